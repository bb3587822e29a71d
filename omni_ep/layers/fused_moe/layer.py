"""FusedMoE: the routed experts of one MoE layer, expert-parallel or tensor-parallel.

    route (fp32 softmax, top-k, renormalise)
      -> dispatch (to the ranks holding each token's experts)
      -> local experts (this rank's experts only)
      -> combine (partial outputs back to the token's rank)

Shape legend: T tokens, E global experts, K top-k, H hidden, I expert intermediate size,
I_tp = I / TP when the experts are tensor-parallel (expert parallel off), else I.

Expert parallel (``enable_expert_parallel``): each EP rank allocates and loads only its
E / EP experts. TP ranks hold the same tokens, so each TP rank dispatches only its own chunk of them
(no duplicates) and writes its chunk into a zero [T, H] output: the output is then TP-partial, like the
tensor-parallel path's, and one TP all-reduce (``maybe_all_reduce_tensor_model_parallel``) completes both.
"""

from __future__ import annotations

import torch
from torch import nn

from omni_ep.distributed import get_ep_group, get_parallel_config, get_tp_group
from omni_ep.distributed.row_chunks import row_chunk
from omni_ep.layers.fused_moe.dispatch import get_dispatcher_cls
from omni_ep.layers.fused_moe.expert_placement import (
    build_expert_map,
    build_expert_owner,
    check_expert_parallel,
    experts_per_rank,
)
from omni_ep.layers.fused_moe.experts import get_local_experts_cls, unsupported_reason
from omni_ep.layers.fused_moe.router import select_experts

SHARD_IDS = ("w1", "w3", "w13", "w2")  # gate, up, fused [up; gate] as HunyuanImage-3.0 stores it, down


class FusedMoE(nn.Module):
    """Routed experts of one layer. The platform registry picks this class or a subclass per device."""

    # Local-expert implementations to try, best first; the first that supports the device and dtype runs.
    preferred_experts_backends: tuple[str, ...] = ("torch",)

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool = True,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
        prefix: str = "",
        experts_backend: str | None = None,
    ):
        super().__init__()
        config = get_parallel_config()
        self.tp_group, self.ep_group = get_tp_group(), get_ep_group()
        tp_size, ep_size = self.tp_group.world_size, self.ep_group.world_size
        check_expert_parallel(num_experts, ep_size, tp_size)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.use_ep = ep_size > 1
        if not self.use_ep and intermediate_size % tp_size != 0:
            raise ValueError(
                f"expert intermediate size {intermediate_size} is not divisible by tensor parallel size {tp_size}; "
                "enable expert parallel or choose a tensor parallel size that divides it"
            )
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.reduce_results, self.prefix = reduce_results, prefix
        self.ep_rank, self.ep_size = self.ep_group.rank, ep_size
        self.tp_rank, self.tp_size = self.tp_group.rank, tp_size

        placement = experts_per_rank(num_experts, ep_size, config.expert_placement)
        self.local_expert_ids: list[int] = placement[self.ep_rank]
        self.local_num_experts = len(self.local_expert_ids)
        # Derived from the placement, rebuilt per device: never a checkpoint entry, survives meta init.
        self._expert_map = build_expert_map(num_experts, self.local_expert_ids)
        self._expert_owner = build_expert_owner(num_experts, placement)

        self.intermediate_size_per_partition = intermediate_size if self.use_ep else intermediate_size // tp_size
        I_tp, dtype = self.intermediate_size_per_partition, params_dtype or torch.get_default_dtype()
        self.w13_weight = nn.Parameter(torch.empty(self.local_num_experts, 2 * I_tp, hidden_size, dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(self.local_num_experts, hidden_size, I_tp, dtype=dtype), requires_grad=False)
        for param in (self.w13_weight, self.w2_weight):
            param.weight_loader = self.weight_loader

        dispatcher_cls = get_dispatcher_cls(config.all2all_backend if self.use_ep else "local")
        self.dispatcher = dispatcher_cls(self.ep_group, self._expert_map, self._expert_owner)
        self._requested_experts_backend = experts_backend
        self._experts = None

    # ---- placement -------------------------------------------------------------------------------------
    @property
    def expert_map(self) -> torch.Tensor:
        """int32 [E]: local index of each global expert on this rank, -1 where it is on another rank."""
        return self._expert_map

    def is_local_expert(self, expert_id: int) -> bool:
        return bool(self._expert_map[expert_id] >= 0)

    @property
    def experts(self):
        """The local-expert implementation, chosen on first use for the weights' device and dtype."""
        if self._experts is None:
            self._experts = self._select_experts_backend(self.w13_weight.device, self.w13_weight.dtype)
        return self._experts

    def set_experts_backend(self, name: str | None) -> None:
        """Pin the local-experts implementation (None: the platform's preference, chosen on next use)."""
        self._requested_experts_backend, self._experts = name, None

    def _select_experts_backend(self, device: torch.device, dtype: torch.dtype):
        names = (self._requested_experts_backend,) if self._requested_experts_backend else self.preferred_experts_backends
        reasons = []
        for name in names:
            reason = unsupported_reason(name, device, dtype)
            if reason is None:
                return get_local_experts_cls(name)()
            reasons.append(reason)
        raise RuntimeError(f"no local-experts backend runs on {device} with {dtype}: {'; '.join(reasons)}")

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H] (or [..., H]), router_logits [T, E] -> routed output [T, H] (same shape as input).

        With reduce_results=False and TP > 1 the result is a TP-partial sum: call
        maybe_all_reduce_tensor_model_parallel after adding other TP-partial terms (the shared MLP).
        """
        shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, self.hidden_size)
        logits_TE = router_logits.reshape(-1, self.num_experts)
        if logits_TE.shape[0] != x_TH.shape[0]:
            raise ValueError(f"router_logits has {logits_TE.shape[0]} rows but hidden_states has {x_TH.shape[0]} tokens")
        topk_weights_TK, topk_ids_TK = select_experts(logits_TE, self.top_k, self.renormalize)

        start, end = (0, x_TH.shape[0])
        if self.use_ep and self.tp_size > 1:
            start, end = row_chunk(x_TH.shape[0], self.tp_rank, self.tp_size)  # TP peers hold the same tokens
        dispatched = self.dispatcher.dispatch(x_TH[start:end], topk_ids_TK[start:end], topk_weights_TK[start:end])
        y_MH = self.experts.apply(
            dispatched.hidden_states, dispatched.topk_ids, dispatched.topk_weights, self.w13_weight, self.w2_weight
        )
        out = self.dispatcher.combine(y_MH, dispatched.metadata)
        if (start, end) != (0, x_TH.shape[0]):
            out = torch.nn.functional.pad(out, (0, 0, start, x_TH.shape[0] - end))
        if self.reduce_results:
            out = self.maybe_all_reduce_tensor_model_parallel(out)
        return out.reshape(shape)

    def maybe_all_reduce_tensor_model_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """Sum TP-partial outputs over the TP group (identity when TP is 1)."""
        return self.tp_group.all_reduce(x)

    # ---- loading ---------------------------------------------------------------------------------------
    @classmethod
    def make_expert_params_mapping(
        cls,
        model: nn.Module | None = None,
        ckpt_gate_proj_name: str = "gate_proj",
        ckpt_down_proj_name: str = "down_proj",
        ckpt_up_proj_name: str = "up_proj",
        num_experts: int = 0,
        num_redundant_experts: int = 0,
    ) -> list[tuple[str, str, int, str]]:
        """[(param_name, weight_name, expert_id, shard_id)] for THIS rank's experts only.

        param_name is "experts.w13_weight" / "experts.w2_weight"; weight_name is the checkpoint fragment
        "experts.{j}.{proj}."; when the gate and up names are equal (HunyuanImage-3.0's
        "gate_and_up_proj", stored [up; gate]) one "w13" entry replaces "w1" and "w3". The local experts
        come from the first FusedMoE inside ``model``, or from the current parallel state.
        """
        if num_redundant_experts:
            raise NotImplementedError("redundant experts (EPLB) are not supported yet; pass num_redundant_experts=0")
        layer = next((m for m in model.modules() if isinstance(m, FusedMoE)), None) if model is not None else None
        if layer is not None:
            local_ids = layer.local_expert_ids
        else:
            config, ep = get_parallel_config(), get_ep_group()
            local_ids = experts_per_rank(num_experts, ep.world_size, config.expert_placement)[ep.rank]
        if ckpt_gate_proj_name == ckpt_up_proj_name:
            shards = [("w13", ckpt_gate_proj_name)]
        else:
            shards = [("w1", ckpt_gate_proj_name), ("w3", ckpt_up_proj_name)]
        mapping = []
        for expert_id in local_ids:
            for shard_id, proj in shards + [("w2", ckpt_down_proj_name)]:
                param = "experts.w2_weight" if shard_id == "w2" else "experts.w13_weight"
                mapping.append((param, f"experts.{expert_id}.{proj}.", expert_id, shard_id))
        return mapping

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, weight_name: str, shard_id: str, expert_id: int
    ) -> bool:
        """Copy one expert's checkpoint tensor into its local slot; False (nothing copied) when not local.

        w1 (gate) / w3 (up): [I, H]; w13: [2I, H] stored [up; gate]; w2 (down): [H, I]. The TP slice of the
        intermediate dimension is taken here when the experts are tensor-parallel.
        """
        if shard_id not in SHARD_IDS:
            raise ValueError(f"{weight_name}: unknown shard_id {shard_id!r}; expected one of {SHARD_IDS}")
        local = int(self._expert_map[expert_id])
        if local < 0:
            return False
        I, I_tp, H = self.intermediate_size, self.intermediate_size_per_partition, self.hidden_size
        rows = slice(self.tp_rank * I_tp, (self.tp_rank + 1) * I_tp) if not self.use_ep else slice(0, I)
        expected = {"w1": (I, H), "w3": (I, H), "w13": (2 * I, H), "w2": (H, I)}[shard_id]
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(
                f"{weight_name}: checkpoint shape {tuple(loaded_weight.shape)} does not match the expected "
                f"{expected} for shard {shard_id} (hidden {H}, intermediate {I})"
            )
        with torch.no_grad():
            if shard_id == "w2":
                param[local].copy_(loaded_weight[:, rows])
            elif shard_id == "w1":
                param[local, :I_tp].copy_(loaded_weight[rows])
            elif shard_id == "w3":
                param[local, I_tp:].copy_(loaded_weight[rows])
            else:  # [up; gate] -> our [gate; up]
                up, gate = loaded_weight.split(I)
                param[local, :I_tp].copy_(gate[rows])
                param[local, I_tp:].copy_(up[rows])
        return True

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, local_num_experts={self.local_num_experts}, top_k={self.top_k}, "
            f"hidden_size={self.hidden_size}, intermediate_size_per_partition={self.intermediate_size_per_partition}, "
            f"ep_rank={self.ep_rank}, ep_size={self.ep_size}, dispatch={self.dispatcher.name}"
        )

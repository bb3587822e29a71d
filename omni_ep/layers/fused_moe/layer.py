"""FusedMoE: the routed experts of one MoE layer, expert-parallel or tensor-parallel, and the shared experts.

    route (fp32 softmax, top-k, renormalise)
      -> dispatch (to the ranks holding each token's experts)
      -> local experts (this rank's experts only)        | shared experts, while tokens are in flight
      -> combine (partial outputs back to the token's rank, summed in fp32)
      -> one TP collective

Shape legend: T tokens, E global experts, K top-k, H hidden, I expert intermediate size,
I_tp = I / TP when the experts are tensor-parallel (expert parallel off), else I.

Expert parallel (``enable_expert_parallel``): each EP rank allocates and loads only its E / EP experts. TP ranks
hold the same tokens, so each TP rank routes, dispatches and runs the shared experts on its own chunk of them (no
duplicates), and one all-gather over TP joins the chunks. Without expert parallel the experts are split over TP
in I: every rank computes a partial sum for all tokens, adds the shared experts of its own chunk, and one
all-reduce over TP completes both.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from omni_ep.distributed import get_ep_group, get_parallel_config, get_tp_group
from omni_ep.distributed.row_chunks import row_chunk
from omni_ep.forward_context import get_forward_context
from omni_ep.layers.fused_moe.dispatch import get_dispatcher_cls
from omni_ep.layers.fused_moe.expert_loads import read_layer_loads
from omni_ep.layers.fused_moe.expert_placement import (
    build_expert_map,
    build_expert_owner,
    check_expert_parallel,
    experts_per_rank,
)
from omni_ep.layers.fused_moe.experts import get_local_experts_cls, unsupported_reason
from omni_ep.layers.fused_moe.fp8 import FP8_DTYPE, check_quantization, quantize_rows
from omni_ep.layers.fused_moe.router import select_experts

logger = logging.getLogger(__name__)
SHARD_IDS = ("w13", "w2")  # fused [up; gate] as HunyuanImage-3.0 stores it, down


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
        prefix: str = "",
        experts_backend: str | None = None,
        quantization: str | None = None,
    ):
        super().__init__()
        check_quantization(quantization)
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
        self.prefix = prefix
        self.ep_rank, self.ep_size = self.ep_group.rank, ep_size
        self.tp_rank, self.tp_size = self.tp_group.rank, tp_size

        loads = read_layer_loads(config.expert_loads, prefix, num_experts) if config.expert_loads else None
        placement = experts_per_rank(num_experts, ep_size, config.expert_placement, loads)
        self.local_expert_ids: list[int] = placement[self.ep_rank]
        self.local_num_experts = len(self.local_expert_ids)
        # Derived from the placement, rebuilt per device: never a checkpoint entry, survives meta init.
        self._expert_map = build_expert_map(num_experts, self.local_expert_ids)
        self._expert_owner = build_expert_owner(num_experts, placement)

        self.intermediate_size_per_partition = intermediate_size if self.use_ep else intermediate_size // tp_size
        I_tp, E_local = self.intermediate_size_per_partition, self.local_num_experts
        self.params_dtype = params_dtype or torch.get_default_dtype()  # the activations' dtype
        self.quantization = quantization
        dtype = FP8_DTYPE if quantization == "fp8" else self.params_dtype
        self.w13_weight = nn.Parameter(torch.empty(E_local, 2 * I_tp, hidden_size, dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(E_local, hidden_size, I_tp, dtype=dtype), requires_grad=False)
        if quantization == "fp8":  # one fp32 scale per weight row (output channel), set by weight_loader
            scales = dict(dtype=torch.float32)
            self.w13_weight_scale = nn.Parameter(torch.ones(E_local, 2 * I_tp, **scales), requires_grad=False)
            self.w2_weight_scale = nn.Parameter(torch.ones(E_local, hidden_size, **scales), requires_grad=False)
        else:
            self.w13_weight_scale = self.w2_weight_scale = None
        for param in (self.w13_weight, self.w2_weight):
            param.weight_loader = self.weight_loader

        dispatcher_cls = get_dispatcher_cls(config.all2all_backend if self.use_ep else "local")
        self.dispatcher = dispatcher_cls(self.ep_group, self._expert_map, self._expert_owner)
        self._requested_experts_backend = experts_backend
        self._experts = None
        self.recorded_loads_E: torch.Tensor | None = None  # int64 [E] while record_expert_loads counts routed rows

    # ---- placement -------------------------------------------------------------------------------------
    @property
    def expert_map(self) -> torch.Tensor:
        """int32 [E]: local index of each global expert on this rank, -1 where it is on another rank."""
        return self._expert_map

    @property
    def experts(self):
        """The local-expert implementation, chosen on first use for the weights' device and the activations'
        dtype (and FP8 weights where quantized)."""
        if self._experts is None:
            self._experts = self._select_experts_backend(self.w13_weight.device, self.params_dtype)
        return self._experts

    def set_params_dtype(self, dtype: torch.dtype) -> None:
        """The activations' dtype becomes dtype: unquantized expert weights are cast to it (FP8 weights and their
        scales stay as they are), and the local-experts implementation is chosen again on next use."""
        if self.quantization is None:
            for param in (self.w13_weight, self.w2_weight):
                param.data = param.data.to(dtype)
        self.params_dtype, self._experts = dtype, None

    def set_experts_backend(self, name: str | None) -> None:
        """Pin the local-experts implementation (None: the platform's preference, chosen on next use)."""
        self._requested_experts_backend, self._experts = name, None

    def _select_experts_backend(self, device: torch.device, dtype: torch.dtype):
        names = (self._requested_experts_backend,) if self._requested_experts_backend else self.preferred_experts_backends
        reasons = []
        for name in names:
            reason = unsupported_reason(name, device, dtype)
            if reason is None and self.quantization == "fp8":
                reason = get_local_experts_cls(name).fp8_unsupported_reason(device)
            if reason is None:
                if reasons:
                    logger.warning("%s: the %s experts run (%s)", self.prefix or "FusedMoE", name, "; ".join(reasons))
                return get_local_experts_cls(name)()
            reasons.append(reason)
        raise RuntimeError(f"no local-experts backend runs on {device} with {dtype}: {'; '.join(reasons)}")

    # ---- forward ---------------------------------------------------------------------------------------
    def routed_rows(self, num_tokens: int) -> tuple[int, int]:
        """The rows [start, end) of a [num_tokens, H] input that this rank routes: its TP chunk under expert
        parallel (TP ranks hold the same tokens and split them), all of them otherwise. A caller may compute the
        router logits of these rows only."""
        return row_chunk(num_tokens, self.tp_rank, self.tp_size) if self.use_ep else (0, num_tokens)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        shared_experts: nn.Module | None = None,
    ) -> torch.Tensor:
        """hidden_states [T, H] (or [..., H]), router_logits [T, E] or only the routed rows' [end - start, E]
        (``routed_rows``) -> [T, H] (the input's shape): the routed experts plus ``shared_experts(hidden_states)``
        when given, complete over the TP group."""
        shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, self.hidden_size)
        logits_TE = router_logits.reshape(-1, self.num_experts)
        T = x_TH.shape[0]
        start, end = self.routed_rows(T)
        if logits_TE.shape[0] == T:
            logits_TE = logits_TE[start:end]
        elif logits_TE.shape[0] != end - start:
            raise ValueError(
                f"router_logits has {logits_TE.shape[0]} rows; want {T} (every token) or {end - start} (the rows "
                "this rank routes, routed_rows)"
            )
        if self.use_ep:
            out_CH = self.forward_routed_rows(x_TH[start:end], logits_TE, shared_experts)
            out_TH = self.tp_group.all_gather_row_chunks(out_CH, T)
        else:
            shared_rows = row_chunk(T, self.tp_rank, self.tp_size)  # this TP rank's share of the shared experts
            x_shared = x_TH[shared_rows[0] : shared_rows[1]]
            out_TH = self._routed(x_TH, logits_TE, x_shared, shared_experts, shared_rows=shared_rows)
            out_TH = self.tp_group.all_reduce(out_TH)
        return out_TH.reshape(shape)

    def forward_routed_rows(
        self, x_CH: torch.Tensor, router_logits_CE: torch.Tensor, shared_experts: nn.Module | None = None
    ) -> torch.Tensor:
        """Expert parallel only: x [C, H], the rows this rank routes (``routed_rows``), and their logits [C, E] ->
        [C, H], the routed experts plus ``shared_experts(x)`` for these rows alone (not joined over TP: for callers
        that keep the hidden states in TP row chunks)."""
        if not self.use_ep:
            raise RuntimeError("forward_routed_rows needs expert parallel: without it every TP rank computes a "
                               "partial sum for all tokens (forward)")
        return self._routed(x_CH, router_logits_CE.reshape(-1, self.num_experts), x_CH, shared_experts)

    def _token_bound(self) -> int | None:
        """The most tokens any EP rank dispatches in this forward, from the forward context (None: unknown)."""
        max_tokens = get_forward_context().max_tokens_across_ep
        if max_tokens is None or not self.use_ep:
            return max_tokens
        return -(-max_tokens // self.tp_size)  # TP ranks dispatch chunks of at most ceil(T / TP) tokens

    def _routed(self, x_TH, logits_TE, x_shared_CH, shared_experts, shared_rows=None) -> torch.Tensor:
        """Route, dispatch, local experts, combine; the shared experts' output on x_shared [C, H] is added to
        rows ``shared_rows`` of the result (all of them when None). The shared experts run while the dispatch is
        in flight."""
        topk_weights_TK, topk_ids_TK = select_experts(logits_TE, self.top_k, self.renormalize)
        if self.recorded_loads_E is not None:
            ids = topk_ids_TK.reshape(-1).long()
            self.recorded_loads_E.scatter_add_(0, ids, torch.ones_like(ids))
        pending = self.dispatcher.dispatch_async(x_TH, topk_ids_TK, topk_weights_TK, self._token_bound())
        shared_CH = shared_experts(x_shared_CH) if shared_experts is not None else None
        dispatched = pending.wait()
        y_MH = self.experts.apply(
            dispatched.hidden_states, dispatched.topk_ids, dispatched.topk_weights, self.w13_weight, self.w2_weight,
            self.w13_weight_scale, self.w2_weight_scale,
        )
        out_TH = self.dispatcher.combine(y_MH, dispatched.metadata)
        if shared_CH is not None:
            start, end = shared_rows or (0, out_TH.shape[0])
            out_TH[start:end] += shared_CH
        return out_TH

    # ---- loading ---------------------------------------------------------------------------------------
    @classmethod
    def make_expert_params_mapping(
        cls,
        model: nn.Module,
        ckpt_gate_proj_name: str,
        ckpt_down_proj_name: str,
        ckpt_up_proj_name: str,
        num_experts: int,
        num_redundant_experts: int = 0,
    ) -> list[tuple[str, str, int, str]]:
        """[(param_name, weight_name, expert_id, shard_id)] for the experts THIS rank holds in the FusedMoE layers
        of ``model``, and only those: the loader reads nothing else from disk. Every layer of ``model`` must hold
        the same experts (under placement balanced each layer has its own: pass one block at a time).

        weight_name is the checkpoint fragment "experts.{j}.{proj}." and param_name the fragment that replaces it
        to name the parameter ("experts.w13_" / "experts.w2_"): "mlp.experts.5.gate_and_up_proj.weight" ->
        "mlp.experts.w13_weight". The gate and up projections must be one fused tensor (HunyuanImage-3.0's
        "gate_and_up_proj", stored [up; gate]): shard "w13"; the down projection is shard "w2".
        """
        if num_redundant_experts:
            raise NotImplementedError("redundant experts (EPLB) are not supported yet; pass num_redundant_experts=0")
        if ckpt_gate_proj_name != ckpt_up_proj_name:
            raise NotImplementedError(
                f"separate gate ({ckpt_gate_proj_name!r}) and up ({ckpt_up_proj_name!r}) checkpoint tensors are not "
                "supported; FusedMoE loads one fused [up; gate] tensor per expert"
            )
        layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
        if not layers:
            raise ValueError(f"{type(model).__name__} holds no FusedMoE layer")
        layer = layers[0]
        if any(other.local_expert_ids != layer.local_expert_ids for other in layers):
            raise ValueError(f"the FusedMoE layers of {type(model).__name__} hold different experts on this rank "
                             "(placement balanced): pass one MoE block at a time")
        if layer.num_experts != num_experts:
            raise ValueError(f"num_experts={num_experts} but the layer has {layer.num_experts} experts")
        return [
            (param, f"experts.{expert_id}.{proj}.", expert_id, shard_id)
            for expert_id in layer.local_expert_ids
            for param, proj, shard_id in (("experts.w13_", ckpt_gate_proj_name, "w13"),
                                          ("experts.w2_", ckpt_down_proj_name, "w2"))
        ]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, weight_name: str, shard_id: str, expert_id: int
    ) -> bool:
        """Copy one expert's checkpoint tensor into its local slot; False (nothing copied) when not local.

        w13: [2I, H] stored [up; gate], kept as [gate; up]; w2 (down): [H, I]. The TP slice of the intermediate
        dimension is taken here when the experts are tensor-parallel. Quantization "fp8": the slot gets the
        e4m3fn rows of this rank's slice and their scales (fp8.quantize_rows).
        """
        if shard_id not in SHARD_IDS:
            raise ValueError(f"{weight_name}: unknown shard_id {shard_id!r}; expected one of {SHARD_IDS}")
        local = int(self._expert_map[expert_id])
        if local < 0:
            return False
        I, I_tp, H = self.intermediate_size, self.intermediate_size_per_partition, self.hidden_size
        rows = slice(self.tp_rank * I_tp, (self.tp_rank + 1) * I_tp) if not self.use_ep else slice(0, I)
        expected = {"w13": (2 * I, H), "w2": (H, I)}[shard_id]
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(
                f"{weight_name}: checkpoint shape {tuple(loaded_weight.shape)} does not match the expected "
                f"{expected} for shard {shard_id} (hidden {H}, intermediate {I})"
            )
        with torch.no_grad():
            if self.quantization == "fp8":
                if shard_id == "w2":
                    weight = loaded_weight[:, rows]
                else:
                    up, gate = loaded_weight.split(I)
                    weight = torch.cat([gate[rows], up[rows]])
                weight, scale = quantize_rows(weight.to(param.device))
                (self.w2_weight_scale if shard_id == "w2" else self.w13_weight_scale)[local].copy_(scale)
                param[local].copy_(weight)
            elif shard_id == "w2":
                param[local].copy_(loaded_weight[:, rows])
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
            + (f", quantization={self.quantization}" if self.quantization else "")
        )

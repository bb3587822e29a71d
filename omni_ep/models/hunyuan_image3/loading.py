"""Loading HunyuanImage-3.0 from its released folder, each rank reading only what it holds.

    config.json, model.safetensors.index.json, model-000NN-of-000MM.safetensors

The model is built with its parameters on the meta device, then materialised on the target device and
filled tensor by tensor from the shards (``safe_open`` + ``get_slice``): this rank's experts only (other
experts' bytes are never read), this rank's TP slices, the replicated rest. ``vision_model.*``,
``vision_aligner.*``, ``vae.*``, ``lm_head.*`` and ``model.ln_f.*`` are skipped.

Every shard header is parsed first, so a missing index, a truncated shard, a missing or extra tensor, or
a shape that does not match fails before any weight is copied, naming the file and the tensor.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from torch import nn

from omni_ep.config import ParallelConfig
from omni_ep.distributed import get_parallel_config, get_parallel_state, init_parallel_state, is_parallel_state_initialized
from omni_ep.layers.fused_moe import FusedMoE
from omni_ep.models.hunyuan_image3.configuration import HunyuanImage3Config
from omni_ep.models.hunyuan_image3.transformer import SKIPPED_PREFIXES, HunyuanImage3Transformer2DModel
from omni_ep.models.hunyuan_image3.vae import HunyuanVAEDecoder

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
LOAD_FORMATS = ("safetensors", "dummy")
# safetensors dtype codes -> torch dtypes (the ones a HunyuanImage-3.0 checkpoint can hold)
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
EXPERT_NAME = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_and_up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """The checkpoint folder does not hold what the model needs; the message names file and tensor."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its shard, dtype, shape, and byte range inside the shard's data block."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class LoadStats:
    """What one rank read from disk (bytes of tensor data, as stored)."""

    bytes_read: int = 0
    expert_bytes_read: int = 0
    tensors_read: int = 0
    names_read: list[str] = field(default_factory=list)
    bytes_by_dtype: dict[torch.dtype, int] = field(default_factory=dict)

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The dtype that holds most of the bytes read (the checkpoint's own dtype), None when nothing was read."""
        return max(self.bytes_by_dtype, key=self.bytes_by_dtype.get, default=None)


def read_safetensors_header(path: str) -> dict:
    """The JSON header of one shard; raises CheckpointError when the file is truncated or not safetensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from None
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        last = max(header, key=lambda n: header[n]["data_offsets"][1])
        raise CheckpointError(
            f"{path}: truncated shard: its header needs {8 + header_len + data_end} bytes but the file has {size} "
            f"(tensor {last!r} and possibly others are cut off); download the shard again"
        )
    return header


class SafetensorsCheckpoint:
    """The shards of one checkpoint folder, read by tensor name; counts the bytes it reads.

    ``read(name, slices)`` reads only the given slice of a tensor (``get_slice``), so TP slices and
    experts of other ranks cost no reads. With ``dry_run`` nothing past the headers is read: ``read`` returns a
    meta tensor of the slice's shape and counts the bytes it would have read.
    """

    def __init__(self, path: str | os.PathLike, dry_run: bool = False):
        self.path = os.fspath(path)
        self.dry_run = dry_run
        index_path = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index_path):
            self.index_path = index_path
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index (needs a 'weight_map'): {e}") from None
        elif os.path.isfile(os.path.join(self.path, SINGLE_FILE_NAME)):
            self.index_path = os.path.join(self.path, SINGLE_FILE_NAME)
            weight_map = None
        else:
            raise CheckpointError(
                f"no {INDEX_NAME} (or single {SINGLE_FILE_NAME}) in {self.path}: point to a HunyuanImage-3.0 "
                "checkpoint folder"
            )
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE_NAME]
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            file_path = os.path.join(self.path, file)
            if not os.path.isfile(file_path):
                raise CheckpointError(f"{self.index_path} lists shard {file} but {file_path} does not exist")
            for name, meta in read_safetensors_header(file_path).items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # the index is authoritative about which shard holds a name
                if meta["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file_path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
                begin, end = meta["data_offsets"]
                self.entries[name] = TensorEntry(file, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]), end - begin)
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self.entries]
            if missing:
                raise CheckpointError(
                    f"{self.index_path} puts tensor {missing[0]!r} in {weight_map[missing[0]]} but that shard does "
                    f"not contain it ({len(missing)} such tensors)"
                )
        self.stats = LoadStats()
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint {self.index_path}") from None

    def read(self, name: str, slices: tuple[slice, ...] | None = None, is_expert: bool = False) -> torch.Tensor:
        """The tensor ``name`` (or ``tensor[slices]``), on CPU in its stored dtype; counted in ``stats``."""
        entry = self.entry(name)
        if self.dry_run:
            tensor = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
            return self._count(name, tensor if slices is None else tensor[slices], is_expert)
        if entry.file not in self._handles:
            self._handles[entry.file] = safe_open(os.path.join(self.path, entry.file), framework="pt", device="cpu")
        handle = self._handles[entry.file]
        if slices is None or all(s == slice(None) for s in slices):
            tensor = handle.get_tensor(name)
        else:
            tensor = handle.get_slice(name)[slices]
        return self._count(name, tensor, is_expert)

    def _count(self, name: str, tensor: torch.Tensor, is_expert: bool) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        self.stats.bytes_read += nbytes
        self.stats.expert_bytes_read += nbytes if is_expert else 0
        self.stats.bytes_by_dtype[tensor.dtype] = self.stats.bytes_by_dtype.get(tensor.dtype, 0) + nbytes
        self.stats.tensors_read += 1
        self.stats.names_read.append(name)
        return tensor

    def close(self) -> None:
        self._handles.clear()


# ---- build on meta, materialise per rank ------------------------------------------------------------------
@contextlib.contextmanager
def parameters_on_meta():
    """Inside, every nn.Parameter a module registers is moved to the meta device (no memory, no init cost).

    Buffers and plain tensors (the expert map) stay real, unlike under ``torch.device("meta")``.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            attrs = dict(param.__dict__)
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            param.__dict__.update(attrs)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize_parameters(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter uninitialised storage on ``device``, keeping the Parameter objects and their
    attributes; move buffers there too."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if param.device.type == "meta":
                real = torch.empty(param.shape, dtype=param.dtype, device=device)
            elif param.device != device:
                real = param.detach().to(device)
            else:
                continue
            # Swap contents in place: the Parameter object stays the same, so closures and attributes
            # that refer to it (weight_loader, checkpoint_slice) keep working.
            attrs = dict(param.__dict__)
            torch.utils.swap_tensors(param, nn.Parameter(real, requires_grad=False))
            param.__dict__.update(attrs)
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)


def _is_expert_param(name: str) -> bool:
    """The routed experts' weights (and their FP8 scales), filled through make_expert_params_mapping."""
    return name.endswith((".experts.w13_weight", ".experts.w2_weight", ".experts.w13_weight_scale",
                          ".experts.w2_weight_scale"))


def load_weights(model: HunyuanImage3Transformer2DModel, checkpoint: SafetensorsCheckpoint) -> LoadStats:
    """Fill ``model``'s materialised parameters from ``checkpoint``; returns what this rank read.

    All names and shapes are checked against the shard headers before anything is read.
    """
    config = model.config
    params = dict(model.named_parameters())
    plain = {n: p for n, p in params.items() if not _is_expert_param(n)}
    expected_experts = {
        f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"
        for i in range(config.num_hidden_layers)
        for j in range(config.num_experts)
        for proj in ("gate_and_up_proj", "down_proj")
    }

    # 1. Names: the Instruct-Distil embedders iff config.json flags them, every parameter present, nothing unknown.
    _check_flagged_embedders(config, checkpoint)
    missing = sorted(n for n in plain if n not in checkpoint)
    missing += sorted(n for n in expected_experts if n not in checkpoint)
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensors the model needs are missing from {checkpoint.index_path}, e.g. "
            f"{', '.join(repr(n) for n in missing[:5])}; is this a HunyuanImage-3.0 checkpoint with this config.json?"
        )
    extra = sorted(
        n
        for n in checkpoint.names()
        if n not in plain and n not in expected_experts and not n.startswith(SKIPPED_PREFIXES)
    )
    if extra:
        files = sorted({checkpoint.entry(n).file for n in extra})
        raise CheckpointError(
            f"{len(extra)} tensors in {', '.join(files)} match no parameter of the model, e.g. "
            f"{', '.join(repr(n) for n in extra[:5])}; the checkpoint and config.json disagree"
        )

    # 2. Shapes of the full tensors, from the headers.
    for name, param in plain.items():
        full = _full_shape(model, name, param)
        found = checkpoint.entry(name).shape
        if found != full:
            raise CheckpointError(
                f"{checkpoint.entry(name).file}: tensor {name!r} has shape {found}, the model expects {full}"
            )
    for name in expected_experts:
        layer = int(name.split(".")[2])
        H, I = config.hidden_size, config.moe_intermediate_size_at(layer)
        full = (2 * I, H) if name.endswith("gate_and_up_proj.weight") else (H, I)
        found = checkpoint.entry(name).shape
        if found != full:
            raise CheckpointError(
                f"{checkpoint.entry(name).file}: expert tensor {name!r} has shape {found}, the model expects {full}"
            )

    # 3. Read and copy: TP slices, local experts only.
    with torch.no_grad():
        for name, param in plain.items():
            slicer = getattr(param, "checkpoint_slice", None)
            slices = slicer(checkpoint.entry(name).shape) if slicer is not None else None
            tensor = checkpoint.read(name, slices)
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor)
            else:
                param.copy_(tensor)
        for block_name, block in model.named_modules():
            if not isinstance(getattr(block, "experts", None), FusedMoE):
                continue
            mapping = FusedMoE.make_expert_params_mapping(
                block, ckpt_gate_proj_name="gate_and_up_proj", ckpt_down_proj_name="down_proj",
                ckpt_up_proj_name="gate_and_up_proj", num_experts=config.num_experts,
            )
            for param_name, weight_name, expert_id, shard_id in mapping:  # this rank's experts only
                ckpt_name = f"{block_name}.{weight_name}weight"
                param = params[ckpt_name.replace(weight_name, param_name)]
                if not param.weight_loader(param, checkpoint.read(ckpt_name, is_expert=True), ckpt_name,
                                           shard_id=shard_id, expert_id=expert_id):
                    raise RuntimeError(f"{ckpt_name}: expert {expert_id} is not held by this rank's {block_name}")
    return checkpoint.stats


# config.json flag -> the embedder it builds (Instruct-Distil): the flags are the contract with the weights.
FLAGGED_EMBEDDERS = {"cfg_distilled": "guidance_emb", "use_meanflow": "timestep_r_emb"}


def _check_flagged_embedders(config: HunyuanImage3Config, checkpoint) -> None:
    for flag, module in FLAGGED_EMBEDDERS.items():
        stored = any(n.startswith(f"{module}.") for n in checkpoint.names())
        if stored and not getattr(config, flag):
            raise CheckpointError(
                f"{checkpoint.index_path} holds {module}.* but config.json has {flag}={getattr(config, flag)}: "
                f"an Instruct-Distil checkpoint needs {flag}=true in its config.json"
            )
        if getattr(config, flag) and not stored:
            raise CheckpointError(
                f"config.json has {flag}=true but {checkpoint.index_path} holds no {module}.* tensors: is this the "
                f"Instruct-Distil checkpoint? (Instruct and the base model have {flag} false or absent)"
            )


def _full_shape(model: nn.Module, name: str, param: nn.Parameter) -> tuple[int, ...]:
    """The checkpoint shape of ``name``: the parameter's own, or its TP-unsplit shape."""
    module = model.get_submodule(name.rpartition(".")[0])
    if hasattr(module, "tp_dim") and module.tp_dim is not None and param.dim() == 2:
        return (module.output_size, module.input_size)
    if hasattr(module, "tp_dim") and module.tp_dim == 0 and param.dim() == 1:
        return (module.output_size,)
    return tuple(param.shape)


class DummyCheckpoint:
    """Random weights under the real names and shapes, read like a SafetensorsCheckpoint (through the same
    loaders, so each rank draws only its own slices and experts) but from no file: norms 1, biases 0, the rest
    N(0, 0.02) (variance-preserving enough for bf16 benchmarks of the full-size model).

    Tensor ``name`` is drawn, in fp32 on ``device``, from a generator seeded by (seed, name) alone: every layout
    holds the same model, so full-size runs can be compared across layouts. Reads count nothing in ``stats``
    (no byte comes from disk).
    """

    def __init__(self, config: HunyuanImage3Config, device: torch.device, seed: int = 0):
        from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import transformer_shapes

        self.index_path = "dummy weights"
        self.device, self.seed = torch.device(device), seed
        self.entries = {
            name: TensorEntry("dummy", torch.float32, shape, 4 * math.prod(shape))
            for name, shape in transformer_shapes(config).items()
            if not name.startswith(SKIPPED_PREFIXES)
        }
        self.stats = LoadStats()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> TensorEntry:
        return self.entries[name]

    def read(self, name: str, slices: tuple[slice, ...] | None = None, is_expert: bool = False) -> torch.Tensor:
        from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import is_norm_weight, tensor_seed

        shape = self.entries[name].shape
        if is_norm_weight(name, shape):
            tensor = torch.ones(shape, device=self.device)
        elif name.endswith("bias"):
            tensor = torch.zeros(shape, device=self.device)
        else:
            generator = torch.Generator(device=self.device).manual_seed(tensor_seed(name, self.seed))
            tensor = torch.empty(shape, device=self.device).normal_(0.0, 0.02, generator=generator)
        return tensor if slices is None else tensor[slices]

    def close(self) -> None:
        pass


# ---- entry points -----------------------------------------------------------------------------------------
def check_supported_layout(config: ParallelConfig | None = None) -> None:
    """Raise NotImplementedError for the layouts this model cannot run yet (default: the current state's)."""
    config = config or get_parallel_config()
    if config.pipeline_parallel_size > 1:
        raise NotImplementedError(
            f"HunyuanImage-3.0 with pipeline parallel ({config.pipeline_parallel_size}) > 1 is not supported yet; "
            "use TP, SP (ulysses x ring), CFG, DP and expert parallel"
        )


def load_transformer(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    load_format: str = "safetensors",
    seed: int = 0,
    quantization: str | None = None,
) -> HunyuanImage3Transformer2DModel:
    """Build and load this rank's part of the transformer.

    path: the checkpoint folder (``config.json`` plus the shards; only ``config.json`` with "dummy").
    dtype: parameter dtype (the router stays fp32). device: default the parallel state's device.
    load_format: "safetensors", or "dummy" for random weights of the real shapes (no weight file read).
    quantization: None, or "fp8": the routed experts quantized to FP8 as they load (not exact; fp8.py).
    The parallel state must be initialised on every rank first (a single process gets the default).
    ``model.load_stats`` tells what was read.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    if not is_parallel_state_initialized():
        init_parallel_state(ParallelConfig())
    check_supported_layout()
    device = torch.device(device) if device is not None else get_parallel_state().device
    config = HunyuanImage3Config.from_pretrained(path)
    checkpoint = SafetensorsCheckpoint(path) if load_format == "safetensors" else DummyCheckpoint(config, device, seed)

    with parameters_on_meta():
        model = HunyuanImage3Transformer2DModel(config, params_dtype=dtype, quantization=quantization)
    materialize_parameters(model, device)
    try:
        model.load_stats = load_weights(model, checkpoint)
    finally:
        checkpoint.close()
    # Each MoE layer's experts are chosen now: a device or dtype (or FP8) that none takes fails here, on every rank,
    # before any collective.
    for module in model.modules():
        if isinstance(module, FusedMoE):
            module.experts  # noqa: B018 (the property chooses them)
    if device.type == "cuda":
        model.adapters_channels_last()
    return model.eval()


def plan_load(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16) -> LoadStats:
    """What this rank would read to load the transformer and the VAE decoder, without reading it: the model is
    built on the meta device and filled through the same loaders from the shard headers alone."""
    check_supported_layout()
    config = HunyuanImage3Config.from_pretrained(path)
    checkpoint = SafetensorsCheckpoint(path, dry_run=True)
    with parameters_on_meta():
        model = HunyuanImage3Transformer2DModel(config, params_dtype=dtype)
    load_weights(model, checkpoint)
    for name in checkpoint.names():
        if name.startswith("vae.decoder."):  # every rank reads the whole decoder (load_vae_decoder)
            checkpoint.read(name)
    return checkpoint.stats


def load_vae_decoder(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    load_format: str = "safetensors",
    seed: int = 0,
) -> HunyuanVAEDecoder:
    """The VAE decoder from the ``vae.decoder.*`` tensors of the checkpoint (strict on names and shapes).

    load_format "dummy": random weights drawn on ``device`` per tensor name as the tiny checkpoint draws them
    (``tiny_tensor``: a function of (seed, name); on the CPU the checkpoint's very values), nothing read; every
    process holds the same decoder, so images of runs with dummy weights can be compared (torch's default init
    would draw from each process's RNG state)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    config = HunyuanImage3Config.from_pretrained(path)
    if load_format == "dummy":
        from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import tiny_tensor

        with torch.device("meta"):  # no default init: every value is drawn below
            decoder = HunyuanVAEDecoder.from_vae_config(config.vae.to_dict())
        decoder = decoder.to_empty(device=device)
        with torch.no_grad():
            for key, value in decoder.state_dict().items():
                value.copy_(tiny_tensor(f"vae.decoder.{key}", tuple(value.shape), seed, device=device))
        decoder.load_stats = LoadStats()
        return decoder.to(dtype=dtype).eval()
    decoder = HunyuanVAEDecoder.from_vae_config(config.vae.to_dict())
    checkpoint = SafetensorsCheckpoint(path)
    prefix = "vae.decoder."
    state = decoder.state_dict()
    names = {n for n in checkpoint.names() if n.startswith(prefix)}
    missing = sorted(prefix + n for n in state if prefix + n not in names)
    extra = sorted(n for n in names if n[len(prefix):] not in state)
    if missing or extra:
        raise CheckpointError(
            f"{checkpoint.index_path}: the VAE decoder tensors do not match config.json's vae block: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    loaded = {}
    for key, value in state.items():
        entry = checkpoint.entry(prefix + key)
        if entry.shape != tuple(value.shape):
            raise CheckpointError(
                f"{entry.file}: tensor {prefix + key!r} has shape {entry.shape}, the VAE decoder expects {tuple(value.shape)}"
            )
        loaded[key] = checkpoint.read(prefix + key)
    checkpoint.close()
    decoder.load_state_dict(loaded)
    decoder.load_stats = checkpoint.stats
    return decoder.to(device=device, dtype=dtype).eval()

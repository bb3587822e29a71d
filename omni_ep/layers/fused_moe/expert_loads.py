"""Expert loads: the rows the router sent to each expert of each MoE layer over some generations, recorded on the
device and written as JSON, for placement "balanced" (expert_placement.py) to split the experts by.

    with record_expert_loads(pipe.transformer) as loads:
        pipe(prompt)
    if rank == 0:
        write_expert_loads("loads.json", loads, prompt=prompt)

The file: {"format": FORMAT, "num_experts": E, "meta": {what was generated}, "layers": {FusedMoE prefix: [rows of
expert 0, ..., E-1]}}. The rows are those the experts computed: padding rows (a sequence-parallel share, a DP
rank's repeated prompt) count too.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from omni_ep.distributed import get_world_group

FORMAT = "omni_ep expert loads v1"


@contextmanager
def record_expert_loads(model: nn.Module) -> Iterator[dict[str, list[int]]]:
    """Count every FusedMoE layer's routed rows while the block runs; at its end the yielded dict holds
    {layer prefix: rows per expert [E]}, summed over all ranks (a collective: every rank enters and leaves the
    block). Without expert parallel TP peers route the same tokens, so their sum is divided by TP. Counting is an
    on-device scatter-add per layer: no host sync inside a step."""
    from omni_ep.layers.fused_moe.layer import FusedMoE

    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no FusedMoE layer to record")
    loads: dict[str, list[int]] = {}
    for layer in layers:
        layer.recorded_loads_E = torch.zeros(layer.num_experts, dtype=torch.int64, device=layer.w13_weight.device)
    try:
        yield loads
        counts_LE = get_world_group().all_reduce(torch.stack([layer.recorded_loads_E for layer in layers]))
        duplicates = 1 if layers[0].use_ep else layers[0].tp_size
        for layer, counts_E in zip(layers, (counts_LE // duplicates).tolist()):
            loads[layer.prefix] = counts_E
    finally:
        for layer in layers:
            layer.recorded_loads_E = None


def write_expert_loads(path: str | os.PathLike, loads: dict[str, list[int]], **meta) -> None:
    """Write {layer prefix: rows per expert} (and ``meta``: what was generated) as the expert-loads JSON."""
    num_experts = {len(counts) for counts in loads.values()}
    if len(num_experts) != 1:
        raise ValueError(f"every layer needs the same number of experts, got {sorted(num_experts)}")
    with open(path, "w") as f:
        json.dump(dict(format=FORMAT, num_experts=num_experts.pop(), meta=meta, layers=loads), f, indent=1)


def read_expert_loads(path: str | os.PathLike) -> dict[str, list[int]]:
    """{layer prefix: rows per expert} of an expert-loads file; a ValueError that names the file and what is wrong
    otherwise. Parsed once per file version: every MoE layer of a model reads the same one."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read the expert loads {str(path)!r}: {e}") from None
    return _parse_expert_loads(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _parse_expert_loads(path: str, mtime_ns: int, size: int) -> dict[str, list[int]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the expert loads {path!r}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), dict):
        raise ValueError(f"{path!r} is not an expert-loads file ({FORMAT!r}; write one with --record-expert-loads)")
    sizes = set()
    for prefix, counts in data["layers"].items():
        if not isinstance(counts, list) or not all(type(c) is int and c >= 0 for c in counts):
            raise ValueError(f"{path!r}: layer {prefix!r} needs a list of non-negative integer loads")
        sizes.add(len(counts))
    if len(sizes) > 1:
        raise ValueError(f"{path!r}: the layers hold different numbers of experts {sorted(sizes)}")
    return data["layers"]


def read_layer_loads(path: str | os.PathLike, prefix: str, num_experts: int) -> list[int]:
    """The rows per expert [E] recorded for the FusedMoE layer ``prefix``; a ValueError that names the file and
    what is wrong otherwise (every rank reads the file, so every rank raises, before any collective)."""
    counts = read_expert_loads(path).get(prefix)
    if counts is None:
        raise ValueError(f"{str(path)!r} has no loads for layer {prefix!r}: it was recorded for another model "
                         "(or fewer layers); record it again with this model")
    if len(counts) != num_experts:
        raise ValueError(f"{str(path)!r}: layer {prefix!r} needs {num_experts} loads (one per expert), got "
                         f"{len(counts)}")
    return list(counts)

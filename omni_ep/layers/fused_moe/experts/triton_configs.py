"""Tile configurations of the Triton expert GEMMs: tuned JSON files, picked by device, experts and tokens.

A file `configs/E{E}_N{I}_{device name}.json` (e.g. E64_N3072_NVIDIA_H100_80GB_HBM3.json) maps a token count
M (as a string) to
    {"BLOCK_M": int, "gate_up": {BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, ONE_DOT, PROGRAMS_PER_SM,
                                 TMA, SORTED_X, WARP_SPECIALIZE, HALF_TILES, GLUON]},
     "down": {the same keys but ONE_DOT and SORTED_X, and SORTED_Y}}
(GLUON: the GEMM's Gluon kernel on Hopper, gate_up_swiglu_gluon.py / down_unpermute_gluon.py; the other flags:
the kernels' docstrings)
(keys starting with "_" are notes: device, versions, command).
`benchmarks/tune_moe.py` writes these files. Lookup: the file of this device (else one of the same GPU family,
e.g. an H100 file on an H200), for E local experts (else the nearest E with the same I), then the entry with
the nearest token count. With no file, a default that is correct everywhere and reasonable on Hopper.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
_NAME = re.compile(r"^E(\d+)_N(\d+)_(.+)\.json$")


def device_file_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' (the form used in file names)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


def device_family(device_name: str) -> str:
    """The GPU generation letter of a file-name device: 'NVIDIA_H200' -> 'H', 'NVIDIA_A100_SXM4_80GB' -> 'A'."""
    parts = device_file_name(device_name).split("_")
    model = parts[1] if parts[0].upper() == "NVIDIA" and len(parts) > 1 else parts[0]
    return model[:1].upper()


def config_file_name(num_experts: int, intermediate_size: int, device_name: str) -> str:
    return f"E{num_experts}_N{intermediate_size}_{device_file_name(device_name)}.json"


def default_config(num_tokens: int) -> dict:
    """Untuned fallback: small row blocks for few tokens, large tiles otherwise."""
    if num_tokens <= 256:
        tile = {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
        return {"BLOCK_M": 16 if num_tokens <= 32 else 64, "gate_up": tile, "down": dict(tile)}
    return {
        "BLOCK_M": 128,
        "gate_up": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
        "down": {"BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    }


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> dict[int, dict]:
    with open(path) as f:
        table = json.load(f)
    return {int(m): cfg for m, cfg in table.items() if not m.startswith("_")}


def _pick_file(num_experts: int, intermediate_size: int, device_name: str, config_dir: Path) -> Path | None:
    exact = config_dir / config_file_name(num_experts, intermediate_size, device_name)
    if exact.exists():
        return exact
    want_device = device_file_name(device_name)
    candidates = []
    for path in config_dir.glob("E*_N*_*.json"):
        found = _NAME.match(path.name)
        if found is None or int(found[2]) != intermediate_size:
            continue
        e, dev = int(found[1]), found[3]
        if dev != want_device and device_family(dev) != device_family(want_device):
            continue
        # Prefer this exact device, then the nearest expert count, then a stable name order.
        candidates.append((dev != want_device, abs(e - num_experts), path.name, path))
    return min(candidates)[3] if candidates else None


def moe_config(
    num_experts: int, intermediate_size: int, num_tokens: int, device_name: str, config_dir: Path | None = None
) -> dict:
    """The tile configuration for E local experts of width I on `device_name`, at M tokens on this rank."""
    path = _pick_file(num_experts, intermediate_size, device_name, config_dir or CONFIG_DIR)
    if path is None:
        return default_config(num_tokens)
    table = _load(path)
    nearest = min(table, key=lambda m: (abs(m - num_tokens), m))
    return table[nearest]

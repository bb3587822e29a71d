"""Tile configurations of the Triton expert GEMMs: a typed config, and the tuned JSON files it is read from.

A file `configs/E{E}_N{I}_{device name}.json` (e.g. E64_N3072_NVIDIA_H200.json) maps a token count M (as a
string) to a MoEConfig written out by `to_dict`:
    {"block_m": 128,
     "gate_up": {"kernel": "gluon", "block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 3},
     "down":    {"kernel": "gluon", "block_n": 256, ...}}
plus at most one "_meta" entry (device, what wrote the file). `from_dict` rejects any other key, so a misspelt
key is an error, not a feature silently left at its default. `benchmarks/tune_moe.py` writes these files.

Lookup: the file of this device (else one of the same GPU family, e.g. an H100 file on an H200), for E local
experts (else the nearest E with the same I), then the entry with the nearest token count. With no file, a
default that is correct everywhere and reasonable on Hopper.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
_NAME = re.compile(r"^E(\d+)_N(\d+)_(.+)\.json$")

# The kernels of each GEMM (triton_kernels/): "pointer" loads every operand tile by pointer (any GPU, any tile,
# the interpreter); "tma" reads the weights (gate_up) or both operands (down) by the copy engine through tensor
# descriptors (compute capability 9+); "gluon" is the Hopper kernel in Gluon with an explicit TMA + mbarrier
# ring. Where a kernel cannot run the tensors or tiles at hand, the GEMM runs the next one down this list.
KERNELS = ("gluon", "tma", "pointer")


def _check_int(where: str, value, low: int, power_of_two: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {value!r} is not an integer")
    if value < low:
        raise ValueError(f"{where}: {value} is below {low}")
    if power_of_two and value & (value - 1):
        raise ValueError(f"{where}: {value} is not a power of two")


def _fields_from(cls, data, where: str) -> dict:
    """data's keys checked against cls's fields: unknown and missing keys are errors naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: want an object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    for key in data:
        if key not in names:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
    for key in sorted(required - set(data)):
        raise ValueError(f"{where}: missing key {key!r}")
    return dict(data)


@dataclass(frozen=True)
class GemmConfig:
    """The tiles and kernel of one expert GEMM.

    kernel           one of KERNELS
    block_n, block_k the output tile's columns and the K step (powers of two, at least 16: the MMA's minimum)
    group_m          row blocks walked down a column of tiles before moving right (L2 reuse of weight tiles)
    num_warps        warps of a program
    num_stages       shared-memory stages of the operand pipeline
    programs_per_sm  persistent programs per SM; 0: one program per tile of the worst case (a plain grid)
    """

    kernel: str
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 1

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel: unknown kernel {self.kernel!r} (known: {', '.join(KERNELS)})")
        _check_int("block_n", self.block_n, 16, power_of_two=True)
        _check_int("block_k", self.block_k, 16, power_of_two=True)
        _check_int("group_m", self.group_m, 1)
        _check_int("num_warps", self.num_warps, 1, power_of_two=True)
        _check_int("num_stages", self.num_stages, 1)
        _check_int("programs_per_sm", self.programs_per_sm, 0)
        if self.kernel == "gluon" and self.num_warps % 4:
            raise ValueError(f"num_warps: the gluon kernel runs whole warpgroups (4 warps), not {self.num_warps}")
        if self.kernel == "gluon" and self.num_stages < 2:
            raise ValueError(f"num_stages: the gluon kernel's ring needs at least 2 stages, not {self.num_stages}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "gemm") -> GemmConfig:
        """A config from a JSON object; errors name the key as `where.key`."""
        fields = _fields_from(cls, data, where)
        try:
            return cls(**fields)
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MoEConfig:
    """block_m: the row block of the expert-sorted layout (each expert's rows padded to a multiple of it),
    shared by both GEMMs; gate_up and down: each GEMM's kernel and tiles."""

    block_m: int
    gate_up: GemmConfig
    down: GemmConfig

    def __post_init__(self):
        _check_int("block_m", self.block_m, 16, power_of_two=True)
        for gemm, config, mma_cols in (("gate_up", self.gate_up, 2 * self.gate_up.block_n),
                                       ("down", self.down, self.down.block_n)):
            if config.kernel != "gluon":
                continue
            # wgmma: each warp of the warpgroups owns 16 rows of the tile; one instruction is at most 256 wide
            # (gate_up's holds the gate and the up columns).
            if self.block_m != 16 * config.num_warps:
                raise ValueError(f"{gemm}.kernel gluon: block_m {self.block_m} must be 16 rows per warp "
                                 f"(num_warps {config.num_warps} -> {16 * config.num_warps})")
            if mma_cols > 256:
                raise ValueError(f"{gemm}.block_n: the gluon kernel's MMA is {mma_cols} columns wide, over 256")

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        fields = _fields_from(cls, data, "config")
        return cls(fields["block_m"], GemmConfig.from_dict(fields["gate_up"], "gate_up"),
                   GemmConfig.from_dict(fields["down"], "down"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def default_config(num_tokens: int) -> MoEConfig:
    """Untuned fallback, pointer loads: small row blocks for few tokens, large tiles otherwise."""
    if num_tokens <= 256:
        tile = GemmConfig("pointer", block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
        return MoEConfig(16 if num_tokens <= 32 else 64, tile, tile)
    return MoEConfig(128, GemmConfig("pointer", block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4),
                     GemmConfig("pointer", block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=4))


def fit_fp32(config: MoEConfig) -> MoEConfig:
    """fp32 tiles take twice the shared memory of bf16 ones: K steps of at most 32 and at most 3 stages."""
    def fit(c: GemmConfig) -> GemmConfig:
        return dataclasses.replace(c, block_k=min(c.block_k, 32), num_stages=min(c.num_stages, 3))

    return dataclasses.replace(config, gate_up=fit(config.gate_up), down=fit(config.down))


def fit_fp8(config: MoEConfig) -> MoEConfig:
    """FP8 operands: the bf16 tiles with K steps twice as long (the same bytes a stage), by the pointer or tma
    kernels (the Gluon kernels take 16-bit operands)."""
    def fit(c: GemmConfig) -> GemmConfig:
        return dataclasses.replace(c, kernel="pointer" if c.kernel == "pointer" else "tma", block_k=2 * c.block_k)

    return dataclasses.replace(config, gate_up=fit(config.gate_up), down=fit(config.down))


@functools.lru_cache(maxsize=None)
def load_config_file(path: Path) -> dict[int, MoEConfig]:
    """{M: config} of a tuned file; a key other than a token count or "_meta", or a bad entry, is an error
    naming the file and the entry."""
    with open(path) as f:
        table = json.load(f)
    configs = {}
    for key, entry in table.items():
        if key == "_meta":
            continue
        if not key.isdigit():
            raise ValueError(f"{path.name}: unknown key {key!r} (want token counts and '_meta')")
        try:
            configs[int(key)] = MoEConfig.from_dict(entry)
        except ValueError as exc:
            raise ValueError(f"{path.name}, entry {key}: {exc}") from None
    return configs


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
) -> MoEConfig:
    """The tile configuration for E local experts of width I on `device_name`, at M tokens on this rank."""
    path = _pick_file(num_experts, intermediate_size, device_name, config_dir or CONFIG_DIR)
    if path is None:
        return default_config(num_tokens)
    table = load_config_file(path)
    nearest = min(table, key=lambda m: (abs(m - num_tokens), m))
    return table[nearest]

"""Tile order, program count, K-step loads and tensor descriptors shared by the persistent expert GEMMs."""

import functools
import importlib

import torch
import triton
import triton.language as tl

from omni_ep.layers.fused_moe.experts.triton_configs import GemmConfig

SHARED_MEMORY_BYTES = 227 * 1024  # per block on Hopper (sm_90), the opt-in maximum


def ring_fits(block_m: int, block_n: int, block_k: int, stages: int, element_size: int, out_cols: int) -> bool:
    """Whether `stages` operand tiles [block_m, block_k] + [block_n, block_k] and an output staging tile
    [block_m, out_cols] (none with 0) fit in a Hopper block's shared memory, with 1 KiB to spare."""
    tiles = stages * (block_m + block_n) * block_k + block_m * out_cols
    return tiles * element_size + 1024 <= SHARED_MEMORY_BYTES


@functools.lru_cache(maxsize=None)
def gluon_module(name: str):
    """The Gluon kernel module `name` of this package (down_unpermute_gluon, gate_up_swiglu_gluon), or None
    where this Triton has no Gluon for Hopper (before 3.6)."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


@triton.jit
def grouped_tile(tile, num_m_blocks, num_n_blocks, GROUP_M: tl.constexpr):
    """Tile index -> (m block, n block), walking GROUP_M row blocks down each column before moving right,
    so a weight tile is reused from L2 by the neighbouring row blocks (of the same expert, mostly)."""
    tiles_per_group = GROUP_M * num_n_blocks
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    m_block = first_m + (tile % tiles_per_group) % group_rows
    n_block = (tile % tiles_per_group) // group_rows
    return m_block, n_block


def persistent_programs(num_row_blocks: int, num_n_blocks: int, config: GemmConfig, num_sms: int) -> int:
    """Programs of a persistent GEMM launch: programs_per_sm per SM, at most one per tile of the worst case;
    programs_per_sm 0 means one program per worst-case tile (a plain, non-persistent grid)."""
    tiles = max(num_row_blocks * num_n_blocks, 1)
    return tiles if config.programs_per_sm == 0 else min(tiles, num_sms * config.programs_per_sm)


@triton.jit
def load_k_step(ptrs, ks, k_left, EVEN_K: tl.constexpr, K_AXIS: tl.constexpr):
    """One K step of a tile; where fewer than BLOCK_K values of K are left (k_left), read zeros past the end.
    K_AXIS: the tile axis that runs along K (1 for an A tile [M, K], 0 for a B tile [K, N])."""
    if EVEN_K:
        tile = tl.load(ptrs)
    elif K_AXIS == 0:
        tile = tl.load(ptrs, mask=(ks < k_left)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=(ks < k_left)[None, :], other=0.0)
    return tile


def fp8_accumulation(a: torch.Tensor, block_k: int) -> int | None:
    """tl.dot's max_num_imprecise_acc for operand a: with FP8 operands each K step's products are added to the fp32
    accumulator (Hopper's FP8 MMA keeps fewer bits when it accumulates many steps itself: 1.6e-2 relative error
    at H = 4096 on an H200, against the exact sums of the same FP8 values); None (Triton's default) for 16- and
    32-bit operands."""
    return block_k if a.element_size() == 1 else None


@triton.jit
def pointer_k_loop(a_ptrs, b_ptrs, ks, k_size, acc, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, FP8_ACC: tl.constexpr = None):
    """acc [BLOCK_M, N] += A @ B over k_size: A tiles [BLOCK_M, BLOCK_K] at a_ptrs, B tiles [BLOCK_K, N] at
    b_ptrs, both pointer blocks stepping BLOCK_K along K (zeros past k_size). FP8_ACC: see fp8_accumulation."""
    for k in range(0, tl.cdiv(k_size, BLOCK_K)):
        a = load_k_step(a_ptrs, ks, k_size - k * BLOCK_K, EVEN_K, 1)
        b = load_k_step(b_ptrs, ks, k_size - k * BLOCK_K, EVEN_K, 0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, max_num_imprecise_acc=FP8_ACC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


def tma_fits(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine (TMA) can read these tensors: a CUDA device of compute capability 9 or more
    (or the interpreter), 16-byte aligned base addresses and row strides, unit stride along the last axis."""
    for t in tensors:
        if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] < 9:
            return False
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return False
    return True


def tma_descriptor(t: torch.Tensor, *block_shape: int):
    """A host-side tensor descriptor over t that loads tiles of block_shape; reads past the end along any
    axis come back as zeros."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, list(block_shape))

"""Ulysses sequence parallel: one all-to-all from sequence shards to head shards before attention, one back after.

Shape legend: B batch, U ulysses degree, L tokens of this rank's sequence share, S = U * L tokens of the ulysses
group, N query heads and N_kv KV heads of this rank before the exchange (after TP), n = N / U query heads and
n_kv KV heads after it, D head dim.

Before: every member holds all N heads of its own L tokens. After: every member holds n heads of all S tokens
(the members' shares concatenated in group-rank order), so attention runs unchanged on whole sequences.

GQA-aware: query heads are grouped per KV head (head i uses KV head i // (N / N_kv)), and member u receives the
query heads [u * n, (u + 1) * n) with exactly the KV heads they use, never K/V repeated per query head:
- N_kv % U == 0: member u gets KV heads [u * N_kv / U, (u + 1) * N_kv / U) (n_kv = N_kv / U);
- U % N_kv == 0: its query heads all use one KV head, which it gets alone (n_kv = 1; U / N_kv members share it).
q, k and v travel packed in one all-to-all per direction, each under the profiler range ``PROFILE_RANGE``
(benchmarks/profile_step.py reports its kernel time and the part of it no other kernel overlaps).
"""

from __future__ import annotations

import torch

from omni_ep.distributed.group_coordinator import GroupCoordinator

PROFILE_RANGE = "ulysses_all_to_all"


def check_ulysses_heads(num_heads: int, num_kv_heads: int, ulysses_degree: int, tensor_parallel_size: int = 1) -> None:
    """Raise a ValueError naming the flags to change when the heads cannot be split over TP x ulysses."""
    heads, kv_heads = num_heads // tensor_parallel_size, num_kv_heads // tensor_parallel_size
    where = (f"num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads}, "
             f"--tensor-parallel-size {tensor_parallel_size}, --ulysses-degree {ulysses_degree}")
    if num_heads % tensor_parallel_size or num_kv_heads % tensor_parallel_size:
        raise ValueError(f"the tensor parallel size must divide the attention and KV heads ({where}); "
                         "change --tensor-parallel-size")
    if heads % ulysses_degree:
        raise ValueError(
            f"the ulysses degree must divide the {heads} attention heads each TP rank holds ({where}); change "
            "--ulysses-degree or --tensor-parallel-size so that ulysses x TP divides the attention heads"
        )
    if kv_heads % ulysses_degree and ulysses_degree % kv_heads:
        raise ValueError(
            f"the ulysses degree must divide the {kv_heads} KV heads each TP rank holds, or be a multiple of that "
            f"count ({where}); change --ulysses-degree or --tensor-parallel-size"
        )


def kv_heads_per_member(num_kv_heads: int, ulysses_degree: int) -> int:
    """n_kv: the KV heads each ulysses member attends with, of N_kv on this rank before the exchange."""
    return max(num_kv_heads // ulysses_degree, 1)


def _by_member(x_BHLD: torch.Tensor, U: int) -> torch.Tensor:
    """[B, N_x, L, D] -> [B, U, N_x / U or 1, L, D]: the heads member u gets, in head order."""
    B, H, L, D = x_BHLD.shape
    if H % U:  # U % H == 0: each head goes to U / H consecutive members
        x_BHLD = x_BHLD.repeat_interleave(U // H, dim=1)
    return x_BHLD.reshape(B, U, -1, L, D)


def sequence_to_heads(
    q_BNLD: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor, group: GroupCoordinator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's L tokens of every head -> n query heads [B, n, S, D] and n_kv KV heads [B, n_kv, S, D] of the
    group's S tokens. Identity for a group of one."""
    U = group.world_size
    if U == 1:
        return q_BNLD, k_BKLD, v_BKLD
    n = q_BNLD.shape[1] // U
    n_kv = kv_heads_per_member(k_BKLD.shape[1], U)
    packed_BUhLD = torch.cat([_by_member(q_BNLD, U), _by_member(k_BKLD, U), _by_member(v_BKLD, U)], dim=2)
    B, _, h, L, D = packed_BUhLD.shape
    with torch.profiler.record_function(PROFILE_RANGE):
        received_UBhLD = group.all_to_all_single(packed_BUhLD.movedim(1, 0).contiguous(), [1] * U, [1] * U)
    # member u' sent its own L tokens: concatenating in member order gives the group's S = U * L tokens
    whole_BhSD = received_UBhLD.permute(1, 2, 0, 3, 4).reshape(B, h, U * L, D)
    q, k, v = whole_BhSD.split([n, n_kv, n_kv], dim=1)
    return q, k, v


def heads_to_sequence(out_BSnD: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
    """Attention output of n heads over the group's S tokens [B, S, n, D] -> this rank's L tokens of all N heads
    [B, L, N, D] (the inverse exchange). Identity for a group of one."""
    U = group.world_size
    if U == 1:
        return out_BSnD
    B, S, n, D = out_BSnD.shape
    L = S // U
    send_UBLnD = out_BSnD.reshape(B, U, L, n, D).movedim(1, 0).contiguous()
    with torch.profiler.record_function(PROFILE_RANGE):
        received_UBLnD = group.all_to_all_single(send_UBLnD, [1] * U, [1] * U)
    # member u' sent heads [u' * n, (u' + 1) * n) of this rank's tokens
    return received_UBLnD.permute(1, 2, 0, 3, 4).reshape(B, L, U * n, D)

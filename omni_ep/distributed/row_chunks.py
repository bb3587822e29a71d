"""Split N identical rows over the ranks of a group (TP ranks hold the same tokens): each rank works on its own
contiguous chunk, the chunk sizes differ by at most one, and a sum over the group restores the whole."""


def row_chunk(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s chunk; 10 rows over 4 ranks -> (0, 3) (3, 6) (6, 8) (8, 10)."""
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)

"""The VAE decode split into horizontal bands, one per rank, exactly equal to the one-rank decode.

Shape legend: B batch, C channels, G GroupNorm groups, T frames, rows x cols spatial size; s the spatial scale of
a level (1 at the latent, x2 after every upsample).

conv_in and the mid block (whose attention is global) run on every rank over the whole latent. Then rank r keeps
its own latent rows (row_chunk of the latent height) plus a halo, and decodes that window alone:
- convs pad the window with zeros like the whole image; at a window edge inside the image that zero row is wrong,
  and each conv moves the wrong rows one row inwards (an upsample doubles them). The halo at the start of every
  level is the number of rows the rest of the decoder can spoil (`band_halos`, read from the module structure),
  so the own rows stay exact, and after every upsample the window is cut back to its own rows plus that halo;
- every GroupNorm takes its statistics over the whole tensor: each rank sums its OWN rows only (never a halo
  row, which another rank owns) and the sums are all-reduced, once for the mean and once for the second moment
  about it; every row of the window, halo included, is then normalised with these global statistics;
- the own rows of the last frame are all-gathered into the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omni_ep.distributed.group_coordinator import GroupCoordinator
from omni_ep.distributed.row_chunks import row_chunk


def _rows_spoiled(module: nn.Module) -> int:
    """Rows a zero-padded conv spoils per window edge (its row padding); 0 for anything else."""
    return module.padding[-2] if isinstance(module, nn.Conv3d) else 0


def band_halos(decoder: nn.Module) -> dict[int, int]:
    """{s: halo rows at scale s} at the start of every level of a HunyuanVAEDecoder (s = 1 after the mid block).

    Walks the levels backwards from conv_out: a resnet block adds conv1's and conv2's rows (its 1x1 shortcut
    none); an upsample's conv spoils rows at the lower scale, so h rows wanted after it need ceil(h / 2) + its
    rows before it. Real decoder (3 blocks a level, 4 upsamples): {1: 14, 2: 14, 4: 13, 8: 11, 16: 7}.
    """
    has_upsample = [hasattr(up, "upsample") for up in decoder.up]
    halos, rows = {}, _rows_spoiled(decoder.conv_out)
    for level in reversed(range(len(decoder.up))):
        up = decoder.up[level]
        if has_upsample[level]:
            rows = -(-rows // 2) + _rows_spoiled(up.upsample.conv)
        for block in reversed(up.block):
            rows += max(_rows_spoiled(block.conv1) + _rows_spoiled(block.conv2),
                        _rows_spoiled(getattr(block, "nin_shortcut", None)))
        halos[2 ** sum(has_upsample[:level])] = rows  # the first level of a scale overwrites a later one
    return halos


@dataclass(frozen=True)
class HunyuanVAEBand:
    """This rank's band: it owns latent rows [own_start, own_stop) of a latent of height x width and decodes them
    with halos[s] extra rows on each side at scale s (fewer at the image border)."""

    group: GroupCoordinator
    own_start: int
    own_stop: int
    height: int
    width: int
    halos: dict[int, int]

    @classmethod
    def for_rank(cls, decoder: nn.Module, group: GroupCoordinator, height: int, width: int) -> HunyuanVAEBand:
        """The band of ``group.rank``: its row_chunk of the latent height, halos from the decoder's modules."""
        start, stop = row_chunk(height, group.rank, group.world_size)
        return cls(group, start, stop, height, width, band_halos(decoder))

    def _scale(self, x: torch.Tensor) -> int:
        return x.shape[-1] // self.width  # columns are never split

    def window(self, s: int) -> tuple[int, int]:
        """[start, stop) image rows at scale s that this rank holds from the level of scale s on."""
        halo = self.halos[s]
        return max(0, self.own_start * s - halo), min(self.height * s, self.own_stop * s + halo)

    def enter(self, x: torch.Tensor, rows_start: int) -> torch.Tensor:
        """x [..., rows, cols] holding image rows from rows_start on -> the window of its scale."""
        start, stop = self.window(self._scale(x))
        return x[..., start - rows_start : stop - rows_start, :]

    def enter_level(self, x: torch.Tensor) -> torch.Tensor:
        """x just upsampled (x2) from the window of the previous scale -> the window of its own scale."""
        return self.enter(x, 2 * self.window(self._scale(x) // 2)[0])

    def own_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., rows, cols] holding this band's window -> its own rows (a view)."""
        s = self._scale(x)
        start = self.window(s)[0]
        return x[..., self.own_start * s - start : self.own_stop * s - start, :]

    def gather_image(self, image_BCrc: torch.Tensor) -> torch.Tensor:
        """Own rows [B, C, own rows * s, cols] of every rank -> the whole image [B, C, height * s, cols]."""
        s = image_BCrc.shape[-1] // self.width
        sizes = [(stop - start) * s for start, stop in
                 (row_chunk(self.height, r, self.group.world_size) for r in range(self.group.world_size))]
        return self.group.all_gather_uneven(image_BCrc, sizes, dim=2)

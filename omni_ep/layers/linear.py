"""Linear layers replicated or split over the tensor-parallel group (vLLM's conventions).

``forward(x)`` returns ``(output, output_bias)``; output_bias is None unless ``skip_bias_add``.
Every parameter carries ``weight_loader(param, full_checkpoint_tensor)`` that copies this rank's slice,
and ``checkpoint_slice(full_shape)`` giving the slice to read from disk (safetensors ``get_slice``).

Shape legend: N tokens, In input features, Out output features, In_tp / Out_tp their per-rank share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni_ep.distributed import get_tp_group


class _TPLinear(nn.Module):
    """A linear layer whose weight [Out, In] may be split along ``tp_dim`` (0: rows, 1: columns)."""

    tp_dim: int | None = None

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        skip_bias_add: bool = False,
        prefix: str = "",
        tp_size: int | None = None,
    ):
        super().__init__()
        self.tp_group = get_tp_group()
        self.tp_size = self.tp_group.world_size if tp_size is None else tp_size
        self.tp_rank = self.tp_group.rank if self.tp_size > 1 else 0
        self.input_size, self.output_size, self.prefix = input_size, output_size, prefix
        self.skip_bias_add = skip_bias_add
        shape = [output_size, input_size]
        if self.tp_dim is not None:
            if shape[self.tp_dim] % self.tp_size != 0:
                raise ValueError(
                    f"{prefix or type(self).__name__}: dimension {shape[self.tp_dim]} is not divisible by tensor "
                    f"parallel size {self.tp_size}"
                )
            shape[self.tp_dim] //= self.tp_size
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        self.bias = None
        if bias:
            bias_split = self.tp_dim == 0
            self.bias = nn.Parameter(torch.empty(shape[0] if bias_split else output_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader, self.weight.checkpoint_slice = self.weight_loader, self._slicer(self.tp_dim)
        if self.bias is not None:  # a bias is split only with the output features
            self.bias.weight_loader = self.weight_loader
            self.bias.checkpoint_slice = self._slicer(0 if self.tp_dim == 0 else None)

    def _slicer(self, dim: int | None):
        """checkpoint_slice(full_shape) -> this rank's slices along ``dim`` (None: the whole tensor)."""

        def checkpoint_slice(full_shape) -> tuple[slice, ...]:
            slices = [slice(None)] * len(full_shape)
            if dim is not None and self.tp_size > 1:
                size = full_shape[dim] // self.tp_size
                slices[dim] = slice(self.tp_rank * size, (self.tp_rank + 1) * size)
            return tuple(slices)

        return checkpoint_slice

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Copy this rank's slice of the full checkpoint tensor (or an already-sliced tensor) into ``param``."""
        if tuple(loaded_weight.shape) != tuple(param.shape):
            loaded_weight = loaded_weight[param.checkpoint_slice(loaded_weight.shape)]
        if tuple(loaded_weight.shape) != tuple(param.shape):
            raise ValueError(
                f"{self.prefix}: checkpoint shape {tuple(loaded_weight.shape)} does not match parameter "
                f"{tuple(param.shape)} (tensor parallel size {self.tp_size})"
            )
        with torch.no_grad():
            param.copy_(loaded_weight)

    def _linear(self, x: torch.Tensor, add_bias: bool) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if add_bias else None)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp_size={self.tp_size}, bias={self.bias is not None}"


class ReplicatedLinear(_TPLinear):
    """The whole weight on every rank (the MoE router: ``params_dtype=torch.float32``)."""

    tp_dim = None

    def forward(self, x):
        """x [N, In] -> ([N, Out], bias or None). Input is cast to the weight dtype (fp32 router)."""
        out = self._linear(x.to(self.weight.dtype), not self.skip_bias_add)
        return out, (self.bias if self.skip_bias_add else None)


class ColumnParallelLinear(_TPLinear):
    """Output features split in contiguous chunks over TP: rank r holds rows [r*Out_tp, (r+1)*Out_tp)."""

    tp_dim = 0

    def __init__(self, input_size, output_size, bias=False, gather_output=False, params_dtype=None,
                 skip_bias_add=False, prefix="", tp_size=None):
        super().__init__(input_size, output_size, bias, params_dtype, skip_bias_add, prefix, tp_size)
        self.gather_output = gather_output

    def forward(self, x):
        """x [N, In] -> ([N, Out_tp] or [N, Out] with gather_output, bias or None)."""
        out = self._linear(x, not self.skip_bias_add)
        if self.gather_output and self.tp_size > 1:
            out = self.tp_group.all_gather(out, dim=-1)
        return out, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(_TPLinear):
    """Input features split over TP; with ``reduce_results`` the partial products are all-reduced."""

    tp_dim = 1

    def __init__(self, input_size, output_size, bias=False, input_is_parallel=True, reduce_results=True,
                 params_dtype=None, skip_bias_add=False, prefix="", tp_size=None):
        super().__init__(input_size, output_size, bias, params_dtype, skip_bias_add, prefix, tp_size)
        self.input_is_parallel, self.reduce_results = input_is_parallel, reduce_results

    def forward(self, x):
        """x [N, In_tp] (or [N, In] when not input_is_parallel) -> ([N, Out], bias or None).
        The bias is added once, after the reduction (rank 0 alone adds it when results are not reduced)."""
        if not self.input_is_parallel and self.tp_size > 1:
            x = x.chunk(self.tp_size, dim=-1)[self.tp_rank]
        out = F.linear(x, self.weight)
        if self.reduce_results and self.tp_size > 1:
            out = self.tp_group.all_reduce(out)
        if self.bias is not None and not self.skip_bias_add and (self.reduce_results or self.tp_rank == 0):
            out = out + self.bias
        return out, (self.bias if self.skip_bias_add else None)

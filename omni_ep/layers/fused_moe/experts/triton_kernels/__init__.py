"""Triton kernels behind TritonExperts: pair/block alignment, the two expert GEMMs, the top-k sum.

Import these modules only after TRITON_INTERPRET is settled: triton.jit reads it when the kernels are defined.
"""

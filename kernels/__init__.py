"""Fused Triton kernels for RoRA (installed as ``rora_fast.kernels``). Placeholder until issue 3 lands."""

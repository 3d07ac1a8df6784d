"""Fused GPU kernels (Triton). Import the submodules lazily: importing triton reads TRITON_INTERPRET once."""

"""tpcrepro: reproduce the tables of "TPC-ViT: Token Propagation Controller for Efficient Vision Transformers"."""

from tpcrepro import cpu as _cpu

_cpu.pin()  # before torch loads: the same CPU kernels on every AVX2 machine (tpcrepro/cpu.py)

__version__ = "0.1.0"

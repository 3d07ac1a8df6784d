"""tpcrepro: reproduce the tables of "TPC-ViT: Token Propagation Controller for Efficient Vision Transformers"."""

__version__ = "0.1.0"

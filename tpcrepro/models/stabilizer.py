"""The stabilizer: top-κ attention by Euclidean distance (Eq. 15-18), usable by any model.

For each head and query, only the κ available keys nearest to the query in
Euclidean distance enter the softmax. ‖q − k‖² = ‖q‖² − 2q·k + ‖k‖² and ‖q‖²
is constant along a row, so keys are ranked by 2q·k − ‖k‖² (no extra matmul
beyond QKᵀ). Selection is by index (topk), so ties never admit more than κ
keys, and ranking is done in fp32 (bf16 scores flip near-ties). κ ≥ the
number of keys is exactly dense attention.

On CUDA the top-κ case runs as one fused Triton kernel (tpcrepro.kernels):
TPCREPRO_STABILIZER=torch|triton|auto picks the path (auto: Triton on CUDA,
PyTorch elsewhere; triton also runs on CPU under TRITON_INTERPRET=1).
Attention dropout always takes the PyTorch path.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F


def nearest_keys(q: torch.Tensor, k: torch.Tensor, kappa: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean [B, H, Nq, Nk]: the κ valid keys nearest to each query (fewer if fewer are valid).

    q: [B, H, Nq, D], k: [B, H, Nk, D]; valid: bool broadcastable to [B, H, Nq, Nk].
    """
    qf, kf = q.float(), k.float()
    rank = 2 * qf @ kf.transpose(-2, -1) - kf.pow(2).sum(-1).unsqueeze(-2)
    if valid is not None:
        rank = rank.masked_fill(~valid, float("-inf"))
    idx = rank.topk(kappa, dim=-1, sorted=False).indices  # the set, not its order: a third faster on the CPU
    chosen = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, idx, True)
    return chosen if valid is None else chosen & valid


def backend(device: torch.device) -> str:
    """The path top-κ attention takes on `device`: 'triton' or 'torch' (TPCREPRO_STABILIZER, default auto)."""
    mode = os.environ.get("TPCREPRO_STABILIZER", "auto").lower()
    if mode not in ("torch", "triton", "auto"):
        raise ValueError(f"TPCREPRO_STABILIZER must be torch, triton or auto, got {mode!r}")
    if mode == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return mode


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor] = None,
              kappa: Optional[int] = None, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ·scale) · v over the allowed keys. [B, H, Nq, D] -> [B, H, Nq, D].

    valid: bool broadcastable to [B, H, Nq, Nk] (True = the key may be used);
    every query row must allow at least one key. kappa: None = dense.
    """
    mask = valid
    if kappa is not None and kappa < k.shape[-2]:
        if dropout_p == 0.0 and backend(q.device) == "triton":
            from tpcrepro.kernels.topk_attention import supports, topk_attention

            if supports(q, k, v, valid):
                return topk_attention(q, k, v, kappa, valid, scale)
            if q.device.type != "cuda" or os.environ.get("TPCREPRO_STABILIZER", "").lower() == "triton":
                raise ValueError(f"TPCREPRO_STABILIZER=triton: the kernel does not take q {tuple(q.shape)} "
                                 f"{q.dtype} on {q.device}, k {tuple(k.shape)} (CPU needs TRITON_INTERPRET=1)")
        mask = nearest_keys(q, k, kappa, valid)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)


def reference_attention(q, k, v, valid=None, kappa=None, scale=None) -> torch.Tensor:
    """Plain fp32 matrix form, selecting keys by sorting distances: the test oracle."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-2, -1) * scale
    allowed = torch.ones_like(logits, dtype=torch.bool) if valid is None else valid.expand_as(logits)
    if kappa is not None:
        dist = torch.cdist(q, k).masked_fill(~allowed, float("inf"))
        order = dist.argsort(dim=-1)[..., :kappa]
        near = torch.zeros_like(allowed).scatter_(-1, order, True)
        allowed = allowed & near
    logits = logits.masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1) @ v).to(torch.float32)

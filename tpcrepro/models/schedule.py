"""A plain ViT that computes a fixed number of tokens per block (tokens physically removed).

Used to check the analytic MACs counter against fvcore, and as the base of
the benchmark mode that times a chosen per-layer token schedule without
trained weights. Tokens are kept in order (CLS first), so the weights of any
timm VisionTransformer apply unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer


class ScheduledViT(nn.Module):
    """Wrap `vit`; block l sees only the first keep[l] tokens. [B, C, H, W] -> [B, num_classes]."""

    def __init__(self, vit: VisionTransformer, keep: Sequence[int]):
        super().__init__()
        if len(keep) != len(vit.blocks):
            raise ValueError(f"need one token count per block ({len(vit.blocks)}), got {len(keep)}")
        if any(b > a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"a token schedule must not grow: {list(keep)}")
        self.vit, self.keep = vit, list(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        for n, blk in zip(self.keep, v.blocks):
            x = blk(x[:, :n])
        return v.forward_head(v.norm(x))

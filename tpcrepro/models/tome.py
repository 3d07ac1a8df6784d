"""ToMe (token merging, ICLR'23) on any timm ViT/DeiT: tome_deit_{t,s,b}, tome_vit_smoke. No training.

In every block, between attention and MLP: split the tokens into two
alternating sets, match each token of the first set to its most similar
token of the second (cosine similarity of the head-averaged keys), and merge
the r best pairs by size-weighted average. Attention adds log(size) to the
key logits (proportional attention). CLS is never merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from tpcrepro import flops
from tpcrepro.models.registry import register_family
from tpcrepro.models.stabilizer import nearest_keys


@dataclass(frozen=True)
class ToMeCfg:
    r: int = 13  # pairs merged in every block
    schedule: tuple = ()  # per-block r (overrides r), e.g. ToMe's decreasing schedules

    def r_at(self, block: int) -> int:
        return self.schedule[block] if self.schedule else self.r


def bipartite_merge(metric: torch.Tensor, r: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that merges r tokens of [B, N, C] (sum reduction); metric [B, N, D]; token 0 (CLS) is kept."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = float("-inf")  # CLS (first of set a) never merges
    best, best_idx = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)[..., None]
    kept_a = order[:, r:].sort(dim=1).values  # CLS stays first
    src = order[:, :r]
    dst = best_idx[..., None].gather(1, src)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        xa, xb = x[:, ::2], x[:, 1::2]
        unmerged = xa.gather(1, kept_a.expand(-1, -1, c))
        moved = xa.gather(1, src.expand(-1, -1, c))
        xb = xb.scatter_reduce(1, dst.expand(-1, -1, c), moved, reduce="sum")
        return torch.cat([unmerged, xb], dim=1)

    return merge


def tome_block(blk: Block, x: torch.Tensor, size: torch.Tensor, r: int, kappa: Optional[int]):
    """[B, N, C], size [B, N, 1] -> ([B, N − r, C], [B, N − r, 1])."""
    a = blk.attn
    b, n, c = x.shape
    q, k, v = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(q), a.k_norm(k)
    bias = size.log()[:, None, None, :, 0].expand(b, 1, n, n)  # proportional attention
    if kappa is not None and kappa < n:
        bias = bias.masked_fill(~nearest_keys(q, k, kappa), float("-inf"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=a.scale)
    x = x + blk.drop_path1(blk.ls1(a.proj_drop(a.proj(a.norm(o.transpose(1, 2).reshape(b, n, c))))))
    r = min(r, (n - 1) // 2)
    if r > 0:
        merge = bipartite_merge(k.mean(1), r)
        x, size = merge(x * size), merge(size)
        x = x / size
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), size


class ToMeViT(VisionTransformer):
    """timm VisionTransformer with token merging in every block. forward -> logits [B, classes]."""

    def __init__(self, tome: Optional[ToMeCfg] = None, kappa: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.tome = tome or ToMeCfg()
        self.kappa = kappa
        self.dims = flops.ViTDims.of(self)

    def forward_features(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        size = x.new_ones(*x.shape[:2], 1)
        for i, blk in enumerate(self.blocks):
            x, size = tome_block(blk, x, size, self.tome.r_at(i), self.kappa)
        return self.norm(x)

    def token_counts(self) -> list[int]:
        n, out = self.dims.num_patches + self.num_prefix_tokens, []
        for i in range(self.dims.depth):
            out.append(n)
            n -= min(self.tome.r_at(i), (n - 1) // 2)
        return out

    def macs(self) -> int:
        """Blocks (attention on n, MLP on n − r), the key-similarity matmul of each merge, embedding, norm, head."""
        d, c = self.dims, self.dims.embed_dim
        head_dim = self.blocks[0].attn.head_dim
        counts = self.token_counts()
        total = d.embed_macs + c * d.num_classes
        for i, n in enumerate(counts):
            r = min(self.tome.r_at(i), (n - 1) // 2)
            total += flops.block_macs(n, n, c, d.mlp_hidden, self.kappa, n_mlp=n - r)
            if r > 0:
                total += ((n + 1) // 2) * (n // 2) * head_dim
        last = len(counts) - 1
        return total + 5 * (counts[-1] - min(self.tome.r_at(last), (counts[-1] - 1) // 2)) * c


register_family(ToMeViT, "tome", "ToMe (r = 13 pairs merged per block)", smoke_defaults={"tome": ToMeCfg(r=4)})

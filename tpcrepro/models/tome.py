"""ToMe (token merging, ICLR'23) on any timm ViT/DeiT: tome_deit_{t,s,b}, tome_vit_smoke. No training.

In every block, between attention and MLP: split the tokens into two
alternating sets, match each token of the first set to its most similar
token of the second (cosine similarity of the head-averaged keys), and merge
the r best pairs by size-weighted average. Attention adds log(size) to the
key logits (proportional attention). CLS is never merged.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from tpcrepro import flops
from tpcrepro.methods import ToMeCfg  # noqa: F401  (its settings: torch-free, for recipes)
from tpcrepro.models.blocks import TokenBlock
from tpcrepro.models.registry import register_family
from tpcrepro.models.stabilizer import nearest_keys


def bipartite_match(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens merge: metric [B, N, D] -> (kept_a, src, dst), index tensors [B, *, 1]; CLS (token 0) is kept.

    The tokens split into alternating sets a (even) and b (odd); each token of a
    is matched to its most similar token of b (cosine), and the r best pairs
    merge: a's token src into b's token dst; a's others (kept_a) stay, in order.
    """
    metric = metric / metric.norm(p=2.0, dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    cls_row = torch.full_like(scores[:, :1], float("-inf"))
    scores = torch.cat([cls_row, scores[:, 1:]], dim=1)  # CLS (first of set a) never merges
    best, best_idx = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True).unsqueeze(-1)
    kept_a = order[:, r:].sort(dim=1).values  # CLS stays first
    src = order[:, :r]
    dst = best_idx.unsqueeze(-1).gather(1, src)
    return kept_a, src, dst


def merge_tokens(x: torch.Tensor, kept_a: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Merge (sum) the matched tokens of x [B, N, C] -> [B, N − r, C]."""
    c = x.shape[-1]
    xa, xb = x[:, ::2], x[:, 1::2]
    unmerged = xa.gather(1, kept_a.expand(-1, -1, c))
    moved = xa.gather(1, src.expand(-1, -1, c))
    xb = xb.scatter_reduce(1, dst.expand(-1, -1, c), moved, reduce="sum")
    return torch.cat([unmerged, xb], dim=1)


class ToMeBlock(TokenBlock):
    """A timm block that merges r token pairs between attention and MLP, with proportional attention.

    The model sets r (already capped at (N − 1) // 2 from its static token
    counts) and kappa, so the forward has no branch on a tensor's shape.
    """

    r: int
    kappa: Optional[int]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.r = 0
        self.kappa = None

    def merge_forward(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, C], size [B, N, 1] -> ([B, N − r, C], [B, N − r, 1])."""
        q, k, v = self.heads(self.norm1(x))
        n = x.shape[1]
        bias = size.log()[:, None, None, :, 0].expand(-1, 1, n, n)  # proportional attention
        kappa = self.kappa
        if kappa is not None and kappa < k.shape[-2]:
            bias = bias.masked_fill(~nearest_keys(q, k, kappa, None), float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.attn.scale)
        x = self.residual_attn(x, o)
        if self.r > 0:
            kept_a, src, dst = bipartite_match(k.mean(1), self.r)
            x = merge_tokens(x * size, kept_a, src, dst)
            size = merge_tokens(size, kept_a, src, dst)
            x = x / size
        return self.residual_mlp(x), size


class ToMeViT(VisionTransformer):
    """timm VisionTransformer with token merging in every block. forward -> logits [B, classes]."""

    __jit_unused_properties__ = ["dims"]

    def __init__(self, tome: Optional[ToMeCfg] = None, kappa: Optional[int] = None, **kwargs):
        super().__init__(**{"block_fn": ToMeBlock, **kwargs})
        self.tome = tome or ToMeCfg()
        self.kappa = kappa
        self._set_roles()

    @property
    def dims(self) -> flops.ViTDims:
        return flops.ViTDims.of(self)

    def _set_roles(self) -> None:
        n = self.patch_embed.num_patches + self.num_prefix_tokens
        for i, blk in enumerate(self.blocks):
            blk.r, blk.kappa = min(self.tome.r_at(i), (n - 1) // 2), self.kappa
            n -= blk.r

    def set_input_size(self, *args, **kwargs) -> None:
        super().set_input_size(*args, **kwargs)
        self._set_roles()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        size = torch.ones_like(x[..., :1])
        for blk in self.blocks:
            x, size = blk.merge_forward(x, size)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

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


register_family(ToMeViT, "tome", "ToMe (r = 13 pairs merged per block)", __name__,
                smoke_defaults={"tome": ToMeCfg(r=4)})

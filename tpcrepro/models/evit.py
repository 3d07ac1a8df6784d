"""EViT (token reorganisation, ICLR'22) on timm's ViT/DeiT blocks: evit_deit_{t,s,b}, evit_vit_smoke.

At the pruning blocks (0-based 3, 6, 9 for 12 blocks), between attention and
MLP: rank the patch tokens by the CLS row of that block's attention,
averaged over heads; keep ceil(keep_rate·(N − 1)); fuse the rest into one
token, their sum weighted by their (not renormalised) CLS attention,
appended at the end. Tokens are really removed, in training and inference,
with the same count for every image (DeiT-S at 0.7: 197 → 140 → 100 → 72).
The keep rate can be warmed up from 1 (cosine, per epoch), as in EViT's
training from scratch.
"""

import math
from typing import Optional

import torch
from timm.models.vision_transformer import VisionTransformer

from tpcrepro import flops
from tpcrepro.methods import EViTCfg  # noqa: F401  (its settings: torch-free, for recipes)
from tpcrepro.models.blocks import TokenBlock
from tpcrepro.models.registry import register_family
from tpcrepro.models.stabilizer import nearest_keys


def kept_count(n_patches: int, keep_rate: float) -> int:
    return math.ceil(keep_rate * n_patches)


class EViTBlock(TokenBlock):
    """A timm block that, if it prunes, reorganises its tokens between attention and MLP.

    [B, N, C] -> [B, 1 + keep (+1 fused), C] when `prunes`, else [B, N, C].
    The model sets the role (prunes, keep, fuse, kappa) from its static
    token counts, so the forward has no branch on a tensor's shape.
    """

    prunes: bool
    keep: int  # patch tokens kept
    fuse: bool
    kappa: Optional[int]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prunes = False
        self.keep = 0  # patch tokens kept
        self.fuse = True
        self.kappa = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.norm1(x))
        if not self.prunes:
            return self.residual_mlp(self.residual_attn(x, self.attention(q, k, v, None, self.kappa)))
        a = self.attn
        logits = (q * a.scale) @ k.transpose(-2, -1)
        kappa = self.kappa
        if kappa is not None and kappa < k.shape[-2]:
            logits = logits.masked_fill(~nearest_keys(q, k, kappa, None), float("-inf"))
        attn = a.attn_drop(logits.softmax(-1))
        x = self.residual_attn(x, attn @ v)
        cls_attn = attn[:, :, 0, 1:].mean(1)  # [B, N-1]
        order = cls_attn.argsort(dim=1, descending=True)
        top, rest = order[:, : self.keep], order[:, self.keep:]
        patches = x[:, 1:]
        c = x.shape[-1]
        kept = torch.gather(patches, 1, top.unsqueeze(-1).expand(-1, -1, c))
        if self.fuse:
            dropped = torch.gather(patches, 1, rest.unsqueeze(-1).expand(-1, -1, c))
            weight = torch.gather(cls_attn, 1, rest)
            x = torch.cat([x[:, :1], kept, weight.unsqueeze(1) @ dropped], dim=1)  # fused: attention-weighted sum
        else:
            x = torch.cat([x[:, :1], kept], dim=1)
        return self.residual_mlp(x)


class EViT(VisionTransformer):
    """timm VisionTransformer with EViT's token reorganisation. forward -> logits [B, classes]."""

    __jit_unused_properties__ = ["dims"]

    def __init__(self, evit: Optional[EViTCfg] = None, kappa: Optional[int] = None, **kwargs):
        super().__init__(**{"block_fn": EViTBlock, **kwargs})
        self.evit = evit or EViTCfg()
        self.kappa = kappa
        self.set_keep_rate(self.evit.keep_rate)

    @property
    def dims(self) -> flops.ViTDims:
        return flops.ViTDims.of(self)

    def set_keep_rate(self, keep_rate: float) -> None:
        """Give each block its role at this keep rate (which blocks prune, how many tokens they keep)."""
        self.keep_rate = keep_rate
        n = self.patch_embed.num_patches + self.num_prefix_tokens
        for i, blk in enumerate(self.blocks):
            keep = kept_count(n - 1, keep_rate)
            blk.prunes = i in self.evit.locations and keep_rate < 1.0 and keep < n - 1
            blk.keep, blk.fuse, blk.kappa = keep, self.evit.fuse, self.kappa
            if blk.prunes:
                n = 1 + keep + int(self.evit.fuse)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.norm_pre(self._pos_embed(self.patch_embed(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at each epoch start (keep-rate warm-up)."""
        self.set_keep_rate(self.evit.keep_rate_at(epoch))

    def set_input_size(self, *args, **kwargs) -> None:
        super().set_input_size(*args, **kwargs)
        self.set_keep_rate(self.keep_rate)

    def token_counts(self) -> tuple[list[int], list[int]]:
        """Tokens entering attention and tokens entering the MLP, per block (the same for every image)."""
        n = self.dims.num_patches + self.num_prefix_tokens
        attn, mlp = [], []
        for i in range(self.dims.depth):
            attn.append(n)
            if i in self.evit.locations and self.keep_rate < 1.0:
                k = kept_count(n - 1, self.keep_rate)
                if k < n - 1:
                    n = 1 + k + int(self.evit.fuse)
            mlp.append(n)
        return attn, mlp

    def macs(self) -> int:
        """Analytic MACs: blocks at their counts, the fusion's weighted sums, patch embedding, final norm, head."""
        attn, mlp = self.token_counts()
        d = self.dims
        c = d.embed_dim
        total = d.ends(mlp[-1])
        for a_n, m_n in zip(attn, mlp):
            total += flops.block_macs(a_n, a_n, c, d.mlp_hidden, self.kappa, n_mlp=m_n)
            if self.evit.fuse and m_n < a_n:
                total += (a_n - m_n + 1) * c  # the dropped tokens' weighted sum
        return total


# the smoke ViT has 8 blocks: prune at 0-based 2, 4, 6
register_family(EViT, "evit", "EViT (keep 0.7 at blocks 4, 7, 10)", __name__,
                smoke_defaults={"evit": EViTCfg(locations=(2, 4, 6))})

"""LV-ViT (token labeling, NeurIPS'21) written on timm's ViT: lvvit_t, lvvit_s, lvvit_m.

timm has no LV-ViT. The configuration follows the released models: a
convolutional stem (7×7/2 conv, two 3×3 convs, each with BatchNorm and
ReLU, then an 8×8/8 projection: 14×14 tokens at 224 px), CLS and learned
position embedding, qkv without bias, MLP ratio 3, residual branches divided
by `skip_lam` (1 for T, 2 for S and M), and an auxiliary head over the patch
tokens. The prediction is head(CLS) + 0.5·max over patches of aux_head; the
token-labeling loss with dense label maps is not included (plain
cross-entropy on that prediction). Parameter names match the released
checkpoints, so their state dicts load as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

LVVIT = {
    "t": dict(embed_dim=240, depth=12, num_heads=4, skip_lam=1.0),
    "s": dict(embed_dim=384, depth=16, num_heads=6, skip_lam=2.0),
    "m": dict(embed_dim=512, depth=20, num_heads=8, skip_lam=2.0),
}


class ConvStem(nn.Module):
    """LV-ViT's patch embedding. [B, 3, H, W] -> [B, (H/16)·(W/16), C]."""

    def __init__(self, img_size: int = 224, in_chans: int = 3, embed_dim: int = 384, width: int = 64):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (16, 16)
        self.grid_size = (img_size // 16, img_size // 16)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.proj = nn.Conv2d(width, embed_dim, 8, stride=8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)

    def stem_macs(self) -> int:
        """The convolutions' MACs at this image size (BatchNorm and ReLU not counted)."""
        h, w = self.img_size[0] // 2, self.img_size[1] // 2
        c1, c2 = self.conv1, self.conv2
        conv1 = h * w * c1.out_channels * c1.in_channels * 49
        conv23 = 2 * h * w * c2.out_channels * c2.in_channels * 9
        return conv1 + conv23 + self.num_patches * self.proj.out_channels * self.proj.in_channels * 64


class Scale(nn.Module):
    """Multiply by a fixed factor (LV-ViT's 1/skip_lam on each residual branch); no parameters."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor if self.factor != 1.0 else x


class LVViT(VisionTransformer):
    """timm VisionTransformer shaped as LV-ViT. forward -> logits [B, classes]."""

    def __init__(self, skip_lam: float = 2.0, img_size: int = 224, in_chans: int = 3, **kwargs):
        kwargs = {**dict(patch_size=16, mlp_ratio=3.0, qkv_bias=False), **kwargs}
        super().__init__(img_size=img_size, in_chans=in_chans, **kwargs)
        self.patch_embed = ConvStem(img_size, in_chans, self.embed_dim)
        for blk in self.blocks:
            blk.ls1 = Scale(1.0 / skip_lam)
            blk.ls2 = Scale(1.0 / skip_lam)
        self.aux_head = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """head(CLS) + 0.5 · max over patch tokens of aux_head (x: normed tokens [B, N, C])."""
        if pre_logits:
            return x[:, 0]
        aux = self.aux_head(x[:, self.num_prefix_tokens:])
        return self.head(x[:, 0]) + 0.5 * aux.max(dim=1).values


def _make(size: str, pretrained: bool, kwargs: dict) -> LVViT:
    if pretrained:
        raise ValueError("LV-ViT has no timm hub weights: set model.pretrained to a released checkpoint file")
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("pretrained_cfg", "cache_dir"))}
    return LVViT(**{**LVVIT[size], **kwargs})


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-T: width 240, depth 12, 4 heads (8.53 M params, 2.88 G MACs)."""
    return _make("t", pretrained, kwargs)


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: width 384, depth 16, 6 heads (26.15 M params, 6.57 G MACs)."""
    return _make("s", pretrained, kwargs)


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-M: width 512, depth 20, 8 heads (55.83 M params, 12.70 G MACs)."""
    return _make("m", pretrained, kwargs)

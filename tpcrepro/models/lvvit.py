"""LV-ViT (token labeling, NeurIPS'21) written on timm's ViT: lvvit_t, lvvit_s, lvvit_m.

timm has no LV-ViT. The configuration follows the released models: a
convolutional stem (7×7/2 conv, two 3×3 convs, each with BatchNorm and
ReLU, then an 8×8/8 projection: 14×14 tokens at 224 px), CLS and learned
position embedding, qkv without bias, MLP ratio 3, residual branches divided
by `skip_lam` (1 for T, 2 for S and M), and an auxiliary head over the patch
tokens. The prediction is head(CLS) + 0.5·max over patches of aux_head.
Training takes plain cross-entropy on that prediction, or, with dense label
maps (data.token_labels), LV-ViT's token-labeling loss with MixToken
(tpcrepro.token_labeling). Parameter names match the released checkpoints,
so their state dicts load as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from tpcrepro.models.evit import EViT, EViTCfg
from tpcrepro.models.registry import SMOKE_CFG, cfg, register
from tpcrepro.models.smoke import sincos_init_
from tpcrepro.models.vit import TPCVisionTransformer
from tpcrepro.token_labeling import Box, swap_box

LVVIT = {
    "t": dict(embed_dim=240, depth=12, num_heads=4, skip_lam=1.0),
    "s": dict(embed_dim=384, depth=16, num_heads=6, skip_lam=2.0),
    "m": dict(embed_dim=512, depth=20, num_heads=8, skip_lam=2.0),
}


class ConvStem(nn.Module):
    """LV-ViT's patch embedding. [B, in, H, W] -> [B, (H/p)·(W/p), C] with p = stride · patch.

    Released models: stride 2, patch 8 (16×16 pixels per token), width 64.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, embed_dim: int = 384, width: int = 64,
                 stride: int = 2, patch: int = 8):
        super().__init__()
        p = stride * patch
        self.img_size = (img_size, img_size)
        self.patch_size = (p, p)
        self.grid_size = (img_size // p, img_size // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, width, 7, stride=stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.proj = nn.Conv2d(width, embed_dim, patch, stride=patch)
        self.relu = nn.ReLU(inplace=True)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """A new image size (timm's VisionTransformer.set_input_size resamples the positions to the new grid)."""
        if patch_size is not None and tuple(patch_size) != self.patch_size:
            raise ValueError(f"the convolutional stem's patch size is fixed at {self.patch_size}")
        if img_size is not None:
            self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            p = self.patch_size[0]
            self.grid_size = (self.img_size[0] // p, self.img_size[1] // p)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)

    def stem_macs(self) -> int:
        """The stem's MACs at this image size: convolutions, and BatchNorm at 2 per element as fvcore counts it."""
        s = self.conv1.stride[0]
        hw = (self.img_size[0] // s) * (self.img_size[1] // s)
        c1, c2 = self.conv1, self.conv2
        conv1 = hw * c1.out_channels * c1.in_channels * 49
        conv23 = 2 * hw * c2.out_channels * c2.in_channels * 9
        bn = 3 * 2 * hw * c1.out_channels
        k = self.proj.kernel_size[0]
        return conv1 + conv23 + bn + self.num_patches * self.proj.out_channels * self.proj.in_channels * k * k


class Scale(nn.Module):
    """Multiply by a fixed factor (LV-ViT's 1/skip_lam on each residual branch); no parameters."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor if self.factor != 1.0 else x


VIT_DEFAULTS = dict(patch_size=16, mlp_ratio=3.0, qkv_bias=False)


def lvvit_parts_(vit: VisionTransformer, skip_lam: float, stem: dict) -> VisionTransformer:
    """Turn a timm ViT into LV-ViT in place: convolutional stem, residual branches ÷ skip_lam, aux head."""
    img = vit.patch_embed.img_size[0]
    vit.patch_embed = ConvStem(img, vit.patch_embed.proj.in_channels, vit.embed_dim, **stem)
    if vit.patch_embed.num_patches != vit.pos_embed.shape[1] - vit.num_prefix_tokens:
        raise ValueError(f"the stem's {vit.patch_embed.patch_size} patches do not match patch_size of the ViT")
    for blk in vit.blocks:
        blk.ls1 = Scale(1.0 / skip_lam)
        blk.ls2 = Scale(1.0 / skip_lam)
    vit.aux_head = nn.Linear(vit.embed_dim, vit.num_classes) if vit.num_classes else nn.Identity()
    ref = vit.pos_embed  # timm may build the model on another device or dtype (create_model(device=...))
    vit.patch_embed.to(ref.device, ref.dtype)
    vit.aux_head.to(ref.device, ref.dtype)
    return vit


def embed_mixed(vit: VisionTransformer, x: torch.Tensor, box: Optional[Box]) -> torch.Tensor:
    """Patch embedding with MixToken's box taken from the flipped batch (box None: plain), then CLS and positions."""
    t = vit.patch_embed(x)
    if box is not None:
        t = swap_box(t, vit.patch_embed.grid_size, box)
    return vit.norm_pre(vit._pos_embed(t))


def token_outputs(vit: VisionTransformer, normed: torch.Tensor, box: Optional[Box]) -> dict:
    """Token-labeling outputs from the normed tokens: head(CLS) and the aux head per patch token, unmixed."""
    aux = vit.aux_head(normed[:, vit.num_prefix_tokens:])
    if box is not None:
        aux = swap_box(aux, vit.patch_embed.grid_size, box)
    return {"logits": vit.head(normed[:, 0]), "aux_tokens": aux}


class LVViTHeads:
    """LV-ViT's two heads on a timm ViT (mixed in before the ViT class): the prediction, reset, and cfg names."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """head(CLS) + 0.5 · max over patch tokens of aux_head; pre_logits (or no classes): the CLS features."""
        cls = self.head_drop(self.fc_norm(x[:, 0]))
        if pre_logits or self.num_classes == 0:
            return cls
        return self.head(cls) + 0.5 * self.aux_head(x[:, self.num_prefix_tokens:]).max(dim=1).values

    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.aux_head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's reset, for both heads (a fine-tuning to another class count replaces the aux head too)."""
        VisionTransformer.reset_classifier(self, num_classes, global_pool)
        w = self.head.weight if isinstance(self.head, nn.Linear) else self.cls_token
        self.aux_head = (nn.Linear(self.embed_dim, num_classes, device=w.device, dtype=w.dtype)
                         if num_classes > 0 else nn.Identity()).train(self.head.training)


class LVViT(LVViTHeads, VisionTransformer):
    """timm VisionTransformer shaped as LV-ViT. forward(x) -> logits [B, classes];
    forward_token_labels(x, box) -> {"logits": head(CLS), "aux_tokens": [B, N, classes]} (token labeling)."""

    def __init__(self, skip_lam: float = 2.0, stem: Optional[dict] = None, **kwargs):
        super().__init__(**{**VIT_DEFAULTS, **kwargs})
        lvvit_parts_(self, skip_lam, stem or {})

    def forward_token_labels(self, x: torch.Tensor, box: Optional[Box] = None) -> dict:
        """Token labeling's outputs; box: MixToken's box, swapped in from the flipped batch and back (None: plain)."""
        t = self.blocks(embed_mixed(self, x, box))
        return token_outputs(self, self.norm(t), box)


class TPCLVViT(LVViTHeads, TPCVisionTransformer):
    """TPC in every LV-ViT block; the aux head reads every token's halting-weighted output (METHOD.md §9)."""

    all_token_outputs = True

    def __init__(self, skip_lam: float = 2.0, stem: Optional[dict] = None, **kwargs):
        super().__init__(**{**VIT_DEFAULTS, **kwargs})
        lvvit_parts_(self, skip_lam, stem or {})

    def _embed(self, x: torch.Tensor, box: Optional[Box] = None) -> torch.Tensor:
        return embed_mixed(self, x, box)

    def _outputs(self, out: torch.Tensor, box: Optional[Box] = None, token_labels: bool = False) -> dict:
        if token_labels or box is not None:
            normed = self.norm(out)
            return {"features": normed, **token_outputs(self, normed, box)}
        return super()._outputs(out)

    def forward_token_labels(self, x: torch.Tensor, box: Optional[Box] = None) -> dict:
        """As forward_with_stats, with "logits" = head(CLS) and "aux_tokens" [B, N, classes] (token labeling)."""
        result = self._form(x, box, token_labels=True)
        result.pop("features")
        result["stats"]["macs"] = self.per_image_macs(result["stats"])
        return result


class EViTLVViT(LVViTHeads, EViT):
    """EViT's token reorganisation on LV-ViT (the aux head reads the kept tokens and the fused one)."""

    def __init__(self, skip_lam: float = 2.0, stem: Optional[dict] = None, **kwargs):
        super().__init__(**{**VIT_DEFAULTS, **kwargs})
        lvvit_parts_(self, skip_lam, stem or {})


# the smoke LV-ViT: digits at 16×16, stem stride 1 and 2×2 patches (8×8 tokens), width 64, depth 8
SMOKE = dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=8, num_heads=4, skip_lam=2.0,
             stem=dict(width=16, stride=1, patch=2))
SMOKE_EVIT = EViTCfg(locations=(2, 4, 6))
LVVIT_SMOKE_DOC = "on the smoke LV-ViT (16×16 digits, 8×8 tokens, width 64, depth 8, stem width 16)"
# timm has no LV-ViT weights: the cfgs carry no source (recipes load the released files: model.pretrained)
LVVIT_CFG = cfg(first_conv="patch_embed.conv1", classifier=("head", "aux_head"))
LVVIT_SMOKE_CFG = cfg(**{**SMOKE_CFG, "first_conv": "patch_embed.conv1", "classifier": ("head", "aux_head")})

SIZES = {"t": "width 240, depth 12, 4 heads (8.53 M params, 2.88 G MACs)",
         "s": "width 384, depth 16, 6 heads (26.15 M params, 6.57 G MACs)",
         "m": "width 512, depth 20, 8 heads (55.83 M params, 12.70 G MACs)"}
for _size, _what in SIZES.items():
    register(f"lvvit_{_size}", LVViT, LVVIT[_size], LVVIT_CFG, f"LV-ViT-{_size.upper()}: {_what}.", __name__)
    register(f"tpc_lvvit_{_size}", TPCLVViT, LVVIT[_size], LVVIT_CFG, f"TPC-ViT on LV-ViT-{_size.upper()}.", __name__)
register("evit_lvvit_s", EViTLVViT, {**LVVIT["s"], "evit": EViTCfg(locations=(4, 8, 12))}, LVVIT_CFG,
         "EViT (keep 0.7 at blocks 5, 9, 13) on LV-ViT-S.", __name__)
register("lvvit_smoke", LVViT, SMOKE, LVVIT_SMOKE_CFG, f"LV-ViT {LVVIT_SMOKE_DOC}.", __name__, post=sincos_init_)
register("tpc_lvvit_smoke", TPCLVViT, SMOKE, LVVIT_SMOKE_CFG, f"TPC-ViT {LVVIT_SMOKE_DOC}.", __name__,
         post=sincos_init_)
register("evit_lvvit_smoke", EViTLVViT, {**SMOKE, "evit": SMOKE_EVIT}, LVVIT_SMOKE_CFG, f"EViT {LVVIT_SMOKE_DOC}.",
         __name__, post=sincos_init_)
BACKBONE = {f"tpc_lvvit_{k}": f"lvvit_{k}" for k in SIZES} | {"tpc_lvvit_smoke": "lvvit_smoke"}

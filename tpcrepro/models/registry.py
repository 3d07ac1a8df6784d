"""Register tpcrepro's models with timm the way timm's own model files do.

One helper for every family: `register` puts the model's pretrained cfg in
its module's `default_cfgs` (generate_default_cfgs) and registers an entry
point (register_model) that builds the model through timm's
build_model_with_cfg. So every model has a `pretrained_cfg`/`default_cfg`,
timm's factory arguments (pretrained_cfg, pretrained_cfg_overlay, cache_dir,
features_only, ...) are handled by timm alone, and where a method sits on a
DeiT or Swin backbone its cfg is the backbone's released one: the method's
parameters are exactly the backbone's, so `timm.create_model("tpc_deit_s",
pretrained=True)` loads deit_small_patch16_224.fb_in1k into the TPC model.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Callable, Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model,
                         resolve_pretrained_cfg)
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter

DEIT = {
    "t": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "s": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
DEIT_NAMES = {"t": "deit_tiny_patch16_224", "s": "deit_small_patch16_224", "b": "deit_base_patch16_224"}
DEIT_TAG = "fb_in1k"
SMOKE_NAME = "vit_smoke_patch2_16"


def cfg(**kwargs) -> dict:
    """A pretrained cfg without weights (timm's ViT/DeiT defaults, as in timm's deit.py `_cfg`)."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


SMOKE_CFG = dict(num_classes=10, input_size=(1, 16, 16), mean=(0.5,), std=(0.5,), crop_pct=1.0)  # digits in [-1, 1]


def backbone_cfg(name_tag: str, **overrides):
    """A released backbone's pretrained cfg (its weights, input size, normalisation), for a method on it."""
    return replace(get_pretrained_cfg(name_tag), **overrides)


def _has_weights(name: str, kwargs: dict) -> bool:
    c = resolve_pretrained_cfg(name, pretrained_cfg=kwargs.get("pretrained_cfg"),
                               pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    return bool(c.has_weights or c.state_dict is not None)


def build(name: str, cls: Callable, pretrained: bool, kwargs: dict, post: Optional[Callable] = None,
          features: Optional[dict] = None, filter_fn: Optional[Callable] = None, strict: bool = True):
    """build_model_with_cfg for one of tpcrepro's models.

    post: applied to the fresh model before any weights load (the smoke models' sin-cos positions);
    features: timm's feature_cfg where the family supports features_only (None: it does not).
    """
    if pretrained and not _has_weights(name, kwargs):
        raise ValueError(f"{name} has no released weights: train it with tpcrepro, or pass "
                         "pretrained_cfg_overlay=dict(file=PATH) (recipes: model.pretrained=PATH)")
    if kwargs.get("features_only") and features is None:
        raise ValueError(f"{name} has no features_only: the method changes the token set between blocks, "
                         "so its intermediate tokens have no feature-map layout")
    make = cls if post is None else (lambda **kw: post(cls(**kw)))
    return build_model_with_cfg(make, name, pretrained, feature_cfg=dict(features or {}),
                                pretrained_filter_fn=filter_fn, pretrained_strict=strict, **kwargs)


def register(name: str, cls: Callable, config: dict, pretrained_cfg, doc: str, module: str, tag: str = "",
             post: Optional[Callable] = None, features: Optional[dict] = None, filter_fn: Optional[Callable] = None,
             strict: bool = True) -> None:
    """Register `name` (pretrained cfg under `name.tag`) in `module`, built as cls(**{**config, **kwargs}).

    module: the registering module's __name__ (timm lists the model under it and reads its default_cfgs).
    """
    mod = sys.modules[module]
    if not hasattr(mod, "default_cfgs"):
        mod.default_cfgs = {}
    mod.default_cfgs.update(generate_default_cfgs({f"{name}.{tag}" if tag else name: pretrained_cfg}))

    def entry(pretrained: bool = False, **kwargs):
        return build(name, cls, pretrained, {**config, **kwargs}, post, features, filter_fn, strict)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = module
    entry.__doc__ = doc
    register_model(entry)


def register_family(cls: type, prefix: str, what: str, module: str, sizes: str = "tsb",
                    defaults: Optional[dict] = None, smoke_defaults: Optional[dict] = None, strict: bool = True,
                    smoke_features: Optional[dict] = None) -> None:
    """<prefix>_deit_<size> on each DeiT (its released cfg and weights) and <prefix>_vit_smoke.

    defaults: size -> constructor kwargs (e.g. A-ViT's gate centre per size);
    strict=False where the method adds parameters the backbone's weights lack.
    """
    from tpcrepro.models.smoke import SMOKE_VIT, sincos_init_

    defaults = defaults or {}
    for size in sizes:
        register(f"{prefix}_deit_{size}", cls, {**DEIT[size], **defaults.get(size, {})},
                 backbone_cfg(f"{DEIT_NAMES[size]}.{DEIT_TAG}"), f"{what} on {DEIT_NAMES[size]}.", module,
                 tag=DEIT_TAG, filter_fn=vit_filter, strict=strict)
    register(f"{prefix}_vit_smoke", cls, {**SMOKE_VIT, **(smoke_defaults or {})}, cfg(**SMOKE_CFG),
             f"{what} on the smoke ViT ({SMOKE_NAME}).", module, post=sincos_init_, filter_fn=vit_filter,
             strict=strict, features=smoke_features)

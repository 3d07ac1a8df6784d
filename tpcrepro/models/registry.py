"""Register a method's models with timm: <prefix>_deit_{t,s,b} and <prefix>_vit_smoke.

Every method wraps the same backbones, so one function builds them: the
method's class with a DeiT (or the smoke ViT) configuration, extra defaults
per size (e.g. A-ViT's gate centre), and the backbone's parameter names, so
the backbone's checkpoints load into it.
"""

from __future__ import annotations

from typing import Optional

from timm.models import register_model

from tpcrepro.models.smoke import SMOKE_VIT, sincos_init_

DEIT = {
    "t": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "s": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
DEIT_NAMES = {"t": "deit_tiny_patch16_224", "s": "deit_small_patch16_224", "b": "deit_base_patch16_224"}
SMOKE_NAME = "vit_smoke_patch2_16"


def build(cls: type, variant: dict, pretrained: bool, kwargs: dict):
    if pretrained:
        raise ValueError(f"{cls.__name__} models load their backbone's weights: set model.backbone and model.pretrained")
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("pretrained_cfg", "cache_dir"))}
    return cls(**{**variant, **kwargs})


def _register(name: str, cls: type, variant: dict, defaults: dict, doc: str, smoke: bool) -> None:
    def create(pretrained: bool = False, **kwargs):
        model = build(cls, variant, pretrained, {**defaults, **kwargs})
        return sincos_init_(model) if smoke else model

    create.__name__ = create.__qualname__ = name
    create.__module__ = cls.__module__
    create.__doc__ = doc
    register_model(create)


def register_family(cls: type, prefix: str, what: str, sizes: str = "tsb",
                    defaults: Optional[dict] = None, smoke_defaults: Optional[dict] = None) -> None:
    """Register <prefix>_deit_<size> for each size and <prefix>_vit_smoke; defaults: size -> constructor kwargs."""
    defaults = defaults or {}
    for size in sizes:
        _register(f"{prefix}_deit_{size}", cls, DEIT[size], defaults.get(size, {}),
                  f"{what} on {DEIT_NAMES[size]}.", smoke=False)
    _register(f"{prefix}_vit_smoke", cls, SMOKE_VIT, smoke_defaults or {}, f"{what} on the smoke ViT ({SMOKE_NAME}).",
              smoke=True)

"""The timm internals tpcrepro's models touch exist in the installed timm (pyproject declares the floor)."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import Block, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
FLOOR = (1, 0, 16)  # Attention.norm (scale_norm), which every block forward here applies, is new in timm 1.0.16


def _parse(v: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def test_pyproject_declares_the_floor_and_the_installed_timm_meets_it():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"timm>={".".join(map(str, FLOOR))}"' in text
    assert _parse(version("timm")) >= FLOOR


def test_block_and_attention_internals():
    """models/blocks.py, vit.py, dynamicvit.py, tokenmaps.py: the qkv split and proj(norm(·)) of timm's Block."""
    blk = Block(dim=32, num_heads=4, qkv_bias=True)
    for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
        assert hasattr(blk, name), f"Block.{name}"
    a = blk.attn
    for name in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "norm", "proj",
                 "proj_drop"):
        assert hasattr(a, name), f"Attention.{name}"
    assert a.qkv.out_features == 3 * a.num_heads * a.head_dim  # the fused [q; k; v] layout the split relies on
    assert hasattr(blk.mlp, "fc1")  # flops.ViTDims


def test_block_helpers_reproduce_timms_block():
    from tpcrepro.models.blocks import block_forward

    torch.manual_seed(0)
    blk = Block(dim=32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(block_forward(blk, x), blk(x), atol=1e-6)


def test_vision_transformer_internals():
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=3)
    for name in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "fc_norm", "head_drop",
                 "head", "pool", "global_pool", "num_prefix_tokens", "cls_token", "pos_embed", "embed_dim",
                 "set_input_size", "reset_classifier", "forward_head", "no_weight_decay"):
        assert hasattr(vit, name), f"VisionTransformer.{name}"
    assert "block_fn" in inspect.signature(VisionTransformer.__init__).parameters
    for name in ("img_size", "grid_size", "num_patches", "proj"):
        assert hasattr(vit.patch_embed, name), f"PatchEmbed.{name}"


def test_swin_internals():
    m = SwinTransformer(img_size=16, in_chans=1, num_classes=3, patch_size=1, window_size=4, embed_dim=8,
                        depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2))
    for name in ("patch_embed", "layers", "norm", "head", "forward_head", "forward_intermediates", "feature_info"):
        assert hasattr(m, name), f"SwinTransformer.{name}"
    stage = m.layers[2]
    assert hasattr(stage, "downsample") and hasattr(stage, "blocks")
    blk = stage.blocks[0]
    for name in ("_attn", "norm1", "norm2", "mlp", "drop_path1", "drop_path2", "window_size", "input_resolution"):
        assert hasattr(blk, name), f"SwinTransformerBlock.{name}"
    assert hasattr(m.head, "fc") and hasattr(m.patch_embed, "grid_size")


def test_builder_and_registry_internals():
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg  # noqa
    from timm.models._features import feature_take_indices  # noqa: F401
    from timm.models.swin_transformer import checkpoint_filter_fn  # noqa: F401
    from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter  # noqa: F401
    from timm.layers import build_sincos2d_pos_embed  # noqa: F401

    params = inspect.signature(build_model_with_cfg).parameters
    for name in ("feature_cfg", "pretrained_filter_fn", "pretrained_strict", "pretrained_cfg_overlay"):
        assert name in params, f"build_model_with_cfg({name}=)"
    assert hasattr(timm.models.PretrainedCfg, "has_weights")

"""Every registered model is a timm model: logits from forward, timm's cfgs and builders, its heads, its weights."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import get_channel_dim
from timm.models._registry import _model_entrypoints

import tpcrepro.models  # noqa: F401
from tpcrepro.models import api
from tpcrepro.models.controller import TPCCfg

OURS = sorted(n for n, fn in _model_entrypoints.items() if fn.__module__.startswith("tpcrepro."))
SMOKE = [n for n in OURS if "smoke" in n]
NEVER = TPCCfg(beta=1e4)  # the gates never fire: nothing halts or pauses


def test_every_family_is_registered_with_a_pretrained_cfg():
    assert len(OURS) == 33
    for name in OURS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.input_size and cfg.first_conv, name


@pytest.mark.parametrize("name", OURS)
def test_structure_on_the_meta_device(name):
    """Built through timm's builder on every model: cfg attached, heads reset, unknown arguments refused."""
    with torch.device("meta"):
        m = timm.create_model(name)
        assert m.pretrained_cfg["architecture"] == name and m.default_cfg is m.pretrained_cfg
        m.reset_classifier(7)
        heads = m.get_classifier()
        for head in heads if isinstance(heads, tuple) else (heads,):
            assert head.out_features == 7, name  # LV-ViT's aux_head too
        with pytest.raises(TypeError):
            timm.create_model(name, not_a_model_arg=1)


@pytest.mark.parametrize("name", SMOKE)
def test_forward_is_logits_in_eval_and_training(name):
    torch.manual_seed(0)
    m = timm.create_model(name)
    x = torch.randn(3, *m.pretrained_cfg["input_size"])
    for train in (False, True):
        m.train(train)
        out = m(x)
        assert isinstance(out, torch.Tensor) and out.shape == (3, 10), name
        feats = m.forward_features(x)
        assert m.forward_head(feats, pre_logits=True).shape == (3, m.num_features)
        assert m.forward_head(feats).shape == (3, 10)
        full = api.stats_forward(m, x)
        assert full["logits"].shape == (3, 10) and set(full) >= {"logits", "stats", "losses"}
        if api.is_adaptive(m):
            assert full["stats"]["macs"].shape == (3,)
            assert bool(full["losses"]) == train  # the controller's losses exist in training only
    m.eval()
    m.reset_classifier(5)
    assert m(x).shape == (3, 5)  # every head reset (LV-ViT's aux head included): fine-tuning to 5 classes works
    m.reset_classifier(0)
    assert m(x).shape == (3, m.num_features)


def test_forward_with_stats_is_the_forward_plus_stats():
    torch.manual_seed(0)
    m = timm.create_model("tpc_vit_smoke", tpc=TPCCfg(beta=4.0, gamma=10.0)).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        out = m.forward_with_stats(x)
        assert torch.equal(out["logits"], m(x))
    assert set(out) == {"logits", "stats"}
    assert torch.equal(out["stats"]["macs"], m.per_image_macs(out["stats"]))


def test_features_only_through_timms_feature_machinery():
    x = torch.randn(2, 1, 16, 16)
    for name in ("swin_smoke", "tpc_swin_smoke", "vit_smoke_patch2_16"):
        m = timm.create_model(name, features_only=True).eval()
        with torch.no_grad():
            feats = m(x)
        axis = get_channel_dim(getattr(m, "output_fmt", "NCHW"))
        assert [f.shape[axis] for f in feats] == m.feature_info.channels(), name
    with pytest.raises(ValueError, match="features_only"):
        timm.create_model("evit_vit_smoke", features_only=True)


@pytest.mark.parametrize("name,backbone,shape", [
    ("tpc_deit_t", "deit_tiny_patch16_224", (2, 3, 224, 224)),
    ("tpc_swin_smoke", "swin_smoke", (2, 1, 16, 16)),
])
def test_pretrained_true_loads_the_backbones_weights(tmp_path, name, backbone, shape):
    """pretrained=True reads the cfg's weights (here a local file, as a released backbone's would be)."""
    torch.manual_seed(0)
    base = timm.create_model(backbone).eval()
    path = tmp_path / f"{backbone}.pth"
    torch.save(base.state_dict(), path)
    torch.manual_seed(1)  # other random weights, so only the loading can make them agree
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), tpc=NEVER).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(model(x), base(x), atol=1e-5)


def test_the_deit_cfgs_point_at_the_released_backbones():
    for size, deit in (("t", "deit_tiny_patch16_224"), ("s", "deit_small_patch16_224"), ("b", "deit_base_patch16_224")):
        for prefix in ("tpc", "evit", "tome", "dynamicvit") + (("avit",) if size != "b" else ()):
            cfg = timm.models.get_pretrained_cfg(f"{prefix}_deit_{size}")
            released = timm.models.get_pretrained_cfg(f"{deit}.fb_in1k")
            assert (cfg.hf_hub_id, cfg.url, cfg.mean, cfg.crop_pct) == (released.hf_hub_id, released.url,
                                                                         released.mean, released.crop_pct)
    assert timm.models.get_pretrained_cfg("tpc_swin_t").hf_hub_id == "timm/swin_tiny_patch4_window7_224.ms_in1k"
    released = timm.list_pretrained()
    assert "tpc_deit_s.fb_in1k" in released and not [n for n in released if "lvvit" in n]


def test_pretrained_without_released_weights_says_what_to_do():
    with pytest.raises(ValueError, match="no released weights"):
        timm.create_model("lvvit_smoke", pretrained=True)


@pytest.mark.parametrize("name", ["evit_vit_smoke", "tome_vit_smoke", "lvvit_smoke", "swin_smoke"])
def test_fixed_rate_families_script_and_trace(name):
    """TorchScript and FX, as timm's DeiT: no branch on a tensor's shape or values in their forward."""
    from torch.fx import symbolic_trace

    torch.manual_seed(0)
    m = timm.create_model(name).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = m(x)
        assert torch.allclose(torch.jit.script(m)(x), ref, atol=1e-5)
        assert torch.allclose(symbolic_trace(m)(x), ref, atol=1e-5)


def test_recipe_weights_of_another_class_count_leave_both_lvvit_heads_initialised(tmp_path):
    from tpcrepro import weights
    from tpcrepro.recipe import ModelCfg

    sd = timm.create_model("lvvit_smoke", num_classes=7).state_dict()
    torch.save(sd, tmp_path / "seven.pth")
    model = weights.create(ModelCfg(name="lvvit_smoke", num_classes=10, in_chans=1, img_size=16,
                                    pretrained=str(tmp_path / "seven.pth")))
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    assert model.aux_head.out_features == 10 and model.head.out_features == 10

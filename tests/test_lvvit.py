"""LV-ViT backbones: the released configurations' parameters and MACs, and their checkpoint format."""

from __future__ import annotations

import pytest
import timm
import torch

import tpcrepro.models  # noqa: F401
from tpcrepro import flops, weights
from tpcrepro.recipe import ModelCfg

REFERENCE = {"lvvit_t": (8.53e6, 2.88e9), "lvvit_s": (26.15e6, 6.57e9), "lvvit_m": (55.83e6, 12.70e9)}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_params_and_macs_match_the_released_configurations(name):
    m = timm.create_model(name).eval()
    params, macs = REFERENCE[name]
    assert abs(flops.count_params(m) / params - 1) < 0.001
    assert abs(flops.fvcore_macs(m, (3, 224, 224)) / macs - 1) < 0.002


def test_released_key_format_loads(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("lvvit_s").eval()
    sd = src.state_dict()
    for key in ("patch_embed.conv1.weight", "patch_embed.bn3.running_var", "patch_embed.proj.bias",
                "blocks.15.attn.qkv.weight", "aux_head.weight", "pos_embed", "cls_token"):
        assert key in sd, key
    assert "blocks.0.attn.qkv.bias" not in sd  # LV-ViT's qkv has no bias
    torch.save(sd, tmp_path / "lvvit_s.pth")  # the released files are flat state dicts
    loaded = weights.create(ModelCfg(name="lvvit_s", pretrained=str(tmp_path / "lvvit_s.pth"))).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))


def test_prediction_adds_half_the_aux_head_max():
    torch.manual_seed(0)
    m = timm.create_model("lvvit_t").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = m.forward_features(x)
        expected = m.head(tokens[:, 0]) + 0.5 * m.aux_head(tokens[:, 1:]).max(1).values
        assert torch.allclose(m(x), expected)

"""Pretrained weights: timm and DeiT file formats, head replacement, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch

from tpcrepro import weights
from tpcrepro.errors import UserError
from tpcrepro.recipe import ModelCfg

CFG = ModelCfg(name="vit_smoke_patch2_16", num_classes=10, img_size=16, in_chans=1)


@pytest.fixture
def source():
    torch.manual_seed(0)
    return weights.create(CFG).eval()


@pytest.mark.parametrize("fmt", ["timm", "deit", "ddp"])
def test_local_file_formats_give_identical_outputs(tmp_path, source, fmt):
    sd = source.state_dict()
    obj = {"timm": sd, "deit": {"model": sd, "epoch": 299}, "ddp": {"state_dict": {f"module.{k}": v for k, v in sd.items()}}}[fmt]
    torch.save(obj, tmp_path / "w.pth")
    torch.manual_seed(1)
    loaded = weights.create(ModelCfg(**{**CFG.__dict__, "pretrained": str(tmp_path / "w.pth")})).eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(source(x), loaded(x))


def test_head_of_another_size_is_left_initialised(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    m = weights.create(ModelCfg(**{**CFG.__dict__, "num_classes": 3, "pretrained": str(tmp_path / "w.pth")}))
    assert m.head.out_features == 3
    assert torch.equal(m.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_missing_or_wrong_files_are_clear(tmp_path):
    with pytest.raises(UserError, match="not found"):
        weights.create(ModelCfg(**{**CFG.__dict__, "pretrained": str(tmp_path / "none.pth")}))
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(UserError, match="cannot read weights"):
        weights.create(ModelCfg(**{**CFG.__dict__, "pretrained": str(tmp_path / "junk.pth")}))
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), tmp_path / "deit.pth")
    with pytest.raises(UserError, match="do not fit"):
        weights.create(ModelCfg(**{**CFG.__dict__, "pretrained": str(tmp_path / "deit.pth")}))


def test_hub_unreachable_is_clear(monkeypatch):
    real = timm.create_model

    def offline(*a, pretrained=False, **k):
        if pretrained:
            raise ConnectionError("no network")
        return real(*a, **k)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="model.pretrained=/path"):
        weights.create(ModelCfg(name="deit_tiny_patch16_224", pretrained="hub"))
    with pytest.raises(UserError, match="'deit_tiny_patch16_224' weights"):  # an adaptive model asks for its backbone's
        weights.create(ModelCfg(name="tpc_deit_t", backbone="deit_tiny_patch16_224", pretrained="hub"))


def test_backbone_hub_weights_load_into_the_adaptive_model(monkeypatch):
    real = timm.create_model
    torch.manual_seed(0)
    released = real("deit_tiny_patch16_224")

    def hub(name, pretrained=False, **k):
        return released if pretrained else real(name, **k)

    monkeypatch.setattr(timm, "create_model", hub)
    m = weights.create(ModelCfg(name="tpc_deit_t", backbone="deit_tiny_patch16_224", pretrained="hub"))
    assert all(torch.equal(v, released.state_dict()[k]) for k, v in m.state_dict().items())


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model"):
        weights.create(ModelCfg(name="deit_enormous"))

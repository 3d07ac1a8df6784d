"""TPC on LV-ViT and Swin, and EViT on LV-ViT: the invariants of Tables 6 and 7's models."""

from __future__ import annotations

import pytest
import timm
import torch

import tpcrepro.models  # noqa: F401
from tpcrepro import flops, weights
from tpcrepro.models.controller import TPCCfg
from tpcrepro.recipe import ModelCfg

NEVER = TPCCfg(beta=1e4)  # σ(5·t − 10⁴) = 0: nothing halts or pauses before the last layer
BUSY = TPCCfg(beta=0.0, gamma=5.0)  # gates near ½ on random weights: tokens halt, pause and restart


def _pair(tpc_name: str, base_name: str, tpc: TPCCfg, **kw):
    torch.manual_seed(0)
    base = timm.create_model(base_name, **kw).eval()
    model = timm.create_model(tpc_name, tpc=tpc, **kw).eval()
    model.load_state_dict(base.state_dict())  # the same parameters, strictly
    return model, base


def _both_forms(model, x):
    with torch.no_grad():
        model.inference = "removed"
        removed = model.forward_with_stats(x)
        model.inference = "masked"
        masked = model.forward_with_stats(x)
    return masked, removed


@pytest.mark.parametrize("tpc_name,base_name,shape", [
    ("tpc_lvvit_smoke", "lvvit_smoke", (3, 1, 16, 16)),
    ("tpc_lvvit_t", "lvvit_t", (2, 3, 224, 224)),
    ("tpc_swin_smoke", "swin_smoke", (3, 1, 16, 16)),
    ("tpc_swin_t", "swin_tiny_patch4_window7_224", (1, 3, 224, 224)),
])
def test_never_halting_equals_the_backbone(tpc_name, base_name, shape):
    model, base = _pair(tpc_name, base_name, NEVER)
    x = torch.randn(*shape)
    masked, removed = _both_forms(model, x)
    with torch.no_grad():
        ref = base(x)
    assert torch.allclose(masked["logits"], ref, atol=1e-5)
    assert torch.allclose(removed["logits"], ref, atol=1e-5)
    assert int(removed["stats"]["macs"][0]) == model.macs_all_tokens()


@pytest.mark.parametrize("tpc_name,base_name", [("tpc_lvvit_smoke", "lvvit_smoke"), ("tpc_swin_smoke", "swin_smoke")])
def test_masked_and_removed_forms_agree_while_tokens_halt_and_pause(tpc_name, base_name):
    model, _ = _pair(tpc_name, base_name, BUSY)
    x = torch.randn(16, 1, 16, 16)
    masked, removed = _both_forms(model, x)
    assert torch.allclose(masked["logits"], removed["logits"], atol=1e-4)
    for key in ("n_q", "paused", "halted", "restarted", "macs"):
        assert torch.equal(masked["stats"][key], removed["stats"][key]), key
    n_q = removed["stats"]["n_q"]
    assert removed["stats"]["paused"].sum() > 0 and removed["stats"]["restarted"].sum() > 0
    assert (n_q < n_q[:, :1]).any(), "some tokens must stop being computed"
    assert (removed["stats"]["macs"] < model.macs_all_tokens()).all()


def test_lvvit_tokens_halt_with_their_remainder_when_the_cls_halts():
    model, _ = _pair("tpc_lvvit_smoke", "lvvit_smoke", BUSY)
    trace = []
    with torch.no_grad():
        model.forward_masked(torch.randn(8, 1, 16, 16), trace=trace)
    cls_halt = torch.stack([t["halted"][:, 0] for t in trace], 1)  # [B, L]
    layer = cls_halt.float().argmax(1)
    early = cls_halt.any(1) & (layer < len(trace) - 1)
    assert early.any(), "the CLS should halt before the last layer on some image"
    for b in early.nonzero().squeeze(1).tolist():
        after = [t["computed"][b].any() for t in trace[layer[b] + 1:]]
        assert not any(after), "no token of an image is computed after its CLS halts"


def test_halting_weights_of_every_token_sum_to_one_on_lvvit():
    torch.manual_seed(0)
    model = timm.create_model("tpc_lvvit_smoke", tpc=BUSY).train()
    out = model.forward_with_stats(torch.randn(4, 1, 16, 16))
    assert set(out["losses"]) == {"ponder", "distribution"}
    out["logits"].sum().backward()  # the aux head gets gradient through the tokens' outputs
    assert model.aux_head.weight.grad.abs().sum() > 0


def test_swin_analytic_macs_equal_fvcore():
    for name, shape in (("swin_tiny_patch4_window7_224", (3, 224, 224)), ("swin_smoke", (1, 16, 16))):
        torch.manual_seed(0)
        m = timm.create_model(name)
        from tpcrepro.models.swin import swin_macs

        assert swin_macs(m) == flops.fvcore_macs(m, shape)
    assert swin_macs(timm.create_model("swin_tiny_patch4_window7_224")) == 4_509_194_496  # docs/measure.md: 4.509 G


def test_tpc_lvvit_all_token_count_equals_fvcore_of_the_backbone():
    for size in ("smoke", "s"):
        shape = (1, 16, 16) if size == "smoke" else (3, 224, 224)
        model = timm.create_model(f"tpc_lvvit_{size}")
        assert model.macs_all_tokens() == flops.fvcore_macs(timm.create_model(f"lvvit_{size}"), shape)


def test_evit_on_lvvit_s_counts_its_schedule_exactly():
    m = timm.create_model("evit_lvvit_s").eval()
    assert m.evit.locations == (4, 8, 12)
    assert m.macs() == flops.fvcore_macs(m, (3, 224, 224))
    assert abs(m.macs() / 1e9 - 4.7) < 0.05  # Table 7 prints 4.7 G for EViT-LV-ViT-S


def test_released_lvvit_checkpoint_loads_into_tpc_lvvit(tmp_path):
    torch.manual_seed(0)
    sd = timm.create_model("lvvit_s").state_dict()
    torch.save({"model": sd}, tmp_path / "lvvit_s.pth")
    cfg = ModelCfg(name="tpc_lvvit_s", backbone="lvvit_s", pretrained=str(tmp_path / "lvvit_s.pth"))
    model = weights.create(cfg, tpc=NEVER)
    assert torch.equal(model.state_dict()["blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])


def test_swin_takes_no_stabilizer_and_reports_its_gates():
    with pytest.raises(ValueError, match="stabilizer"):
        timm.create_model("tpc_swin_smoke", kappa=8)
    torch.manual_seed(0)
    rep = timm.create_model("tpc_swin_smoke", tpc=TPCCfg(beta=40.0)).gate_report(torch.randn(4, 1, 16, 16))
    assert rep["max_break"] < 1e-6 and len(rep["gate_channel_max"]) == 2

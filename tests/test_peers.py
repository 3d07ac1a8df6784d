"""The compared methods: A-ViT, EViT, DynamicViT on DeiT, against their published facts."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import tpcrepro.models  # noqa: F401
from tpcrepro import flops
from tpcrepro.models import controller as ctl
from tpcrepro.models.avit import AVIT_S
from tpcrepro.models.dynamicvit import DynamicViTCfg
from tpcrepro.models.evit import EViTCfg

SMOKE = dict(num_classes=10, in_chans=1, img_size=16)


def deit_pair(name, **kw):
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224").eval()
    m = timm.create_model(name, **kw).eval()
    missing, unexpected = m.load_state_dict(deit.state_dict(), strict=False)
    assert not unexpected
    return deit, m


def test_evit_deit_s_counts_and_macs():
    m = timm.create_model("evit_deit_s").eval()
    attn, mlp = m.token_counts()
    assert [attn[i] for i in (0, 4, 7, 10)] == [197, 140, 100, 72]
    macs = m.macs()
    assert macs == flops.fvcore_macs(m, (3, 224, 224))
    assert abs(macs / 3.0e9 - 1) < 0.02


def test_dynamicvit_deit_s_counts_macs_params():
    m = timm.create_model("dynamicvit_deit_s").eval()
    assert m.keep_counts() == [137, 96, 67]
    macs = m.macs()
    assert macs == flops.fvcore_macs(m, (3, 224, 224))
    assert abs(macs / 2.9e9 - 1) < 0.04
    assert abs(flops.count_params(m) / 22.8e6 - 1) < 0.005


@pytest.mark.parametrize("name,kw", [("evit_deit_s", {"evit": EViTCfg(keep_rate=1.0)}),
                                     ("dynamicvit_deit_s", {"dynamicvit": DynamicViTCfg(keep_rate=1.0)})])
def test_keeping_everything_is_the_backbone(name, kw):
    deit, m = deit_pair(name, **kw)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = m(x)
        assert torch.allclose(logits, deit(x), atol=1e-4)


def test_dynamicvit_training_and_inference_paths_keep_the_same_tokens():
    torch.manual_seed(0)
    m = timm.create_model("dynamicvit_vit_smoke", **SMOKE).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        masked, removed = m.forward_masked(x, deterministic=True), m.forward_removed(x)
    assert torch.allclose(masked["logits"], removed["logits"], atol=1e-5)
    for dec, idx in zip(masked["decisions"], removed["kept_index"]):
        for b in range(len(x)):
            assert set(dec[b].nonzero().flatten().tolist()) == set(idx[b].tolist())


@pytest.mark.parametrize("kappa", [None, 9])
def test_dynamicvit_policy_attention_is_the_published_softmax_with_policy(kappa):
    """p·a / Σ p·a (p the plain softmax) equals DynamicViT's exp(l − max)·a / Σ exp(l − max)·a, value and gradient
    (the policy's straight-through gradient included); an all-ones policy is the plain block."""
    from tpcrepro.models.blocks import block_forward
    from tpcrepro.models.dynamicvit import policy_block
    from tpcrepro.models.stabilizer import nearest_keys

    torch.manual_seed(0)
    blk = timm.create_model("dynamicvit_vit_smoke", **SMOKE).blocks[1].double()
    x = torch.randn(3, 17, blk.attn.qkv.in_features, dtype=torch.float64)
    policy = (torch.rand(3, 17, dtype=torch.float64) < 0.6).double()
    policy[:, 0] = 1.0

    def published(x, policy):
        q, k, v = blk.heads(blk.norm1(x))
        logits = (q * blk.attn.scale) @ k.transpose(-2, -1)
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        allow = policy[:, None, None, :] + (1.0 - policy[:, None, None, :]) * eye
        if kappa is not None:
            allow = allow * nearest_keys(q, k, kappa, allow > 0).to(x.dtype)
        w = torch.exp(logits - logits.amax(-1, keepdim=True)) * allow
        return blk.residual_mlp(blk.residual_attn(x, (w / w.sum(-1, keepdim=True)) @ v))

    ours_in, ref_in = (policy.clone().requires_grad_(), policy.clone().requires_grad_())
    ours, ref = policy_block(blk, x, ours_in, kappa), published(x, ref_in)
    assert torch.allclose(ours, ref, atol=1e-12)
    g = torch.randn_like(ours)
    (ours * g).sum().backward(), (ref * g).sum().backward()
    assert torch.allclose(ours_in.grad, ref_in.grad, atol=1e-12) and ours_in.grad.abs().sum() > 0
    ones = torch.ones(3, 17, dtype=torch.float64)
    assert torch.allclose(policy_block(blk, x, ones, kappa), block_forward(blk, x, None, kappa), atol=1e-12)


def test_dynamicvit_training_losses_and_frozen_backbone_schedule():
    torch.manual_seed(0)
    m = timm.create_model("dynamicvit_vit_smoke", **SMOKE)
    m.attach_teacher()
    m.train()
    out = m.forward_with_stats(torch.randn(8, 1, 16, 16))
    assert {"ratio", "distill_cls", "distill_tokens"} == set(out["losses"])
    sum(out["losses"].values()).backward()
    assert m.predictors[0].out_conv[0].weight.grad.abs().sum() > 0  # straight-through reaches the predictor
    assert m.lr_scale("backbone", 0) == 0.0 and m.lr_scale("backbone", 5) == 0.01 and m.lr_scale("predictor", 0) == 1
    assert not m.pos_embed.requires_grad and not m.cls_token.requires_grad
    assert sum(p.numel() for p in m.parameters()) == flops.count_params(m)  # the teacher is not a submodule


def test_avit_halting_rule_on_a_hand_made_example():
    """PEERS: h = σ(10·t₀ − centre); c += h; halt once c ≥ 0.99; weights h then the remainder; ρ = layers + R."""
    hs = [0.3, 0.5, 0.4]
    centre = AVIT_S.beta
    state = ctl.TokenState.start(1, 2, "cpu")
    is_cls = torch.tensor([[True, False]])
    weights = []
    for i, h in enumerate(hs):
        t = torch.zeros(1, 2, 4)
        t[..., 0] = (math.log(h / (1 - h)) + centre) / 10.0
        p, rt = ctl.gates(t, AVIT_S)
        assert torch.allclose(p, torch.tensor(h)) and torch.equal(rt, torch.ones_like(rt))
        b_hat = ctl.regularize(p * rt, state.computed(), AVIT_S)  # no TDR: unchanged
        state, w, halt = ctl.step(state, b_hat, p, rt, state.computed(), False, is_cls, AVIT_S)
        weights.append(w[0, 1].item())
    assert weights == pytest.approx([0.3, 0.5, 0.2], abs=1e-6)  # t holds h's logit to float32's precision
    assert bool(state.halted[0, 1]) and state.rho[0, 1].item() == pytest.approx(3.2)
    assert int(state.pause_left.sum()) == 0  # A-ViT never pauses


@pytest.mark.parametrize("name", ["avit_deit_s", "evit_deit_s", "dynamicvit_deit_s"])
def test_every_method_takes_the_stabilizer(name):
    m = timm.create_model(name, kappa=100).eval()
    assert m.kappa == 100
    with torch.no_grad():
        logits = m(torch.randn(1, 3, 224, 224))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("recipe", ["smoke/avit", "smoke/evit_stab", "smoke/dynamicvit"])
def test_smoke_recipes_train(recipe):
    from conftest import FAST
    from tpcrepro.jobs import run_job
    from tpcrepro.recipe import load_recipe

    rec = run_job(load_recipe(recipe, FAST + ("train.epochs=1", "model.init_from=null")), "train", seed=0)
    assert rec.status == "done" and rec.metrics["n_val"] == 64


def test_dynamicvit_backbone_stays_frozen_from_the_first_step(tmp_path):
    """Frozen epochs leave every backbone weight as it started, the first step included; the predictors learn."""
    from conftest import FAST
    from tpcrepro import weights
    from tpcrepro.jobs import run_job
    from tpcrepro.models import method_kwargs
    from tpcrepro.recipe import load_recipe

    r = load_recipe("smoke/dynamicvit", FAST + ("train.epochs=1", "model.init_from=null", "dynamicvit.freeze_epochs=1"))
    torch.manual_seed(0)  # the job's initialisation (jobs._train)
    start = weights.create(r.model, **method_kwargs(r)).state_dict()
    run_job(r, "train", seed=0, run_dir=tmp_path / "r")
    end = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["model"]
    backbone = [k for k in start if not k.startswith("predictors.")]
    assert backbone and all(torch.equal(start[k], end[k]) for k in backbone)
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("predictors."))


def test_tome_counts_macs_and_r_zero_is_the_backbone():
    from tpcrepro.models.tome import ToMeCfg

    m = timm.create_model("tome_deit_s").eval()
    counts = m.token_counts()
    assert counts[0] == 197 and counts[1] == 184 and counts[-1] == 54
    assert m.macs() == flops.fvcore_macs(m, (3, 224, 224))
    deit, zero = deit_pair("tome_deit_s", tome=ToMeCfg(r=0))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(zero(x), deit(x), atol=1e-5)


def test_tome_merge_is_a_size_weighted_average():
    from tpcrepro.models.tome import bipartite_match, merge_tokens

    x = torch.tensor([[[0.0], [1.0], [5.0], [1.1], [9.0]]])  # CLS, then tokens; set a = 0, 2, 4; set b = 1, 3
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.0, 1.0], [1.0, 0.1]]])
    match = bipartite_match(metric, 1)
    merge = lambda t: merge_tokens(t, *match)  # noqa: E731
    size = torch.ones(1, 5, 1)
    merged, new_size = merge(x * size), merge(size)
    assert merged.shape[1] == 4 and merged[0, 0, 0] == 0.0  # CLS kept first
    assert sorted((merged / new_size)[0, :, 0].tolist()) == pytest.approx(sorted([0.0, 9.0, 3.0, 1.1]))


def test_flops_job_of_a_stabilized_method_counts_sparse_attention():
    from tpcrepro.jobs import run_job
    from tpcrepro.recipe import load_recipe

    dense = run_job(load_recipe("smoke/evit"), "flops").metrics
    sparse = run_job(load_recipe("smoke/evit_stab"), "flops").metrics
    assert dense["macs"] == dense["fvcore_macs"] and sparse["macs"] < dense["macs"]


def test_avit_that_never_halts_is_the_backbone():
    from dataclasses import replace

    deit, m = deit_pair("avit_deit_s", tpc=replace(AVIT_S, beta=1e4))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(m.forward_with_stats(x)["logits"], deit(x), atol=1e-4)


def test_tome_schedule_counts_match_fvcore():
    from tpcrepro.models.tome import ToMeCfg

    m = timm.create_model("tome_vit_smoke", **SMOKE, tome=ToMeCfg(schedule=(8, 8, 4, 4, 2, 2, 0, 0))).eval()
    assert m.token_counts() == [65, 57, 49, 45, 41, 39, 37, 37]
    assert m.macs() == flops.fvcore_macs(m, (1, 16, 16))


def test_evit_keep_rate_warm_up():
    cfg = EViTCfg(keep_rate=0.7, shrink_start=10, shrink_epochs=100)
    assert cfg.keep_rate_at(0) == 1.0 and cfg.keep_rate_at(9) == 1.0
    assert cfg.keep_rate_at(60) == pytest.approx(0.85) and cfg.keep_rate_at(110) == 0.7 and cfg.keep_rate_at(300) == 0.7
    m = timm.create_model("evit_vit_smoke", **SMOKE, evit=EViTCfg(locations=(2, 4, 6), shrink_start=1, shrink_epochs=2))
    m.set_epoch(0)
    assert m.token_counts()[1][-1] == 65  # nothing pruned during the first epoch
    assert EViTCfg().keep_rate_at(0) == 0.7  # the fine-tuning recipe: fixed

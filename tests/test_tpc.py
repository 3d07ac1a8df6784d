"""TPC: the invariants of the controller, the masked and removed forms, and its MACs."""

from __future__ import annotations

import pytest
import timm
import torch

import tpcrepro.models  # noqa: F401
from tpcrepro import flops
from tpcrepro.models import controller as ctl
from tpcrepro.models.controller import TPCCfg
from tpcrepro.models.smoke import SMOKE_VIT

SMOKE = dict(num_classes=10, in_chans=1, img_size=16)
NEVER = TPCCfg(beta=1e4)  # σ(5·t − 10⁴) = 0: nothing halts or pauses before the last layer
ACTIVE = TPCCfg(beta=-0.5, gamma=1.0, target_depth=4.0)  # halts, pauses and restarts on random weights


def smoke_pair(cfg: TPCCfg, kappa=None, seed=0):
    torch.manual_seed(seed)
    base = timm.create_model("vit_smoke_patch2_16", **SMOKE).eval()
    tpc = timm.create_model("tpc_vit_smoke", **SMOKE, tpc=cfg, kappa=kappa).eval()
    tpc.load_state_dict(base.state_dict())
    return base, tpc


def images(n=6, seed=1):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_never_halting_controller_is_the_backbone():
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224").eval()
    tpc = timm.create_model("tpc_deit_t", tpc=NEVER).eval()
    tpc.load_state_dict(deit.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = deit(x)
        assert torch.allclose(tpc.forward_with_stats(x)["logits"], ref, atol=1e-5)
        tpc.inference = "masked"
        assert torch.allclose(tpc.forward_with_stats(x)["logits"], ref, atol=1e-5)


def test_same_parameter_count_as_the_backbone():
    for t, s in (("tpc_deit_t", "deit_tiny_patch16_224"), ("tpc_deit_s", "deit_small_patch16_224")):
        assert flops.count_params(timm.create_model(t)) == flops.count_params(timm.create_model(s))


@pytest.mark.parametrize("layout", [{}, {"buckets": 1}])
@pytest.mark.parametrize("kappa", [None, 20])
@pytest.mark.parametrize("cfg", [ACTIVE, TPCCfg(beta=-0.5, gamma=1.0, paused_as_kv=False, pause_span=2),
                                 TPCCfg(beta=-0.5, gamma=1.0, reuse="none")])
def test_masked_and_removed_forms_agree(cfg, kappa, layout):
    _, tpc = smoke_pair(cfg, kappa)
    for k, v in layout.items():
        setattr(tpc, k, v)
    x = images(8)
    with torch.no_grad():
        removed = tpc.forward_with_stats(x)
        tpc.inference = "masked"
        masked = tpc.forward_with_stats(x)
    assert torch.allclose(removed["logits"], masked["logits"], atol=1e-5)
    for key in ("n_q", "n_kv", "paused", "halted", "restarted", "macs"):
        assert torch.equal(removed["stats"][key], masked["stats"][key]), key
    assert (removed["stats"]["halted"][:, :-1].sum() > 0)  # the test exercises halting


@pytest.mark.parametrize("kappa", [None, 7])
def test_padded_layer_with_one_image_computing_every_token(kappa):
    """A group in which one image computes all its tokens and the others do not is not the plain block: each
    image keeps its own queries and keys (the padded path), as in the masked layer and one image at a time."""
    from tpcrepro.models.vit import layer_masked, layer_packed_

    torch.manual_seed(0)
    blk = timm.create_model("tpc_vit_smoke", **SMOKE).eval().blocks[2]
    b, n = 5, 65
    x = torch.randn(b, n, blk.attn.qkv.in_features)
    kv = torch.rand(b, n) < 0.8
    computed = kv & (torch.rand(b, n) < 0.6)
    computed[:, 0] = kv[:, 0] = True
    kv[3] = computed[3] = True  # this image computes every token: the group's largest count is n
    c, k = computed.numpy(), kv.numpy()
    with torch.inference_mode():
        padded = layer_packed_(blk, x.clone(), c, k, 1, kappa)
        masked = layer_masked(blk, x.clone(), computed, kv, kappa)
        alone = torch.cat([layer_packed_(blk, x[i:i + 1].clone(), c[i:i + 1], k[i:i + 1], 1, kappa) for i in range(b)])
        split = layer_packed_(blk, x.clone(), c, k, 4, kappa, overhead=0.0)  # groups of similar counts
    for out in (padded, alone, split):
        assert torch.allclose(out, masked, atol=1e-5)
    assert torch.equal(padded[~computed], x[~computed])


def test_removed_form_follows_new_weights_and_dtypes():
    """The removed form's cached query/key-value weight views follow load_state_dict and .to(dtype)."""
    _, tpc = smoke_pair(ACTIVE)
    x = images(4)
    with torch.no_grad():
        tpc(x)  # the views are made and kept here
        _, other = smoke_pair(ACTIVE, seed=3)
        tpc.load_state_dict(other.state_dict())
        assert torch.equal(tpc(x), other(x))
        assert torch.equal(tpc.double()(x.double()), other.double()(x.double()))


def test_kappa_at_least_n_equals_dense_tpc():
    _, dense = smoke_pair(ACTIVE)
    _, wide = smoke_pair(ACTIVE, kappa=65)
    x = images()
    with torch.no_grad():
        assert torch.allclose(dense.forward_with_stats(x)["logits"], wide.forward_with_stats(x)["logits"], atol=1e-6)


def _run_controller(cfg: TPCCfg, depth=8, b=4, n=12, seed=0):
    """Drive the controller with random gates; return the per-layer weights, masks and final state."""
    g = torch.Generator().manual_seed(seed)
    state = ctl.TokenState.start(b, n, "cpu")
    is_cls = torch.zeros(b, n, dtype=torch.bool)
    is_cls[:, 0] = True
    ws, comps = [], []
    for i in range(depth):
        last = i == depth - 1
        computed = state.computed()
        p, rt = torch.rand(b, n, generator=g), torch.rand(b, n, generator=g)
        b_hat = torch.ones(b, n) if last else ctl.regularize(p * rt, computed, cfg)
        state, w, _ = ctl.step(state, b_hat, p, rt, computed, last, is_cls, cfg)
        ws.append(w), comps.append(computed)
    state, w_end = ctl.finish(state)
    ws[-1] = ws[-1] + w_end
    return torch.stack(ws, 1), torch.stack(comps, 1), state


@pytest.mark.parametrize("reuse", ["pause", "none"])
def test_halting_weights_sum_to_one(reuse):
    w, _, state = _run_controller(TPCCfg(reuse=reuse, pause_span=2))
    assert torch.allclose(w.sum(1), torch.ones_like(w[:, 0]), atol=1e-6)
    assert state.halted.all()


def test_reuse_none_never_reactivates():
    _, comps, _ = _run_controller(TPCCfg(reuse="none"), seed=3)
    later_on = comps[:, 1:] & ~comps[:, :-1]
    assert not later_on.any()


def test_pause_freezes_the_state_and_the_token_comes_back():
    _, tpc = smoke_pair(TPCCfg(beta=-0.5, gamma=1.0, pause_span=1))
    trace = []
    with torch.no_grad():
        tpc.forward_masked(images(8), trace=trace)
    paused_then_back = 0
    for i in range(1, len(trace) - 1):
        p = trace[i]["paused"]
        assert torch.equal(trace[i]["x"][p], trace[i - 1]["x"][p])  # not updated while paused
        back = p & trace[i + 1]["computed"]
        paused_then_back += int(back.sum())
        assert not torch.equal(trace[i + 1]["x"][back], trace[i]["x"][back]) or not back.any()
    assert paused_then_back > 0  # restarted tokens are computed again
    assert not any(t["paused"][:, 0].any() for t in trace)  # CLS never pauses


def test_xi_one_equals_tdr_off():
    b = torch.rand(3, 10)
    computed = torch.rand(3, 10) > 0.3
    assert torch.equal(ctl.regularize(b, computed, TPCCfg(xi=1.0)), ctl.regularize(b, computed, TPCCfg(tdr=False)))
    mixed = ctl.regularize(b, computed, TPCCfg(xi=0.5))
    mean = (b * computed).sum(1, keepdim=True) / computed.sum(1, keepdim=True)
    assert torch.allclose(mixed, 0.5 * b + 0.5 * mean)


def test_gradients_reach_the_gate_channels():
    _, tpc = smoke_pair(ACTIVE)
    tpc.train()
    out = tpc.forward_with_stats(images(8))
    (out["losses"]["ponder"] + out["losses"]["distribution"]).backward()
    fc2 = tpc.blocks[0].mlp.fc2.weight.grad  # writes the block output's channels 0 and 1
    assert fc2[:2].abs().sum() > 0


def test_gate_sign_and_single_gate():
    t = torch.zeros(1, 2, 4)
    t[..., 0], t[..., 1] = 8.0, 0.0
    p, rt = ctl.gates(t, TPCCfg(gamma=5, beta=40))
    assert torch.allclose(p, torch.full_like(p, 0.5)) and (rt < 1e-15).all()
    p_plus, _ = ctl.gates(t, TPCCfg(gamma=5, beta=40, gate_sign="plus"))
    assert (p_plus > 0.999).all()
    _, rt_single = ctl.gates(t, TPCCfg(single_gate=True))
    assert torch.equal(rt_single, torch.ones_like(rt_single))


def test_distribution_loss_directions_and_sources():
    w, comps, _ = _run_controller(TPCCfg())
    b_hat = torch.rand_like(w)
    for source in ("halting_weights", "break_mean"):
        d = ctl.depth_distribution(w, b_hat, comps, TPCCfg(dist_source=source))
        assert torch.isclose(d.sum(), torch.tensor(1.0), atol=1e-5)
    prior = ctl.gaussian_prior(8, 4.0)
    assert ctl.kl_to_prior(prior, prior, TPCCfg()) < 1e-6
    assert ctl.kl_to_prior(prior, prior, TPCCfg(kl_direction="target_d")) < 1e-6


def test_macs_with_nothing_halted_equal_fvcore_less_the_skipped_final_norm():
    _, tpc = smoke_pair(NEVER)
    base = timm.create_model("vit_smoke_patch2_16", **SMOKE)
    with torch.no_grad():
        macs = tpc.forward_with_stats(images(2))["stats"]["macs"]
    n, c = 65, SMOKE_VIT["embed_dim"]
    # TPC normalises only the halting-weighted CLS state; the backbone normalises all 65 tokens
    assert (macs == flops.fvcore_macs(base, (1, 16, 16)) - 5 * (n - 1) * c).all()


def test_gate_report_warns_for_the_paper_literal_gate():
    torch.manual_seed(0)
    fresh = timm.create_model("tpc_vit_smoke", **SMOKE, tpc=TPCCfg(beta=40.0))
    assert fresh.gate_report(images(16))["max_break"] < 1e-6
    _, active = smoke_pair(ACTIVE)
    assert active.gate_report(images(16))["max_break"] > 1e-3


def test_images_whose_cls_halted_stop_early():
    _, tpc = smoke_pair(TPCCfg(beta=-3.0, gamma=1.0))
    with torch.no_grad():
        stats = tpc.forward_with_stats(images(8))["stats"]
    stopped = stats["n_q"] == 0
    assert stopped.any() and (stats["n_q"][:, 0] > 0).all()


def test_fine_tuning_needs_the_finished_base_run():
    from tpcrepro.errors import UserError
    from tpcrepro.jobs import run_job
    from tpcrepro.recipe import load_recipe

    with pytest.raises(UserError, match="finished run of smoke/vit_pretrain seed 0"):
        run_job(load_recipe("smoke/tpc"), "train", seed=0)


def test_tpc_smoke_training_logs_losses_tokens_and_mean_macs():
    import json
    import subprocess
    import sys

    from conftest import FAST
    from tpcrepro.jobs import run_dir_for, run_job
    from tpcrepro.recipe import load_recipe

    r = load_recipe("smoke/tpc", FAST + ("train.epochs=1", "model.init_from=null", "tpc.beta=-0.5", "tpc.gamma=1.0"))
    rec = run_job(r, "train", seed=0)
    m = rec.metrics
    assert 0 < m["macs"] < 30_235_584 and len(m["tokens_n_q"]) == 8 and m["gate_warning"] is False
    row = json.loads((run_dir_for(r, 0) / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"task_loss", "ponder_loss", "distribution_loss", "train_tokens_n_q", "tokens_paused"} <= set(row)
    ckpt = run_dir_for(r, 0) / "checkpoint.pt"
    proc = subprocess.run([sys.executable, "-m", "tpcrepro", "flops", "--checkpoint", str(ckpt), "--json"],
                          capture_output=True, text=True, timeout=300)
    out = json.loads(proc.stdout)
    assert out["n_images"] == 64 and out["macs"] == pytest.approx(m["macs"]) and out["tokens_n_q"] == m["tokens_n_q"]


def test_benchmark_mode_schedule_and_record():
    from tpcrepro import bench, flops, records
    from tpcrepro.measure import bench_schedule as run_bench, write_bench_record

    counts = bench.schedule(64, 12, 197, 119, spread=0.5)
    assert counts.float().mean() == pytest.approx(119, abs=0.5) and counts.min() >= 60 and counts.max() <= 179
    dims = flops.ViTDims.of(timm.create_model("deit_small_patch16_224"))
    assert 115 <= bench.uniform_count(dims, 197, 2.8e9) <= 125
    out = run_bench("tpc_vit_smoke", 15e6, None, 0.5, "cpu", 8, "fp32")
    assert out["benchmark_mode"] and 1.5 < out["macs_ratio"] < 2.5
    assert out["dense_ratio"] == 1.0 and out["removed_images_per_sec"] > 0
    write_bench_record(out)
    rec = records.load_records()[-1]
    assert rec.profile == "bench" and rec.metrics["benchmark_mode"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_removed_form_on_cuda_matches_masked():
    _, tpc = smoke_pair(ACTIVE, kappa=20)
    tpc = tpc.cuda()
    x = images(16).cuda()
    with torch.no_grad():
        removed = tpc.forward_with_stats(x)["logits"]
        tpc.inference = "masked"
        masked = tpc.forward_with_stats(x)["logits"]
    assert torch.allclose(removed, masked, atol=1e-4)

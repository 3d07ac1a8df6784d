"""Figures: token states from a hand-made trace; every figure writes a PNG from fixture records or a tiny model."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import tpcrepro.models  # noqa: F401  registers tpc_vit_smoke
from tpcrepro import figures, jobs, paths, records, tokenmaps
from tpcrepro.errors import UserError
from tpcrepro.tokenmaps import COMPUTED as C
from tpcrepro.tokenmaps import GONE as G
from tpcrepro.tokenmaps import HALTED as H
from tpcrepro.tokenmaps import PAUSED as P
from tpcrepro.tokenmaps import RESTARTED as R
from tpcrepro.models.controller import TPCCfg
from tpcrepro.recipe import load_recipe

PNG = b"\x89PNG"


def _trace(rows):
    """rows: per layer (computed, paused, halted), each a list of per-image lists of 0/1."""
    as_mask = lambda v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    return [dict(zip(("computed", "paused", "halted"), map(as_mask, layer))) for layer in rows]


def test_token_states_hand_made():
    # image 0: CLS + 3 patches; image 1: its CLS halts at layer 1, so everything is gone after it
    trace = _trace([
        ([[1, 1, 1, 1], [1, 1, 1, 1]], [[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 1], [0, 0, 0, 0]]),
        ([[1, 1, 0, 0], [1, 0, 1, 1]], [[0, 0, 1, 0], [0, 1, 0, 0]], [[0, 0, 0, 0], [1, 0, 0, 0]]),
        ([[1, 1, 1, 0], [1, 1, 1, 1]], [[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 1, 0, 0], [0, 0, 0, 0]]),
        ([[1, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]], [[1, 0, 0, 0], [0, 0, 0, 0]]),
    ])
    want = torch.tensor([
        [[C, C, C, H], [C, C, C, C]],
        [[C, C, P, G], [H, P, C, C]],
        [[C, H, R, G], [G, G, G, G]],  # image 1 would restart token 1, but its CLS halted before
        [[H, G, G, G], [G, G, G, G]],
    ])
    assert torch.equal(tokenmaps.token_states(trace), want)


def test_token_states_restart_and_halt_same_layer():
    trace = _trace([([[1, 1]], [[0, 0]], [[0, 0]]), ([[1, 0]], [[0, 1]], [[0, 0]]), ([[1, 1]], [[0, 0]], [[0, 1]])])
    assert tokenmaps.token_states(trace)[:, 0].tolist() == [[C, C], [C, P], [C, H]]


def _tpc(beta=1.0):
    torch.manual_seed(0)
    return timm.create_model("tpc_vit_smoke", tpc=TPCCfg(beta=beta)).eval()


def test_token_states_match_model_stats():
    model = _tpc()
    x = torch.randn(4, 1, 16, 16)
    trace, _ = tokenmaps.run_trace(model, x)
    codes = tokenmaps.token_states(trace).transpose(0, 1)  # [B, L, N]
    assert {C, R, P, H, G} <= set(codes.unique().tolist())  # the small β gives every state
    with torch.no_grad():
        stats = model.forward_masked(x)["stats"]
    assert torch.equal((codes == P).sum(-1), stats["paused"])
    assert torch.equal((codes == H).sum(-1), stats["halted"])
    n_q = ((codes == C) | (codes == R) | (codes == H)).sum(-1)
    assert torch.equal(n_q, stats["n_q"])


def test_fig5_and_fig1_write_pngs(tmp_path):
    tpc, vit = _tpc(), timm.create_model("vit_smoke_patch2_16").eval()
    x = torch.randn(2, 1, 16, 16)
    p5 = tokenmaps.fig5(tpc, x, layers=[0, 2, 4, 7])
    assert p5 == paths.results_dir() / "figures" / "fig5.png" and p5.read_bytes()[:4] == PNG
    p1 = tokenmaps.fig1({"ViT": vit, "TPC": tpc}, x, tmp_path / "f1.png", display=(x.clamp(-1, 1) + 1) / 2)
    assert p1.read_bytes()[:4] == PNG
    att = tokenmaps.cls_attention(tpc, x)
    assert att.shape == (8, 2, 64) and torch.all(att.sum(-1) <= 1 + 1e-5)  # CLS keeps the rest
    dense = tokenmaps.cls_attention(vit, x)
    assert torch.all((dense.sum(-1) > 0) & (dense.sum(-1) < 1))
    with pytest.raises(UserError):
        tokenmaps.fig5(vit, x)


def test_load_run_model_and_digits():
    recipe = load_recipe("smoke/tpc")
    src = jobs.static_model(recipe)  # the recipe's model: 32x32 RGB scenes, 4x4 patches
    path = jobs.run_dir_for(recipe, 0) / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": src.state_dict(), "epoch": 15}, path)
    model = tokenmaps.load_run_model("smoke/tpc", seed=0)
    assert not model.training and torch.equal(model.pos_embed, src.pos_embed)
    with pytest.raises(UserError, match="no checkpoint"):
        tokenmaps.load_run_model("smoke/tpc", seed=1)
    x, shown = tokenmaps.digits_images(3)
    assert x.shape == (3, 1, 16, 16) and shown.min() >= 0 and shown.max() <= 1


def _record(recipe_id, kind, seed, metrics, settings=None, recipe_hash=None, started="2026-01-01T00:00:00"):
    r = load_recipe(recipe_id)
    records.write_record(records.Record(
        recipe=r.id, recipe_hash=recipe_hash or r.hash, profile=r.profile, kind=kind, seed=seed, status="done",
        metrics=metrics, settings=settings or {}, overrides=[], environment={}, started_at=started, duration_s=1.0))
    return r


def _run(recipe_id, seed, top1s, in_settings=True):
    r = load_recipe(recipe_id)
    d = jobs.run_dir_for(r, seed)
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1.0, "top1": t}) + "\n"
                                             for e, t in enumerate(top1s)))
    _record(recipe_id, "train", seed, {"top1": top1s[-1]}, {"run_dir": str(d)} if in_settings else {})


def test_fig4_from_run_metrics():
    for seed in range(3):
        _run("smoke/tpc", seed, [50.0 + seed, 70.0, 90.0 - seed], in_settings=seed != 2)  # seed 2: found by path
        _run("smoke/tpc_kappa100", seed, [60.0, 80.0, 95.0])
    out = figures.fig4()
    assert out.name == "fig4_smoke.png" and out.read_bytes()[:4] == PNG
    assert len(figures.recipe_curves("smoke/tpc")) == 3
    assert figures.read_curve(jobs.run_dir_for(load_recipe("smoke/tpc"), 0)) == {0: 50.0, 1: 70.0, 2: 90.0}


def test_fig4_without_runs_raises():
    _record("smoke/tpc", "train", 0, {"top1": 1.0}, {"run_dir": "/nonexistent"})
    with pytest.raises(UserError, match="no training curves"):
        figures.fig4()


def test_tradeoff(capsys, tmp_path):
    with pytest.raises(UserError, match="no smoke records"):
        figures.tradeoff()
    capsys.readouterr()
    _record("smoke/vit", "flops", 0, {"macs": 30_000_000, "params": 1})
    for seed in range(2):
        _record("smoke/vit", "train", seed, {"top1": 98.0 + seed})
        for rid, macs in (("curves/tpc_depth3", 18e6), ("smoke/tpc", 19e6), ("curves/tpc_depth5", 20e6)):
            _record(rid, "train", seed, {"top1": 95.0 + macs / 1e7 + seed, "macs": macs + seed})
        _record("smoke/evit", "train", seed, {"top1": 97.0})
    _record("smoke/evit", "flops", 0, {"macs": 21_000_000})
    out = figures.tradeoff()  # the rows of tables/tradeoff.yaml, grouped by method
    assert out.name == "tradeoff_smoke.png" and out.read_bytes()[:4] == PNG
    err = capsys.readouterr().err
    assert "curves/evit_keep05" in err and "smoke/tome" in err and "smoke/evit," not in err
    assert figures.table_groups()["TPC (target depth)"] == ["curves/tpc_depth3", "smoke/tpc", "curves/tpc_depth5"]
    absolute = figures.tradeoff({"TPC": ["smoke/tpc"]}, baseline=None, out=tmp_path / "t.png")
    assert absolute.read_bytes()[:4] == PNG

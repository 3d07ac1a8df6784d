"""`tpcrepro bench`: the real controller's gates set for a MACs target, every form timed in one run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

import tpcrepro.models  # noqa: F401
from tpcrepro import bench, benchreal, records, speed
from tpcrepro.errors import UserError
from tpcrepro.models.controller import TPCCfg

TINY = speed.Protocol(batch_size=4, precision="fp32", warmup=1, steps=1, repeats=1, device="cpu")


@pytest.mark.parametrize("name", ["tpc_vit_smoke", "avit_vit_smoke", "tpc_lvvit_smoke", "tpc_swin_smoke"])
def test_bench_sets_the_gates_for_the_target_and_times_every_form(name):
    model, _, _, _ = benchreal.build(name, None, None, None)
    full = model.macs_all_tokens()
    frac = 0.85 if "swin" in name else 0.6  # TPC-Swin skips only the MLPs of one stage
    out = benchreal.run(name, frac * full, [1, 4], TINY)
    assert [r["batch_size"] for r in out["runs"]] == [1, 4]
    for r in out["runs"]:
        assert r["macs"] == pytest.approx(frac * full, rel=0.05), "the real removed forward lands at the target"
        assert r["masked_macs"] == r["macs"] and r["forms_agree"]
        assert r["dense_ratio"] == 1.0 and r["macs_ratio"] == pytest.approx(full / r["macs"])
        for form in ("removed", "replayed", "masked"):
            assert r[f"{form}_images_per_sec"] > 0 and form in r["forms"]
    if name == "tpc_vit_smoke":
        assert {"evit_ratio", "tome_ratio", "evit_macs_ratio"} <= set(out["runs"][0])
    paths = benchreal.write_records(out)
    recs = [r for r in records.load_records() if r.recipe == f"bench/{name}"]
    assert len(paths) == 2 and {r.metrics["mode"] for r in recs} == {"real controller"}


def test_calibration_bisects_beta_both_gate_signs():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 16)
    for sign in ("minus", "plus"):
        model = timm.create_model("tpc_vit_smoke", num_classes=10, in_chans=1, img_size=16,
                                  tpc=TPCCfg(gate_sign=sign, beta=0.0, gamma=1.0)).eval()
        target = 0.5 * model.macs_all_tokens()
        cal = bench.calibrate_beta(model, x, target)
        assert cal["macs"] == pytest.approx(target, rel=0.02) and model.tpc.beta == cal["beta"]
        assert bench.mean_macs(model, x) == cal["macs"]
    with pytest.raises(UserError):
        bench.calibrate_beta(model, x, 2.0 * model.macs_all_tokens())


def test_replayed_counts_reproduce_the_real_forward_cost():
    """The replay computes exactly the real forward's per-image, per-layer counts."""
    model, _, _, _ = benchreal.build("tpc_vit_smoke", None, None, None)
    model.tpc = TPCCfg(beta=-0.5, gamma=1.0)
    x = torch.randn(6, 1, 16, 16)
    stats = bench.run_form(model, x, "removed")["stats"]
    seen = []
    runner = bench._replay(model, stats)
    orig = bench.layer_packed_

    def spy(blk, x, computed, kv, buckets, kappa, overhead=None):
        seen.append((sorted(computed.sum(1).tolist()), sorted(kv.sum(1).tolist())))
        return orig(blk, x, computed, kv, buckets, kappa, overhead)

    bench.layer_packed_ = spy
    try:
        with torch.inference_mode():
            runner(x)
    finally:
        bench.layer_packed_ = orig
    for i, (nq, nkv) in enumerate(seen):
        alive = stats["n_q"][:, i] > 0
        assert nq == sorted(stats["n_q"][alive, i].tolist()) and nkv == sorted(stats["n_kv"][alive, i].tolist())


def test_bench_cli_json_prints_the_real_path_ratios():
    proc = subprocess.run([sys.executable, "-m", "tpcrepro", "bench", "--model", "tpc_vit_smoke", "--macs", "15e6",
                           "--batch-size", "2", "--device", "cpu", "--json", "--no-record"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mode"] == "real controller" and [r["batch_size"] for r in out["runs"]] == [1, 2]
    assert all(r["removed_ratio"] > 0 and r["replayed_ratio"] > 0 and r["macs_ratio"] > 1 for r in out["runs"])


def test_readme_speed_block_is_generated_from_the_bench_records(tmp_path):
    from tpcrepro import report

    out = benchreal.run("tpc_vit_smoke", 15e6, [1], TINY, peers=False)
    benchreal.write_records(out)
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- generated: speed -->\nstale text\n<!-- /generated -->\ny\n")
    assert report.update_readme(readme) == 1
    text = readme.read_text()
    r = out["runs"][0]
    assert "stale text" not in text and f"| tpc_vit_smoke | set for 0.015 G | 1 |" in text
    assert f"{r['removed_ratio']:.2f}×" in text and f"{r['replayed_ratio']:.2f}×" in text
    assert "TPC-DeiT-S at 2.8 G, batch 1: ≥ 1.35× (stretch 1.5×): not measured" in text


def test_median_interval_is_the_order_statistics_with_their_binomial_coverage():
    lo, hi, cover = speed.median_interval([9, 1, 8, 2, 7, 3, 6, 4, 5])
    assert (lo, hi) == (2, 8) and cover == pytest.approx(1 - 2 * 10 / 512)  # k = 2: 1 - 2 P(Bin(9, 1/2) <= 1)
    lo, hi, cover = speed.median_interval([3.0, 1.0, 2.0])
    assert (lo, hi) == (1.0, 3.0) and cover == pytest.approx(0.75)  # below 6 values: the range, 1 - 2^(1-n)
    assert speed.median_interval([5.0]) == (5.0, 5.0, 0.0)
    # coverage checked by simulation: the true median of U(0, 1) falls inside about `cover` of the time
    g = torch.Generator().manual_seed(0)
    hits = sum(lo <= 0.5 <= hi for lo, hi, _ in (speed.median_interval(torch.rand(9, generator=g).tolist())
                                                  for _ in range(4000)))
    assert abs(hits / 4000 - (1 - 2 * 10 / 512)) < 0.015


def test_compare_ratio_is_the_median_of_paired_repeats(monkeypatch):
    base = [1.0, 2.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 2.0]  # the machine slows down on some repeats, for both models
    times = iter([t for b in base for t in (b, b / 2)])  # the second model is always twice as fast beside it
    monkeypatch.setattr(speed, "_time_steps", lambda m, x, p: next(times))
    p = speed.Protocol(batch_size=1, precision="fp32", warmup=0, steps=1, repeats=9, device="cpu")
    out = speed.compare({"a": torch.nn.Identity(), "b": torch.nn.Identity()}, (1,), p)
    assert out["b"]["ratio"] == 2.0 and out["b"]["ratio_ci"] == [2.0, 2.0] and out["b"]["repeats"] == 9
    assert out["b"]["spread"] > 0.5  # the times spread, the paired ratio does not


def test_speed_goals_are_judged_from_the_timing_interval():
    row = lambda lo, hi: {"removed_ratio": (lo + hi) / 2, "removed_ratio_ci": [lo, hi]}  # noqa: E731
    assert benchreal.verdict([row(1.36, 1.40)], 1.35) == "holds"
    assert benchreal.verdict([row(1.20, 1.34)], 1.35) == "does not hold"
    assert benchreal.verdict([row(1.30, 1.40)], 1.35).startswith("unresolved")
    assert benchreal.verdict([row(1.36, 1.40), row(1.1, 1.2)], 1.35) == "holds in part"
    assert benchreal.verdict([{"removed_ratio": 1.4}], 1.35) == "holds"  # a record without an interval: its point


def test_cost_grouping_runs_narrow_models_unsplit_and_wide_ones_split():
    from tpcrepro.models.vit import GROUP_OVERHEAD_MACS_CPU, groups

    nq = [20, 25, 30, 35, 40, 45, 50, 55, 60, 65] * 3  # 30 images of spread counts
    nkv = [v + 5 for v in nq]
    assert len(groups(nq, 4)) == 4  # no overhead given: the fixed split
    assert len(groups(nq, 4, nkv, (64, 256), GROUP_OVERHEAD_MACS_CPU)) == 1  # width 64: operators cost, not MACs
    wide = groups(nq, 4, nkv, (384, 1536), GROUP_OVERHEAD_MACS_CPU)
    assert len(wide) == 4 and sorted(j for g in wide for j in g) == list(range(30))
    assert len(groups(nq, 4, nkv, (384, 1536), 1e15)) == 1  # a group costing more than any padding: never split
    assert len(groups([50] * 30, 4, [50] * 30, (384, 1536), 1.0)) == 1  # equal counts: splitting saves nothing


def test_cost_grouping_gives_the_same_counts_and_nearly_the_same_logits():
    """The grouping only changes how the images are padded: counts and MACs as the finest split (random weights,
    no halting sum near its threshold), logits within rounding."""
    model, _, _, _ = benchreal.build("tpc_vit_smoke", None, None, None)
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        bench.calibrate_beta(model, x, 15e6)
        cost = bench.run_form(model, x, "removed")  # on the CPU: the cost rule (one group at width 64)
        finest = bench.Form(model, "removed", group_overhead_macs=0.0).run(x)  # no fixed cost: `buckets` groups
    assert model.group_overhead_macs is None  # set for the call only
    assert torch.equal(cost["stats"]["n_q"], finest["stats"]["n_q"])
    torch.testing.assert_close(cost["logits"], finest["logits"], atol=1e-4, rtol=1e-4)


def test_trained_runs_are_timed_on_their_validation_images():
    """A trained controller is timed on its own data (noise makes it halt and pause as it never does there);
    every timed repeat walks the same batches in turn."""
    from tpcrepro.recipe import load_recipe
    from tpcrepro.scenes import ScenesDataset

    batches = benchreal.timed_batches(4, "smoke/tpc", (3, 32, 32))
    assert len(batches) == 16 and all(b.shape == (4, 3, 32, 32) for b in batches)  # 64 images
    val = ScenesDataset("val", load_recipe("smoke/tpc").data.scenes)
    assert torch.equal(batches[1][2], val[6][0])
    assert len(benchreal.timed_batches(32, "smoke/tpc", (3, 32, 32))) == 4  # 4 batches of 32
    (rand,) = benchreal.timed_batches(4, None, (3, 32, 32))
    assert torch.equal(rand, benchreal.images(4, (3, 32, 32), 0))


def test_compare_walks_the_batches_in_turn():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(int(x[0, 0]))
            return x

    xs = [torch.full((2, 3), float(i)) for i in range(3)]
    p = speed.Protocol(batch_size=2, precision="fp32", warmup=0, steps=4, repeats=2, device="cpu")
    speed.compare({"a": Spy()}, (3,), p, inputs=xs)
    assert seen == [0, 1, 2] + [0, 1, 2, 0] * 2  # a warm-up pass over every batch, then each repeat from the first


def test_the_trained_smoke_goal_is_judged_per_batch_size():
    from types import SimpleNamespace

    def rec(batch, lo, hi):
        metrics = {"mode": "real controller", "run": "smoke/tpc", "target_macs": None, "kappa": None,
                   "batch_size": batch, "macs": 1.6e7, "macs_ratio": 1.9, "removed_ratio": (lo + hi) / 2,
                   "removed_ratio_ci": [lo, hi], "removed_ratio_ci_level": 0.97, "replayed_ratio": 1.1}
        settings = {"precision": "fp32", "device_name": "CPU (2 cores, 2 threads)", "threads": 2}
        return SimpleNamespace(profile="bench", recipe="bench/tpc_vit_smoke", metrics=metrics, settings=settings,
                               started_at="2026-01-01T00:00:00")

    text = benchreal.markdown([rec(1, 0.92, 0.96), rec(32, 1.19, 1.23)])
    assert "not slower than its dense backbone, batch 1: smoke/tpc: 0.94× [0.92, 0.96]" in text
    assert text.count("**does not hold**") == 1 and text.count("**holds**") == 1

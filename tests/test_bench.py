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
    orig = bench.layer_grouped_

    def spy(blk, x, computed, kv, nq, nkv, buckets, kappa):
        seen.append((sorted(nq), sorted(nkv)))
        return orig(blk, x, computed, kv, nq, nkv, buckets, kappa)

    bench.layer_grouped_ = spy
    try:
        with torch.inference_mode():
            runner(x)
    finally:
        bench.layer_grouped_ = orig
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
    readme.write_text("x\n<!-- generated: speed -->\nold\n<!-- /generated -->\ny\n")
    assert report.update_readme(readme) == 1
    text = readme.read_text()
    r = out["runs"][0]
    assert "old" not in text and f"| tpc_vit_smoke | set for 0.015 G | 1 |" in text
    assert f"{r['removed_ratio']:.2f}×" in text and f"{r['replayed_ratio']:.2f}×" in text
    assert "TPC-DeiT-S at 2.8 G, batch 1: ≥ 1.35× (stretch 1.5×): not measured" in text

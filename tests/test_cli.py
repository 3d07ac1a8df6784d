"""The command line: one-line errors, dry runs with torchrun commands, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "tpcrepro", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_flops_json_deit_s():
    out = json.loads(cli("flops", "--model", "deit_small_patch16_224", "--json").stdout)
    assert {"model", "params", "macs"} <= set(out)
    assert abs(out["macs"] / 4.608e9 - 1) < 0.005


def test_bad_recipe_key_is_one_line():
    proc = cli("run", "smoke/vit", "--set", "train.lrr=1", "--dry-run", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown recipe key 'train.lrr'" in lines[0] and "Traceback" not in proc.stderr


def test_missing_data_dir_is_one_line(tmp_path):
    proc = cli("job", "deit/deit_t", "--data", str(tmp_path / "nope"), "--set", "model.pretrained=null", check=False)
    assert proc.returncode == 2 and "does not exist; pass --data" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_paper_dry_run_prints_torchrun_commands():
    proc = cli("run", "table3", "--profile", "paper", "--dry-run", "--nproc-per-node", "8", "--data", "/imagenet")
    lines = proc.stdout.strip().splitlines()
    train = [ln for ln in lines if "--kind train" in ln]
    expected = {f"torchrun --nproc-per-node=8 -m tpcrepro job deit/{r} --kind train --seed 0 --data /imagenet"
                for r in ("deit_s", "tpc_deit_s", "dynamicvit_deit_s")}
    assert set(train) == expected
    assert any("--kind flops" in ln and not ln.startswith("torchrun") for ln in lines)


def test_multinode_dry_run_has_rendezvous():
    out = cli("run", "deit/deit_b", "--profile", "paper", "--dry-run", "--nproc-per-node", "8", "--nnodes", "2",
              "--rdzv-endpoint", "node0:29400").stdout
    assert "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=node0:29400" in out


def test_profile_mismatch_is_explained():
    proc = cli("run", "deit/deit_s", "--profile", "smoke", "--dry-run", check=False)
    assert proc.returncode == 2 and "pass --profile paper" in proc.stderr


def test_unknown_target():
    proc = cli("run", "table99", check=False)
    assert proc.returncode == 2 and "neither a table" in proc.stderr


def test_throughput_json_on_cpu_with_baseline():
    out = json.loads(cli("throughput", "--model", "vit_smoke_patch2_16", "--device", "cpu", "--img-size", "16",
                         "--batch-size", "8", "--baseline", "vit_smoke_patch2_16", "--json").stdout)
    assert out["images_per_sec"] > 0 and "device_name" in out["settings"]
    assert 0.3 < out["ratio"] < 3.0  # the same model twice, timed interleaved in one run


@pytest.mark.parametrize("cmd", ["run", "report", "list", "flops", "throughput", "job"])
def test_help_explains(cmd):
    assert "Usage" in cli(cmd, "--help").stdout


def test_results_folder_option(tmp_path):
    cli("--results", str(tmp_path / "mine"), "report", "table9")
    assert (tmp_path / "mine" / "tables" / "table9.md").exists()

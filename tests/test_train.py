"""Training: records, checkpoints, resume after a kill, determinism, NaN loss, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpcrepro import records
from tpcrepro.errors import UserError
from tpcrepro.jobs import run_dir_for, run_job
from tpcrepro.recipe import load_recipe

from conftest import FAST


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_train_job_writes_checkpoint_metrics_and_record(tmp_path):
    r = load_recipe("smoke/vit_pretrain", FAST)
    rec = run_job(r, "train", seed=0)
    assert rec.status == "done" and rec.profile == "smoke"
    assert 0 <= rec.metrics["top1"] <= 100 and rec.metrics["n_val"] == 64
    assert rec.overrides == list(FAST)
    run_dir = run_dir_for(r, 0)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [0, 1]
    assert not list(run_dir.glob(".*.tmp"))  # no temp files left behind
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "epoch"} <= set(ckpt) and ckpt["epoch"] == 2
    saved = records.load_records()
    assert len(saved) == 1 and saved[0].metrics == rec.metrics
    assert saved[0].environment["git_commit"] is not None or saved[0].environment["torch"]


def test_same_seed_same_result_on_cpu(tmp_path):
    r = load_recipe("smoke/vit_pretrain", FAST)
    a = run_job(r, "train", seed=3, run_dir=tmp_path / "a")
    b = run_job(r, "train", seed=3, run_dir=tmp_path / "b")
    assert a.metrics["top1"] == b.metrics["top1"] and a.metrics["final_train_loss"] == b.metrics["final_train_loss"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_mid_epoch_resumes_with_nothing_lost(tmp_path):
    r = load_recipe("smoke/vit_pretrain", FAST + ("train.epochs=3",))
    run_job(r, "train", seed=1, run_dir=tmp_path / "whole")

    class Killed(KeyboardInterrupt):
        pass

    def kill_in_epoch_2(epoch, step):
        if epoch == 1 and step == 2:
            raise Killed

    with pytest.raises(Killed):
        run_job(r, "train", seed=1, run_dir=tmp_path / "broken", hook=kill_in_epoch_2)
    assert torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    rec = run_job(r, "train", seed=1, run_dir=tmp_path / "broken")
    assert rec.metrics["resumed"] is True
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "broken")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    epochs = [json.loads(ln)["epoch"] for ln in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_checkpoint_of_another_recipe_version_is_refused(tmp_path):
    run_job(load_recipe("smoke/vit_pretrain", FAST), "train", seed=0, run_dir=tmp_path / "r")
    with pytest.raises(UserError, match="another recipe version"):
        run_job(load_recipe("smoke/vit_pretrain", FAST + ("train.lr=1e-4",)), "train", seed=0, run_dir=tmp_path / "r")


def test_nan_loss_is_a_clear_error_and_a_failed_record(tmp_path):
    r = load_recipe("smoke/vit_pretrain", FAST + ("train.lr=1e30", "train.warmup_epochs=0"))
    with pytest.raises(UserError, match="loss is (nan|inf)"):
        run_job(r, "train", seed=0)
    recs = records.load_records()
    assert recs[-1].status == "failed" and "loss is" in recs[-1].error
    assert "no checkpoint was written before it" in recs[-1].error  # it failed in the first epoch


def test_eval_only_when_epochs_zero(tmp_path):
    rec = run_job(load_recipe("smoke/vit_pretrain", FAST + ("train.epochs=0",)), "train", seed=0)
    assert rec.metrics["epochs"] == 0 and rec.metrics["n_val"] == 64


def test_flops_job_record():
    rec = run_job(load_recipe("smoke/vit_pretrain"), "flops")
    assert rec.metrics["params"] == 404_874 or rec.metrics["params"] > 400_000
    assert abs(rec.metrics["macs"] / 30.2e6 - 1) < 0.01


@pytest.mark.parametrize("recipe,extra", [
    ("smoke/vit_pretrain", ()),
    ("smoke/tpc", ("train.epochs=1", "model.init_from=null", "tpc.beta=-0.5", "tpc.gamma=1.0")),
])
def test_two_process_ddp_with_gloo(tmp_path, recipe, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29517",
           "-m", "tpcrepro", "job", recipe, "--kind", "train", "--seed", "0", "--device", "cpu"]
    for o in FAST + extra:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = records.load_records()
    assert len(recs) == 1, "only rank 0 writes the record"
    rec = recs[0]
    assert rec.settings["world_size"] == 2
    assert rec.metrics["n_val"] == 64  # exact evaluation: every image once, none padded

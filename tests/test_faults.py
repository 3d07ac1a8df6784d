"""Untrusted files and faults: no code runs from a loaded file, one job per run directory, signals,
a history that survives kill -9, damaged records named, values checked where they enter."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tpcrepro import checkpoint, cli, records, weights
from tpcrepro.errors import UserError
from tpcrepro.jobs import run_dir_for, run_job
from tpcrepro.recipe import load_recipe
from tpcrepro.train import TEST_AT_ENV, TIME_KEYS

from conftest import FAST, make_image_folder

# Smaller still for the jobs run in subprocesses (and the runs compared with them): 2 steps per epoch, 2 blocks.
TINY = FAST + ("data.subset_train=64", "data.subset_val=32", "model.kwargs={depth: 2}")
FAST_ARGS = [a for o in FAST for a in ("--set", o)]
TINY_ARGS = [a for o in TINY for a in ("--set", o)]


def tpcrepro(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run the CLI in this process as `tpcrepro ARGS`: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["tpcrepro", *args])
    monkeypatch.setattr(records, "_warned", set())  # each command is its own process in real use
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one line a user error prints (and there is only that line)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------- 1. nothing loaded executes code

class Payload:
    """Unpickling this object creates `marker` (what a hostile file would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_file(path: Path, marker: Path) -> Path:
    """A file shaped like a checkpoint (epoch, recipe, state dict) with the payload beside the tensors."""
    sd = weights.create(load_recipe("smoke/vit_pretrain").model).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 40, "recipe": "smoke/vit_pretrain", "overrides": [], "model": sd, "extra": Payload(marker)}, path)
    return path


def test_the_payload_works_when_unpickled(tmp_path):
    """The test below could not fail if the payload did nothing: it does, under a full unpickle."""
    marker = tmp_path / "ran"
    torch.load(payload_file(tmp_path / "p.pt", marker), weights_only=False)
    assert marker.exists()


def test_no_loading_path_runs_a_payload(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PAYLOAD_RAN"
    hostile = payload_file(tmp_path / "hostile.pth", marker)
    run = tmp_path / "shared_run"
    payload_file(run / "checkpoint.pt", marker)
    base = load_recipe("smoke/tpc").model.init_from
    payload_file(run_dir_for(load_recipe(base), 0) / "checkpoint.pt", marker)
    monkeypatch.setenv("TPCREPRO_WEIGHTS", str(hostile))
    paths = {
        "resume": (["job", "smoke/vit_pretrain", "--run-dir", str(run), *FAST_ARGS], run / "checkpoint.pt"),
        "flops --checkpoint": (["flops", "--checkpoint", str(hostile)], hostile),
        "model.pretrained": (["job", "smoke/vit_pretrain", "--set", f"model.pretrained={hostile}", *FAST_ARGS], hostile),
        "$TPCREPRO_WEIGHTS": (["job", "smoke/vit_pretrain", "--set", "model.pretrained=$TPCREPRO_WEIGHTS", *FAST_ARGS], hostile),
        "model.init_from": (["job", "smoke/tpc", *FAST_ARGS], run_dir_for(load_recipe(base), 0) / "checkpoint.pt"),
    }
    for name, (args, file) in paths.items():
        code, err = tpcrepro(args, capsys, monkeypatch)
        line = error_line(err)
        assert code == 2, name
        assert str(file) in line and "contains objects that would have to be executed to load" in line, name
        assert "convert-checkpoint" in line, name
        assert not marker.exists(), f"{name}: the payload ran"
    code, err = tpcrepro(["convert-checkpoint", str(hostile), str(tmp_path / "out.pth")], capsys, monkeypatch)
    assert code == 2 and "never executes" in error_line(err) and not (tmp_path / "out.pth").exists()
    assert not marker.exists(), "convert-checkpoint: the payload ran"


def test_convert_a_trusted_file(tmp_path, capsys, monkeypatch):
    """DeiT-style training checkpoints (argparse args, numpy values) and older tpcrepro checkpoints (numpy RNG
    tuples) convert on request without executing anything; a file naming other globals is refused."""
    sd = weights.create(load_recipe("smoke/vit_pretrain").model).state_dict()
    src, dst = tmp_path / "deit_train.pth", tmp_path / "safe.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=5e-4, model="deit"), "best": np.float64(79.8),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}},
               src)
    with pytest.raises(UserError, match="would have to be executed"):
        weights.read_state_dict(src)
    code, _ = tpcrepro(["convert-checkpoint", str(src), str(dst)], capsys, monkeypatch)
    assert code == 0
    out = checkpoint.safe_load(dst)
    assert out["args"] == {"lr": 5e-4, "model": "deit"} and out["best"] == 79.8
    assert all(torch.equal(v, sd[k]) for k, v in weights.read_state_dict(dst).items())
    old = torch.load(src, weights_only=False)["rng"]
    checkpoint.set_rng_state(out["rng"])  # the old tuples became plain values that restore the same streams
    converted = (np.random.rand(), random.random())
    np.random.set_state(old["numpy"])
    random.setstate(old["python"])
    assert converted == (np.random.rand(), random.random())


@pytest.mark.parametrize("layout", ["flat", "model", "state_dict", "module_prefix"])
def test_released_checkpoint_layouts_load_safely(tmp_path, layout):
    """timm files (a flat state dict), DeiT/LV-ViT ({'model': ...}), {'state_dict': ...}, DDP 'module.' keys."""
    model = weights.create(load_recipe("smoke/vit_pretrain").model)
    sd = model.state_dict()
    obj = {"flat": sd, "model": {"model": sd}, "state_dict": {"state_dict": sd, "epoch": 300},
           "module_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}}}[layout]
    torch.save(obj, tmp_path / "w.pth")
    other = weights.create(load_recipe("smoke/vit_pretrain").model)
    weights.load_weights(other, tmp_path / "w.pth")
    assert all(torch.equal(v, sd[k]) for k, v in other.state_dict().items())


# ---------------------------------------------------------------- 2-4. lock, signals, kills: real processes

def start_job(run_dir: Path, test_at: str | None, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONPATH": str(Path.cwd())}
    env.pop(TEST_AT_ENV, None)
    if test_at:
        env[TEST_AT_ENV] = test_at
    cmd = [sys.executable, "-m", "tpcrepro", "job", "smoke/vit_pretrain", "--run-dir", str(run_dir), "--device", "cpu", *TINY_ARGS]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def wait_for_point(proc: subprocess.Popen, timeout: float = 240) -> list[str]:
    """Read the job's stderr until it reports its test point (it then waits to be signalled)."""
    seen, t0 = [], time.time()
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("test point"):
            return seen
        assert time.time() - t0 < timeout, "".join(seen)
    raise AssertionError(f"exited {proc.wait()} before its test point:\n{''.join(seen)}")


def snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


def test_one_job_per_run_directory_and_clean_signals(tmp_path, capsys, monkeypatch):
    """Jobs paused in epoch 2 hold their directories' locks: a second job there stops at once touching nothing;
    SIGINT / SIGTERM end one with one line, exit 130 / 143 and a record; a kill -9 leaves no lock that blocks."""
    runs = {name: tmp_path / name for name in ("sigint", "sigterm", "kill")}
    procs = {name: start_job(run, "step:1:wait", tmp_path) for name, run in runs.items()}  # in parallel
    for proc in procs.values():
        wait_for_point(proc)
    run, first = runs["sigint"], procs["sigint"]
    before, n_records = snapshot(run), len(records.load_records())
    second, err = tpcrepro(["job", "smoke/vit_pretrain", "--run-dir", str(run), *TINY_ARGS], capsys, monkeypatch)
    line = error_line(err)
    assert second == 2 and str(run) in line and f"pid {first.pid}" in line
    assert snapshot(run) == before and len(records.load_records()) == n_records
    for name, sig, code in (("sigint", signal.SIGINT, 130), ("sigterm", signal.SIGTERM, 143)):
        procs[name].send_signal(sig)
        rest = procs[name].stderr.read()
        assert procs[name].wait(timeout=120) == code, rest
        lines = [ln for ln in rest.splitlines() if ln.strip()]
        assert lines[-1] == "interrupted after epoch 1 of 2; the same command resumes", rest
    errors = sorted(r.error for r in records.load_records() if r.status == "failed")
    assert errors == ["interrupted after epoch 1 of 2; the same command resumes"] * 2
    procs["kill"].kill()  # SIGKILL: no handler, no cleanup; the kernel drops the lock
    procs["kill"].wait(timeout=60)
    rec = run_job(load_recipe("smoke/vit_pretrain", TINY), "train", 0, run_dir=runs["kill"])
    assert rec.status == "done" and rec.metrics["resumed"] is True and len(rec.metrics["history_top1"]) == 2


def test_the_lock_is_released_on_exit(tmp_path):
    """The lock is per open file: a holder in this process also blocks a second take; leaving the block frees it."""
    from tpcrepro import runlock

    with runlock.hold(tmp_path):
        with pytest.raises(UserError, match=rf"{tmp_path} is in use by another job \(pid {os.getpid()}\)"):
            with runlock.hold(tmp_path):
                pass
    with runlock.hold(tmp_path):  # released on exit
        pass


def rows(run_dir: Path) -> list[dict]:
    out = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in out]


def test_history_survives_kill_9_at_any_point_of_the_checkpoint_write(tmp_path):
    """Killed right before or right after the first checkpoint write (os._exit, like kill -9), then
    resumed: one row per epoch, in order, equal to an uninterrupted run's; no temp file survives."""
    recipe = load_recipe("smoke/vit_pretrain", TINY)
    whole = run_job(recipe, "train", 0, run_dir=tmp_path / "whole")
    points = ["before_ckpt:0", "after_ckpt:0"]  # the two sides of the first checkpoint write
    procs = {p: start_job(tmp_path / p.replace(":", "_"), f"{p}:exit", tmp_path) for p in points}
    for p, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 9, err
    for p in points:
        run = tmp_path / p.replace(":", "_")
        (run / ".checkpoint.pt.left_by_a_kill.tmp").write_bytes(b"")  # what a kill inside torch.save leaves
        rec = run_job(recipe, "train", 0, run_dir=run)
        assert [r["epoch"] for r in rows(run)] == [0, 1], p
        assert rows(run) == rows(tmp_path / "whole"), p
        assert rec.metrics["history_top1"] == whole.metrics["history_top1"], p
        assert not list(run.glob(".*.tmp")), p


def test_without_a_checkpoint_the_curve_starts_empty_and_checkpoints_are_plain(tmp_path):
    """Rows left by a run killed before its first checkpoint (an older version appended them first) go;
    the checkpoint written holds tensors and plain values only, its epoch rows included."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "top1": 1.0}) + "\n")
    run_job(load_recipe("smoke/vit_pretrain", TINY + ("train.epochs=1",)), "train", 0, run_dir=run)
    assert [r["epoch"] for r in rows(run)] == [0] and rows(run)[0]["top1"] != 1.0
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # raises if anything else is inside
    assert state["epoch"] == 1 and [r["epoch"] for r in state["history"]] == [0]


def test_the_slurm_entry_requeues_what_is_left_without_force():
    import submitit

    from tpcrepro.runner import SlurmEntry

    entry = SlurmEntry("smoke/vit_pretrain", ("train.epochs=2",), [("train", 0, True), ("flops", 0, True)], None)
    assert isinstance(entry, submitit.helpers.Checkpointable)
    entry.finished.append(("flops", 0))
    again = entry.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    nxt = again.function
    assert isinstance(nxt, SlurmEntry) and nxt.work == [("train", 0, False)] and nxt.overrides == entry.overrides


# ---------------------------------------------------------------- 5. damaged records are named

def test_damaged_records_are_named_once_and_the_rest_used(tmp_path, capsys, monkeypatch):
    run_job(load_recipe("smoke/vit_pretrain"), "flops")
    rdir = tmp_path / "results" / "records"
    (rdir / "broken.json").write_text('{"recipe": "smoke/vit_pretrain", ')
    (rdir / "partial.json").write_text(json.dumps({"recipe": "smoke/vit_pretrain", "kind": "train"}))
    for args in (["report"], ["list"], ["figure", "fig4"], ["run", "smoke/vit_pretrain", "--dry-run"]):
        code, err = tpcrepro(args, capsys, monkeypatch)
        warns = [ln for ln in err.splitlines() if ln.startswith("warning: skipping record")]
        assert len(warns) == 2, (args, err)
        assert "broken.json: not valid JSON" in warns[0] and "partial.json: incomplete: missing" in warns[1]
    assert len(records.load_records()) == 1  # the good one is still used


# ---------------------------------------------------------------- 6. values checked where they enter

@pytest.mark.parametrize("override,says", [
    ("train.lr=-1", "'train.lr' must be > 0, got -1.0"),
    ("train.epochs=-1", "'train.epochs' must be ≥ 0"),
    ("train.batch_size=0", "'train.batch_size' must be ≥ 1"),
    ("train.warmup_epochs=60", "'train.warmup_epochs' (60) must not exceed 'train.epochs' (50)"),
    ("stabilizer.kappa=0", "kappa must be at least 1"),
    ("tpc.xi=1.5", "xi ≤ 1"),
    ("tpc.phi_p=-1", "'tpc.phi_p' must be ≥ 0, got -1.0"),
    ("data.aug.mixup_prob=2", "'data.aug.mixup_prob' must be in [0, 1]"),
])
def test_out_of_range_values_are_one_line_errors(override, says, capsys, monkeypatch):
    code, err = tpcrepro(["show", "smoke/vit_pretrain", "--set", override], capsys, monkeypatch)
    assert code == 2 and says in error_line(err)


def test_recipe_hashes_are_unchanged_by_validation():
    """Committed records are keyed by these hashes: the checks reject values, they do not rewrite them."""
    committed = Path(__file__).parents[1] / "results" / "records"
    recs = [records.read_record(p) for p in sorted(committed.glob("smoke__vit__train__*.json"))]
    if not recs:
        pytest.skip("no committed smoke/vit records")
    newest = max(recs, key=lambda r: r.started_at)
    assert load_recipe("smoke/vit", tuple(newest.overrides)).hash == newest.recipe_hash


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_checkpoint_says_what_to_do(tmp_path, damage, capsys, monkeypatch):
    run = tmp_path / "r"
    run.mkdir()
    buf = tmp_path / "full.pt"
    torch.save({"epoch": 1, "model": {"w": torch.zeros(1000)}}, buf)
    (run / "checkpoint.pt").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2] if damage == "truncated" else b"")
    code, err = tpcrepro(["job", "smoke/vit_pretrain", "--run-dir", str(run), *FAST_ARGS], capsys, monkeypatch)
    line = error_line(err)
    assert code == 2 and f"cannot read {run / 'checkpoint.pt'}: the file is damaged" in line and "--force" in line


def test_flops_with_a_checkpoint_that_does_not_fit(tmp_path, capsys, monkeypatch):
    path = tmp_path / "c.pt"
    torch.save({"epoch": 1, "recipe": "smoke/tpc", "overrides": [], "model": {"blocks.0.bogus": torch.zeros(2)}}, path)
    code, err = tpcrepro(["flops", "--checkpoint", str(path)], capsys, monkeypatch)
    assert code == 2 and "do not fit" in error_line(err)


def test_missing_data_is_found_before_anything_slow(tmp_path, capsys, monkeypatch):
    """A paper-profile run without data stops at once, before any weights are fetched or any job starts."""
    def no_fetch(*a, **k):
        raise AssertionError("weights were fetched before the data directory was checked")

    monkeypatch.setattr(weights, "create", no_fetch)
    monkeypatch.delenv("TPCREPRO_DATA", raising=False)
    for args in (["job", "deit/tpc_deit_s"], ["run", "deit/tpc_deit_s", "--profile", "paper", "--kinds", "train"]):
        code, err = tpcrepro(args, capsys, monkeypatch)
        assert code == 2 and "no data directory" in error_line(err), args
    code, err = tpcrepro(["job", "deit/tpc_deit_s", "--data", str(tmp_path / "nope")], capsys, monkeypatch)
    assert code == 2 and f"data directory {tmp_path / 'nope'} does not exist" in error_line(err)


def test_skipped_images_get_one_console_line_per_split(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", per_class=4, size=16)
    (root / "train" / "a" / "1.png").write_bytes(b"not an image")
    (root / "val" / "b" / "2.png").write_bytes(b"")
    recipe = tmp_path / "folder.yaml"
    recipe.write_text(
        f"base: {Path(__file__).parents[1] / 'recipes' / '_base' / 'smoke.yaml'}\n"
        "model: {num_classes: 2, in_chans: 3, kwargs: {depth: 2}}\n"
        f"data: {{dataset: folder, root: {root}, aug: {{translate: 0}}}}\n"
        "train: {epochs: 2, batch_size: 4, warmup_epochs: 0}\n"
    )
    capsys.readouterr()
    rec = run_job(load_recipe(str(recipe)), "train", 0)
    err = capsys.readouterr().err
    warns = [ln for ln in err.splitlines() if "unreadable image" in ln]
    assert len(warns) == 2, err
    assert f"1 unreadable image(s) in the train split (first: {root / 'train' / 'a' / '1.png'})" in warns[0]
    assert f"1 unreadable image(s) in the val split (first: {root / 'val' / 'b' / '2.png'})" in warns[1]
    assert rec.metrics["val_skipped"] == 1


@pytest.mark.parametrize("argv, says", [
    (["run", "table2", "--no-such-flag"], "No such option: --no-such-flag (see 'tpcrepro run --help')"),
    (["bench", "--batch-size", "many"], "Invalid value for '--batch-size'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_usage_errors_are_one_line_errors(argv, says, capsys, monkeypatch):
    code, err = tpcrepro(argv, capsys, monkeypatch)
    assert code == 2 and says in error_line(err)

"""`run --jobs`: jobs side by side on the CPU cores, each on its recipe's threads, in dependency order;
signals passed on; the dry run's minutes are the same rules fed the records' durations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tpcrepro import pool, records
from tpcrepro.recipe import load_recipe
from tpcrepro.train import TEST_AT_ENV

from test_pipeline import fixture_project  # noqa: F401  (the 2-row fixture table: fx/vit, fx/tpc from it)


def job(rid: str, kind: str = "train", seed: int = 0, threads: int = 1, base: str | None = None, base_seed=None):
    model = SimpleNamespace(init_from=base, init_seed=base_seed)
    recipe = SimpleNamespace(id=rid, model=model, train=SimpleNamespace(threads=threads))
    return SimpleNamespace(recipe=recipe, kind=kind, seed=seed, label=f"{rid} {kind} {seed}")


def test_makespan_packs_jobs_by_threads_after_their_base():
    pre = job("pre", threads=2)
    fine = [job("a", seed=s, base="pre", base_seed=0) for s in range(3)] + [job("b", base="pre", base_seed=0)]
    flops = job("a", "flops")
    secs = {"pre": 10.0, "a": 4.0, "b": 4.0}
    took = lambda j: 1.0 if j.kind == "flops" else secs[j.recipe.id]  # noqa: E731
    plan = [pre, *fine, flops]
    # the pretraining takes both cores; then four 1-core jobs two by two; the FLOPs count waits its turn (no overtaking)
    assert pool.makespan(plan, took, cores=2) == 10 + 4 + 4 + 1
    assert pool.makespan(plan, took, cores=1) == sum(map(took, plan))  # one core: one after another
    assert pool.makespan(plan, took, cores=4) == 10 + 4  # the FLOPs count runs beside the pretraining
    assert pool.makespan(plan, took, cores=4, limit=1) == sum(map(took, plan))


def test_longest_chains_start_first_and_timings_last():
    """Plan order a (short), b (long), c (short): b first, and a pretraining before the rows that start from it."""
    short, long_ = job("short"), job("long")
    pre = job("pre", threads=2)
    rows = [job("row", seed=s, base="pre", base_seed=0) for s in range(2)]
    timing = job("t", "throughput")
    secs = {"short": 2.0, "long": 6.0, "pre": 3.0, "row": 5.0, "t": 1.0}
    took = lambda j: secs[j.recipe.id]  # noqa: E731
    plan = [timing, short, long_, *rows, pre]
    assert [j.recipe.id for j in pool.priority_order(plan, took)] == ["pre", "long", "row", "row", "short", "t"]
    # two cores: pre (0-3, both), long (3-9) beside a row (3-8), the other row (8-13), short (9-11), the timing
    # alone (13-14); in plan order the timing, short and long would go first and pre wait for both cores: 15
    assert pool.makespan(plan, took, cores=2) == 14


def test_a_timing_takes_every_core_and_a_failed_base_stops_its_rows():
    q = pool._Queue([job("x"), job("t", "throughput"), job("y")], cores=2, limit=2)
    assert [j.recipe.id for j in q.startable()] == ["x"]  # the timing waits for a machine of its own
    q.finish(q.jobs[0], True)
    assert [j.recipe.id for j in q.startable()] == ["t"] and q.startable() == []
    pre = job("pre")
    q = pool._Queue([pre, job("a", base="pre", base_seed=0), job("c")], cores=2, limit=2)
    assert [j.recipe.id for j in q.startable()] == ["pre", "c"]  # "a" waits for its base, holding nothing back
    q.finish(pre, False)
    assert [j.recipe.id for j in q.blocked_by_failure()] == ["a"] and not q.waiting


def test_the_smoke_recipes_pin_their_threads_without_changing_their_hashes():
    vit, pre = load_recipe("smoke/vit"), load_recipe("smoke/vit_pretrain")
    assert (vit.train.threads, pre.train.threads) == (1, 2)
    assert vit.hash == load_recipe("smoke/vit", ("train.threads=2",)).hash  # like data.workers: not hashed


def _records(root: Path) -> list:
    return sorted(records.load_records(root / "results" / "records"), key=lambda r: r.started_at)


def one_thread(root: Path, epochs: int = 1) -> None:
    """fx/vit on one thread per job (as the smoke recipes), for `epochs`."""
    vit = root / "recipes" / "fx" / "vit.yaml"
    vit.write_text(vit.read_text().replace("epochs: 1,", f"epochs: {epochs},").replace("warmup_epochs: 0}", "warmup_epochs: 0, threads: 1}"))


def test_run_puts_jobs_side_by_side_each_on_one_thread(fixture_project):  # noqa: F811
    one_thread(fixture_project)
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run([sys.executable, "-m", "tpcrepro", "run", "fx/vit", "--seeds", "0,1", "--jobs", "2",
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    recs = [r for r in _records(fixture_project) if r.kind == "train"]
    assert sorted(r.seed for r in recs) == [0, 1] and all(r.environment["torch_threads"] == 1 for r in recs)
    a, b = recs
    t = lambda r: time.mktime(time.strptime(r.started_at[:19], "%Y-%m-%dT%H:%M:%S"))  # noqa: E731
    assert t(b) <= t(a) + a.duration_s + 1  # the second started before the first ended
    assert "up to 2 at once" in proc.stderr and "fx/vit train seed 1" in proc.stderr
    logs = sorted(p.name for p in (fixture_project / "runs" / "logs").iterdir())
    assert "fx__vit__train__s1.log" in logs and "epoch 1/1" in (fixture_project / "runs" / "logs" / "fx__vit__train__s1.log").read_text()


def test_a_signal_to_run_stops_every_running_job_cleanly_and_the_same_command_resumes(fixture_project):  # noqa: F811
    one_thread(fixture_project, epochs=2)
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), TEST_AT_ENV: "step:1:wait"}
    cmd = [sys.executable, "-m", "tpcrepro", "run", "fx/vit", "--seeds", "0,1", "--jobs", "2", "--device", "cpu",
           "--kinds", "train"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    reached, t0 = 0, time.time()
    for line in proc.stderr:  # both jobs reach epoch 2 and wait there
        reached += "test point step:1" in line
        if reached == 2:
            break
        assert time.time() - t0 < 300, line
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest
    failed = [r for r in _records(fixture_project) if r.status == "failed"]
    assert sorted(r.seed for r in failed) == [0, 1]
    assert {r.error for r in failed} == {"interrupted after epoch 1 of 2; the same command resumes"}
    env.pop(TEST_AT_ENV)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    done = [r for r in _records(fixture_project) if r.status == "done"]
    assert sorted(r.seed for r in done) == [0, 1] and all(r.metrics["resumed"] for r in done)

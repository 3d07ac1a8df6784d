"""A whole table end to end on a 2-row fixture: plan, train, count, report; resumable; through submitit too."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tpcrepro.cli import app

FIXTURE_TABLE = """
id: fixture
title: "A two-row fixture"
backbone: deit_s
columns:
  - {key: top1, header: "Top-1"}
  - {key: gmacs, header: "FLOPs (G)"}
  - {key: images_per_sec, header: "Throughput (img/s)"}
baseline: vit
rows:
  - {id: vit, label: "ViT", paper: {top1: 79.8, gmacs: 4.6, images_per_sec: 26000}, method: baseline, recipes: {smoke: fx/vit}}
  - {id: tpc, label: "Ours", paper: {top1: 80.8, gmacs: 2.8, images_per_sec: 65000}, method: tpc, recipes: {smoke: fx/tpc}}
"""
VIT = """profile: smoke
jobs: [train, flops]
model: {name: vit_smoke_patch2_16, num_classes: 10, img_size: 16, in_chans: 1, kwargs: {depth: 2}}
data: {dataset: digits, workers: 0, subset_train: 64, subset_val: 32,
       aug: {auto_augment: null, color_jitter: 0.0, hflip: 0.0, re_prob: 0.0, mixup: 0.0, cutmix: 0.0, smoothing: 0.0}}
train: {epochs: 1, batch_size: 32, warmup_epochs: 0}
eval: {batch_size: 32}
"""
TPC = VIT.replace("vit_smoke_patch2_16, num_classes", "tpc_vit_smoke, init_from: fx/vit, num_classes") + "tpc: {beta: 0.0}\n"


@pytest.fixture
def fixture_project(tmp_path, monkeypatch):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "fixture.yaml").write_text(FIXTURE_TABLE)
    (tmp_path / "recipes" / "fx").mkdir(parents=True)
    (tmp_path / "recipes" / "fx" / "vit.yaml").write_text(VIT)
    (tmp_path / "recipes" / "fx" / "tpc.yaml").write_text(TPC)
    monkeypatch.setenv("TPCREPRO_TABLES", str(tmp_path / "tables"))
    monkeypatch.setenv("TPCREPRO_RECIPES", str(tmp_path / "recipes"))
    return tmp_path


def test_a_table_runs_end_to_end_resumes_and_reports_deterministically(fixture_project):
    runner = CliRunner()
    res = runner.invoke(app, ["run", "fixture", "--seeds", "0"])
    assert res.exit_code == 0, res.output
    assert "4 run, 0 already done" in res.output  # vit train + flops, tpc train + flops
    report = fixture_project / "results" / "tables" / "fixture.md"
    text = report.read_text()
    assert "`fx/vit` seeds 0" in text and "`fx/tpc` seeds 0" in text and "not ImageNet" in text
    # the speed column comes from one side-by-side protocol of the trained models, ratios to the baseline
    grid = (fixture_project / "results" / "tables" / "fixture_speed_smoke.md").read_text()
    assert "trained run (seed 0)" in grid and "(1.00×)" in grid
    assert "Speed ÷ backbone (side by side, CPU)" in text and "| 1.00 " in text
    assert "speed already measured" in runner.invoke(app, ["run", "fixture", "--seeds", "0"]).output
    again = runner.invoke(app, ["run", "fixture", "--seeds", "0"])
    assert "0 run, 4 already done" in again.output
    assert runner.invoke(app, ["report", "fixture"]).exit_code == 0
    assert report.read_text() == text  # the same records give the same bytes
    speed_md = fixture_project / "results" / "tables" / "fixture_speed_smoke.md"
    speed_md.unlink()  # the speed grid is rendered from its records too
    assert runner.invoke(app, ["report", "fixture"]).exit_code == 0 and speed_md.read_text() == grid
    dry = runner.invoke(app, ["run", "fixture", "--seeds", "0,1", "--dry-run"])
    assert "fx/vit --kind train --seed 1" in dry.output and "min by the records' durations" in dry.output


def test_kinds_restricts_the_plan(fixture_project):
    res = CliRunner().invoke(app, ["run", "fixture", "--kinds", "flops"])
    assert res.exit_code == 0, res.output
    assert "2 run" in res.output
    recs = list((fixture_project / "results" / "records").glob("*.json"))
    assert len(recs) == 2 and all("__flops__" in p.name for p in recs)


def test_submitit_local_executor_runs_a_row(fixture_project):
    pytest.importorskip("submitit")
    res = CliRunner().invoke(app, ["run", "fx/vit", "--seeds", "0", "--launcher", "submitit-local",
                                   "--gpus-per-node", "1", "--slurm-dir", str(fixture_project / "slurm")])
    assert res.exit_code == 0, res.output
    assert "1 job(s) submitted" in res.output
    names = sorted(p.name.split("__")[2] for p in (fixture_project / "results" / "records").glob("*.json"))
    assert names == ["flops", "train"]


def test_paper_dry_run_states_gpu_hours():
    res = CliRunner().invoke(app, ["run", "table6", "--profile", "paper", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "swin/tpc_swin_t --kind train" in res.output
    assert "A100-class GPU-hours" in res.output


def test_a_plan_takes_the_tables_seeds_and_times_speed_side_by_side():
    from tpcrepro import runner

    p = runner.plan_target("table9", "smoke")
    assert {j.seed for j in p.jobs} == {0} and p.report_tables == ["table9"] and not p.speed_tables
    p = runner.plan_target("table4", "smoke", seeds="0,1")
    assert p.speed_tables == ("table4",) and not [j for j in p.jobs if j.kind == "throughput"]
    assert {j.seed for j in p.jobs if j.kind == "train"} == {0, 1}
    assert runner.plan_target("smoke/vit", "smoke", kinds="flops").report_tables == runner.tables.list_tables()


def test_a_job_runs_in_this_process_or_under_torchrun_by_its_description():
    from tpcrepro import runner
    from tpcrepro.recipe import load_recipe

    train, flops = (runner.Job(load_recipe("smoke/vit"), k, 0) for k in ("train", "flops"))
    assert runner.invocation(train, runner.Launch()).where == "process"
    two = runner.Launch(nproc_per_node=2)
    inv = runner.invocation(train, two, force=True)
    assert inv.where == "torchrun" and inv.command()[:2] == ["torchrun", "--nproc-per-node=2"] and "--force" in inv.args
    assert runner.invocation(flops, two).where == "process"  # one process measures
    assert runner.job_command(flops, two)[:3] == ["tpcrepro", "job", "smoke/vit"]

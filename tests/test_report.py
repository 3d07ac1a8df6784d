"""Report and list: deterministic tables from fixture records; smoke numbers kept apart."""

from __future__ import annotations

import dataclasses

from tpcrepro import records, report, status
from tpcrepro.recipe import load_recipe


def _rec(recipe_id, kind, seed, metrics, status_="done", started="2026-01-01T00:00:00", recipe_hash=None):
    r = load_recipe(recipe_id)
    return records.Record(
        recipe=r.id, recipe_hash=recipe_hash or r.hash, profile=r.profile, kind=kind, seed=seed, status=status_,
        metrics=metrics, settings={}, overrides=[], environment={"git_commit": "abc1234"}, started_at=started,
        duration_s=1.0,
    )


def _fixture():
    for seed, top1 in enumerate([97.0, 98.0, 99.0]):
        records.write_record(_rec("smoke/vit", "train", seed, {"top1": top1, "top5": 100.0}))
    records.write_record(_rec("smoke/vit", "flops", 0, {"params": 404874, "macs": 30_230_000}))
    records.write_record(_rec("deit/deit_s", "train", 0, {"top1": 79.86, "top5": 94.95}))
    records.write_record(_rec("deit/deit_s", "flops", 0, {"params": 22_050_664, "macs": 4_608_338_304}))


def test_report_is_deterministic_and_keeps_smoke_apart(tmp_path):
    _fixture()
    a = report.write_all(tmp_path / "a", ["table3"])[0].read_text()
    b = report.write_all(tmp_path / "b", ["table3"])[0].read_text()
    assert a == b
    paper_part, smoke_part = a.split("## Our runs at smoke scale")
    assert "79.9" in paper_part and "+0.06" in paper_part  # ours beside the paper, with the difference
    assert "98.0 ± 1.0" not in paper_part and "98.0 ± 1.0" in smoke_part  # smoke only in its own section
    assert "not ImageNet results" in smoke_part and "MACs (M), smoke" in smoke_part
    assert "quoted from the paper" in paper_part
    assert "`smoke/vit` seeds 0,1,2" in smoke_part


def test_report_without_runs_shows_the_paper_and_how_to_run(tmp_path):
    text = report.write_all(tmp_path, ["table9"])[0].read_text()
    assert "70.6" in text and "tpcrepro run table9 --profile paper" in text


def test_list_statuses():
    _fixture()
    records.write_record(_rec("deit/deit_t", "train", 0, {}, status_="failed"))
    records.write_record(_rec("deit/deit_b", "train", 0, {"top1": 1.0}, recipe_hash="000000000000"))
    rows = {(r["table"], r["row"]): r for r in status.table_status(["smoke", "paper"], lambda p: [0])}
    assert rows[("table3", "deit_s")]["paper"] == "missing"  # flops done, throughput not yet
    assert rows[("table3", "deit_s")]["smoke"] == "done"
    assert rows[("table2", "deit_t")]["paper"] == "failed"
    assert rows[("table5", "deit_b")]["paper"] == "stale"
    assert rows[("table3", "tokenlearner")]["paper"] == "quoted"
    assert rows[("table3", "ours")]["smoke"] == "missing"
    assert rows[("table7", "ours_lvvit_t")]["smoke"] == "missing"
    assert rows[("ablation", "reuse_none")]["paper"] == "no recipe"  # a table of our own runs at smoke scale only


def test_latest_record_wins():
    records.write_record(_rec("smoke/vit", "train", 0, {"top1": 1.0}, started="2026-01-01T00:00:00"))
    records.write_record(_rec("smoke/vit", "train", 0, {"top1": 2.0}, started="2026-01-02T00:00:00"))
    records.write_record(_rec("smoke/vit", "train", 0, {}, status_="failed", started="2026-01-03T00:00:00"))
    best = records.latest(records.load_records())
    assert best[("smoke/vit", "smoke", "train", 0, load_recipe("smoke/vit").hash)].metrics["top1"] == 2.0


def test_current_version_wins_over_a_newer_other_version(tmp_path):
    r = load_recipe("smoke/vit")
    records.write_record(_rec("smoke/vit", "train", 0, {"top1": 90.0}, started="2026-01-01T00:00:00"))
    records.write_record(_rec("smoke/vit", "train", 0, {"top1": 10.0}, started="2026-02-01T00:00:00",
                              recipe_hash="0123456789ab"))
    from tpcrepro import runner

    job = runner.Job(r, "train", 0)
    assert runner.statuses([job])[0][1] == "done"
    ours = report.collect("smoke/vit", "smoke", records.latest(records.load_records()))
    assert ours.values["top1"] == [90.0] and not ours.stale


def test_force_does_not_rerun_the_base_of_a_fine_tune():
    from tpcrepro import runner

    jobs = runner.plan([load_recipe("smoke/tpc", ("model.init_seed=null",))], [0, 1])
    deps = [j for j in jobs if j.dependency]
    assert [(j.recipe.id, j.seed) for j in deps] == [("smoke/vit_pretrain", 0), ("smoke/vit_pretrain", 1)]
    assert jobs.index(deps[-1]) < min(jobs.index(j) for j in jobs if j.recipe.id == "smoke/tpc")
    assert [j.seed for j in jobs if j.kind == "flops"] == [0]


def test_every_seed_fine_tunes_the_one_pretrained_backbone():
    """model.init_seed: every seed of a smoke row starts from the backbone's seed-0 run, which is planned once."""
    from tpcrepro import jobs as jobs_mod, runner

    tpc = load_recipe("smoke/tpc")
    plan = runner.plan([tpc, load_recipe("smoke/vit")], [0, 1, 2])
    assert [(j.recipe.id, j.seed) for j in plan if j.dependency] == [("smoke/vit_pretrain", 0)]
    assert [jobs_mod.init_seed(tpc, s) for s in (0, 1, 2)] == [0, 0, 0]
    assert jobs_mod.init_seed(load_recipe("smoke/tpc", ("model.init_seed=null",)), 2) == 2


def test_cpu_images_per_sec_never_sit_beside_the_papers():
    import dataclasses

    gpu = dataclasses.replace(_rec("deit/deit_s", "throughput", 0, {"images_per_sec": 9000.0}),
                              settings={"device": "cuda"})
    cpu = dataclasses.replace(_rec("deit/evit_deit_s", "throughput", 0, {"images_per_sec": 40.0}),
                              settings={"device": "cpu"})
    records.write_record(gpu)
    records.write_record(cpu)
    latest = records.latest(records.load_records())
    assert report.collect("deit/deit_s", "paper", latest).values["images_per_sec"] == [9000.0]
    assert report.collect("deit/evit_deit_s", "paper", latest) is None


def test_current_records_else_older_versions_on_the_same_data_flagged_stale():
    r = load_recipe("smoke/vit")
    for seed, top1, h, data in ((0, 70.0, "0123456789ab", "digits"), (1, 80.0, "0123456789ab", "scenes")):
        rec = _rec("smoke/vit", "train", seed, {"top1": top1}, recipe_hash=h)
        records.write_record(dataclasses.replace(rec, settings={"data": data}))
    latest = records.newest()
    mine, stale = latest.current(r)
    assert stale and [x.metrics["top1"] for x in mine] == [80.0]  # never another data set's numbers
    assert latest.current_record(r, "train", 1)[1] and latest.current_record(r, "train", 2) == (None, False)
    records.write_record(_rec("smoke/vit", "flops", 0, {"macs": 1.0}))
    latest = records.newest()  # a new file: read, the others not again
    mine, stale = latest.current(r)
    assert not stale and [x.kind for x in mine] == ["flops"]
    assert latest.current_record(r, "flops", 0)[0].metrics == {"macs": 1.0}


def test_each_recipe_and_record_is_read_and_hashed_once_per_command(monkeypatch, capsys):
    import sys

    from tpcrepro import cli, recipe

    records.write_record(_rec("smoke/vit", "train", 0, {"top1": 90.0}))
    calls = {"parse": [], "hash": [], "read": []}
    parse, hash_, read = recipe._load, recipe.recipe_hash, records.read_record
    monkeypatch.setattr(recipe, "_load", lambda p, o: calls["parse"].append((str(p), o)) or parse(p, o))
    monkeypatch.setattr(recipe, "recipe_hash", lambda r: calls["hash"].append((r.id, r.overrides)) or hash_(r))
    monkeypatch.setattr(records, "read_record", lambda p: calls["read"].append(str(p)) or read(p))
    monkeypatch.setattr(recipe, "_loaded", {})
    monkeypatch.setattr(records, "_parsed", {})
    monkeypatch.setattr(sys, "argv", ["tpcrepro", "run", "table9", "--profile", "smoke", "--dry-run"])
    cli.main()
    assert "job(s) to run" in capsys.readouterr().err
    for what, seen in calls.items():
        assert seen and len(seen) == len(set(seen)), what

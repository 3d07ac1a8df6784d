"""Recipe validation: unknown keys, types, the base level, overrides and the hash."""

from __future__ import annotations

import pytest

from tpcrepro.errors import UserError
from tpcrepro.recipe import load_recipe, parse_override


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "r.yaml", "profile: smoke\ntrain:\n  lr: 1e-3\n  epohcs: 3\n")
    with pytest.raises(UserError) as e:
        load_recipe(str(p))
    assert "train.epohcs" in str(e.value) and "r.yaml" in str(e.value)


def test_wrong_type_is_an_error(tmp_path):
    p = write(tmp_path, "r.yaml", "profile: smoke\ntrain:\n  epochs: ten\n")
    with pytest.raises(UserError, match="train.epochs"):
        load_recipe(str(p))


def test_bad_profile_and_job_kind(tmp_path):
    with pytest.raises(UserError, match="profile"):
        load_recipe(str(write(tmp_path, "a.yaml", "profile: huge\n")))
    with pytest.raises(UserError, match="jobs"):
        load_recipe(str(write(tmp_path, "b.yaml", "profile: smoke\njobs: [train, dance]\n")))


def test_base_chain_merges_in_order_and_rejects_loops(tmp_path):
    write(tmp_path, "base.yaml", "profile: smoke\ntrain: {lr: 0.5, epochs: 7}\n")
    child = load_recipe(str(write(tmp_path, "child.yaml", "base: base.yaml\ntrain: {lr: 0.25}\n")))
    assert child.train.lr == 0.25 and child.train.epochs == 7
    grand = load_recipe(str(write(tmp_path, "grand.yaml", "base: child.yaml\ntrain: {epochs: 3, warmup_epochs: 1}\n")))
    assert grand.train.lr == 0.25 and grand.train.epochs == 3
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(UserError, match="loops"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_overrides_are_applied_kept_and_hashed():
    plain = load_recipe("smoke/vit")
    over = load_recipe("smoke/vit", ["train.lr=1e-3", "data.aug.translate=0"])
    assert over.train.lr == 1e-3 and over.data.aug.translate == 0
    assert over.overrides == ("train.lr=1e-3", "data.aug.translate=0")
    assert over.hash != plain.hash
    assert load_recipe("smoke/vit").hash == plain.hash  # stable
    with pytest.raises(UserError, match="train.nope"):
        load_recipe("smoke/vit", ["train.nope=1"])


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    with pytest.raises(UserError):
        parse_override("novalue")


def test_missing_recipe_is_a_clear_error():
    with pytest.raises(UserError, match="does not exist"):
        load_recipe("smoke/nope")


def test_hash_ignores_what_changes_no_result():
    base = load_recipe("smoke/tpc").hash
    for o in ("jobs=[train]", "data.workers=4", "eval.batch_size=7", "throughput.batch_size=3"):
        assert load_recipe("smoke/tpc", [o]).hash == base, o
    assert load_recipe("smoke/tpc", ["tpc.beta=3.0"]).hash != base


def test_hash_follows_the_recipe_it_starts_from(tmp_path):
    base = write(tmp_path, "base.yaml", "profile: smoke\ntrain: {lr: 0.5}\n")
    child = write(tmp_path, "child.yaml", f"profile: smoke\nmodel: {{init_from: {base}}}\n")
    before = load_recipe(str(child)).hash
    base.write_text("profile: smoke\ntrain: {lr: 0.25}\n")
    assert load_recipe(str(child)).hash != before


def test_method_settings_are_validated(tmp_path):
    for bad in ("tpc: {pause_span: 0}", "tpc: {xi: 2}", "stabilizer: {kappa: 0}", "tpc: {reuse: sometimes}"):
        with pytest.raises(UserError):
            load_recipe(str(write(tmp_path, "r.yaml", f"profile: smoke\n{bad}\n")))


def test_a_throughput_job_times_by_the_one_protocol():
    import dataclasses

    from tpcrepro import speed
    from tpcrepro.recipe import ThroughputCfg

    names = [f.name for f in dataclasses.fields(speed.Protocol)]
    assert names == [f.name for f in dataclasses.fields(ThroughputCfg)] + ["device", "compile"]
    t = load_recipe("smoke/vit", ("throughput.steps=7", "throughput.precision=fp32")).throughput
    p = speed.Protocol.of(t, "cpu")
    assert (p.steps, p.precision, p.device, p.batch_size) == (7, "fp32", "cpu", t.batch_size)

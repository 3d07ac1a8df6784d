"""Every table and every recipe loads; every referenced recipe exists and matches its profile."""

from __future__ import annotations

import pytest

from tpcrepro import paths, tables
from tpcrepro.recipe import list_recipes, load_recipe, recipe_path


def test_ten_paper_tables_load():
    ids = tables.list_tables()
    assert [f"table{i}" for i in range(1, 11)] == [t for t in ids if t.startswith("table")]
    for spec in tables.load_all():
        assert spec.rows, spec.id
        for row in spec.rows:
            assert set(row.paper) == {c.key for c in spec.columns}


def test_paper_numbers_transcribed():
    t3 = tables.load_table("table3")
    assert t3.row("ours").paper == {"top1": 80.8, "top5": 96.1, "params_m": 22, "gmacs": 2.8}
    assert t3.row("deit_s").paper["gmacs"] == 4.6
    t4 = tables.load_table("table4")
    assert t4.row("ours").paper["images_per_sec"] == 65000
    t9 = tables.load_table("table9")
    assert [r.paper["kappa"] for r in t9.rows] == [20, 40, 60, 140, 80, 120, 100]
    assert tables.load_table("table7").row("lvvit_m").paper["gmacs"] == 16.0


@pytest.mark.parametrize("spec", tables.load_all(), ids=lambda s: s.id)
def test_referenced_recipes_exist_and_match_profile(spec):
    for row in spec.rows:
        if row.quoted:
            assert row.note and not row.recipes
        for profile, rid in row.recipes.items():
            assert recipe_path(rid).exists(), f"{spec.id}/{row.id}: recipe {rid} missing"
            assert load_recipe(rid).profile == profile


@pytest.mark.parametrize("rid", list_recipes())
def test_every_recipe_loads_and_opens_with_a_comment(rid):
    r = load_recipe(rid)
    text = recipe_path(rid).read_text()
    assert text.startswith("#"), f"{rid} must open with a comment: what, command, cost"
    assert "Command:" in text and "Cost" in text, rid
    assert r.id == rid and len(r.hash) == 12


def test_base_recipes_are_not_listed():
    assert not [r for r in list_recipes() if r.startswith("_")]
    assert (paths.recipes_dir() / "_base").is_dir()


@pytest.mark.parametrize("spec", tables.load_all(), ids=lambda s: s.id)
def test_every_runnable_row_has_a_smoke_recipe(spec):
    """A row tpcrepro runs at paper scale also runs at smoke scale (its small stand-in backbone)."""
    for row in spec.rows:
        if not row.quoted and spec.from_paper:
            assert "paper" in row.recipes and "smoke" in row.recipes, f"{spec.id}/{row.id}"
        if not spec.from_paper:
            assert set(row.recipes) == {"smoke"}, f"{spec.id}/{row.id}: a table of our own runs at smoke scale"

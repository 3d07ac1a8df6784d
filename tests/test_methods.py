"""The methods table (tpcrepro/methods.py) and torch-free recipes and tables."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tpcrepro import methods, paths, tables
from tpcrepro.errors import UserError
from tpcrepro.recipe import Recipe, load_recipe


def test_recipes_tables_and_records_load_without_torch():
    code = ("import sys, tpcrepro.recipe, tpcrepro.tables, tpcrepro.records, tpcrepro.methods, tpcrepro.status\n"
            "import tpcrepro.runner, tpcrepro.cli, tpcrepro.report, tpcrepro.claims, tpcrepro.figures\n"
            "tpcrepro.recipe.load_recipe('smoke/tpc').hash; tpcrepro.tables.load_all()\n"
            "bad = [m for m in ('torch', 'timm', 'tpcrepro.models') if m in sys.modules]\n"
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=paths.ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_every_method_section_is_a_recipe_section_with_its_class():
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    for m in methods.METHODS:
        if m.section:
            assert m.cfg is not None and fields[m.section].type is m.cfg
            assert isinstance(getattr(Recipe(profile="smoke"), m.section), m.cfg)
            assert set(m.ranges) <= {f.name for f in dataclasses.fields(m.cfg)}  # a range names a real key


def test_tables_name_only_methods_of_the_table():
    assert set(tables.METHODS) == set(methods.names()) | {"quoted"}
    used = {r.method for spec in tables.load_all() for r in spec.rows}
    assert used <= set(tables.METHODS)


def test_model_names_find_their_method():
    assert methods.of_model("tpc_swin_t").name == "tpc"
    assert methods.of_model("avit_deit_s").name == "avit"
    assert methods.of_model("evit_lvvit_s").name == "evit"
    assert methods.of_model("deit_small_patch16_224") is None and methods.of_model("lvvit_s") is None
    assert methods.label("tome") == "ToMe (r)" and methods.label("quoted") == "quoted"


@pytest.mark.parametrize("name", ["tpc_vit_smoke", "avit_vit_smoke", "evit_vit_smoke", "dynamicvit_vit_smoke",
                                  "tome_vit_smoke", "vit_smoke_patch2_16"])
def test_adaptive_flag_agrees_with_the_models(name):
    import timm

    import tpcrepro.models  # noqa: F401
    from tpcrepro.models import api

    m = methods.of_model(name)
    assert api.is_adaptive(timm.create_model(name)) == (m is not None and m.adaptive)


def test_method_kwargs_from_the_table():
    tpc = load_recipe("smoke/tpc", ("stabilizer.kappa=4", "stabilizer.train_only=true"))
    kw = methods.method_kwargs(tpc)
    assert kw["tpc"] is tpc.tpc and kw["kappa"] == 4 and kw["kappa_train_only"] is True
    swin = load_recipe("smoke/tpc", ("model.name=tpc_swin_smoke", "stabilizer.train_only=true"))
    with pytest.raises(UserError, match="train_only is not supported by tpc_swin_smoke"):
        methods.method_kwargs(swin)
    with pytest.raises(UserError, match="has no stabilizer"):
        methods.method_kwargs(load_recipe("smoke/vit", ("stabilizer.kappa=4",)))
    assert methods.method_kwargs(load_recipe("smoke/vit")) == {}


def test_controllers_say_how_a_fixed_schedule_replays_them():
    import timm

    import tpcrepro.models  # noqa: F401
    from tpcrepro.models import api

    for name in ("tpc_vit_smoke", "avit_vit_smoke", "tpc_lvvit_smoke"):
        m = timm.create_model(name)
        assert isinstance(m, api.ViTController) and not isinstance(m, api.StageController), name
    swin = timm.create_model("tpc_swin_smoke")
    assert isinstance(swin, api.StageController) and not isinstance(swin, api.ViTController)
    assert not isinstance(timm.create_model("vit_smoke_patch2_16"), api.ViTController)

"""timm's own model tests (the installed timm's tests/test_models.py) pass on tpcrepro's models: a fast subset.

The whole run is scripts/timm_conformance.sh; this one fetches timm's source
distribution from PyPI and is skipped where no index can be reached.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["vit_smoke_patch2_16", "tpc_vit_smoke", "evit_vit_smoke", "dynamicvit_vit_smoke", "lvvit_smoke",
          "tpc_lvvit_smoke", "swin_smoke", "tpc_swin_smoke"]
TESTS = ["test_model_forward", "test_model_backward", "test_model_default_cfgs", "test_model_default_cfgs_non_std",
         "test_model_forward_features"]


@pytest.mark.slow
def test_timms_model_tests_pass_on_the_smoke_models():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "scripts/timm_conformance.py", "--models", *MODELS, "--tests", *TESTS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed, failed = map(int, re.search(r"total: (\d+) passed, (\d+) failed", proc.stdout).groups())
    assert failed == 0 and passed >= 2 * len(MODELS), proc.stdout


def test_a_failure_that_only_cannot_reach_the_hub_is_counted_apart(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("timm_conformance", ROOT / "scripts" / "timm_conformance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        '<testcase name="test_model_forward[tpc_vit_smoke]"/>'
        '<testcase name="test_model_load_pretrained[tpc_deit_s]"><failure message="huggingface_hub.errors.'
        'LocalEntryNotFoundError: cannot find the requested files">...</failure></testcase>'
        '<testcase name="test_model_backward[tpc_deit_s]"><failure message="AssertionError: no grad"/></testcase>'
        '</testsuite></testsuites>')
    table = mod.results(xml)
    assert table[("test_model_forward", "TPC-ViT")]["passed"] == ["tpc_vit_smoke"]
    assert table[("test_model_load_pretrained", "TPC-ViT")]["offline"] == ["tpc_deit_s"]
    assert table[("test_model_backward", "TPC-ViT")]["failed"] == ["tpc_deit_s"]

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

"""scripts/gpu_check.sh, the one call a lent GPU gets, runs every step on the CPU at tiny sizes (--quick)."""

from __future__ import annotations

import os
import subprocess
import sys

from tpcrepro import paths


def test_every_step_of_the_gpu_check_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TPCREPRO_RESULTS": str(tmp_path / "results"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(paths.ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "0 step(s) failed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "results" / "records").iterdir())
    for kind in ("bench__stabilizer_block", "bench__varlen", "bench__tpc_vit_smoke", "__train__"):
        assert any(kind in name for name in written), (kind, written)

"""Rerun one committed smoke job here and demand its committed top-1, bit for bit.

    python scripts/check_reproduce.py [RECIPE] [SEED] [--keep]   (default: smoke/vit 0, a few CPU-minutes)

Reads the newest done train record of RECIPE/SEED for the current recipe
version from results/records, reruns it into a temporary results folder with
the same threads (OMP_NUM_THREADS from the record), and compares top-1 and
every validation image's hit (`--keep` adds the new record to results/records and keeps the run's checkpoint under runs/). Exit 0: identical; 1: different (what differs is
printed, with both machines' CPU kernels); 2: nothing to compare against.
A recipe fine-tuned from another needs that one's checkpoint under runs/: run the base first
(`tpcrepro run smoke/vit_pretrain --seeds 0`, or this script on it with --keep).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def committed(recipe_id: str, seed: int):
    sys.path.insert(0, str(ROOT))
    from tpcrepro import records
    from tpcrepro.recipe import load_recipe

    h = load_recipe(recipe_id).hash
    key = (recipe_id, "smoke", "train", seed, h)
    return records.latest(records.load_records(ROOT / "results" / "records")).get(key)


def main() -> int:
    keep = "--keep" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--keep"]
    recipe_id = args[0] if args else "smoke/vit"
    seed = int(args[1]) if len(args) > 1 else 0
    ref = committed(recipe_id, seed)
    if ref is None:
        print(f"no committed done train record of {recipe_id} seed {seed} for the current recipe version")
        return 2
    threads = ref.environment.get("torch_threads")
    if threads is None:  # records before the CPU fields: "MODEL (N cores, T threads)"
        m = re.search(r"(\d+) threads\)", ref.environment.get("device_name", ""))
        threads = int(m.group(1)) if m else 1
    threads = str(threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": str(ROOT),
           "TPCREPRO_NO_PROGRESS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        # runs/ of this checkout: a fine-tune finds its base's checkpoint there; the rerun itself goes to a
        # temporary run directory (--keep: to its usual place, so fine-tunes can start from it)
        run_dir = [] if keep else ["--run-dir", f"{tmp}/run"]
        cmd = [sys.executable, "-m", "tpcrepro", "--results", f"{tmp}/results", "--runs", str(ROOT / "runs"),
               "job", recipe_id, "--kind", "train", "--seed", str(seed), "--force", *run_dir]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        path = next(Path(tmp, "results", "records").glob("*.json"))
        new = json.loads(path.read_text())
        if keep:
            shutil.copy(path, ROOT / "results" / "records" / path.name)
    got, want = new["metrics"], ref.metrics
    same_bits = "correct_top1" not in want or got.get("correct_top1") == want["correct_top1"]  # older records: top-1 only
    print(f"{recipe_id} seed {seed}: committed top-1 {want['top1']!r} ({ref.environment.get('git_commit')}, "
          f"{ref.environment.get('cpu_capability')}, {ref.environment.get('device_name')}); "
          f"here {got['top1']!r} ({new['environment'].get('cpu_capability')}, {new['environment'].get('device_name')})")
    if got["top1"] == want["top1"] and same_bits:
        print("identical: top-1 and every validation image's hit")
        return 0
    print("DIFFERENT: " + ("top-1 " if got["top1"] != want["top1"] else "") + ("per-image hits" if not same_bits else ""))
    vendors = [vendor(r.get("device_name")) for r in (ref.environment, new["environment"])]
    if vendors[0] != vendors[1]:
        print(f"expected: the committed record comes from an {vendors[0]} CPU, this one is {vendors[1]}; MKL's "
              "reproducible AVX2 branch (MKL_CBWR=AVX2) exists on Intel CPUs only, so the matrix products round "
              "differently (README, 'Reproducing the committed numbers')")
    return 1


def vendor(device_name) -> str:
    name = (device_name or "").lower()
    return "Intel" if "intel" in name or "xeon" in name else "AMD" if "amd" in name or "epyc" in name else "unknown"


if __name__ == "__main__":
    sys.exit(main())

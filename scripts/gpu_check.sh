#!/usr/bin/env bash
# Every GPU-side check and timing of tpcrepro in one call (at most 8 minutes: each step has a time limit; on one
# H100/H200/A100), each writing records to results/records (the card is named in them):
#   1. the GPU tests (`pytest -m gpu`: fused top-κ kernel against the reference, forms agree on CUDA);
#   2. the stabilizer block: a DeiT-S block with top-κ attention (κ 100, 197 tokens, batch 256, bf16)
#      against the dense block, forward and training step (goal: within 1.3×);
#   3. variable token counts: a batch computing 60-179 tokens per image against 119 for all (goal ≥ 0.85);
#   4. the real controller: TPC-DeiT-S with its gates set for 2.8 G MACs against DeiT-S, bf16, batch 1 and 256
#      (`tpcrepro bench`: removed, the same counts replayed, masked, EViT, ToMe in one run; κ off and 100;
#      goals: ≥ 1.45× at batch 256, not slower than DeiT-S at batch 1);
#   5. Table 4 by one protocol: DeiT-S, EViT-S, A-ViT-S, TPC-DeiT-S and ToMe side by side
#      (bf16/fp32, batch 256 and 1, eager, and compiled at bf16 batch 256);
#   6. a paper-profile recipe training 300 steps (30 epochs of 1280 images, batch 128) with AMP on generated 224-px images:
#      its training images/s goes into a record (the recipes' stated costs, measured).
# Usage: bash scripts/gpu_check.sh [--device cpu] [--quick]
#   --quick: tiny sizes everywhere (smoke models, batch 2-4, a few images): checks that every step runs and writes its
#   records, e.g. on a CPU (`bash scripts/gpu_check.sh --device cpu --quick`); its numbers mean nothing.
# Output: results/records/*, results/tables/table4_speed_*.md
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "usage: bash scripts/gpu_check.sh [--device cpu] [--quick]" >&2; exit 2 ;;
  esac
done
export DEVICE QUICK
PY=${PYTHON:-python}
TPC="$PY -m tpcrepro"
FAILED=0
step() { echo; echo "== $1"; }
fail() { echo "$1: FAILED"; FAILED=$((FAILED + 1)); }
if [ "$QUICK" = 1 ]; then
  PREC=fp32; BIG=4; MODEL=tpc_vit_smoke; MACS=15e6; KAPPA=20; PROFILE=smoke
else
  PREC=bf16; BIG=256; MODEL=tpc_deit_s; MACS=2.8e9; KAPPA=100; PROFILE=paper
fi
step "1. GPU tests"
if [ "$DEVICE" = cuda ]; then timeout 60 $PY -m pytest -q -m gpu tests/ || fail "gpu tests"; else echo "skipped (no CUDA)"; fi
step "2. stabilizer block vs dense block"
timeout 60 $PY - <<'PYEOF' || fail "stabilizer bench"
import json, os, torch
from tpcrepro.kernels.block_cost import stabilizer_block_bench
from tpcrepro.measure import write_bench_record
from tpcrepro import speed
dev, quick = os.environ["DEVICE"], os.environ["QUICK"] == "1"
size = dict(batch=2, tokens=9, dim=32, heads=2, kappa=4, dtype=torch.float32, iters=2, repeats=1, warmup=1) if quick \
    else dict(batch=256, tokens=197, dim=384, heads=6, kappa=100, dtype=torch.bfloat16)
out = stabilizer_block_bench(device=dev, **size)
print(json.dumps(out, default=str))
p = speed.Protocol(batch_size=size["batch"], precision="fp32" if quick else "bf16", device=dev)
write_bench_record({"model": "stabilizer_block_deit_s", "quick": quick, **out, "settings": speed.settings(p)})
PYEOF
step "3. variable token counts 60-179 vs 119"
timeout 60 $PY - <<'PYEOF' || fail "varlen bench"
import json, os
from tpcrepro import speed
from tpcrepro.bench import varlen_efficiency
from tpcrepro.measure import write_bench_record
dev, quick = os.environ["DEVICE"], os.environ["QUICK"] == "1"
if quick:
    p = speed.Protocol(batch_size=4, precision="fp32", warmup=1, steps=1, repeats=1, device=dev)
    out = varlen_efficiency(p, lo=20, hi=60, buckets=(1, 2), model_name="tpc_vit_smoke")
else:
    p = speed.Protocol(batch_size=256, precision="bf16", device=dev)
    out = varlen_efficiency(p)
print(json.dumps(out))
write_bench_record({"model": "varlen_deit_s", "quick": quick, **out, "settings": speed.settings(p)})
PYEOF
step "4. the real controller: $MODEL at $MACS MACs vs its backbone, batch 1 and $BIG"
timeout 100 $TPC bench --model $MODEL --macs $MACS --device $DEVICE --batch-size $BIG --precision $PREC || fail "bench"
timeout 100 $TPC bench --model $MODEL --macs $MACS --device $DEVICE --batch-size $BIG --precision $PREC --kappa $KAPPA \
  --no-peers || fail "bench kappa"
step "5. Table 4 by one protocol"
if [ "$QUICK" = 1 ]; then echo "skipped (--quick: the smoke profile's Table 4 runs with \`tpcrepro run table4 --kinds throughput\`)"
else timeout 120 $TPC run table4 --profile $PROFILE --kinds throughput --device $DEVICE || fail "table4 protocol"; fi
step "6. paper-profile training speed on generated images"
timeout 90 $PY - <<'PYEOF' || fail "training speed"
import numpy as np, os, subprocess, sys, tempfile
from pathlib import Path
from PIL import Image
quick = os.environ["QUICK"] == "1"
root = Path(tempfile.mkdtemp()) / "fake"
rng = np.random.default_rng(0)
per_class, px = (4, 32) if quick else (640, 256)
for split, n in (("train", per_class), ("val", 2 if quick else 16)):
    for c in ("a", "b"):
        d = root / split / c; d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
print(root)
sets = (["model.img_size=32", "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=4", "data.workers=0", "eval.batch_size=4"] if quick
        else ["train.epochs=30", "train.batch_size=128", "data.workers=12"])
cmd = [sys.executable, "-m", "tpcrepro", "job", "deit/tpc_deit_s", "--data", str(root), "--device", os.environ["DEVICE"],
       "--set", "model.pretrained=null", "--set", "model.num_classes=2", "--set", "data.aug.repeated_aug=false",
       *[a for s in sets for a in ("--set", s)], "--run-dir", tempfile.mkdtemp() + "/tpc_speed_run"]
sys.exit(subprocess.call(cmd))
PYEOF
echo; echo "records:"; ls -t "${TPCREPRO_RESULTS:-results}/records" | head -20
echo; echo "$FAILED step(s) failed"
exit $((FAILED > 0))

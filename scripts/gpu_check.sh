#!/usr/bin/env bash
# Every GPU-side check and timing of tpcrepro in one call (at most 8 minutes: each step has a time limit; on one H100/H200/A100),
# each writing records to results/records (the card is named in them):
#   1. the GPU tests (`pytest -m gpu`: fused top-κ kernel against the reference, forms agree on CUDA);
#   2. the stabilizer block: a DeiT-S block with top-κ attention (κ 100, 197 tokens, batch 256, bf16)
#      against the dense block, forward and training step (goal: within 1.3×);
#   3. variable token counts: a batch computing 60-179 tokens per image against 119 for all (goal ≥ 0.85);
#   4. TPC-DeiT-S at 2.8 G MACs against DeiT-S (benchmark mode, κ off and 100);
#   5. Table 4 by one protocol: DeiT-S, EViT-S, A-ViT-S, TPC-DeiT-S and ToMe side by side
#      (bf16/fp32, batch 256 and 1, eager, and compiled at bf16 batch 256);
#   6. a paper-profile recipe training 300 steps (30 epochs of 1280 images, batch 128) with AMP on generated 224-px images:
#      its training images/s goes into a record (the recipes' stated costs, measured).
# Usage: bash scripts/gpu_check.sh        Output: results/records/*, results/tables/table4_speed_paper.md
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TPC="$PY -m tpcrepro"
step() { echo; echo "== $1"; }
step "1. GPU tests"
timeout 60 $PY -m pytest -q -m gpu tests/ || echo "gpu tests: FAILED (rc $?)"
step "2. stabilizer block vs dense block"
timeout 60 $PY - <<'PYEOF' || echo "stabilizer bench: FAILED"
import json, torch
from tpcrepro.kernels.bench import stabilizer_block_bench
from tpcrepro.measure import write_bench_record
from tpcrepro import speed
out = stabilizer_block_bench(batch=256, tokens=197, dim=384, heads=6, kappa=100, dtype=torch.bfloat16, device="cuda")
print(json.dumps(out, default=str))
p = speed.Protocol(batch_size=256, precision="bf16")
write_bench_record({"model": "stabilizer_block_deit_s", **out, "settings": speed.settings(p)})
PYEOF
step "3. variable token counts 60-179 vs 119"
timeout 60 $PY - <<'PYEOF' || echo "varlen bench: FAILED"
import json
from tpcrepro import speed
from tpcrepro.bench import varlen_efficiency
from tpcrepro.measure import write_bench_record
p = speed.Protocol(batch_size=256, precision="bf16")
out = varlen_efficiency(p)
print(json.dumps(out))
write_bench_record({"model": "varlen_deit_s", **out, "settings": speed.settings(p)})
PYEOF
step "4. TPC-DeiT-S at 2.8 G MACs vs DeiT-S"
timeout 45 $TPC bench --model tpc_deit_s --macs 2.8e9 --device cuda --batch-size 256 --precision bf16 || echo FAILED
timeout 45 $TPC bench --model tpc_deit_s --macs 2.8e9 --device cuda --batch-size 256 --precision bf16 --kappa 100 || echo FAILED
step "5. Table 4 by one protocol"
timeout 120 $TPC run table4 --profile paper --kinds throughput --device cuda || echo "table4 protocol: FAILED"
step "6. paper-profile training speed on generated images"
timeout 90 $PY - <<'PYEOF' || echo "training speed: FAILED"
import numpy as np, os, tempfile
from pathlib import Path
from PIL import Image
root = Path(tempfile.mkdtemp()) / "fake"
rng = np.random.default_rng(0)
for split, n in (("train", 640), ("val", 16)):
    for c in ("a", "b"):
        d = root / split / c; d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
print(root)
os.system(f"{os.environ.get('PYTHON', 'python')} -m tpcrepro job deit/tpc_deit_s --data {root} --device cuda "
          "--set model.pretrained=null --set model.num_classes=2 --set train.epochs=30 --set train.batch_size=128 "
          "--set data.workers=12 --set data.aug.repeated_aug=false --run-dir /tmp/tpc_speed_run")
PYEOF
echo; echo "records:"; ls -t results/records | head -20

#!/usr/bin/env bash
# TPC-DeiT-S at the paper's 2.8 G MACs operating point (benchmark mode: a fixed
# token schedule, random weights) against DeiT-S, timed in one run per call,
# batch 256, bf16, with the stabilizer off and on (κ = 100). Each call writes
# a record to results/records (profile "bench", the card named in it).
# Usage: bash scripts/gpu_tpc_bench.sh   (on a machine with a CUDA GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
TPC=${TPCREPRO:-tpcrepro}
$TPC bench --model tpc_deit_s --macs 2.8e9 --device cuda --batch-size 256 --precision bf16
$TPC bench --model tpc_deit_s --macs 2.8e9 --device cuda --batch-size 256 --precision bf16 --kappa 100

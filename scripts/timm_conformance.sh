#!/usr/bin/env bash
# timm's own model tests (the installed timm version's tests/test_models.py) on tpcrepro's models;
# prints passed/failed per test and model family. Arguments go to scripts/timm_conformance.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec "${PYTHON:-python}" scripts/timm_conformance.py "$@"

"""CPU kernel pinning: set before torch loads, honoured by torch, recorded in every record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tpcrepro import cpu, records

PROBE = ("import tpcrepro, torch, json, os; "
         "print(json.dumps([torch.backends.cpu.get_cpu_capability(), {k: os.environ.get(k) for k in "
         "('ATEN_CPU_CAPABILITY', 'MKL_CBWR', 'ONEDNN_MAX_CPU_ISA')}]))")


def _probe(**env) -> list:
    clean = {k: v for k, v in os.environ.items() if k not in cpu.PINS and k != cpu.NATIVE_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_tpcrepro_pins_the_kernels_before_torch():
    cap, pins = _probe()
    assert pins == cpu.PINS
    if "avx2" in cpu.isa_flags():
        assert cap == "AVX2"  # an AVX-512 machine runs the AVX2 kernels too


def test_a_set_variable_wins_and_torch_honours_it():
    cap, pins = _probe(ATEN_CPU_CAPABILITY="default")
    assert cap == "DEFAULT" and pins["ATEN_CPU_CAPABILITY"] == "default" and pins["MKL_CBWR"] == "AVX2"


def test_native_opt_out_sets_nothing():
    _, pins = _probe(TPCREPRO_NATIVE_CPU="1")
    assert pins == {k: None for k in cpu.PINS}


def test_records_keep_the_cpu_kernels():
    env = records.environment("cpu")
    assert env["cpu_capability"] and env["cpu_pins"] == cpu.pinned() and isinstance(env["cpu_isa"], list)
    assert env["torch_threads"] >= 1

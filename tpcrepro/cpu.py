"""Pin the CPU kernels, so smoke numbers are bit-exact across x86-64 CPUs of one vendor with AVX2.

PyTorch (ATen's vectorised kernels), MKL (matrix products) and oneDNN each
pick their code path by the CPU's instruction set; two machines of "the same
kind" may differ (AVX-512 on one, not the other) and then round differently,
which a small model trained for minutes turns into a different top-1. Before
torch loads, tpcrepro asks all three for their AVX2 path (ATen's capability,
MKL's conditional numerical reproducibility, oneDNN's ISA cap). A variable
already set is left as it is; TPCREPRO_NATIVE_CPU=1 keeps every library's own
choice. Same torch, same threads (`OMP_NUM_THREADS`), a CPU of the same vendor
with AVX2 or better: the same bits. MKL's AVX2 branch is Intel's only
(elsewhere MKL takes its own branch), so AMD CPUs agree among themselves but
not with Intel ones; the vendor-neutral branch (MKL_CBWR=COMPATIBLE) halves
the speed. GPUs and other instruction sets reproduce only within noise.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
NATIVE_ENV = "TPCREPRO_NATIVE_CPU"
_ISA = re.compile(r"^(avx\w*|fma|f16c|amx\w*|sse4_2)$")


def pin() -> dict:
    """Set the pins that are not set yet (unless TPCREPRO_NATIVE_CPU=1); returns what is set now."""
    if os.environ.get(NATIVE_ENV) != "1":
        for k, v in PINS.items():
            os.environ.setdefault(k, v)
    return pinned()


def pinned() -> dict:
    return {k: os.environ.get(k) for k in PINS}


def isa_flags() -> list[str]:
    """The CPU's vector instruction-set flags (avx2, avx512f, fma, ...) from /proc/cpuinfo; [] elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if _ISA.match(f))
    except OSError:
        pass
    return []


@contextmanager
def threads(n: Optional[int]):
    """Run the block with torch on `n` CPU threads (None: as it is), then put the count back."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def describe() -> dict:
    """What a record keeps: the kernels torch chose, the pins, the CPU's flags, the threads."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_pins": pinned(),
            "cpu_isa": isa_flags(), "torch_threads": torch.get_num_threads()}

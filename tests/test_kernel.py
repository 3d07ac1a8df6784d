"""The fused top-κ kernel against the fp64 oracle and the PyTorch path.

CPU: Triton's interpreter, in one subprocess (TRITON_INTERPRET must be set before triton is imported).
GPU (@pytest.mark.gpu): the same checks at DeiT-S shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpcrepro.models.stabilizer import attention, nearest_keys, reference_attention

ROOT = Path(__file__).resolve().parents[1]
NS, DS = (7, 33, 65), (16, 60, 64)


def kappas(n: int) -> list[int]:
    return [1, 5, n - 1, n, n + 3]


def inputs(b, h, n, d, dtype, mask, seed, device="cpu"):
    """q, k, v (randn, no near-ties) and a valid mask: None, 'keys' [B,1,1,N] or 'rows' [B,1,N,N] (| diagonal)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for _ in range(3))
    valid = None
    if mask == "keys":
        valid = torch.rand(b, 1, 1, n, generator=g) > 0.4
        valid[..., 0] = True
    elif mask == "rows":
        valid = (torch.rand(b, 1, n, n, generator=g) > 0.5) | torch.eye(n, dtype=torch.bool)
    return q, k, v, None if valid is None else valid.to(device)


def within(out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Worst |out − ref| − tol·|ref| (≤ tol passes): allclose with atol = rtol = tol."""
    return float(((out.double() - ref.double()).abs() - tol * ref.double().abs()).max())


def check_case(n, d, kappa, dtype, mask, seed=0, b=2, h=2, device="cpu") -> dict:
    """Output vs the fp64 oracle (and vs it over the kernel's own keys), chosen keys vs nearest_keys, counts."""
    from tpcrepro.kernels.topk_attention import _forward

    q, k, v, valid = inputs(b, h, n, d, dtype, mask, seed, device)
    out, keep = _forward(q, k, v, valid, kappa, d ** -0.5, store_keep=True)
    ref = reference_attention(q, k, v, valid, kappa).to(device)
    chosen = nearest_keys(q, k, min(kappa, n), valid)
    n_valid = torch.ones_like(chosen).sum(-1) if valid is None else valid.expand_as(chosen).sum(-1)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return {"err": within(out, ref, tol), "err_own_keys": within(out, reference_attention(q, k, v, keep), tol),
            "same_keys": bool(torch.equal(keep, chosen)), "rows_differ": float((keep != chosen).any(-1).float().mean()),
            "counts": bool((keep.sum(-1) == n_valid.clamp(max=kappa)).all())}


def check_ties(seed: int) -> bool:
    """Integer inputs (exact ties, duplicated keys): exactly min(κ, #valid) keys, none ranked below a dropped one."""
    from tpcrepro.kernels.topk_attention import _forward

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (2, 2, 40, 16), generator=g).float()
    k = torch.randint(-1, 2, (2, 2, 40, 16), generator=g).float()
    k[..., 20:, :] = k[..., :20, :]
    valid = (torch.rand(2, 1, 40, 40, generator=g) > 0.3) | torch.eye(40, dtype=torch.bool)
    rank = 2 * q @ k.transpose(-2, -1) - k.pow(2).sum(-1)[..., None, :]
    ok = True
    for kappa in (1, 2, 7, 20, 39):
        for m in (None, valid):
            _, keep = _forward(q, k, k, m, kappa, 0.25, store_keep=True)
            allowed = torch.ones_like(keep) if m is None else m.expand_as(keep)
            lowest_kept = rank.masked_fill(~keep, float("inf")).amin(-1)
            best_dropped = rank.masked_fill(keep | ~allowed, float("-inf")).amax(-1)
            ok &= bool((keep.sum(-1) == allowed.sum(-1).clamp(max=kappa)).all() and not (keep & ~allowed).any()
                       and (best_dropped <= lowest_kept).all())
    return ok


def check_configs() -> bool:
    """Every candidate (BLOCK_M, num_warps) gives the same output and keys (rows are independent)."""
    from tpcrepro.kernels.topk_attention import _blocks, _configs, _forward

    q, k, v, valid = inputs(2, 2, 65, 60, torch.bfloat16, "rows", seed=4)
    runs = [_forward(q, k, v, valid, 9, 0.2, True, config) for config in _configs(*_blocks(65, 60), False)]
    return len(runs) > 1 and all(torch.equal(o, runs[0][0]) and torch.equal(m, runs[0][1]) for o, m in runs)


def check_grads(n, kappa, mask, b=2, h=2, d=16, device="cpu", oracle="torch") -> float:
    """Largest relative gap between the gradients to q, k, v (and the outputs) of the Triton path (fp32) and
    of the PyTorch path (oracle='torch'), or of masked fp64 attention over the kernel's own keys ('own_keys')."""
    from tpcrepro.kernels.topk_attention import _forward, topk_attention

    q, k, v, valid = inputs(b, h, n, d, torch.float32, mask, seed=1, device=device)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device)
    res = []
    for path in ("triton", oracle):
        leaves = [t.clone().double().requires_grad_() if path == "own_keys" else t.clone().requires_grad_()
                  for t in (q, k, v)]
        if path == "triton":
            out = topk_attention(*leaves, kappa, valid)
        elif path == "torch":
            out = nearest_attention_torch(*leaves, valid, kappa)
        else:
            keep = _forward(q, k, v, valid, kappa, d ** -0.5, store_keep=True)[1]
            logits = (leaves[0] @ leaves[1].transpose(-2, -1) * d ** -0.5).masked_fill(~keep, float("-inf"))
            out = logits.softmax(-1) @ leaves[2]
        out.backward(g.to(out.dtype))
        res.append([out] + [t.grad for t in leaves])
    return max(float((a.detach().double() - t.detach().double()).abs().max() / (1 + t.detach().double().abs().max()))
               for a, t in zip(*res))


def nearest_attention_torch(q, k, v, valid, kappa):
    """The PyTorch path of `attention`, whatever TPCREPRO_STABILIZER says."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=nearest_keys(q, k, kappa, valid))


def interpreted_checks() -> dict:
    """Every CPU check, run inside the TRITON_INTERPRET=1 subprocess."""
    fwd = {}
    for i, n in enumerate(NS):
        for d in DS:
            for kappa in kappas(n):
                fwd[f"f32-n{n}-d{d}-k{kappa}-none"] = check_case(n, d, kappa, torch.float32, None, seed=i)
        d = DS[i]
        for kappa in kappas(n):
            fwd[f"bf16-n{n}-d{d}-k{kappa}-none"] = check_case(n, d, kappa, torch.bfloat16, None, seed=i)
            for mask in ("keys", "rows"):
                for dt, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
                    fwd[f"{name}-n{n}-d{d}-k{kappa}-{mask}"] = check_case(n, d, kappa, dt, mask, seed=i)
    q, k, v, valid = inputs(2, 2, 33, 60, torch.float32, "rows", seed=3)
    os.environ["TPCREPRO_STABILIZER"] = "triton"
    via_attention = attention(q, k, v, valid, kappa=5, scale=0.3)
    dense = attention(q, k, v, valid, kappa=33)
    os.environ["TPCREPRO_STABILIZER"] = "torch"
    return {"fwd": fwd, "ties": check_ties(0), "configs": check_configs(),
            "grads": {f"n{n}-k{kappa}-{mask}": check_grads(n, kappa, mask)
                      for n, kappa, mask in ((33, 5, None), (33, 5, "rows"), (65, 1, "keys"), (65, 64, None))},
            "dispatch": within(via_attention, attention(q, k, v, valid, kappa=5, scale=0.3), 1e-5),
            "dense": within(dense, reference_attention(q, k, v, valid), 1e-5)}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "TPCREPRO_STABILIZER": "triton", "PYTHONPATH": str(ROOT)}
    code = ("import json, torch; torch.set_num_threads(2); import tests.test_kernel as t; "
            "print(json.dumps(t.interpreted_checks()))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_forward_matches_oracle_and_chooses_the_nearest_keys(interpreted):
    fwd = interpreted["fwd"]
    assert len(fwd) == 3 * 3 * 5 + 3 * 5 * 5
    bad = {case: r for case, r in fwd.items() if not (r["err"] <= (1e-4 if case.startswith("f32") else 2e-2)
                                                     and r["same_keys"] and r["counts"])}
    assert not bad


def test_ties_never_admit_more_than_kappa(interpreted):
    assert interpreted["ties"]


def test_every_tile_config_gives_the_same_result(interpreted):
    assert interpreted["configs"]


def test_gradients_match_the_pytorch_path(interpreted):
    assert max(interpreted["grads"].values()) < 1e-5, interpreted["grads"]


def test_attention_dispatches_to_the_kernel(interpreted):
    assert interpreted["dispatch"] <= 1e-5 and interpreted["dense"] <= 1e-5


def test_forcing_triton_without_a_device_fails(monkeypatch):
    monkeypatch.setenv("TPCREPRO_STABILIZER", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _ = inputs(1, 1, 9, 16, torch.float32, None, 0)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        attention(q, k, v, kappa=3)
    assert torch.equal(attention(q, k, v, kappa=9), attention(q, k, v))  # κ ≥ N is dense: no kernel
    monkeypatch.setenv("TPCREPRO_STABILIZER", "sideways")
    with pytest.raises(ValueError, match="torch, triton or auto"):
        attention(q, k, v, kappa=3)


def test_block_bench_runs_on_cpu():
    from tpcrepro.kernels.block_cost import stabilizer_block_bench

    r = stabilizer_block_bench(batch=2, tokens=9, dim=32, heads=2, kappa=4, dtype=torch.float32, device="cpu",
                               iters=1, repeats=1, warmup=0)
    assert r["backend"] == "torch"
    for name in ("core", "infer", "train"):
        assert r[f"{name}_dense_ms"] > 0 and r[f"{name}_ratio"] == r[f"{name}_stabilizer_ms"] / r[f"{name}_dense_ms"]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mask", [None, "keys", "rows"])
def test_gpu_deit_s_shape(mask):
    r = check_case(197, 64, 100, torch.bfloat16, mask, b=8, h=6, device="cuda")
    assert r["err_own_keys"] <= 2e-2 and r["counts"] and r["rows_differ"] < 0.01, r
    dense = check_case(197, 64, 197, torch.bfloat16, mask, b=8, h=6, device="cuda")
    assert dense["err"] <= 2e-2 and dense["same_keys"] and dense["counts"], dense


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mask", [None, "rows"])
def test_gpu_gradients(mask):
    assert check_grads(197, 100, mask, b=8, h=6, d=64, device="cuda", oracle="own_keys") < 1e-4


@pytest.mark.gpu
@requires_cuda
def test_gpu_block_bench():
    from tpcrepro.kernels.block_cost import stabilizer_block_bench

    r = stabilizer_block_bench(batch=32, iters=3, repeats=2, warmup=2)
    assert r["backend"] == "triton" and r["infer_ratio"] > 0

"""Top-κ Euclidean attention in one Triton kernel (the stabilizer, METHOD.md §7).

One program holds a block of queries against all keys of its (batch, head):
S = q·kᵀ (fp32 accumulation), rank R = S − ‖k‖²/2 (half of 2q·k − ‖k‖²,
same order), then per row the threshold t with #{R ≥ t} = κ, masked softmax
over the kept keys, and P·V. The N×N matrix never leaves registers.

Selection. f(t) = #{R ≥ t} is a non-increasing step function; we keep a
bracket lo < hi with f(lo) > κ > f(hi) (lo = min R, hi just above max R).
The first probe is the Gaussian guess μ + σ·Φ⁻¹(1 − κ/n) (Φ⁻¹ by the logistic
approximation), later ones regula falsi on the counts with the Illinois
rule; a row stops when a probe hits f(t) = κ exactly, or when one key is
left to decide (κ − f(hi) = 1: t = the largest R in [lo, hi); f(lo) − κ = 1:
keep R above the smallest R in [lo, hi)), or when hi − lo is at fp32
rounding of the row's ranks (near-ties). Every row then keeps exactly
min(κ, #valid) keys: if ties at t would admit more, the keys in the tied band
are taken by index order (a cumulative sum), as topk may.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_KEYS = 512  # keys of one (batch, head) all sit in one tile
MAX_TILE_KD = 512 * 64  # K and V tiles (keys × padded head dim) in shared memory
MAX_IT = 48  # probes per row at most; the Illinois bracket shrinks far faster


@triton.jit
def _topk_attention_fwd(Q, K, V, O, VALID, KEEP,  # noqa: E741 (Triton: Q, K, V, O)
                        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                        smb, smh, smm,
                        H, NQ, NK, D, kappa, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_VALID: tl.constexpr, STORE_KEEP: tl.constexpr, DOT_F32: tl.constexpr,
                        PRECISION: tl.constexpr, MAX_ITERS: tl.constexpr):
    pid = tl.program_id(0)
    n_mblk = tl.cdiv(NQ, BLOCK_M)
    bh = pid // n_mblk
    b = (bh // H).to(tl.int64)  # 64-bit base offsets: large batches pass 2³¹ elements
    h = bh % H
    rows = (pid % n_mblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    col_ok = cols < NK
    d_ok = dd < D

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dd[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + dd[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:  # fp32 inputs (3×tf32: fp32 accuracy), or the interpreter (its bf16 dot is wrong)
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PRECISION)
    else:
        s = tl.dot(q, tl.trans(k))
    kf = k.to(tl.float32)
    half_kk = 0.5 * tl.sum(kf * kf, 1)

    valid = col_ok[None, :] & (rows[:, None] >= 0)
    if HAS_VALID:
        allowed = tl.load(VALID + b * smb + h * smh + rows[:, None] * smm + cols[None, :],
                          mask=row_ok[:, None] & col_ok[None, :], other=0).to(tl.float32)
        # I·mask: the same 0/1 tile, in the dot's register layout (a plain load would drag every row
        # reduction below into another layout, holding the rank tile twice)
        i = tl.arange(0, BLOCK_M)
        eye = (i[:, None] == i[None, :]).to(tl.float32)
        if DOT_F32:
            valid = valid & (tl.dot(eye, allowed, input_precision=PRECISION) > 0.5)
        else:
            valid = valid & (tl.dot(eye.to(tl.bfloat16), allowed.to(tl.bfloat16)) > 0.5)
    r = tl.where(valid, s - half_kk[None, :], float("-inf"))  # from here on, valid ⇔ R > −∞

    # Row statistics: count, range, mean and spread of the valid ranks.
    if HAS_VALID:
        nval = tl.sum((r > float("-inf")).to(tl.int32), 1)
    else:
        nval = tl.zeros([BLOCK_M], tl.int32) + NK
    kt = tl.minimum(nval, kappa)
    rmax = tl.where(nval > 0, tl.max(r, 1), 0.0)
    rmin = tl.where(nval > 0, tl.min(tl.where(r > float("-inf"), r, float("inf")), 1), 0.0)
    n_f = tl.maximum(nval, 1).to(tl.float32)
    x = tl.where(r > float("-inf"), r - rmax[:, None], 0.0)
    mean = tl.sum(x, 1) / n_f
    sd = tl.sqrt(tl.maximum(tl.sum(x * x, 1) / n_f - mean * mean, 0.0))
    p_above = tl.minimum(tl.maximum(kt.to(tl.float32) / n_f, 0.5 / n_f), 1.0 - 0.5 / n_f)
    guess = rmax + mean + sd * tl.log((1.0 - p_above) / p_above) * (1.0 / 1.702)

    todo = row_ok & (nval > kappa)
    lo = tl.where(todo, rmin, 0.0)
    hi = tl.where(todo, rmax + tl.maximum(tl.abs(rmax) * 1e-6, 1e-30), 1.0)
    clo = nval
    chi = tl.zeros_like(nval)
    tol = tl.maximum(tl.abs(lo), tl.abs(hi)) * 5e-7
    guess = tl.where((guess > lo) & (guess < hi), guess, 0.5 * (lo + hi))
    t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    exact = rows < 0
    active = todo & (kt - chi > 1) & (clo - kt > 1) & (hi - lo > tol)
    wlo = tl.full([BLOCK_M], 1.0, tl.float32)
    whi = tl.full([BLOCK_M], 1.0, tl.float32)
    last = tl.zeros_like(nval)  # 1: lo moved last, -1: hi moved last
    it = 0
    go = tl.max(active.to(tl.int32), 0) > 0
    while go:
        a = (clo - kt).to(tl.float32) * wlo
        c = (kt - chi).to(tl.float32) * whi
        f = tl.minimum(tl.maximum(a / tl.maximum(a + c, 1e-30), 1.0 / 64), 63.0 / 64)
        tp = tl.where(it == 0, guess, lo + (hi - lo) * f)
        cnt = tl.sum((r >= tp[:, None]).to(tl.int32), 1)
        up = active & (cnt > kt)
        dn = active & (cnt < kt)
        hit = active & (cnt == kt)
        whi = tl.where(up & (last == 1), whi * 0.5, tl.where(dn, 1.0, whi))
        wlo = tl.where(dn & (last == -1), wlo * 0.5, tl.where(up, 1.0, wlo))
        last = tl.where(up, 1, tl.where(dn, -1, last))
        lo = tl.where(up, tp, lo)
        clo = tl.where(up, cnt, clo)
        hi = tl.where(dn, tp, hi)
        chi = tl.where(dn, cnt, chi)
        t = tl.where(hit, tp, t)
        exact = exact | hit
        active = active & ~hit & (kt - chi > 1) & (clo - kt > 1) & (hi - lo > tol)
        it += 1
        go = (tl.max(active.to(tl.int32), 0) > 0) & (it < MAX_ITERS)

    # One key left to decide: the largest (or all but the smallest) rank in [lo, hi).
    r1 = todo & ~exact & (kt - chi == 1)
    m1 = todo & ~exact & ~r1 & (clo - kt == 1)
    band = (r >= lo[:, None]) & (r < hi[:, None])
    bmax = tl.max(tl.where(band, r, float("-inf")), 1)
    bmin = tl.min(tl.where(band, r, float("inf")), 1)
    near = todo & ~exact & ~r1 & ~m1  # near-ties (or out of probes): decided by index below
    t = tl.where(r1, bmax, tl.where(m1, bmin, tl.where(near, hi, t)))
    keep = (r > float("-inf")) & ((r > t[:, None]) | ((r == t[:, None]) & ~m1[:, None]))

    # Ties at the threshold: R above the tied band, then the band's first keys by index.
    bad = row_ok & (tl.sum(keep.to(tl.int32), 1) != kt)
    if tl.max(bad.to(tl.int32), 0) > 0:
        lt = tl.where(near, lo, t)
        above = r > t[:, None]
        tie = (r >= lt[:, None]) & (r <= t[:, None])
        need = kt - tl.sum(above.to(tl.int32), 1)
        order = tl.cumsum(tie.to(tl.int32), 1)
        keep = tl.where(bad[:, None], above | (tie & (order <= need[:, None])), keep)

    logit = tl.where(keep, (r + half_kk[None, :]) * qk_scale, float("-inf"))
    m = tl.max(logit, 1)
    m = tl.where(m > float("-inf"), m, 0.0)
    p = tl.exp2(logit - m[:, None])
    denom = tl.sum(p, 1)
    denom = tl.where(denom > 0, denom, 1.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + dd[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    pv = p.to(v.dtype)
    if DOT_F32:
        acc = tl.dot(pv.to(tl.float32), v.to(tl.float32), input_precision=PRECISION)
    else:
        acc = tl.dot(pv, v)
    o = acc / denom[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * som + dd[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if STORE_KEEP:
        tl.store(KEEP + bh.to(tl.int64) * NQ * NK + rows[:, None] * NK + cols[None, :], keep.to(tl.int8),
                 mask=row_ok[:, None] & col_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _blocks(nk: int, d: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): all keys; the head dim padded, to 64 at least (narrower tiles spill registers)."""
    return max(16, triton.next_power_of_2(nk)), max(64, triton.next_power_of_2(d))


def _configs(bn: int, bd: int, f32: bool) -> list[tuple[int, int]]:
    """(BLOCK_M, num_warps) candidates: the ones that compile without register spills for sm_90 (ptxas -v)."""
    if f32:
        return [(16, 4)] if bn <= 64 else [(16, 8)]
    if bn >= 512 or bd > 64:
        return [(16, 8), (32, 8)] if bn <= 256 else [(16, 8)]
    return {64: [(16, 4), (32, 4), (64, 4)], 128: [(16, 4), (32, 4), (32, 8), (64, 8)],
            256: [(16, 4), (16, 8), (32, 8)]}[max(bn, 64)]


@functools.cache
def _tuned(bn: int, bd: int, f32: bool) -> triton.runtime.Autotuner:
    """The kernel timed over its candidate configs on the first call per (keys, head dim, mask, keep) tile."""
    configs = [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=1) for m, w in _configs(bn, bd, f32)]
    return triton.autotune(configs, key=["BLOCK_N", "BLOCK_D", "HAS_VALID", "STORE_KEEP"])(_topk_attention_fwd)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor] = None) -> bool:
    """Whether the kernel takes these inputs: CUDA tensors (or any with TRITON_INTERPRET=1), [B, H, N, D],
    one float dtype, Nk ≤ 512 keys, a head dim the tiles hold (D ≤ 128), valid bool broadcastable."""
    if not (q.is_cuda or _interpreting()) or not (q.device == k.device == v.device):
        return False
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        return False
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return False
    bn, bd = _blocks(k.shape[-2], q.shape[-1])
    if k.shape[-2] > MAX_KEYS or bd > 128 or bn * bd > MAX_TILE_KD or min(*q.shape, k.shape[-2]) == 0:
        return False
    if valid is not None:
        if valid.dtype != torch.bool or valid.device != q.device:
            return False
        full = (*q.shape[:3], k.shape[-2])
        try:
            return torch.broadcast_shapes(valid.shape, full) == full
        except RuntimeError:
            return False
    return True


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor], kappa: int,
             scale: float, store_keep: bool, config: Optional[tuple[int, int]] = None
             ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(output, chosen keys [B, H, Nq, Nk] bool if store_keep). config: (BLOCK_M, num_warps), else autotuned
    (the interpreter: the largest BLOCK_M, fewest programs)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    bn, bd = _blocks(nk, d)
    f32 = q.dtype == torch.float32
    o = torch.empty(b, nq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, N, H·D] for free later
    keep = torch.empty(b, h, nq, nk, dtype=torch.int8, device=q.device) if store_keep else o
    if valid is None:
        m, ms = q, (0, 0, 0)
    else:
        if valid.shape[-1] != nk or valid.stride(-1) != 1:
            valid = valid.expand(*valid.shape[:-1], nk).contiguous()
        m = valid.broadcast_to(b, h, nq, nk).view(torch.int8)
        ms = m.stride()[:3]
    args = (q, k, v, o, m, keep, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *ms,
            h, nq, nk, d, int(kappa), float(scale) * math.log2(math.e))
    meta = {"BLOCK_N": bn, "BLOCK_D": bd, "HAS_VALID": valid is not None, "STORE_KEEP": store_keep,
            "DOT_F32": f32 or _interpreting(), "PRECISION": "ieee" if _interpreting() else "tf32x3", "MAX_ITERS": MAX_IT}

    def grid(meta: dict) -> tuple[int]:
        return (b * h * triton.cdiv(nq, meta["BLOCK_M"]),)
    if config is not None or _interpreting():
        bm, warps = config or max(_configs(bn, bd, f32))
        _topk_attention_fwd[grid](*args, BLOCK_M=bm, num_warps=warps, num_stages=1, **meta)
    else:
        _tuned(bn, bd, f32)[grid](*args, **meta)
    return o, (keep.view(torch.bool) if store_keep else None)


class _TopKAttention(torch.autograd.Function):
    """Forward by the kernel, which also returns the chosen keys (1 byte per query-key pair);
    backward recomputes masked SDPA over exactly those keys (the selection has no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, valid, kappa, scale):
        o, keep = _forward(q, k, v, valid, kappa, scale, store_keep=True)
        ctx.save_for_backward(q, k, v, keep)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, keep = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            o = F.scaled_dot_product_attention(*inputs, attn_mask=keep, scale=ctx.scale)
            wrt = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(o, wrt, grad_o))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None, None)


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kappa: int,
                   valid: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale·q·kᵀ)·v over each query's κ valid keys with the largest 2q·k − ‖k‖² (the κ nearest).

    q [B, H, Nq, D], k, v [B, H, Nk, D]; valid bool broadcastable to [B, H, Nq, Nk]. κ ≥ the number of valid
    keys is dense attention over them. Returns [B, H, Nq, D] in q's dtype. Check `supports` first.
    """
    if kappa < 1:
        raise ValueError(f"kappa must be at least 1, got {kappa}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _TopKAttention.apply(q, k, v, valid, kappa, scale)
    return _forward(q, k, v, valid, kappa, scale, store_keep=False)[0]

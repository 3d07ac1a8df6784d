"""The token propagation controller of the removed form (inference), on host arrays.

At inference the controller's per-token state (remainder R, halted, layers
still to skip) and its decisions are a few dozen elementwise operations on
[B, N] per layer. As tensor operations each costs a dispatch (3-5 µs on a
CPU core at batch 1, whatever its size), and a width-64 block costs about 15
of them: the controller cost more than the tokens it saved. Here they run
on the host: the device sends the gate channels and receives the halting
weights and the gather indices. `decide` is one compiled pass over the
tokens (numba) where numba is installed; `decide_reference`, the same in
numpy operations, is its readable form, its fallback and its test oracle.
Between two large blocks a numpy operation runs several times slower than
on its own (the block has pushed its code and data out of the caches): 30
such operations cost DeiT-S at batch 1 about 100 µs a layer, one compiled
pass about 10.

The values are the masked form's (controller.py): the same float32
arithmetic in the same order, no fused multiply-adds, and the two places
where a library's own rounding could differ computed in float64 and rounded
to float32: the gates' sigmoid and the TDR mean (float32 sums depend on the
order of summation; float64 ones, rounded back, agreed in every one of
80,000 rows tested, and the float64 sigmoids of torch, numpy and numba in
every one of 20 M values). No ponder cost: it feeds only the losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tpcrepro.methods import TPCCfg

@dataclass
class HostState:
    """The running images' controller state, host arrays [b, N] (b: images still running)."""

    R: np.ndarray  # float32 remainder 1 − Σ b̂
    halted: np.ndarray  # bool
    pause_left: np.ndarray  # int8: layers still to skip (a paused token is never halted)
    was_paused: np.ndarray  # bool: paused at the previous layer (a computed one has restarted)
    images: np.ndarray  # int64 [b]: each running image's index in the batch

    @classmethod
    def start(cls, b: int, n: int) -> "HostState":
        return cls(np.ones((b, n), np.float32), np.zeros((b, n), bool), np.zeros((b, n), np.int8),
                   np.zeros((b, n), bool), np.arange(b))

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(computed, paused) at the next layer, bool [b, N]."""
        paused = self.pause_left > 0
        return ~(self.halted | paused), paused

    def keep(self, rows: np.ndarray) -> "HostState":
        """The state of the images `rows` (bool [b]) only."""
        return HostState(self.R[rows], self.halted[rows], self.pause_left[rows], self.was_paused[rows],
                         self.images[rows])


def _consts(cfg: TPCCfg) -> tuple:
    """The controller's settings as the step takes them: γ, ±β (float64), ξ, δ (float32), TDR on, pausing on,
    the pause span."""
    beta = -cfg.beta if cfg.gate_sign == "minus" else cfg.beta
    return (float(cfg.gamma), float(beta), np.float32(cfg.xi), np.float32(cfg.delta),
            bool(cfg.tdr and cfg.xi != 1.0), cfg.reuse == "pause", int(cfg.pause_span))


def decide(state: HostState, t: np.ndarray | None, computed: np.ndarray, n_computed: np.ndarray, last: bool,
           prefix: int, cfg: TPCCfg) -> tuple[np.ndarray, np.ndarray]:
    """After a block: halting and pausing of the tokens `computed` there (controller.decide's values), in place.

    t: the block output's gate channels [b, N, 2] (pause, non-restart) or [b, N, 1] (single_gate), float32;
    None at the last layer. n_computed: computed tokens per image [b]; the first `prefix` tokens (CLS) never
    pause. Returns (halting weights w [b, N] float32, halted here [b, N] bool).
    """
    step = None if last else compiled_step()
    if step is None:
        return decide_reference(state, t, computed, n_computed, last, prefix, cfg)
    w = np.empty(state.R.shape, np.float32)
    halt = np.empty(state.R.shape, np.bool_)
    step(np.ascontiguousarray(t, dtype=np.float32), state.R, state.halted, state.pause_left, computed,
         np.asarray(n_computed, np.int64), prefix, *_consts(cfg), w, halt)
    return w, halt


def decide_reference(state: HostState, t: np.ndarray | None, computed: np.ndarray, n_computed: np.ndarray,
                     last: bool, prefix: int, cfg: TPCCfg) -> tuple[np.ndarray, np.ndarray]:
    """`decide` in numpy operations (the compiled step's reference; also the last layer's, which is short)."""
    R = state.R
    left = state.pause_left
    state.pause_left = left - (left > 0).view(np.int8)  # paused tokens count down
    if last:  # b̂ = 1: every computed token halts with its remainder
        state.halted = state.halted | computed
        return R * computed, computed
    gamma, beta, xi, delta, tdr, pause, span = _consts(cfg)
    g = gate_probs(t, gamma, beta)
    p = g[..., 0]
    b = p * g[..., 1] if g.shape[-1] > 1 else p
    if tdr:  # Eq. 9: ξ·b + (1 − ξ)·mean, as controller.regularize computes it
        mean = tdr_mean(b, computed, n_computed)
        b = mean + xi * (b - mean)
    rem = R - b
    halt = computed & (rem <= delta)
    running = computed ^ halt
    w = np.where(halt, R, b * computed)
    state.R = np.where(running, rem, R)
    if pause and g.shape[-1] > 1:  # wants to pause (p ≥ ½) and will come back (r = 1 − r̃ ≥ ½)
        new = running & (np.arange(R.shape[1]) >= prefix) & (p >= HALF) & (g[..., 1] <= HALF)
        state.pause_left[new] = span
    state.halted = state.halted | halt
    return w, halt


HALF = np.float32(0.5)


def gate_probs(t: np.ndarray, gamma: float, beta: float) -> np.ndarray:
    """controller.gate_probs on host arrays: σ(γ·t + β) (β signed) of the gate channels t in float64, rounded
    to float32."""
    z = np.maximum(t.astype(np.float64) * gamma + beta, -700.0)  # σ(−700) rounds to 0 as σ(−∞): no overflow
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def tdr_mean(b: np.ndarray, computed: np.ndarray, n_computed: np.ndarray) -> np.ndarray:
    """Σ b over each image's computed tokens ÷ their count (n_computed [b]), [b, 1] float32, as
    controller.regularize computes it: summed in float64, rounded to float32."""
    total = np.add.reduce(b * computed, axis=1, keepdims=True, dtype=np.float64)
    return (total / np.maximum(n_computed, 1)[:, None]).astype(np.float32)


def _step_py(t, R, halted, pause_left, computed, n_computed, prefix, gamma, beta, xi, delta, tdr, pause, span,
             w, halt):  # pragma: no cover - compiled by numba; decide_reference is its tested twin
    """One pass per image over its tokens: the gates, b, TDR, halting and pausing of decide_reference, in place."""
    nb, n = R.shape
    two = t.shape[2] == 2
    bs = np.empty(n, np.float32)
    ps = np.empty(n, np.float32)
    rs = np.empty(n, np.float32)
    for i in range(nb):
        total = 0.0
        for j in range(n):
            if pause_left[i, j] > 0:
                pause_left[i, j] -= 1
            if computed[i, j]:
                p = np.float32(1.0 / (1.0 + math.exp(-max(np.float64(t[i, j, 0]) * gamma + beta, -700.0))))
                r = np.float32(1.0)
                if two:
                    r = np.float32(1.0 / (1.0 + math.exp(-max(np.float64(t[i, j, 1]) * gamma + beta, -700.0))))
                b = p * r
                ps[j], rs[j], bs[j] = p, r, b
                total += np.float64(b)
        mean = np.float32(total / max(n_computed[i], 1))
        for j in range(n):
            if not computed[i, j]:
                w[i, j] = np.float32(0.0)
                halt[i, j] = False
                continue
            b = bs[j]
            if tdr:
                b = mean + xi * (b - mean)
            rem = R[i, j] - b
            h = rem <= delta
            halt[i, j] = h
            if h:
                w[i, j] = R[i, j]
                halted[i, j] = True
            else:
                w[i, j] = b
                R[i, j] = rem
                if pause and two and j >= prefix and ps[j] >= np.float32(0.5) and rs[j] <= np.float32(0.5):
                    pause_left[i, j] = span


_COMPILED: dict = {}


def _compiled(name: str, fn):
    """fn compiled by numba (on first use; cached on disk), or None where numba is not installed: then the
    numpy twin runs, the same values more slowly."""
    if name not in _COMPILED:
        try:
            import numba
        except ImportError:  # numba is a dependency; a platform without its wheels still runs
            _COMPILED[name] = None
        else:
            _COMPILED[name] = numba.njit(cache=True, nogil=True)(fn)
    return _COMPILED[name]


def compiled_step():
    return _compiled("step", _step_py)


def compiled_plan():
    return _compiled("plan", _plan_py)


def finish(state: HostState, rows: np.ndarray) -> np.ndarray:
    """The images `rows` (bool [b]) end: their tokens not yet halted halt with their remainder. w_end [b, N]."""
    left = ~state.halted & rows[:, None]
    state.halted = state.halted | left
    return np.where(left, state.R, np.float32(0))


@dataclass
class Plan:
    """One layer of the removed form, for its running images: which tokens are computed (queries) and which
    are keys and values (bool [b, N]), how many per image ([b]: nq, nkv, and the paused ones and the ones
    restarted there), and the gather order [b, N] int64: each image's computed tokens, then its other keys,
    then the rest, each in token order (so its first nq are its queries, its first nkv its keys and values)."""

    computed: np.ndarray
    kv: np.ndarray
    order: np.ndarray
    nq: np.ndarray
    nkv: np.ndarray
    paused: np.ndarray
    restarted: np.ndarray

    @classmethod
    def of(cls, computed: np.ndarray, kv: np.ndarray) -> "Plan":
        """The plan of given masks (computed ⊆ kv); no pauses counted."""
        order = np.argsort(-(computed.astype(np.int8) + kv), axis=1, kind="stable")
        zero = np.zeros(len(computed), np.int64)
        return cls(computed, kv, order, computed.sum(1), kv.sum(1), zero, zero)


def plan(state: HostState, paused_as_kv: bool) -> Plan:
    """The next layer's Plan from the state, and state.was_paused set to its paused tokens (one compiled pass
    where numba is installed)."""
    b, n = state.R.shape
    step = compiled_plan()
    if step is None:
        return plan_reference(state, paused_as_kv)
    computed, kv, paused = (np.empty((b, n), np.bool_) for _ in range(3))
    order, counts = np.empty((b, n), np.int64), np.empty((b, 4), np.int64)
    step(state.halted, state.pause_left, state.was_paused, paused_as_kv, computed, kv, paused, order, counts)
    state.was_paused = paused
    return Plan(computed, kv, order, counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 3])


def plan_reference(state: HostState, paused_as_kv: bool) -> Plan:
    """`plan` in numpy operations (the compiled pass's reference)."""
    computed, paused = state.masks()
    kv = ~state.halted if paused_as_kv else computed
    out = Plan.of(computed, kv)
    out.paused, out.restarted = paused.sum(1), (computed & state.was_paused).sum(1)
    state.was_paused = paused
    return out


def _plan_py(halted, pause_left, was_paused, paused_as_kv, computed, kv, paused, order,
             counts):  # pragma: no cover - compiled by numba; its numpy twin in `plan` is tested against it
    nb, n = halted.shape
    for i in range(nb):
        nq = nkv = npaused = nrestart = 0
        for j in range(n):
            p = pause_left[i, j] > 0
            c = not halted[i, j] and not p
            k = c or (p and paused_as_kv)
            computed[i, j], paused[i, j], kv[i, j] = c, p, k
            nq += c
            nkv += k
            npaused += p
            nrestart += c and was_paused[i, j]
        a, bk, r = 0, nq, nkv  # computed, other keys, the rest: each in token order
        for j in range(n):
            if computed[i, j]:
                order[i, a] = j
                a += 1
            elif kv[i, j]:
                order[i, bk] = j
                bk += 1
            else:
                order[i, r] = j
                r += 1
        counts[i, 0], counts[i, 1], counts[i, 2], counts[i, 3] = nq, nkv, npaused, nrestart


class OutputSum:
    """Σ_l w^l·t^l of the tokens the prediction reads ([b, k, C]), per running image, and the finished sums.

    In numpy on the host where the block outputs are float32 host tensors (a CPU: their numpy views cost
    nothing, and acc + w·t is two numpy operations in the masked form's float32 order); elsewhere as tensors."""

    def __init__(self, b: int, k: int, like: torch.Tensor):
        self.host = like.device.type == "cpu" and like.dtype == torch.float32
        shape = (b, k, like.shape[-1])
        if self.host:
            self.acc, self.final = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        else:
            self.acc = torch.zeros(shape, device=like.device, dtype=like.dtype)
            self.final = torch.zeros_like(self.acc)
        self.k, self.device = k, like.device

    def add(self, w: np.ndarray, x: torch.Tensor) -> None:
        """acc += w[:, :k] · x[:, :k]; w [b, N] host float32, x [b, N, C] the block output."""
        k = self.k
        if self.host:
            self.acc = self.acc + w[:, :k, None] * x[:, :k].numpy()
        else:
            self.acc = self.acc + torch.from_numpy(w[:, :k, None]).to(self.device, self.acc.dtype) * x[:, :k]

    def end(self, ended: np.ndarray, images: np.ndarray) -> None:
        """The images `ended` (bool [b]; batch indices `images` [b]) are done: their sums are final."""
        if self.host:
            self.final[images[ended]] = self.acc[ended]
        else:
            idx = torch.from_numpy(images[ended]).to(self.device)
            self.final[idx] = self.acc[torch.from_numpy(ended).to(self.device)]

    def keep(self, rows: np.ndarray) -> None:
        self.acc = self.acc[rows] if self.host else self.acc[torch.from_numpy(rows).to(self.device)]

    def result(self) -> torch.Tensor:
        return torch.from_numpy(self.final) if self.host else self.final

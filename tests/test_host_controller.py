"""The removed form's host controller: its compiled step equals its numpy reference, which equals the masked
form's controller (controller.py) value for value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tpcrepro.methods import TPCCfg
from tpcrepro.models import controller as ctl
from tpcrepro.models import host_controller as hc

CFGS = [TPCCfg(beta=0.0, gamma=1.5), TPCCfg(beta=-0.5, gamma=1.0, pause_span=2), TPCCfg(beta=0.5, tdr=False),
        TPCCfg(beta=0.0, gamma=2.0, reuse="none"), TPCCfg(beta=0.0, gate_sign="plus", xi=0.3),
        TPCCfg(beta=0.0, single_gate=True, tdr=False, reuse="none")]


def _state(rng, b, n):
    st = hc.HostState.start(b, n)
    st.R = (rng.random((b, n)) * 0.9 + 0.05).astype(np.float32)
    st.halted = rng.random((b, n)) < 0.2
    st.halted[:, 0] = False
    st.pause_left = np.where(~st.halted & (rng.random((b, n)) < 0.2), rng.integers(1, 3, (b, n)), 0).astype(np.int8)
    return st


def _copy(st):
    return hc.HostState(st.R.copy(), st.halted.copy(), st.pause_left.copy(), st.was_paused.copy(), st.images.copy())


@pytest.mark.parametrize("cfg", CFGS)
def test_compiled_step_equals_the_numpy_reference(cfg):
    if hc.compiled_step() is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(0)
    for b, n in ((1, 65), (7, 197), (3, 5)):
        st = _state(rng, b, n)
        computed, _ = st.masks()
        t = (rng.standard_normal((b, n, 1 if cfg.single_gate else 2)) * 3).astype(np.float32)
        a, r = _copy(st), _copy(st)
        wa, ha = hc.decide(a, t, computed, computed.sum(1), False, 1, cfg)
        wr, hr = hc.decide_reference(r, t, computed, computed.sum(1), False, 1, cfg)
        assert np.array_equal(wa, wr) and np.array_equal(ha, hr)
        for f in ("R", "halted", "pause_left"):
            assert np.array_equal(getattr(a, f), getattr(r, f)), f


@pytest.mark.parametrize("cfg", CFGS)
def test_host_step_equals_the_masked_forms_controller(cfg):
    """The same halting weights, halts, remainders and pauses as controller.decide on tensors."""
    rng = np.random.default_rng(1)
    b, n = 6, 65
    st = _state(rng, b, n)
    computed, _ = st.masks()
    x = torch.from_numpy((rng.standard_normal((b, n, 8)) * 3).astype(np.float32))
    is_cls = torch.zeros(b, n, dtype=torch.bool)
    is_cls[:, 0] = True
    ts = ctl.TokenState(torch.from_numpy(st.R.copy()), torch.zeros(b, n), torch.from_numpy(st.halted.copy()),
                        torch.from_numpy(st.pause_left.astype(np.int64)))
    ts, w, halt, _, _ = ctl.decide(ts, x, torch.from_numpy(computed), False, is_cls, cfg)
    host = _copy(st)
    hw, hh = hc.decide(host, ctl.gate_channels(x, cfg).numpy(), computed, computed.sum(1), False, 1, cfg)
    assert np.array_equal(hw, w.numpy()) and np.array_equal(hh, halt.numpy())
    assert np.array_equal(host.R, ts.R.numpy()) and np.array_equal(host.halted, ts.halted.numpy())
    assert np.array_equal(host.pause_left, ts.pause_left.numpy().astype(np.int8))
    assert hh.any() and (not cfg.reuse == "pause" or cfg.single_gate or (host.pause_left > st.pause_left).any())


@pytest.mark.parametrize("paused_as_kv", [True, False])
def test_compiled_plan_equals_the_numpy_reference(paused_as_kv):
    if hc.compiled_plan() is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(2)
    for b, n in ((1, 65), (9, 197)):
        st = _state(rng, b, n)
        st.was_paused = rng.random((b, n)) < 0.3
        a, r = _copy(st), _copy(st)
        pa, pr = hc.plan(a, paused_as_kv), hc.plan_reference(r, paused_as_kv)
        for f in ("computed", "kv", "order", "nq", "nkv", "paused", "restarted"):
            assert np.array_equal(getattr(pa, f), getattr(pr, f)), f
        assert np.array_equal(a.was_paused, r.was_paused)
        assert pa.restarted.sum() > 0 and (pa.nkv >= pa.nq).all()

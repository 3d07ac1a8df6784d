"""Top-κ attention: κ ≥ N is dense; κ < N keeps exactly the κ nearest keys (Euclidean)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tpcrepro.models.stabilizer import attention, nearest_keys, reference_attention


def qkv(b=2, h=3, n=17, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("kappa", [17, 18, 100])
def test_kappa_at_least_n_is_dense(kappa):
    q, k, v = qkv()
    assert torch.equal(attention(q, k, v, kappa=kappa), attention(q, k, v))
    assert torch.allclose(attention(q, k, v, kappa=kappa), reference_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("kappa", [1, 4, 10, 16])
def test_kappa_keeps_exactly_the_nearest_keys(kappa):
    q, k, v = qkv(seed=kappa)
    chosen = nearest_keys(q, k, kappa)
    assert (chosen.sum(-1) == kappa).all()
    far = torch.cdist(q, k).argsort(-1)[..., kappa:]  # the farthest N - κ keys of every query
    assert not chosen.gather(-1, far).any()
    assert torch.allclose(attention(q, k, v, kappa=kappa), reference_attention(q, k, v, kappa=kappa), atol=1e-5)


def test_ranking_needs_no_query_norm():
    q, k, _ = qkv()
    rank = 2 * q @ k.transpose(-2, -1) - k.pow(2).sum(-1)[..., None, :]
    assert torch.equal(rank.argsort(-1, descending=True)[..., :5], torch.cdist(q, k).argsort(-1)[..., :5])


def test_unavailable_keys_are_never_chosen():
    q, k, v = qkv()
    valid = torch.ones(2, 1, 1, 17, dtype=torch.bool)
    valid[..., 5:] = False  # only 5 keys available
    chosen = nearest_keys(q, k, 8, valid)
    assert not chosen[..., 5:].any() and (chosen.sum(-1) == 5).all()
    out = attention(q, k, v, valid, kappa=8)
    assert torch.allclose(out, attention(q[..., :, :], k[..., :5, :], v[..., :5, :]), atol=1e-6)
    assert torch.allclose(out, reference_attention(q, k, v, valid, kappa=8), atol=1e-5)


def test_gradients_flow_through_selected_keys():
    q, k, v = (t.requires_grad_() for t in qkv())
    attention(q, k, v, kappa=3).sum().backward()
    assert torch.isfinite(q.grad).all() and (k.grad != 0).any()


def test_cpu_selection_breaks_ties_at_the_kth_rank_without_admitting_more_than_kappa():
    from tpcrepro.models.stabilizer import _nearest_cpu

    rank = np.array([[[5.0, 3.0, 3.0, 3.0, 1.0],  # the 2nd largest rank is tied three times: the first two tied
                      [2.0, 2.0, 2.0, 2.0, 2.0],  # all tied: the first three
                      [9.0, 8.0, 7.0, 6.0, 5.0]]], dtype=np.float32)  # no tie
    chosen = _nearest_cpu(rank, 3, None)
    assert chosen.tolist() == [[[True, True, True, False, False], [True, True, True, False, False],
                                [True, True, True, False, False]]]
    valid = np.array([True, True, False, False, False])  # fewer valid keys than κ: the valid ones only
    assert _nearest_cpu(rank, 3, valid).tolist() == [[[True, True, False, False, False]] * 3]


def test_cpu_selection_is_topks_set():
    """numpy's selection (the CPU path) and torch.topk (elsewhere) choose the same keys where no rank is tied."""
    from tpcrepro.models.stabilizer import _nearest_cpu, _ranks

    q, k, _ = qkv(b=4, h=4, n=65, d=16, seed=3)
    valid = torch.rand(4, 1, 65, 65, generator=torch.Generator().manual_seed(1)) < 0.7
    rank = _ranks(q, k).masked_fill(~valid, float("-inf"))
    idx = rank.topk(33, dim=-1).indices
    ref = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, idx, True) & valid
    assert torch.equal(torch.from_numpy(_nearest_cpu(_ranks(q, k).numpy(), 33, valid.numpy())), ref)

"""Top-κ attention: κ ≥ N is dense; κ < N keeps exactly the κ nearest keys (Euclidean)."""

from __future__ import annotations

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

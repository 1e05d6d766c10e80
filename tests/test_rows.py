"""take_rows / put_rows (raymoe.moe.dispatch) against plain indexing under autograd: a full permutation (the
gather-only backward) and a subset of rows (dropped pairs: zero rows, index_copy backward); gather_pairs and
scatter_pairs against a loop over the pairs."""

from __future__ import annotations

import pytest
import torch

from raymoe.moe.dispatch import (DispatchMeta, gather_pairs, inverse_permutation, put_rows, scatter_pairs, sort_pairs,
                                 take_rows)


@pytest.mark.parametrize("subset", [False, True])
def test_take_and_put_rows_equal_plain_indexing_forward_and_backward(subset):
    g = torch.Generator().manual_seed(0)
    n = 7
    idx = torch.randperm(n, generator=g)[: 4 if subset else n]
    inverse = inverse_permutation(idx, n)
    assert (inverse is None) == subset
    if inverse is not None:
        assert torch.equal(idx[inverse], torch.arange(n))
    x = torch.randn(n, 3, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    up_take, up_put = torch.randn(len(idx), 3, generator=g), torch.randn(n, 3, generator=g)

    taken = take_rows(x, idx, inverse)
    placed = put_rows(taken * 2, idx, n, inverse)
    (taken * up_take).sum().add((placed * up_put).sum()).backward()

    taken_ref = x_ref[idx]
    placed_ref = torch.zeros(n, 3).index_put((idx,), taken_ref * 2)  # rows not in idx stay 0
    (taken_ref * up_take).sum().add((placed_ref * up_put).sum()).backward()

    torch.testing.assert_close(taken, taken_ref)
    torch.testing.assert_close(placed, placed_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    if subset:  # rows never taken get no gradient
        missing = torch.ones(n, dtype=torch.bool)
        missing[idx] = False
        assert x.grad[missing].abs().sum() == 0


@pytest.mark.parametrize("k, drop", [(1, False), (2, False), (3, False), (2, True), (1, True)])
def test_pair_gather_and_weighted_combine_equal_a_per_pair_loop(k, drop):
    """gather_pairs / scatter_pairs (the token layer's dispatch and combine) against one loop over the pairs:
    forward, and the gradients of x, of the rows and of the weights; with drop, some pairs are not sent."""
    g = torch.Generator().manual_seed(k)
    n, dim = 6, 5
    experts_P = torch.randint(0, 3, (n * k,), generator=g)
    if drop:
        experts_P[torch.tensor([1, 4])] = -1
    _, order_p, inverse_p = sort_pairs(experts_P)
    meta = DispatchMeta(order_p=order_p, kept_P=experts_P >= 0, num_pairs=n * k, inverse_p=inverse_p)
    assert (inverse_p is None) == drop
    x = torch.randn(n, dim, generator=g, requires_grad=True)
    w = torch.rand(n, k, generator=g, requires_grad=True)
    scale = torch.randn(len(order_p), dim, generator=g)  # a per-row "expert", so rows' gradients differ
    up = torch.randn(n, dim, generator=g)

    x_pD = gather_pairs(x, order_p, inverse_p, k)
    y = scatter_pairs(x_pD * scale, meta, w)
    (y * up).sum().backward()

    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = torch.zeros(n, dim)
    for r, p in enumerate(order_p.tolist()):  # row r of the experts is pair p = (item p // k, slot p % k)
        y_ref = y_ref.index_add(0, torch.tensor([p // k]), (w_ref[p // k, p % k] * x_ref[p // k] * scale[r])[None])
    (y_ref * up).sum().backward()

    assert torch.equal(x_pD, x.detach()[order_p // k])
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)
    if drop:  # a dropped pair's weight gets no gradient
        assert w.grad.view(-1)[experts_P < 0].abs().sum() == 0

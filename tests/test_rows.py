"""take_rows / put_rows (raymoe.moe.dispatch) against plain indexing under autograd: a full permutation (the
gather-only backward) and a subset of rows (dropped pairs: zero rows, index_copy backward)."""

from __future__ import annotations

import pytest
import torch

from raymoe.moe.dispatch import inverse_permutation, put_rows, take_rows


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

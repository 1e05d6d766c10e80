"""AllToAllDispatcher on 2 real Ray Train workers (gloo) against hand-worked routing and LocalDispatcher.

Includes the cases that once deadlocked the backward (a rank whose experts get no rows, a rank whose rows need no
gradient while its peer's do): the harness turns a hang into a failure after its collective timeout.

4 experts, EP = 2: rank 0 owns experts 0-1, rank 1 owns experts 2-3. Row values encode (rank, pair index) as
100 * rank + index, so the expected layouts can be written down by hand.
Shape legend: P pairs on a rank, R rows at a rank's experts, X = (2, 3) features, Y = 4 outputs.
"""

from __future__ import annotations

import pytest
import torch

from ep_harness import register_shared, shared_results
from raymoe.moe.dispatch import LocalDispatcher
from raymoe.parallel.context import DistContext

E = 4
# case name -> experts_P per rank (-1 = dropped by capacity)
CASES = {
    "mixed": ([3, 0, -1, 2, 0], [1, 1, 2]),
    "rank1_sends_nothing": ([0, 2, 3, 2], [-1, -1]),
    "rank0_has_no_pairs": ([], [3, 0, 0]),
    "rank0_experts_idle": ([2, 3], [3, 2, 2]),
    "rank1_rows_need_no_grad": ([3, 0, -1, 2, 0], [1, 1, 2]),
}
NO_GRAD_ON_RANK1 = {"rank1_rows_need_no_grad"}
DENSE_ITEMS = ([0, 0], [0, 0, 0])  # items per rank for the dense exchange (their expert ids are unused)  # a peer's rows need gradients, this rank's do not
# hand-worked: (rows at rank 0's experts, counts), (rows at rank 1's experts, counts), as first feature values
EXPECTED = {
    "mixed": (([1, 4, 100, 101], [2, 2]), ([3, 102, 0], [2, 1])),
    "rank1_sends_nothing": (([0], [1, 0]), ([1, 3, 2], [2, 1])),
    "rank0_has_no_pairs": (([101, 102], [2, 0]), ([100], [0, 1])),
    "rank0_experts_idle": (([], [0, 0]), ([0, 101, 102, 1, 100], [3, 2])),
    "rank1_rows_need_no_grad": (([1, 4, 100, 101], [2, 2]), ([3, 102, 0], [2, 1])),
}


def _pairs(rank: int, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose every feature is 100 * rank + pair index (+ a small ramp so features differ)."""
    base = torch.tensor([100.0 * rank + i for i in range(len(experts))])
    x_PX = base.view(-1, 1, 1) + torch.linspace(0, 0.5, 6).view(1, 2, 3)
    return x_PX, torch.tensor(experts, dtype=torch.long)


def _expert_fn(w_EXY: torch.Tensor, x_RX: torch.Tensor, counts: list[int], first: int) -> torch.Tensor:
    """Expert e maps a row to flatten(x) @ W_e (rows grouped by local expert). Like the paper experts, no rows
    give a fresh tensor outside the autograd graph (the dispatcher must still take part in the backward)."""
    if sum(counts) == 0:
        return x_RX.new_zeros((0, w_EXY.shape[-1]))
    return torch.cat([chunk.flatten(1) @ w_EXY[first + i] for i, chunk in enumerate(x_RX.split(counts))])


def _exchange_on_workers(ctx: DistContext, config: dict) -> dict:
    from raymoe.parallel.all_to_all import AllToAllDispatcher

    dispatcher = AllToAllDispatcher(E, ctx.ep_rank, ctx.ep_size, None)
    results = {}
    for name, per_rank in CASES.items():
        x_PX, experts_P = _pairs(ctx.rank, per_rank[ctx.rank])
        x_PX.requires_grad_(not (name in NO_GRAD_ON_RANK1 and ctx.rank == 1))
        w_EXY = config["w_EXY"].clone().requires_grad_()
        x_RX, counts, meta = dispatcher.dispatch(x_PX, experts_P)
        y_PY = dispatcher.combine(_expert_fn(w_EXY, x_RX, counts, dispatcher.local_experts.start), meta)
        (y_PY * config["upstream"][name][ctx.rank]).sum().backward()
        grad_x = x_PX.grad.clone() if x_PX.grad is not None else None
        results[name] = {"rows": x_RX.detach()[:, 0, 0].tolist(), "counts": counts, "y": y_PY.detach(),
                         "grad_x": grad_x,
                         "grad_w": w_EXY.grad.clone() if w_EXY.grad is not None else torch.zeros_like(w_EXY)}
    # dense: each rank's items sent once; every local expert runs on the EP group's items (uneven: 2 and 3)
    x_NX, _ = _pairs(ctx.rank, DENSE_ITEMS[ctx.rank])
    x_NX.requires_grad_()
    w_EXY = config["w_EXY"].clone().requires_grad_()
    x_GX, counts, meta = dispatcher.dispatch(x_NX, None)
    first = dispatcher.local_experts.start
    y_eGY = torch.stack([x_GX.flatten(1) @ w_EXY[first + i] for i in range(len(counts))])
    y_PY = dispatcher.combine(y_eGY, meta)
    (y_PY * config["dense_upstream"][ctx.rank]).sum().backward()
    results["dense"] = {"rows": x_GX.detach()[:, 0, 0].tolist(), "counts": counts, "y": y_PY.detach(),
                        "grad_x": x_NX.grad.clone(), "grad_w": w_EXY.grad.clone()}
    return results


def _config(folder=None) -> dict:
    g = torch.Generator().manual_seed(0)
    w_EXY = torch.randn(E, 6, 4, generator=g)
    upstream = {name: [torch.randn(len(p), 4, generator=g) for p in per_rank] for name, per_rank in CASES.items()}
    dense_upstream = [torch.randn(E * len(items), 4, generator=g) for items in DENSE_ITEMS]
    return {"w_EXY": w_EXY, "upstream": upstream, "dense_upstream": dense_upstream}


register_shared("dispatch", _exchange_on_workers, _config)


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    return _config(), shared_results("dispatch", tmp_path_factory.getbasetemp() / "ep_shared")


@pytest.mark.parametrize("case", list(CASES))
def test_rows_and_counts_match_hand_worked_routing(exchange, case):
    _, results = exchange
    for rank in (0, 1):
        rows, counts = EXPECTED[case][rank]
        assert results[rank][case]["counts"] == counts
        assert results[rank][case]["rows"] == pytest.approx(rows)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_local_dispatcher_on_the_global_pairs(exchange, case):
    """Concatenating both ranks' pairs on one process: same counts, rows, outputs and gradients."""
    config, results = exchange
    xs, es = zip(*(_pairs(r, CASES[case][r]) for r in (0, 1)))
    x_PX = torch.cat(xs).requires_grad_()
    experts_P = torch.cat(es)
    w_EXY = config["w_EXY"].clone().requires_grad_()
    local = LocalDispatcher(E)
    x_RX, counts, meta = local.dispatch(x_PX, experts_P)
    y_PY = local.combine(_expert_fn(w_EXY, x_RX, counts, 0), meta)
    (y_PY * torch.cat(config["upstream"][case])).sum().backward()

    assert results[0][case]["counts"] + results[1][case]["counts"] == counts
    assert results[0][case]["rows"] + results[1][case]["rows"] == pytest.approx(x_RX[:, 0, 0].tolist())
    n0 = len(CASES[case][0])
    for rank, rows in ((0, slice(0, n0)), (1, slice(n0, None))):
        torch.testing.assert_close(results[rank][case]["y"], y_PY.detach()[rows], atol=1e-6, rtol=0)
        if case in NO_GRAD_ON_RANK1 and rank == 1:
            assert results[rank][case]["grad_x"] is None
        else:
            torch.testing.assert_close(results[rank][case]["grad_x"], x_PX.grad[rows], atol=1e-6, rtol=0)
    # each rank's expert weights only get gradient from rows routed to its own experts, from both ranks
    torch.testing.assert_close(results[0][case]["grad_w"][:2], w_EXY.grad[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1][case]["grad_w"][2:], w_EXY.grad[2:], atol=1e-5, rtol=0)
    assert results[0][case]["grad_w"][2:].abs().sum() == 0 and results[1][case]["grad_w"][:2].abs().sum() == 0


def test_dropped_pairs_combine_to_zero(exchange):
    _, results = exchange
    assert results[0]["mixed"]["y"][2].abs().sum() == 0  # pair 2 of rank 0 had expert -1
    assert results[1]["rank1_sends_nothing"]["y"].abs().sum() == 0
    assert results[1]["rank1_sends_nothing"]["grad_x"].abs().sum() == 0


def test_dense_exchange_sends_items_once_and_matches_a_brute_force_loop(exchange):
    """Dense dispatch: both ranks see the EP group's 5 items in rank order; combine gives each rank its items'
    outputs from all 4 experts, expert-major; outputs and gradients equal a loop over (expert, item)."""
    config, results = exchange
    w_EXY = config["w_EXY"].clone().requires_grad_()
    for rank in (0, 1):
        assert results[rank]["dense"]["rows"] == pytest.approx([0, 1, 100, 101, 102])
        assert results[rank]["dense"]["counts"] == [5, 5]
    grad_w = torch.zeros_like(w_EXY)
    for rank in (0, 1):
        x_NX, _ = _pairs(rank, DENSE_ITEMS[rank])
        x_NX.requires_grad_()
        n = x_NX.shape[0]
        y_PY = torch.stack([x_NX[b].flatten() @ w_EXY[e] for e in range(E) for b in range(n)])
        w_EXY.grad = None
        (y_PY * config["dense_upstream"][rank]).sum().backward()
        grad_w += w_EXY.grad
        torch.testing.assert_close(results[rank]["dense"]["y"], y_PY.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(results[rank]["dense"]["grad_x"], x_NX.grad, atol=1e-5, rtol=0)
    # rank r's experts get gradient from both ranks' items, and none for the other rank's experts
    torch.testing.assert_close(results[0]["dense"]["grad_w"][:2], grad_w[:2], atol=1e-4, rtol=0)
    torch.testing.assert_close(results[1]["dense"]["grad_w"][2:], grad_w[2:], atol=1e-4, rtol=0)
    assert results[0]["dense"]["grad_w"][2:].abs().sum() == 0 and results[1]["dense"]["grad_w"][:2].abs().sum() == 0

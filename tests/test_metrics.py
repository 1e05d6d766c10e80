"""Specialisation metrics on hand-worked count matrices; the accumulator against one-shot computation,
and a real two-process gloo reduction against one process."""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raymoe.metrics.accumulator import SpecializationAccumulator
from raymoe.metrics.specialization import (coefficient_of_variation, entropy_bits, mutual_information_bits,
                                           sample_entropy_bits, usage_entropy_bits)
from raymoe.models.output import ModelOutput
from raymoe.moe.routing import dense_result
from raymoe.moe.routing import GateResult
from raymoe.parallel.context import DistContext


def test_entropy_bits_by_hand():
    assert entropy_bits(torch.tensor([0.5, 0.5])).item() == pytest.approx(1.0)
    assert entropy_bits(torch.tensor([1.0, 0.0])).item() == 0.0  # 0 log 0 = 0
    assert entropy_bits(torch.full((4,), 0.25)).item() == pytest.approx(2.0)
    assert entropy_bits(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), dim=1).tolist() == pytest.approx([1.0, 0.0])


def test_mutual_information_hand_worked_cases():
    e = 4
    perfect = torch.eye(e) * 25  # class c only ever goes to expert c, classes uniform
    assert mutual_information_bits(perfect) == pytest.approx(math.log2(e))
    assert mutual_information_bits(torch.ones(e, 10) * 7) == pytest.approx(0.0, abs=1e-12)  # independent
    collapse = torch.zeros(e, 10)
    collapse[2] = torch.arange(1, 11)  # every class to expert 2
    assert mutual_information_bits(collapse) == pytest.approx(0.0, abs=1e-12)
    assert usage_entropy_bits(collapse.sum(1)) == pytest.approx(0.0, abs=1e-12)
    # [[2, 1], [1, 2]] / 6: H(E) = H(Y) = 1, H(E, Y) = -2 (1/3) log2(1/3) - 2 (1/6) log2(1/6)
    h_joint = -2 / 3 * math.log2(1 / 3) - 1 / 3 * math.log2(1 / 6)
    assert mutual_information_bits(torch.tensor([[2.0, 1.0], [1.0, 2.0]])) == pytest.approx(2 - h_joint)
    assert mutual_information_bits(torch.zeros(3, 3)) == 0.0


def test_sample_and_usage_entropy_and_cv():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert sample_entropy_bits(probs) == pytest.approx(0.5)  # (0 + 1) / 2
    assert usage_entropy_bits(probs.mean(0)) == pytest.approx(entropy_bits(torch.tensor([0.75, 0.25])).item())
    assert coefficient_of_variation(torch.tensor([1.0, 3.0])) == pytest.approx(math.sqrt(2) / 2)
    assert coefficient_of_variation(torch.tensor([5.0])) == 0.0


def random_batch(gen: torch.Generator, b: int, e: int = 3, c: int = 7, token: int = 1, layers: int = 1):
    """A ModelOutput with random gate distributions and predictions, and labels."""
    gates = []
    for _ in range(layers):
        logits = torch.randn(b * token, e, generator=gen) * 2
        gates.append(dense_result(torch.softmax(logits, 1), logits))
    out = ModelOutput(log_probs_BC=torch.log_softmax(torch.randn(b, c, generator=gen), 1), gates=gates,
                      items_per_sample=token,
                      selected_pred_B=torch.randint(0, c, (b,), generator=gen) if token == 1 else None,
                      layer_stats=[{"dropped_frac": torch.rand((), generator=gen)} for _ in range(layers)]
                      if token > 1 else [])
    return out, torch.randint(0, c, (b,), generator=gen)


def concat(outs):
    """One ModelOutput holding every batch (the one-shot reference)."""
    first = outs[0]
    return ModelOutput(
        log_probs_BC=torch.cat([o.log_probs_BC for o in outs]),
        gates=[dense_result(torch.cat([o.gates[i].probs_NE for o in outs]),
                            torch.cat([o.gates[i].logits_NE for o in outs])) for i in range(len(first.gates))],
        items_per_sample=first.items_per_sample,
        selected_pred_B=None if first.selected_pred_B is None else torch.cat([o.selected_pred_B for o in outs]))


def test_accumulator_over_batches_equals_the_concatenated_batch():
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(gen, b) for b in (5, 8, 3)]
    acc = SpecializationAccumulator(3, 7)
    for out, y in batches:
        acc.update(out, y)
    whole, y_all = concat([o for o, _ in batches]), torch.cat([y for _, y in batches])
    one = SpecializationAccumulator(3, 7)
    one.update(whole, y_all)
    got, ref = acc.compute(), one.compute()
    assert got.keys() == {"error", "top5_error", "mi_true_bits", "mi_pred_bits", "sample_entropy_bits",
                          "usage_entropy_bits", "importance_cv", "max_load_share", "dead_expert_frac",
                          "load_share/0", "load_share/1", "load_share/2"}
    assert got == pytest.approx(ref, rel=1e-12)
    # and against the metric functions applied to the whole set by hand
    probs = whole.gates[0].probs_NE
    top = probs.argmax(1)
    counts_pred = torch.zeros(3, 7)
    counts_true = torch.zeros(3, 7)
    for e, p, t in zip(top.tolist(), whole.selected_pred_B.tolist(), y_all.tolist()):
        counts_pred[e, p] += 1
        counts_true[e, t] += 1
    assert got["mi_pred_bits"] == pytest.approx(mutual_information_bits(counts_pred))
    assert got["mi_true_bits"] == pytest.approx(mutual_information_bits(counts_true))
    assert got["sample_entropy_bits"] == pytest.approx(sample_entropy_bits(probs))
    assert got["usage_entropy_bits"] == pytest.approx(usage_entropy_bits(probs.mean(0)))
    assert got["importance_cv"] == pytest.approx(coefficient_of_variation(probs.sum(0)))
    share = torch.bincount(top, minlength=3).double() / len(top)  # a dense gate: routed share = top-1 share
    assert [got[f"load_share/{j}"] for j in range(3)] == pytest.approx(share.tolist())
    assert got["max_load_share"] == pytest.approx(share.max().item())
    assert got["dead_expert_frac"] == pytest.approx((share < 1 / 30).double().mean().item())
    assert got["error"] == pytest.approx(1 - (whole.log_probs_BC.argmax(1) == y_all).float().mean().item())
    top5 = (whole.log_probs_BC.topk(5, 1).indices == y_all[:, None]).any(1).float().mean().item()
    assert got["top5_error"] == pytest.approx(1 - top5)
    m = acc.matrices()
    assert np.array_equal(m["counts_pred_EC"], counts_pred.numpy().astype(np.int64))
    assert m["entropy_hist"].sum() == 16 and len(m["entropy_edges"]) == len(m["entropy_hist"]) + 1


def test_token_level_accumulator_per_layer():
    gen = torch.Generator().manual_seed(1)
    batches = [random_batch(gen, b, token=4, layers=2) for b in (3, 2)]
    acc = SpecializationAccumulator(3, 7)
    for out, y in batches:
        acc.update(out, y)
    got = acc.compute()
    for i in range(2):
        probs = torch.cat([o.gates[i].probs_NE for o, _ in batches])
        labels = torch.cat([y.repeat_interleave(4) for _, y in batches])  # token t of image b has label y_b
        counts = torch.zeros(3, 7)
        for e, t in zip(probs.argmax(1).tolist(), labels.tolist()):
            counts[e, t] += 1
        assert got[f"layer{i}/mi_true_bits"] == pytest.approx(mutual_information_bits(counts))
        assert got[f"layer{i}/usage_entropy_bits"] == pytest.approx(usage_entropy_bits(probs.mean(0)))
        lse = torch.cat([torch.logsumexp(o.gates[i].logits_NE, 1) for o, _ in batches])
        assert got[f"layer{i}/router_z"] == pytest.approx(lse.pow(2).mean().item(), rel=1e-5)
        fracs = [o.layer_stats[i]["dropped_frac"].item() for o, _ in batches]
        assert got[f"layer{i}/dropped_frac"] == pytest.approx((fracs[0] * 12 + fracs[1] * 8) / 20)
        assert np.array_equal(acc.matrices()[f"layer{i}/counts_true_EC"], counts.numpy().astype(np.int64))
    assert got["mi_true_bits"] == pytest.approx((got["layer0/mi_true_bits"] + got["layer1/mi_true_bits"]) / 2)


def test_single_model_gets_error_only():
    acc = SpecializationAccumulator(1, 3)
    acc.update(ModelOutput(log_probs_BC=torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))),
               torch.tensor([0, 0]))
    assert acc.compute() == {"error": 0.5} and acc.matrices() == {}


def test_sparse_gate_load_counts_chosen_experts():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    gate = GateResult(probs, probs.max(1, keepdim=True).values, probs.argmax(1, keepdim=True), probs.log())
    acc = SpecializationAccumulator(3, 2)
    acc.update(ModelOutput(log_probs_BC=torch.zeros(2, 2), gates=[gate], selected_pred_B=torch.tensor([1, 0])),
               torch.tensor([0, 1]))
    m = acc.matrices()
    assert m["load_E"].tolist() == [1, 1, 0]
    assert m["counts_true_EC"].tolist() == [[1, 0], [0, 1], [0, 0]]
    assert m["counts_pred_EC"].tolist() == [[0, 1], [1, 0], [0, 0]]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        ctx = DistContext(rank=rank, world_size=2)
        gen = torch.Generator().manual_seed(0)
        batches = [random_batch(gen, b) for b in (5, 8, 3)]
        split = SpecializationAccumulator(3, 7)  # rank 0: batches 0, 1; rank 1: batch 2
        for out, y in (batches[:2] if rank == 0 else batches[2:]):
            split.update(out, y)
        split.reduce(ctx)
        lonely = SpecializationAccumulator(3, 7)  # rank 1 sees no batch at all
        if rank == 0:
            for out, y in batches:
                lonely.update(out, y)
        lonely.reduce(ctx)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"split": split.compute(), "lonely": lonely.compute()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(dist.is_initialized(), reason="this process already belongs to a process group")
def test_reduce_over_two_gloo_ranks_equals_one_process(tmp_path):
    # rank 1 in a spawned process, rank 0 here (one child to start instead of two)
    child = mp.get_context("spawn").Process(target=_worker, args=(1, str(tmp_path / "init"), str(tmp_path)))
    child.start()
    try:
        _worker(0, str(tmp_path / "init"), str(tmp_path))
    finally:
        child.join(timeout=120)
    assert child.exitcode == 0
    gen = torch.Generator().manual_seed(0)
    ref = SpecializationAccumulator(3, 7)
    for out, y in [random_batch(gen, b) for b in (5, 8, 3)]:
        ref.update(out, y)
    expected = ref.compute()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["split"] == pytest.approx(expected, rel=1e-12)
        assert got["lonely"] == pytest.approx(expected, rel=1e-12)


def test_load_share_of_a_sparse_router_counts_routed_slots_and_dead_experts():
    """Top-1 routing of 10 items to 4 experts: counts 6 / 4 / 0 / 0 -> shares .6 .4 0 0, half the experts dead
    (share < 1/(10E) = 0.025); the first 3 items' top-1 experts are kept for the stability metrics."""
    from raymoe.metrics.accumulator import _GateSums
    from raymoe.moe.routing import GateResult

    experts = torch.tensor([0, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    logits = torch.nn.functional.one_hot(experts, 4).float() * 5
    probs = logits.softmax(-1)
    gate = GateResult(probs_NE=probs, weights_NK=probs.gather(1, experts[:, None]), experts_NK=experts[:, None],
                      logits_NE=logits)
    sums = _GateSums(4, 2, torch.device("cpu"), keep_items=3)
    sums.update(gate, torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long), None)
    metrics = sums.metrics()
    assert [metrics[f"load_share/{j}"] for j in range(4)] == pytest.approx([0.6, 0.4, 0.0, 0.0])
    assert metrics["dead_expert_frac"] == 0.5 and metrics["max_load_share"] == pytest.approx(0.6)
    assert sums.first.array().tolist() == [0, 0, 1]


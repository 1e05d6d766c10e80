"""2 Ray Train workers with EP = 2 compute what one process computes, for every sample-level gate kind.

For a fixed seed and global batch, the workers run the real training step (raymoe.train.step.train_epoch: local
NLL sum / global batch + regularizer on the gathered global batch / world size, backward through the all-to-all,
sync_gradients) with a zero learning rate, and the test compares against an independent single-process
computation (F.nll_loss mean + regularizer, one backward): loss, mixture output, gate probabilities, regularizer
terms, every parameter gradient (expert gradients against the matching slice of the single-process gradient),
and BatchNorm running statistics (gate-trunk BatchNorm runs as GlobalBatchNorm on the workers). Then the
specialization accumulator over the ranks' evaluation shards equals the single-process numbers.

Noisy top-k: both sides draw the noise from one seeded generator for the GLOBAL batch and each rank feeds its rows
to the gate through the gate's own noise seam (NoisyRouter.draw_noise).
Tolerance 1e-5 (float32).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from ep_harness import register_shared, shared_results
from raymoe.parallel.context import DistContext

B, B_EVAL, TOL = 16, 24, 1e-5
# case -> (data set, gate, regularizer); Fashion-MNIST's gate trunk has BatchNorm, CIFAR-10's experts do
CASES = {
    "softmax": ("fashion_mnist", {"kind": "softmax"}, {"importance": 0.5}),
    "attentive": ("fashion_mnist", {"kind": "attentive"}, {"importance": 0.5,
                                                           "sample_similarity": {"beta_s": 0.3, "beta_d": 0.2}}),
    "topk": ("fashion_mnist", {"kind": "topk", "top_k": 2}, {"load_balance": 0.1, "z_loss": 0.01}),
    "noisy_topk": ("fashion_mnist", {"kind": "noisy_topk", "top_k": 1}, {"importance": 0.2, "load": 0.2}),
    "cifar10_softmax": ("cifar10", {"kind": "softmax"}, {"importance": 0.5}),
}
SHAPE = {"fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10)}


def _setup(case: str):
    """Config, model and data of a case: identical on every rank and in the reference."""
    from raymoe.config.load import load_experiment
    from raymoe.models.build import build_model

    dataset, gate, reg = CASES[case]
    cfg = load_experiment(raw={"name": case, "seed": 5, "data": {"name": dataset}, "model": {"num_experts": 4},
                               "gate": gate, "regularizer": reg})
    channels, side, classes = SHAPE[dataset]
    torch.manual_seed(5)
    model = build_model(cfg, classes, channels, side)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # break the zero-init ties of the noisy gate; the same perturbation everywhere
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x = torch.randn(B, channels, side, side, generator=g)
    y = torch.randint(0, classes, (B,), generator=g)
    x_eval = torch.randn(B_EVAL, channels, side, side, generator=g)
    y_eval = torch.randint(0, classes, (B_EVAL,), generator=g)
    noise = torch.randn(B, 4, generator=g)
    return cfg, model, x, y, x_eval, y_eval, noise, classes


def _feed_noise(model: torch.nn.Module, rows_NE: torch.Tensor) -> None:
    """Every noisy gate of the model draws these rows (this rank's slice of the global noise) as its noise."""
    for module in model.modules():
        if hasattr(module, "draw_noise"):
            module.draw_noise = lambda like_NE: rows_NE.to(like_NE.dtype).clone()


def _on_workers(ctx: DistContext, config) -> dict:
    from raymoe.metrics.accumulator import SpecializationAccumulator
    from raymoe.parallel.expert_parallel import apply_expert_parallel
    from raymoe.train.step import train_epoch

    results = {}
    for case in CASES:
        cfg, model, x, y, x_eval, y_eval, noise, classes = _setup(case)
        lo, hi = ctx.rank * B // 2, (ctx.rank + 1) * B // 2
        model = apply_expert_parallel(model, ctx)
        model.train()
        _feed_noise(model, noise[lo:hi])
        with torch.no_grad():
            out = model(x[lo:hi])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        step = train_epoch(model, optimizer, [(x[lo:hi], y[lo:hi])], reg_cfg=cfg.regularizer, ctx=ctx, epoch=1,
                           num_samples=B, batch_size=B)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        model.eval()
        accumulator = SpecializationAccumulator(cfg.model.num_experts, classes)
        e_lo, e_hi = ctx.rank * B_EVAL // 2, (ctx.rank + 1) * B_EVAL // 2
        with torch.no_grad():
            for start in range(e_lo, e_hi, 6):  # several evaluation batches per rank
                accumulator.update(model(x_eval[start:min(start + 6, e_hi)]), y_eval[start:min(start + 6, e_hi)])
        accumulator.reduce(ctx)
        results[case] = {"log_probs": out.log_probs_BC, "probs": out.gates[0].probs_NE,
                         "weights": out.gates[0].weights_NK, "experts": out.gates[0].experts_NK,
                         "nll": step.loss, "parts": step.parts, "grads": grads, "buffers": buffers,
                         "metrics": {k: float(v) for k, v in accumulator.compute().items()},
                         "first_expert": model.experts.first_expert, "num_local": model.experts.num_local}
    return results


@functools.lru_cache(maxsize=None)
def _reference(case: str) -> dict:
    from raymoe.metrics.accumulator import SpecializationAccumulator
    from raymoe.regularizers.combine import regularize

    cfg, model, x, y, x_eval, y_eval, noise, classes = _setup(case)
    model.train()
    _feed_noise(model, noise)
    with torch.no_grad():
        out = model(x)
    fresh = model(x)
    nll = F.nll_loss(fresh.log_probs_BC, y)
    reg = regularize(cfg.regularizer, fresh, x)
    loss = nll + reg.total + (fresh.aux_loss if fresh.aux_loss is not None else 0.0)
    loss.backward()
    model.eval()
    accumulator = SpecializationAccumulator(cfg.model.num_experts, classes)
    with torch.no_grad():
        accumulator.update(model(x_eval), y_eval)
    return {"out": out, "nll": nll.item(), "parts": {k: float(v) for k, v in reg.parts.items()},
            "grads": {n: p.grad for n, p in model.named_parameters()}, "buffers": dict(model.named_buffers()),
            "metrics": {k: float(v) for k, v in accumulator.compute().items()}}


register_shared("equivalence", _on_workers)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    return shared_results("equivalence", tmp_path_factory.getbasetemp() / "ep_shared")


@pytest.mark.parametrize("case", list(CASES))
def test_two_ep_workers_match_one_process(workers, case):
    ref = _reference(case)
    close = dict(atol=TOL, rtol=TOL)
    assert workers[0][case]["nll"] == pytest.approx(ref["nll"], abs=TOL)
    assert workers[1][case]["nll"] == pytest.approx(ref["nll"], abs=TOL)
    assert ref["parts"], "the regularizer contributed nothing: the test would not cover the gathered batch"
    for rank in (0, 1):
        got = workers[rank][case]
        assert got["parts"].keys() == ref["parts"].keys()
        for name, value in ref["parts"].items():
            assert got["parts"][name] == pytest.approx(value, abs=TOL, rel=TOL), name
        rows = slice(rank * B // 2, (rank + 1) * B // 2)
        gate = ref["out"].gates[0]
        torch.testing.assert_close(got["log_probs"], ref["out"].log_probs_BC[rows], **close)
        torch.testing.assert_close(got["probs"], gate.probs_NE[rows], **close)
        torch.testing.assert_close(got["weights"], gate.weights_NK[rows], **close)
        assert torch.equal(got["experts"], gate.experts_NK[rows])
        experts = slice(got["first_expert"], got["first_expert"] + got["num_local"])
        assert got["num_local"] == 2 and got["first_expert"] == 2 * rank
        for name, grad in ref["grads"].items():
            expected = grad[experts] if name.startswith("experts.") else grad
            torch.testing.assert_close(got["grads"][name], expected, **close, msg=f"gradient of {name}")
        for name, buf in ref["buffers"].items():
            expected = buf[experts] if name.startswith("experts.") and buf.dim() > 0 else buf
            torch.testing.assert_close(got["buffers"][name], expected, **close, msg=f"buffer {name}")


@pytest.mark.parametrize("case", ["softmax", "noisy_topk"])
def test_specialization_metrics_over_ranks_equal_one_process(workers, case):
    ref = _reference(case)["metrics"]
    assert ref
    for rank in (0, 1):
        got = workers[rank][case]["metrics"]
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, abs=1e-5), key

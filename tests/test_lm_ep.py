"""The decoder-only language model under expert parallelism: 2 Ray Train workers (gloo, EP = 2) running the real
training step (raymoe.train.step.train_epoch, fp32, clipping by the global norm) equal one process computing
the plain mean NLL over the whole global batch + regularizers, one backward, and torch's clip_grad_norm_.

Shape legend: B windows, T positions, V vocabulary.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from ep_harness import register_shared, shared_results
from raymoe.parallel.context import DistContext

B, T, V, TOL = 4, 16, 64, 1e-5
CLIP = 0.05  # below the gradient norm, so clipping acts and its factor must agree across ranks
CASES = {
    "gshard_hypermoe": ({"kind": "topk", "top_k": 2, "hypermoe": {"enabled": True, "expert_embed_dim": 8,
                                                                  "process_dim": 8, "hypernet_input": 8,
                                                                  "hypernet_bottleneck": 8, "adapter_dim": 4}},
                        {"load_balance": 0.01, "z_loss": 0.001}),
    "switch_shared": ({"kind": "topk", "top_k": 1}, {"load_balance": 0.01}),
}


def _setup(case: str):
    from raymoe.config.load import load_experiment
    from raymoe.models.build import build_model

    gate, reg = CASES[case]
    cfg = load_experiment(raw={
        "name": case, "seed": 3, "data": {"name": "text", "text": {"block_size": T}},
        "model": {"arch": "gpt_moe", "num_experts": 4,
                  "gpt": {"dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32, "block_size": T,
                          "num_shared_experts": 1 if case == "switch_shared" else 0}},
        "gate": gate, "regularizer": reg, "train": {"max_steps": 1, "batch_size": B, "grad_clip": CLIP}})
    torch.manual_seed(3)
    model = build_model(cfg, V, 0, 0)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(V, (B, T), generator=g)
    y = torch.randint(V, (B, T), generator=g)
    return cfg, model, x, y


def _on_workers(ctx: DistContext, config) -> dict:
    from raymoe.parallel.expert_parallel import apply_expert_parallel
    from raymoe.train.step import StepSettings, train_epoch

    out = {}
    for case in CASES:
        cfg, model, x, y = _setup(case)
        model = apply_expert_parallel(model, ctx)
        lo, hi = ctx.rank * B // 2, (ctx.rank + 1) * B // 2
        result = train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.0), [(x[lo:hi], y[lo:hi])],
                             reg_cfg=cfg.regularizer, ctx=ctx, epoch=1, num_samples=B, batch_size=B,
                             settings=StepSettings(grad_clip=CLIP))
        out[case] = {"loss": result.loss, "norm": result.grad_norm,
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                     "first": [m.first_expert for m in model.modules() if hasattr(m, "first_expert")]}
    return out


@functools.lru_cache(maxsize=None)
def _reference(case: str) -> dict:
    from raymoe.regularizers.combine import regularize

    cfg, model, x, y = _setup(case)
    model.train()
    out = model(x)
    nll = F.nll_loss(out.log_probs_BC, y.reshape(-1))
    loss = nll + regularize(cfg.regularizer, out, x).total
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    return {"nll": nll.item(), "norm": float(norm), "grads": {n: p.grad for n, p in model.named_parameters()}}


register_shared("lm_equivalence", _on_workers)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    return shared_results("lm_equivalence", tmp_path_factory.getbasetemp() / "ep_shared")


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_moe_on_two_ep_workers_equals_one_process(workers, case):
    ref = _reference(case)
    for rank, result in enumerate(workers):
        mine = result[case]
        assert mine["loss"] == pytest.approx(ref["nll"], rel=TOL)
        assert mine["norm"] == pytest.approx(ref["norm"], rel=1e-4)  # the GLOBAL norm, all experts of all ranks
        assert ref["norm"] > CLIP  # clipping acted
        for name, grad in mine["grads"].items():
            expected = ref["grads"][name]
            if grad.shape != expected.shape:  # an expert shard: this rank's slice of the stacked experts
                per_rank = grad.shape[0]
                expected = expected[rank * per_rank:(rank + 1) * per_rank]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=TOL, msg=f"{case} {name} rank {rank}")

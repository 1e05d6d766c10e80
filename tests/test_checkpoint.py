"""Sharded checkpoints: EP=2 -> EP=1 and EP=1 -> EP=2 on real Ray Train workers, markers, wrong architecture.

The stand-in TinyMoE has 4 experts (stacked parameters plus a stacked buffer) and a BatchNorm'd gate, and takes
one Adam step before saving so the optimizer state is non-trivial.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ep_harness import TinyMoE, register_shared, shared_results
from raymoe.parallel.context import DistContext
from raymoe.train.checkpoint import COMPLETE, is_complete, load_checkpoint, load_full_state, save_checkpoint
from raymoe.train.reporter import LocalReporter

SINGLE = DistContext()
EXPERT_KEYS = ("experts.w_EXY", "experts.b_EY", "experts.calls_E")


def _trained(seed: int, ctx: DistContext = SINGLE, ep: bool = False):
    """TinyMoE (optionally expert-parallel) after one Adam step on this rank's data."""
    from raymoe.parallel.expert_parallel import apply_expert_parallel, sync_gradients

    torch.manual_seed(seed)
    model = TinyMoE(top_k=None)
    if ep:
        model = apply_expert_parallel(model, ctx)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed + 100 + ctx.rank)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    F.nll_loss(model(x).log_probs_BC, y).backward()
    sync_gradients(model, ctx)
    optimizer.step()
    return model, optimizer


def _adam_state(model, optimizer) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in optimizer.state.items()}


def _save_and_load_on_workers(ctx: DistContext, config: dict) -> dict:
    from raymoe.train.checkpoint import load_checkpoint, save_checkpoint

    model, optimizer = _trained(1, ctx, ep=True)
    extra = {"config": {"name": "tiny"}, "metrics": {"loss": 0.5}}
    # Ray layout: every rank writes its own folder (Ray merges them in storage) ...
    save_checkpoint(Path(config["root"]) / f"rank{ctx.rank}", model=model, optimizer=optimizer, epoch=3, ctx=ctx,
                    extra=extra)
    # ... and a folder shared by both ranks (the COMPLETE marker comes after the barrier)
    save_checkpoint(Path(config["root"]) / "shared", model=model, optimizer=optimizer, epoch=3, ctx=ctx, extra=extra)
    saved = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "adam": _adam_state(model, optimizer)}
    # EP=1 checkpoint written by the driver -> this EP=2 model
    fresh, fresh_opt = _trained(7, ctx, ep=True)
    returned = load_checkpoint(config["single_ckpt"], model=fresh, optimizer=fresh_opt, ctx=ctx)
    loaded = {"state": {k: v.clone() for k, v in fresh.state_dict().items()}, "adam": _adam_state(fresh, fresh_opt),
              "extra": returned, "lr": fresh_opt.param_groups[0]["lr"]}
    return {"saved": saved, "loaded": loaded}


def _single():
    """The one-process model and optimizer whose checkpoint the EP=2 ranks load."""
    model, optimizer = _trained(2)
    for group in optimizer.param_groups:
        group["lr"] = 0.0123  # the loaded optimizer must take the saved hyperparameters
    return model, optimizer


def _make_config(root: Path) -> dict:
    model, optimizer = _single()
    save_checkpoint(root / "single", model=model, optimizer=optimizer, epoch=5, ctx=SINGLE,
                    extra={"config": {"name": "single"}})
    return {"root": str(root), "single_ckpt": str(root / "single")}


register_shared("checkpoint", _save_and_load_on_workers, _make_config)


@pytest.fixture(scope="module")
def on_workers(tmp_path_factory):
    shared = tmp_path_factory.getbasetemp() / "ep_shared"
    results = shared_results("checkpoint", shared)
    root = shared / "checkpoint"
    single_model, single_opt = _single()
    merged = root / "merged"
    merged.mkdir()
    for rank in (0, 1):
        for f in (root / f"rank{rank}").iterdir():
            shutil.copy(f, merged / f.name)
    return root, single_model, single_opt, results


def _expert_slice(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[2 * rank: 2 * rank + 2]


def test_rank_files_are_split_as_documented(on_workers):
    root, *_ = on_workers
    assert sorted(f.name for f in (root / "rank0").iterdir()) == [COMPLETE, "experts_0-1.pt", "replicated.pt"]
    assert sorted(f.name for f in (root / "rank1").iterdir()) == ["experts_2-3.pt"]
    assert not is_complete(root / "rank0")  # rank 1's shard is missing until Ray merges the folders
    assert is_complete(root / "merged") and is_complete(root / "shared")


@pytest.mark.parametrize("folder", ["merged", "shared"])
def test_ep2_checkpoint_loads_into_one_process(on_workers, folder):
    root, _, _, results = on_workers
    model, optimizer = _trained(9)
    extra = load_checkpoint(root / folder, model=model, optimizer=optimizer, ctx=SINGLE)
    assert extra == {"config": {"name": "tiny"}, "metrics": {"loss": 0.5}, "epoch": 3}
    state, adam = model.state_dict(), _adam_state(model, optimizer)
    for key, value in state.items():
        for rank in (0, 1):
            saved = results[rank]["saved"]["state"][key]
            if key in EXPERT_KEYS:
                torch.testing.assert_close(_expert_slice(value, rank), saved, atol=0, rtol=0)
            else:
                torch.testing.assert_close(value, saved, atol=0, rtol=0)
    for name, st in adam.items():
        for rank in (0, 1):
            saved = results[rank]["saved"]["adam"][name]
            for k, v in st.items():
                expected = saved[k]
                got = _expert_slice(v, rank) if name in EXPERT_KEYS and v.dim() > 0 else v
                torch.testing.assert_close(got, expected, atol=0, rtol=0)
    full, full_extra = load_full_state(root / folder)
    assert full_extra["epoch"] == 3
    for key, value in state.items():
        torch.testing.assert_close(full[key], value, atol=0, rtol=0)


def test_ep1_checkpoint_loads_into_ep2_ranks(on_workers):
    _, single_model, single_opt, results = on_workers
    state, adam = single_model.state_dict(), _adam_state(single_model, single_opt)
    for rank in (0, 1):
        loaded = results[rank]["loaded"]
        assert loaded["extra"] == {"config": {"name": "single"}, "epoch": 5}
        assert loaded["lr"] == pytest.approx(0.0123)
        for key, value in state.items():
            expected = _expert_slice(value, rank) if key in EXPERT_KEYS else value
            torch.testing.assert_close(loaded["state"][key], expected, atol=0, rtol=0)
        for name, st in adam.items():
            for k, v in st.items():
                expected = _expert_slice(v, rank) if name in EXPERT_KEYS and v.dim() > 0 else v
                torch.testing.assert_close(loaded["adam"][name][k], expected, atol=0, rtol=0)


def test_round_trip_in_one_process_continues_training_identically(tmp_path):
    model, optimizer = _trained(3)
    save_checkpoint(tmp_path / "c", model=model, optimizer=optimizer, epoch=1, ctx=SINGLE, extra={})
    clone, clone_opt = _trained(4)
    load_checkpoint(tmp_path / "c", model=clone, optimizer=clone_opt, ctx=SINGLE)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    for m, opt in ((model, optimizer), (clone, clone_opt)):
        opt.zero_grad()
        F.nll_loss(m(x).log_probs_BC, y).backward()
        opt.step()
    for (k, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_incomplete_checkpoint_is_never_loaded(tmp_path):
    model, optimizer = _trained(3)
    reporter = LocalReporter(tmp_path / "run")
    for epoch in (1, 2):
        folder = reporter.staging_dir(epoch)
        save_checkpoint(folder, model=model, optimizer=optimizer, epoch=epoch, ctx=SINGLE, extra={})
        reporter.report({}, folder, epoch)
    (tmp_path / "run" / "epoch_0002" / COMPLETE).unlink()  # as if the job died while writing epoch 2
    assert not is_complete(tmp_path / "run" / "epoch_0002")
    assert reporter.latest_checkpoint() == str(tmp_path / "run" / "epoch_0001")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "run" / "epoch_0002", model=model, optimizer=optimizer, ctx=SINGLE)


def test_local_reporter_keeps_the_last_two(tmp_path):
    model, optimizer = _trained(3)
    reporter = LocalReporter(tmp_path / "run")
    for epoch in (1, 2, 3):
        folder = reporter.staging_dir(epoch)
        save_checkpoint(folder, model=model, optimizer=optimizer, epoch=epoch, ctx=SINGLE, extra={})
        reporter.report({}, folder, epoch)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch_0002", "epoch_0003"]
    assert reporter.latest_checkpoint() == str(tmp_path / "run" / "epoch_0003")


def test_other_architecture_is_a_clear_error(tmp_path):
    model, optimizer = _trained(3)
    save_checkpoint(tmp_path / "c", model=model, optimizer=optimizer, epoch=1, ctx=SINGLE,
                    extra={"config": {"name": "fmnist-attentive"}})
    other = TinyMoE(num_experts=4, d_in=5)
    with pytest.raises(ValueError, match=r"config 'fmnist-attentive'.*experts\.w_EXY: per-expert shape \[6, 3\] "
                                         r"saved, model has \[5, 3\]"):
        load_checkpoint(tmp_path / "c", model=other, optimizer=None, ctx=SINGLE)
    with pytest.raises(ValueError, match="4 experts saved, model has 6"):
        load_checkpoint(tmp_path / "c", model=TinyMoE(num_experts=6), optimizer=None, ctx=SINGLE)


def test_everything_loads_with_weights_only(tmp_path):
    model, optimizer = _trained(3)
    save_checkpoint(tmp_path / "c", model=model, optimizer=optimizer, epoch=1, ctx=SINGLE,
                    extra={"metrics": {"a": 1.0}, "config": {"name": "x", "tags": ["a"], "lr": None}})
    files = sorted((tmp_path / "c").glob("*.pt"))
    assert files, "the checkpoint holds no .pt file"
    for f in files:
        torch.load(f, weights_only=True)


def test_model_gpt_fixes_shapes_only_for_language_models():
    """A checkpoint of an image model saved before model.gpt existed still resumes; for a language model a
    different model.gpt is another architecture."""
    from raymoe.train.loop import _arch_differences

    image_saved = {"data": {"name": "fashion_mnist"}, "model": {"arch": "moe", "num_experts": 5}}
    image_now = {"data": {"name": "fashion_mnist"}, "model": {"arch": "moe", "num_experts": 5, "gpt": {"dim": 128}}}
    assert _arch_differences(image_saved, image_now) == []
    lm_saved = {"data": {"name": "text"}, "model": {"arch": "gpt_moe", "gpt": {"dim": 64}}}
    lm_now = {"data": {"name": "text"}, "model": {"arch": "gpt_moe", "gpt": {"dim": 128}}}
    assert [d.split(":")[0] for d in _arch_differences(lm_saved, lm_now)] == ["model.gpt"]

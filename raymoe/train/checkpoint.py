"""Sharded, re-shardable training checkpoints.

A checkpoint is a folder:
    replicated.pt            rank 0: every state entry outside the experts, their optimizer state, epoch, extra
    experts_<first>-<last>.pt  one per EP rank (written by replica 0): each local expert's tensors and optimizer
                             state keyed by GLOBAL expert id, so any EP degree dividing the expert count can load it
    COMPLETE                 written last by rank 0 after a barrier; a folder without it is never loaded

Under Ray Train every rank writes into its own local folder and reports it; Ray merges the folders in storage.
Only tensors and plain Python values are saved, so everything loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymoe.moe.expert_stack import ExpertStack
from raymoe.parallel.context import DistContext

REPLICATED = "replicated.pt"
COMPLETE = "COMPLETE"
FORMAT = 1


def _stacks(model: nn.Module) -> dict[str, ExpertStack]:
    """Outermost ExpertStack submodules by qualified name."""
    found: dict[str, ExpertStack] = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertStack) and not any(name.startswith(f"{n}.") for n in found):
            found[name] = module
    return found


def _full(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _per_expert_keys(stack: ExpertStack) -> list[str]:
    """State keys (relative to the stack) whose first dim is the local-expert dim."""
    keys = [n for n, _ in stack.named_parameters()]
    keys += [n for n, b in stack.named_buffers() if b is not None and b.dim() > 0 and b.shape[0] == stack.num_local]
    return keys


def _shard_file(first: int, last: int) -> str:
    return f"experts_{first}-{last}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def _optimizer_params(optimizer: torch.optim.Optimizer | None) -> list[nn.Parameter]:
    return [] if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]


def save_checkpoint(directory: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    epoch: int, ctx: DistContext, extra: dict) -> None:
    """Write this rank's part of a checkpoint into `directory` (every rank must call it: it has a barrier).

    Args:
        directory: folder to write into (created); under Ray Train a per-rank local folder is fine.
        model: the (possibly expert-sharded) model.
        optimizer: its optimizer, or None.
        epoch: the number of finished epochs.
        ctx: where this rank sits.
        extra: plain Python values only (metrics, the config dict under "config", ...).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stacks = _stacks(model)
    names = {id(p): n for n, p in model.named_parameters()}
    expert_keys = {_full(prefix, k): (prefix, k) for prefix, s in stacks.items() for k in _per_expert_keys(s)}
    state = model.state_dict()
    opt_params = _optimizer_params(optimizer)
    shard_files = []
    if stacks:
        first_stack = next(iter(stacks.values()))
        per_rank = first_stack.num_local
        shard_files = [_shard_file(r * per_rank, (r + 1) * per_rank - 1) for r in range(ctx.ep_size)]

    if ctx.rank == 0:
        groups = []
        if optimizer is not None:
            for g in optimizer.param_groups:
                hyper = {k: _cpu(v) for k, v in g.items() if k != "params"}
                groups.append({"hyper": hyper, "param_names": [names[id(p)] for p in g["params"]]})
        opt_state = {names[id(p)]: {k: _cpu(v) for k, v in optimizer.state.get(p, {}).items()}
                     for p in opt_params if names[id(p)] not in expert_keys}
        payload = {
            "format": FORMAT,
            "epoch": int(epoch),
            "extra": extra,
            "model": {k: _cpu(v) for k, v in state.items() if k not in expert_keys},
            "optimizer": {"groups": groups, "state": opt_state} if optimizer is not None else None,
            "experts": {prefix: {"num_experts": s.num_experts,
                                 "keys": {k: list(state[_full(prefix, k)].shape[1:]) for k in _per_expert_keys(s)}}
                        for prefix, s in stacks.items()},
            "ep_size": ctx.ep_size,
        }
        _atomic_save(payload, directory / REPLICATED)

    if stacks and ctx.replica_index == 0:
        shard: dict[str, Any] = {"format": FORMAT, "stacks": {}, "optimizer": {}}
        for prefix, stack in stacks.items():
            keys = _per_expert_keys(stack)
            shard["stacks"][prefix] = {
                gid: {k: _cpu(state[_full(prefix, k)][i]) for k in keys} for i, gid in enumerate(stack.local_ids)}
            per_expert_opt: dict[int, dict] = {gid: {} for gid in stack.local_ids}
            for rel, p in stack.named_parameters():
                st = optimizer.state.get(p, {}) if optimizer is not None else {}
                split = {k for k, v in st.items() if isinstance(v, torch.Tensor) and v.shape == p.shape}
                for i, gid in enumerate(stack.local_ids):
                    # tensors shaped like the parameter are per expert (Adam moments); the rest (step) is shared
                    per_expert_opt[gid][rel] = {"split": {k: _cpu(st[k][i]) for k in split},
                                                "shared": {k: _cpu(v) for k, v in st.items() if k not in split}}
            shard["optimizer"][prefix] = per_expert_opt
        _atomic_save(shard, directory / shard_files[ctx.ep_rank])

    ctx.barrier()
    if ctx.rank == 0:
        _atomic_text(json.dumps({"epoch": int(epoch), "expert_files": shard_files}), directory / COMPLETE)


def is_complete(directory: str | os.PathLike) -> bool:
    """True when the COMPLETE marker and every file it names are present."""
    directory = Path(directory)
    try:
        marker = json.loads((directory / COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    return (directory / REPLICATED).is_file() and all((directory / f).is_file() for f in marker.get("expert_files", []))


def _read(directory: Path) -> tuple[dict, dict[str, dict[int, dict]], dict[str, dict[int, dict]]]:
    if not is_complete(directory):
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {COMPLETE} marker or a missing file)")
    rep = torch.load(directory / REPLICATED, map_location="cpu", weights_only=True)
    experts: dict[str, dict[int, dict]] = {}
    optim: dict[str, dict[int, dict]] = {}
    for name in json.loads((directory / COMPLETE).read_text()).get("expert_files", []):
        shard = torch.load(directory / name, map_location="cpu", weights_only=True)
        for prefix, by_id in shard["stacks"].items():
            experts.setdefault(prefix, {}).update(by_id)
        for prefix, by_id in shard["optimizer"].items():
            optim.setdefault(prefix, {}).update(by_id)
    return rep, experts, optim


def _source(rep: dict, directory: Path) -> str:
    config = rep.get("extra", {}).get("config") if isinstance(rep.get("extra"), dict) else None
    name = config.get("name") if isinstance(config, dict) else None
    return f"checkpoint {directory}" + (f" (config {name!r})" if name else "")


def _check_fits(model: nn.Module, rep: dict, directory: Path) -> None:
    """Raise ValueError naming every mismatching key/shape when the checkpoint is from another architecture."""
    problems = []
    stacks = _stacks(model)
    saved_stacks = rep["experts"]
    for prefix in sorted(set(stacks) | set(saved_stacks)):
        if prefix not in stacks or prefix not in saved_stacks:
            where = "checkpoint" if prefix in saved_stacks else "model"
            problems.append(f"expert stack {prefix or '<root>'!r} only in the {where}")
            continue
        stack, saved = stacks[prefix], saved_stacks[prefix]
        if stack.num_experts != saved["num_experts"]:
            problems.append(f"{prefix or '<root>'}: {saved['num_experts']} experts saved, model has {stack.num_experts}")
            continue
        own = {k: list(model.state_dict()[_full(prefix, k)].shape[1:]) for k in _per_expert_keys(stack)}
        for k in sorted(set(own) | set(saved["keys"])):
            if own.get(k) != saved["keys"].get(k):
                problems.append(f"{_full(prefix, k)}: per-expert shape {saved['keys'].get(k)} saved, "
                                f"model has {own.get(k)}")
    expert_full = {_full(p, k) for p, s in stacks.items() for k in _per_expert_keys(s)}
    own_rep = {k: list(v.shape) for k, v in model.state_dict().items() if k not in expert_full}
    saved_rep = {k: list(v.shape) for k, v in rep["model"].items()}
    for k in sorted(set(own_rep) | set(saved_rep)):
        if own_rep.get(k) != saved_rep.get(k):
            problems.append(f"{k}: {saved_rep.get(k, 'missing')} saved, model has {own_rep.get(k, 'missing')}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"{_source(rep, directory)} does not fit this model (another architecture?): {shown}")


def load_checkpoint(directory: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    ctx: DistContext) -> dict:
    """Load a complete checkpoint into a model sharded for any EP degree that divides the expert count.

    Args:
        directory: a complete checkpoint folder (all ranks' files merged).
        model: the model after apply_expert_parallel (or unsharded on one process).
        optimizer: its optimizer (built after sharding), or None to skip optimizer state.
        ctx: where this rank sits (unused beyond documentation: each rank picks its own experts from the model).
    Returns:
        The saved `extra` dict, with "epoch" (finished epochs) added.
    Raises:
        FileNotFoundError: incomplete checkpoint. ValueError: the checkpoint is from another architecture.
    """
    directory = Path(directory)
    rep, experts, optim = _read(directory)
    _check_fits(model, rep, directory)
    stacks = _stacks(model)
    state = dict(rep["model"])
    for prefix, stack in stacks.items():
        for k in _per_expert_keys(stack):
            state[_full(prefix, k)] = torch.stack([experts[prefix][gid][k] for gid in stack.local_ids])
    model.load_state_dict(state, strict=True)
    if optimizer is not None and rep.get("optimizer") is not None:
        _load_optimizer(optimizer, model, rep, optim, stacks, directory)
    return {**(rep.get("extra") or {}), "epoch": rep["epoch"]}


def _load_optimizer(optimizer, model, rep, optim, stacks, directory) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    saved = rep["optimizer"]
    if len(saved["groups"]) != len(optimizer.param_groups):
        raise ValueError(f"{_source(rep, directory)}: optimizer has {len(saved['groups'])} parameter groups saved, "
                         f"this optimizer has {len(optimizer.param_groups)}")
    owner = {}  # full param name -> (stack prefix, relative name)
    for prefix, stack in stacks.items():
        for rel, _ in stack.named_parameters():
            owner[_full(prefix, rel)] = (prefix, rel)
    state, groups, index = {}, [], 0
    for group, saved_group in zip(optimizer.param_groups, saved["groups"]):
        own_names = [names[id(p)] for p in group["params"]]
        if sorted(own_names) != sorted(saved_group["param_names"]):
            raise ValueError(f"{_source(rep, directory)}: optimizer parameter groups hold different parameters")
        ids = []
        for p, name in zip(group["params"], own_names):
            if name in owner:
                prefix, rel = owner[name]
                per = [optim[prefix][gid][rel] for gid in stacks[prefix].local_ids]
                st = {**per[0]["shared"], **{k: torch.stack([e["split"][k] for e in per]) for k in per[0]["split"]}}
            else:
                st = saved["state"].get(name, {})
            if st:
                state[index] = st
            ids.append(index)
            index += 1
        groups.append({**saved_group["hyper"], "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_full_state(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The unsharded model's state_dict (all experts stacked) and `extra` (with "epoch"), for eval/distillation."""
    directory = Path(directory)
    rep, experts, _ = _read(directory)
    state = dict(rep["model"])
    for prefix, info in rep["experts"].items():
        for k in info["keys"]:
            state[_full(prefix, k)] = torch.stack([experts[prefix][gid][k] for gid in range(info["num_experts"])])
    return state, {**(rep.get("extra") or {}), "epoch": rep["epoch"]}

"""YAML -> typed config: strict types, unknown keys rejected, `--set a.b=v` overrides, `base:` inheritance.

Every problem raises ConfigError(path, value, problem); nothing here has side effects.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from raymoe.config.schema import LM_ARCHS, SPARSE_GATES, TOKEN_MOE_ARCHS, ExperimentConfig
from raymoe.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def read_yaml(path: str | os.PathLike, field_path: str = "config") -> dict[str, Any]:
    """Read a YAML mapping, following `base: other.yaml` (relative to the file) with a deep merge
    (raymoe/config/yaml_file.py: UTF-8, no duplicate keys, no base cycles)."""
    from raymoe.config.yaml_file import read_with_bases

    return read_with_bases(path, field_path, deep_merge)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", text, "expected KEY=VALUE, e.g. train.epochs=5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, RecursionError):
        parsed = value
    return key.strip(), parsed


def apply_overrides(raw: dict, overrides: list[str] | dict[str, Any], cls: type = ExperimentConfig) -> dict:
    """Set dotted keys in a raw dict; the path must exist in the dataclass schema `cls`."""
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    raw = copy.deepcopy(raw)
    for key, value in items:
        _check_path_exists(cls, key)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def _check_path_exists(cls: type, dotted: str) -> None:
    current: Any = cls
    for i, part in enumerate(dotted.split(".")):
        if not (isinstance(current, type) and dataclasses.is_dataclass(current)):
            raise ConfigError(dotted, None, f"{'.'.join(dotted.split('.')[:i])} has no sub-keys")
        hints = get_type_hints(current)
        if part not in hints:
            prefix = ".".join(dotted.split(".")[:i])
            raise ConfigError(dotted, None, f"unknown key; {prefix or 'the config'} has {sorted(hints)}")
        current = _dataclass_in(hints[part])


def _dataclass_in(tp: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return tp


def from_dict(cls: type[T], raw: Any, path: str = "") -> T:
    """Build dataclass `cls` from a raw mapping with strict type checks."""
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, f"expected a mapping of {cls.__name__} fields")
    hints = get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(where, raw[unknown[0]], f"unknown key; allowed here: {sorted(hints)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f"{path}.{f.name}" if path else f.name
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, None, "required key is missing")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors: list[ConfigError] = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(exc)
        inner = [e for e in errors if e.path.startswith((f"{path}.", f"{path}["))]
        if inner:  # the value had the option's shape and failed inside it: keep the full path (scheduler.asha.x)
            raise max(inner, key=lambda e: len(e.path))
        raise ConfigError(path, value, " or ".join(e.problem for e in errors))
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(path, value, f"must be one of {list(allowed)}")
        return value
    if origin in (list, typing.List):
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, value, "must be a list")
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(path, value, "must be a mapping")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "must be an integer")
        if not INT64_MIN <= value <= INT64_MAX:  # what torch and numpy hold; Python ints are unbounded
            raise ConfigError(path, _short(value), "out of range: an integer must fit in 64 bits")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, value, "must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "must be a number")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range (e.g. 400 digits)
            raise ConfigError(path, _short(value), "out of range for a 64-bit float") from None
        if not math.isfinite(value):
            raise ConfigError(path, value, "must be finite")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "must be a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
SEED_MAX = 2 ** 32 - 1  # numpy's legacy seeding and Ray's trial seeds take 32-bit seeds


def _short(value: Any) -> Any:
    """A huge number as it is shown in an error: its first digits and its length."""
    text = str(value)
    return value if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for MLflow params and sweep overrides)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _require(ok: bool, path: str, value: Any, problem: str) -> None:
    if not ok:
        raise ConfigError(path, value, problem)


def check_experiment(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field rules; raise ConfigError on the first violation."""
    m, g, t, s, r, d = cfg.model, cfg.gate, cfg.train, cfg.scaling, cfg.regularizer, cfg.data
    _require(bool(cfg.name.strip()), "name", cfg.name, "must not be empty")
    _require("/" not in cfg.name, "name", cfg.name, "must not contain '/'")
    _require(0 <= cfg.seed <= SEED_MAX, "seed", cfg.seed, f"must be in [0, {SEED_MAX}] (a 32-bit seed)")
    for key in ("train_limit", "test_limit"):
        value = getattr(d, key)
        _require(value is None or value >= 1, f"data.{key}", value, "must be >= 1 (or null for all)")
    _require(d.val_fraction is None or 0 < d.val_fraction <= 0.5, "data.val_fraction", d.val_fraction,
             "must be in (0, 0.5], or null to train on the whole training set (the paper's protocol)")
    _require(m.num_experts >= 1, "model.num_experts", m.num_experts, "must be >= 1")
    _require(m.hidden_size is None or m.hidden_size >= 1, "model.hidden_size", m.hidden_size, "must be >= 1")
    _require(0 < m.log_eps < 1e-2, "model.log_eps", m.log_eps, "must be in (0, 0.01)")
    _require(g.temperature > 0, "gate.temperature", g.temperature, "must be > 0")
    _require(g.top_k >= 1, "gate.top_k", g.top_k, "must be >= 1")
    _require(g.top_k <= m.num_experts, "gate.top_k", g.top_k, f"must be <= model.num_experts ({m.num_experts})")
    _require(g.noise_eps >= 0, "gate.noise_eps", g.noise_eps, "must be >= 0")
    _require(0 <= g.jitter < 1, "gate.jitter", g.jitter, "must be in [0, 1)")
    _require(g.capacity_factor is None or g.capacity_factor > 0, "gate.capacity_factor", g.capacity_factor,
             "must be > 0 (or null for dropless)")
    _require(g.bias_balance_rate >= 0, "gate.bias_balance_rate", g.bias_balance_rate, "must be >= 0")
    lm, vit_moe = m.arch in LM_ARCHS, m.arch == "vit_moe"
    _require(lm or d.name != "text", "data.name", d.name,
             f"text data is for the language models; set model.arch gpt or gpt_moe (got {m.arch})")
    if lm:
        _check_language_model(cfg)
    token_level = m.arch in TOKEN_MOE_ARCHS
    if m.arch == "gpt":  # dense: of gate.* only top_k (the FFN width) is used, so gpt_moe is one --set away
        _require(s.expert_parallel == 1, "scaling.expert_parallel", s.expert_parallel,
                 "the dense gpt has no experts (use model.arch gpt_moe)")
        _require(r.sample_similarity.beta_s == 0 and r.sample_similarity.beta_d == 0,
                 "regularizer.sample_similarity", "beta_s/beta_d > 0", "the dense gpt has no gate")
    elif not token_level:
        _require(g.kind != "expert_choice", "gate.kind", g.kind,
                 "expert_choice routes tokens; use it with model.arch: vit_moe")
        _require(g.capacity_factor is None, "gate.capacity_factor", g.capacity_factor,
                 "capacity applies to token-level routers (model.arch: vit_moe)")
        _require(not g.hypermoe.enabled, "gate.hypermoe.enabled", True,
                 "HyperMoE is a token-level option; use model.arch: vit_moe")
        _require(g.bias_balance_rate == 0 or g.kind in SPARSE_GATES, "gate.bias_balance_rate",
                 g.bias_balance_rate, "bias balancing changes top-k selection; use a top-k gate")
    else:
        vit = m.vit
        if vit_moe:
            for key in ("patch_size", "dim", "depth", "heads", "mlp_dim", "moe_every"):
                _require(getattr(vit, key) >= 1, f"model.vit.{key}", getattr(vit, key), "must be >= 1")
            _require(vit.dim % vit.heads == 0, "model.vit.dim", vit.dim,
                     f"must be divisible by heads ({vit.heads})")
            _require(vit.num_shared_experts >= 0, "model.vit.num_shared_experts", vit.num_shared_experts,
                     "must be >= 0")
            image = 28 if d.name in ("mnist", "fashion_mnist") else 32
            _require(image % vit.patch_size == 0, "model.vit.patch_size", vit.patch_size,
                     f"must divide the image size {image}")
            _require(not (g.kind == "expert_choice" and vit.causal), "gate.kind", g.kind,
                     "expert choice looks at all tokens of the batch, so it would leak future tokens in a causal "
                     "model")
        _require(not (g.hypermoe.enabled and g.kind == "expert_choice"), "gate.hypermoe.enabled", True,
                 "HyperMoE needs a per-token unselected set; expert_choice has none (use topk or noisy_topk)")
        # token-level (raymoe/moe/token) additions
        _require(g.kind != "softmax", "gate.kind", g.kind,
                 "token-level MoE layers need a sparse router: topk, noisy_topk, expert_choice or attentive")
        if vit_moe:
            _require(vit.moe_every <= vit.depth, "model.vit.moe_every", vit.moe_every,
                     f"must be <= model.vit.depth ({vit.depth}) so at least one block is a MoE layer")
        _require(not (g.kind == "expert_choice" and g.bias_balance_rate > 0), "gate.bias_balance_rate",
                 g.bias_balance_rate, "expert choice is balanced by construction; bias balancing needs top-k")
        _require(not (g.kind == "attentive" and s.expert_parallel > 1), "scaling.expert_parallel",
                 s.expert_parallel, "the token-level attentive gate reads every expert's hidden layer; "
                 "it needs all experts on each rank (expert_parallel 1)")
        _require(r.sample_similarity.beta_s == 0 and r.sample_similarity.beta_d == 0,
                 "regularizer.sample_similarity", "beta_s/beta_d > 0",
                 "sample similarity compares whole-image gate outputs; token-level (vit_moe, gpt_moe) gates "
                 "route tokens, so it is not defined there")
    if g.hypermoe.enabled:
        for key in ("expert_embed_dim", "process_dim", "hypernet_input", "hypernet_bottleneck", "layer_embed_dim",
                    "adapter_dim"):
            value = getattr(g.hypermoe, key)
            _require(value >= 1, f"gate.hypermoe.{key}", value, "must be >= 1")
    if m.arch == "single":
        _require(g.kind == "softmax", "gate.kind", g.kind, "model.arch single has no gate; leave gate.kind default")
    for key in ("importance", "load", "load_balance", "z_loss"):
        value = getattr(r, key)
        _require(value >= 0, f"regularizer.{key}", value, "must be >= 0")
    _require(r.load == 0 or g.kind == "noisy_topk", "regularizer.load", r.load,
             "the load loss uses the noisy top-k gate's smooth load estimate; set gate.kind noisy_topk "
             "(or use regularizer.load_balance)")
    ss = r.sample_similarity
    _require(ss.beta_s >= 0, "regularizer.sample_similarity.beta_s", ss.beta_s, "must be >= 0")
    _require(ss.beta_d >= 0, "regularizer.sample_similarity.beta_d", ss.beta_d, "must be >= 0")
    _require(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _require(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "must be >= 1")
    _require(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _require(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", t.grad_clip, "must be > 0 (or null = off)")
    _require(t.accum_steps >= 1, "train.accum_steps", t.accum_steps, "must be >= 1")
    _require(t.batch_size % t.accum_steps == 0, "train.accum_steps", t.accum_steps,
             f"must divide train.batch_size ({t.batch_size}) into equal micro-batches")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be >= 1 (or null)")
    _require(t.tokens is None or t.tokens >= 1, "train.tokens", t.tokens, "must be >= 1 (or null)")
    _require(t.max_steps is None or t.tokens is None, "train.tokens", t.tokens,
             f"give train.max_steps ({t.max_steps}) or train.tokens, not both")
    _require(t.eval_every >= 1, "train.eval_every", t.eval_every, "must be >= 1")
    device = None
    if t.precision == "bf16" and (s.num_workers == 0 or not s.use_gpu):  # GPU workers check their own (train_fn)
        from raymoe.runtime import pick_device

        device = pick_device(t.device)
    check_on_this_machine(cfg, device)
    if t.distill_from is not None:
        _require(m.arch == "moe" and g.kind == "softmax", "train.distill_from", t.distill_from,
                 "distillation trains a new original gate: needs model.arch moe and gate.kind softmax")
    _require(s.num_workers >= 0, "scaling.num_workers", s.num_workers, "must be >= 0")
    _require(s.expert_parallel >= 1, "scaling.expert_parallel", s.expert_parallel, "must be >= 1")
    _require(s.max_failures >= -1, "scaling.max_failures", s.max_failures, "must be >= -1 (-1 = unlimited)")
    _require(s.cpus_per_worker > 0, "scaling.cpus_per_worker", s.cpus_per_worker, "must be > 0")
    if s.gpus_per_worker is not None:
        _require(s.use_gpu, "scaling.gpus_per_worker", s.gpus_per_worker, "needs scaling.use_gpu: true")
        _require(0 < s.gpus_per_worker <= 1 or float(s.gpus_per_worker).is_integer(), "scaling.gpus_per_worker",
                 s.gpus_per_worker, "must be a fraction in (0, 1] or a whole number")
    if s.num_workers > 1:  # each rank takes a slice of every global batch (raymoe.data.batches)
        _require(t.batch_size >= s.num_workers, "train.batch_size", t.batch_size,
                 f"must be >= scaling.num_workers ({s.num_workers}): each worker gets a slice of every batch")
    if s.expert_parallel > 1:
        _require(m.arch != "single", "scaling.expert_parallel", s.expert_parallel, "the single model has no experts")
        _require(s.num_workers >= s.expert_parallel, "scaling.expert_parallel", s.expert_parallel,
                 f"needs at least that many workers (scaling.num_workers = {s.num_workers})")
        _require(s.num_workers % s.expert_parallel == 0, "scaling.expert_parallel", s.expert_parallel,
                 f"must divide scaling.num_workers ({s.num_workers})")
        _require(m.num_experts % s.expert_parallel == 0, "scaling.expert_parallel", s.expert_parallel,
                 f"must divide model.num_experts ({m.num_experts}) so each rank owns "
                 f"num_experts / expert_parallel experts")
    _require(cfg.tracking.system_metrics_s is None or 0.1 <= cfg.tracking.system_metrics_s <= 3600,
             "tracking.system_metrics_s", cfg.tracking.system_metrics_s, "must be in [0.1, 3600] seconds, or null")
    _require(bool(cfg.tracking.experiment.strip()), "tracking.experiment", cfg.tracking.experiment,
             "must not be empty")
    _require(cfg.tracking.uri.startswith(("sqlite:///", "http://", "https://", "databricks", "postgresql", "mysql")),
             "tracking.uri", cfg.tracking.uri,
             "use sqlite:///mlflow.db or a tracking server URL (MLflow >= 3.13 refuses ./mlruns file stores)")
    return cfg


def _check_language_model(cfg: ExperimentConfig) -> None:
    """model.gpt, the causal-routing rules and data.text for model.arch gpt / gpt_moe."""
    m, g, d, gpt = cfg.model, cfg.gate, cfg.data, cfg.model.gpt
    _require(d.name == "text", "model.arch", m.arch,
             f"is a language model and trains on text; set data.name text (got {d.name})")
    for key in ("dim", "depth", "heads", "mlp_dim", "moe_every", "block_size"):
        _require(getattr(gpt, key) >= 1, f"model.gpt.{key}", getattr(gpt, key), "must be >= 1")
    _require(gpt.dim % gpt.heads == 0, "model.gpt.dim", gpt.dim, f"must be divisible by heads ({gpt.heads})")
    _require(gpt.positions != "rope" or (gpt.dim // gpt.heads) % 2 == 0, "model.gpt.positions", gpt.positions,
             f"rotary positions need an even head dim; dim / heads = {gpt.dim // gpt.heads}")
    _require(gpt.moe_every <= gpt.depth, "model.gpt.moe_every", gpt.moe_every,
             f"must be <= model.gpt.depth ({gpt.depth}) so at least one block is a MoE layer")
    _require(gpt.num_shared_experts >= 0, "model.gpt.num_shared_experts", gpt.num_shared_experts, "must be >= 0")
    _require(0 <= gpt.dropout < 1, "model.gpt.dropout", gpt.dropout, "must be in [0, 1)")
    _require(gpt.vocab_size is None or gpt.vocab_size >= 1, "model.gpt.vocab_size", gpt.vocab_size,
             "must be >= 1 (or null for the data's vocabulary)")
    # a token's output must never depend on later tokens (raymoe/models/gpt.py)
    _require(g.kind != "expert_choice", "gate.kind", g.kind,
             "expert choice looks at all tokens of the batch, so it would leak future tokens in a causal model "
             "(model.arch gpt / gpt_moe)")
    _require(g.capacity_factor is None, "gate.capacity_factor", g.capacity_factor,
             "capacity dropping ranks tokens across the batch (first choices of later tokens before second choices "
             "of earlier ones), so it would leak future tokens in a causal model; use null (dropless)")
    _require(cfg.train.max_steps is not None or cfg.train.tokens is not None, "train.max_steps", None,
             "a language model trains for a step budget: set train.max_steps or train.tokens")
    data_vocab = _check_text_data(cfg)
    if gpt.vocab_size is not None:
        _require(gpt.vocab_size >= data_vocab, "model.gpt.vocab_size", gpt.vocab_size,
                 f"smaller than the data's vocabulary ({data_vocab} ids); the embedding must hold every id")


def _check_text_data(cfg: ExperimentConfig) -> int:
    """data.text against model.gpt and the files it names; returns the most ids the data can hold (byte: 256,
    bpe: data.text.vocab_size, bin: meta.json's vocab_size)."""
    from raymoe.data.text import shards
    from raymoe.data.text.sources import corpus_folder, text_files
    from raymoe.data.text.tokenizers import tokenizer_vocab

    d, t, gpt = cfg.data, cfg.data.text, cfg.model.gpt
    _require(t.block_size >= 1, "data.text.block_size", t.block_size, "must be >= 1")
    _require(t.block_size <= gpt.block_size, "data.text.block_size", t.block_size,
             f"must be <= model.gpt.block_size ({gpt.block_size}), the longest context the model holds")
    _require(t.val_tokens >= t.block_size, "data.text.val_tokens", t.val_tokens,
             f"must be >= data.text.block_size ({t.block_size}): the validation subset holds whole windows")
    for key in ("train_limit", "test_limit"):  # in tokens for text
        value = getattr(d, key)
        _require(value is None or value > t.block_size, f"data.{key}", value,
                 f"text: first N tokens; must be > data.text.block_size ({t.block_size}) to hold one window")
    _require(not d.augment, "data.augment", d.augment, "image augmentation; not defined for text")
    _require(256 <= t.vocab_size < 2 ** 31, "data.text.vocab_size", t.vocab_size,
             "must be >= 256 (the byte alphabet every BPE starts from) and < 2^31")
    if t.source != "hf":
        for key in ("hf_name", "hf_config"):
            _require(getattr(t, key) is None, f"data.text.{key}", getattr(t, key),
                     f"only used by data.text.source hf (source is {t.source})")
    if t.source == "corpus":
        from raymoe.data.text.corpus import FORTUNES_PACKAGE, fortune_files

        folder = corpus_folder(t)
        _require(bool(fortune_files(folder)), "data.text.path", str(folder),
                 f"no fortune files there; install Debian's corpus (apt-get install {FORTUNES_PACKAGE}) "
                 "or point data.text.path at a folder of fortune files")
    elif t.source == "file":
        _require(t.path is not None, "data.text.path", t.path, "required for data.text.source file")
        _require(bool(text_files(Path(t.path).expanduser())), "data.text.path", t.path,
                 "no such file, or a folder without .txt files")
    elif t.source == "bin":
        _require(t.path is not None, "data.text.path", t.path,
                 "required for data.text.source bin: a folder of train.bin, val.bin, meta.json")
        folder = Path(t.path).expanduser()
        _require(folder.is_dir(), "data.text.path", t.path, "no such folder")
        meta = shards.read_meta(folder)
        shards.check_shards(folder, meta)
        return meta.vocab_size
    else:
        _require(bool(t.hf_name), "data.text.hf_name", t.hf_name, "required for data.text.source hf")
        _require(bool(t.hf_text_field), "data.text.hf_text_field", t.hf_text_field, "must not be empty")
        _require(t.path is None or Path(t.path).expanduser().exists(), "data.text.path", t.path,
                 "no such file or folder (hf: the builder's data_files / data_dir)")
    return tokenizer_vocab(t)


def check_on_this_machine(cfg: ExperimentConfig, device) -> None:
    """The checks that depend on the machine (its device, its files): made by check_experiment where the config is
    read, and again by train_fn on each worker, which may run on another node. device None: bf16 not checked."""
    t = cfg.train
    if t.precision == "bf16" and device is not None:
        from raymoe.runtime import bf16_supported

        _require(bf16_supported(device), "train.precision", t.precision,
                 f"this machine's {device} has no bf16 arithmetic (AVX512-BF16/AMX on CPU, or a GPU that supports "
                 f"it); use fp32")
    if t.distill_from is not None:
        _require(Path(t.distill_from).exists(), "train.distill_from", t.distill_from,
                 "checkpoint not found on this machine")


def load_experiment(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] = (),
                    raw: dict | None = None) -> ExperimentConfig:
    """Read, override, convert and check an experiment config."""
    data = read_yaml(path) if raw is None else copy.deepcopy(raw)
    data = apply_overrides(data, overrides or [])
    return check_experiment(from_dict(ExperimentConfig, data))

"""The config loader: strict types, unknown keys, overrides, base inheritance, cross-field rules."""

from __future__ import annotations

import pytest

from raymoe.config.load import apply_overrides, flatten, load_experiment, parse_override, read_yaml
from raymoe.errors import ConfigError
from raymoe.train.identity import run_name


def _load(raw, overrides=()):
    return load_experiment(raw={"name": "t", **raw}, overrides=list(overrides))


def test_defaults_and_nested_values():
    cfg = _load({"gate": {"kind": "topk", "top_k": 2}, "train": {"lr": "1e-3"}})
    assert cfg.gate.top_k == 2 and cfg.gate.kind == "topk"
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string; floats accept it
    assert cfg.model.num_experts == 5


@pytest.mark.parametrize(
    "raw, path",
    [
        ({"bogus": 1}, "bogus"),
        ({"gate": {"topk": 2}}, "gate.topk"),
        ({"train": {"epochs": 2.5}}, "train.epochs"),
        ({"train": {"epochs": True}}, "train.epochs"),
        ({"gate": {"kind": "dense"}}, "gate.kind"),
        ({"gate": {"top_k": 6}}, "gate.top_k"),
        ({"train": {"lr": -1.0}}, "train.lr"),
        ({"model": {"num_experts": 0}}, "model.num_experts"),
        ({"data": {"name": "imagenet"}}, "data.name"),
        ({"scaling": {"num_workers": 2, "expert_parallel": 2}, "model": {"num_experts": 5}}, "scaling.expert_parallel"),
        ({"tracking": {"uri": "./mlruns"}}, "tracking.uri"),
        ({"train": {"distill_from": "/no/such/ckpt"}}, "train.distill_from"),
        ({"gate": "softmax"}, "gate"),
    ],
)
def test_bad_values_name_the_field(raw, path):
    with pytest.raises(ConfigError) as info:
        _load(raw)
    assert info.value.path == path
    assert path in str(info.value)


def test_missing_name_is_required():
    with pytest.raises(ConfigError, match="name"):
        load_experiment(raw={})


def test_overrides_are_type_checked_and_paths_must_exist():
    cfg = _load({}, ["train.epochs=3", "gate.kind=attentive", "data.train_limit=100", "data.root=null"])
    assert (cfg.train.epochs, cfg.gate.kind, cfg.data.train_limit, cfg.data.root) == (3, "attentive", 100, None)
    with pytest.raises(ConfigError) as info:
        _load({}, ["train.epoch=3"])
    assert info.value.path == "train.epoch"
    with pytest.raises(ConfigError) as info:
        _load({}, ["train.epochs=three"])
    assert info.value.path == "train.epochs"
    with pytest.raises(ConfigError):
        parse_override("train.epochs")


def test_base_inheritance_deep_merges(tmp_path):
    (tmp_path / "_base.yaml").write_text("name: base\ntrain:\n  epochs: 20\n  lr: 0.001\ngate:\n  kind: softmax\n")
    (tmp_path / "child.yaml").write_text("base: _base.yaml\nname: child\ntrain:\n  epochs: 3\n")
    raw = read_yaml(tmp_path / "child.yaml")
    assert raw == {"name": "child", "train": {"epochs": 3, "lr": 0.001}, "gate": {"kind": "softmax"}}


def test_unparseable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="file not found"):
        read_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(tmp_path / "list.yaml")


def test_apply_overrides_does_not_mutate_input():
    raw = {"name": "x", "train": {"epochs": 1}}
    out = apply_overrides(raw, {"train.epochs": 4})
    assert raw["train"]["epochs"] == 1 and out["train"]["epochs"] == 4


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_run_name_is_stable_and_ignores_epochs_and_tracking():
    a = _load({"train": {"epochs": 2}})
    b = _load({"train": {"epochs": 7}, "tracking": {"experiment": "other"}})
    c = _load({"seed": 3})
    assert run_name(a) == run_name(b)
    assert run_name(a) != run_name(c)
    assert run_name(a).startswith("t-")

"""Malformed experiments through the real CLI (`raymoe train`): exit code 2, one stderr line naming the field
path and the bad value, and nothing started: no MLflow store, run or experiment, no checkpoints."""

from __future__ import annotations

import sqlite3

import pytest
import yaml

from raymoe.cli import main

GOOD = {"name": "bad-input", "data": {"name": "fashion_mnist", "train_limit": 64, "test_limit": 64},
        "train": {"epochs": 1, "batch_size": 32, "progress": False}}


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# (id, YAML content: a dict merged onto GOOD or raw text, --set overrides, field path expected, bad value expected)
CASES = [
    ("unknown-top-key", {"bogus": 1}, [], "bogus", "1"),
    ("unknown-nested-key", {"gate": {"topk": 2}}, [], "gate.topk", "2"),
    ("unknown-deep-key", {"regularizer": {"sample_similarity": {"beta": 1.0}}}, [],
     "regularizer.sample_similarity.beta", "1.0"),
    ("wrong-type-int", {"train": {"epochs": "ten"}}, [], "train.epochs", "'ten'"),
    ("wrong-type-float-for-int", {"train": {"batch_size": 12.5}}, [], "train.batch_size", "12.5"),
    ("wrong-type-bool", {"train": {"progress": "yes"}}, [], "train.progress", "'yes'"),
    ("section-not-mapping", {"gate": "softmax"}, [], "gate", "'softmax'"),
    ("top-k-above-experts", {"gate": {"kind": "topk", "top_k": 6}}, [], "gate.top_k", "6"),
    ("negative-lr", {"train": {"lr": -0.1}}, [], "train.lr", "-0.1"),
    ("zero-experts", {"model": {"num_experts": 0}}, [], "model.num_experts", "0"),
    ("unknown-dataset", {"data": {"name": "imagenet"}}, [], "data.name", "'imagenet'"),
    ("unknown-gate", {"gate": {"kind": "dense"}}, [], "gate.kind", "'dense'"),
    ("ep-not-dividing-experts", {"scaling": {"num_workers": 2, "expert_parallel": 2}}, [],
     "scaling.expert_parallel", "2"),
    ("missing-distill-checkpoint", {"train": {"distill_from": "no/such/checkpoint"}}, [],
     "train.distill_from", "no/such/checkpoint"),
    ("capacity-factor-zero", {"model": {"arch": "vit_moe"}, "gate": {"kind": "topk", "capacity_factor": 0.0}}, [],
     "gate.capacity_factor", "0.0"),
    ("file-store-uri", {"tracking": {"uri": "./mlruns"}}, [], "tracking.uri", "./mlruns"),
    ("train-limit-zero", {"data": {"train_limit": 0}}, [], "data.train_limit", "0"),
    ("bad-device", {"train": {"device": "tpu"}}, [], "train.device", "'tpu'"),
    ("yaml-does-not-parse", "name: x\ntrain: {epochs: 2\n", [], "config", "not valid YAML"),
    ("yaml-not-a-mapping", "- name: x\n- seed: 1\n", [], "config", "must hold a mapping"),
    ("set-unknown-path", {}, ["train.epoch=3"], "train.epoch", "unknown key"),
    ("set-bad-type", {}, ["train.batch_size=big"], "train.batch_size", "'big'"),
    ("set-without-equals", {}, ["train.epochs"], "--set", "'train.epochs'"),
    ("set-negative-seed", {}, ["seed=-4"], "seed", "-4"),
]


def _assert_nothing_started(root) -> None:
    db = root / "mlflow.db"
    if db.exists():  # tolerated only if empty of experiments/runs
        with sqlite3.connect(db) as con:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            if "runs" in tables:
                assert con.execute("select count(*) from runs").fetchone()[0] == 0
            if "experiments" in tables:
                names = {r[0] for r in con.execute("select name from experiments")}
                assert names <= {"Default"}
    assert not (root / "mlruns").exists()
    assert not (root / "checkpoints").exists()


@pytest.mark.parametrize("case_id, content, overrides, path, value", CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_2_naming_field_and_value(tmp_path, monkeypatch, capsys, case_id, content, overrides,
                                                   path, value):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "experiment.yaml"
    config.write_text(content if isinstance(content, str) else yaml.safe_dump(_merge(GOOD, content)))
    argv = ["train", str(config)] + [a for o in overrides for a in ("--set", o)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one clear message, no traceback
    assert path in lines[0] and value in lines[0], lines[0]
    _assert_nothing_started(tmp_path)


def test_missing_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "does/not/exist.yaml"])
    err = capsys.readouterr().err
    assert code == 2
    assert "config" in err and "does/not/exist.yaml" in err and "file not found" in err
    _assert_nothing_started(tmp_path)


def test_missing_data_is_bad_input(tmp_path, monkeypatch, capsys):
    """No copy under data.root, no system copy (MNIST has no Debian package here), download off."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(_merge(GOOD, {"data": {"name": "mnist", "root": str(tmp_path / "empty"),
                                                            "download": False}})))
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "data" in err and "empty" in err
    _assert_nothing_started(tmp_path)


def test_errors_survive_pickling_between_ray_processes():
    """Ray ships a trial's exception to the driver by pickle: the field path, value and message must survive."""
    import pickle

    from raymoe.data.sources import DataError
    from raymoe.errors import ConfigError

    for err in (ConfigError("gate.top_k", 3, "must be <= model.num_experts (2)"), DataError("mnist", "not found")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and (back.path, back.value, str(back)) == (err.path, err.value, str(err))

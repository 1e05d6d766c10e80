"""Bad input never reaches Ray, torch or MLflow (docs/reliability.md).

Hypothesis mutates the shipped presets and sweep files (rename, retype, out-of-range numbers, a duplicated key,
bytes that are not UTF-8, base chains that loop) and runs the real CLI in-process on each example, in an empty
working directory. Every example must: exit 2, print one line on stderr that names the mutated field, print no
traceback, start no Ray, and leave no MLflow store, ray_results/ or checkpoints/ behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raymoe.cli import main
from raymoe.config.load import flatten, load_experiment, to_dict
from raymoe.config.schema import ExperimentConfig
from raymoe.tune.sweep_schema import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
PRESETS = [ROOT / "tune_configs" / "paper" / "fmnist" / "attentive_ls.yaml",
           ROOT / "tune_configs" / "vit" / "fmnist_hypermoe.yaml"]
SWEEP = ROOT / "tune_configs" / "sweeps" / "demo_fmnist.yaml"
OUTPUTS = ("ray_results", "checkpoints", "mlflow.db", "reports")
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _leaf_type(cls: type, dotted: str) -> Any:
    """The schema type of a dotted path (Optional unwrapped), or None when it is not a plain leaf."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = get_type_hints(tp).get(part)
        if tp is None:
            return None
        if get_origin(tp) in (Union, types.UnionType):
            options = [a for a in get_args(tp) if a is not type(None)]
            tp = options[0] if len(options) == 1 else tp
    return tp


def _bad_value(tp: Any) -> Any:
    """A value of the wrong kind for a leaf of type tp (never converted into a valid one)."""
    if tp is bool:
        return 3
    if tp in (int, float):
        return "seven"
    if tp is str:
        return [1, 2]
    if get_origin(tp) is Literal:
        return "no-such-choice"
    if get_origin(tp) in (Union, types.UnionType):  # int | list[int] and the like
        return "seven"
    if get_origin(tp) in (list, typing.List):
        return {"a": 1}
    return None


def _leaves(raw: dict, cls: type) -> list[tuple[str, Any]]:
    """(dotted path, schema type) of every plain leaf of a config mapping whose wrong values we can name."""
    out = []
    for path in flatten(raw):
        tp = _leaf_type(cls, path)
        if tp is not None and tp is not Any and _bad_value(tp) is not None:
            out.append((path, tp))
    return out


def _set(raw: dict, dotted: str, value: Any) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return raw


def _rename(raw: dict, dotted: str) -> tuple[dict, str]:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[f"{last}_x"] = node.pop(last)
    return raw, ".".join([*parents, f"{last}_x"])


@st.composite
def mutations(draw, raw: dict, cls: type, prefix: str = "") -> tuple[bytes, str]:
    """(file bytes, text the error line must hold) for one invalid mutation of a valid mapping `raw`."""
    import copy

    raw = copy.deepcopy(raw)
    kind = draw(st.sampled_from(["rename", "retype", "huge", "duplicate", "encoding"]))
    leaves = _leaves(raw, cls)
    if kind == "rename":
        path, _ = draw(st.sampled_from(leaves))
        raw, renamed = _rename(raw, path)
        return yaml.safe_dump(raw, sort_keys=False).encode(), prefix + renamed
    if kind == "retype":
        path, tp = draw(st.sampled_from(leaves))
        return yaml.safe_dump(_set(raw, path, _bad_value(tp)), sort_keys=False).encode(), prefix + path
    if kind == "huge":
        numeric = [(p, tp) for p, tp in leaves if tp in (int, float)]
        path, tp = draw(st.sampled_from(numeric))
        digits = draw(st.integers(320, 420))  # beyond both int64 and the float range
        value = 10 ** digits * draw(st.sampled_from([1, -1]))
        return yaml.safe_dump(_set(raw, path, value), sort_keys=False).encode(), prefix + path
    if kind == "duplicate":
        key = draw(st.sampled_from([k for k, v in raw.items() if isinstance(v, dict)]))
        text = yaml.safe_dump(raw, sort_keys=False) + yaml.safe_dump({key: raw[key]}, sort_keys=False)
        return text.encode(), f"'{key}' appears twice"
    data = yaml.safe_dump(raw, sort_keys=False).encode()
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82"])) + data[at:], "not UTF-8"


def _run_cli(args: list[str], cwd: Path) -> tuple[int, str]:
    err = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
    finally:
        os.chdir(old)
    return code, err.getvalue()


def _assert_refused(code: int, err: str, expected: str, cwd: Path) -> None:
    import ray

    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], (expected, lines[0])
    assert not ray.is_initialized()
    assert not [name for name in OUTPUTS if (cwd / name).exists()], sorted(p.name for p in cwd.iterdir())


def _preset_raw(path: Path) -> dict:
    """The preset, resolved, pointed at a data set this machine does not hold: were a mutation ever accepted, the
    run would stop at the data check (another message, so the test fails) instead of training for minutes."""
    raw = to_dict(load_experiment(path))
    raw["data"].update(name="mnist", root="/nonexistent/raymoe-test", download=False)
    return raw


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_mutated_experiments_exit_2_naming_the_field(preset, tmp_path_factory):
    raw = _preset_raw(preset)

    @SETTINGS
    @given(mutations(raw, ExperimentConfig))
    def check(example):
        data, expected = example
        cwd = tmp_path_factory.mktemp("train")
        (cwd / "exp.yaml").write_bytes(data)
        code, err = _run_cli(["train", "exp.yaml"], cwd)
        _assert_refused(code, err, expected, cwd)

    check()


def test_mutated_sweeps_exit_2_naming_the_field(tmp_path_factory):
    sweep = yaml.safe_load(SWEEP.read_text())
    sweep["base"]["data"].update(name="mnist", root="/nonexistent/raymoe-test", download=False)  # as above
    # optional sections, so mutations reach paths inside them (scheduler.asha.grace_period, stop_on.after)
    sweep["scheduler"] = {"asha": {"grace_period": 1, "reduction_factor": 2.0}}
    sweep["stop_on"] = {"metric": "dead_expert_frac", "above": 0.5, "after": 3}
    sweep.pop("space")  # kept valid below: the mutations cover the sweep's own fields and its base experiment
    space = yaml.safe_load(SWEEP.read_text())["space"]

    @SETTINGS
    @given(mutations(sweep, SweepConfig))
    def check(example):
        data, expected = example
        cwd = tmp_path_factory.mktemp("tune")
        text = data + b"\n" + yaml.safe_dump({"space": space}).encode()
        (cwd / "sweep.yaml").write_bytes(text)
        code, err = _run_cli(["tune", "sweep.yaml", "--storage", str(cwd / "ray_results")], cwd)
        _assert_refused(code, err, expected, cwd)

    check()


@st.composite
def environments(draw) -> tuple[dict[str, str], list[str], str]:
    """(files to write, extra command-line arguments, text the error line must hold) for the classes that live
    outside one file: base chains that loop (1-4 files, any entry point), outputs blocked by a file, and command
    values."""
    kind = draw(st.sampled_from(["cycle", "blocked", "cli"]))
    exp = yaml.safe_dump({"name": "g", "data": {"name": "mnist", "root": "/nonexistent/raymoe-test",
                                                "download": False}})
    if kind == "cycle":
        n = draw(st.integers(1, 4))
        names = [f"c{i}.yaml" for i in range(n)]
        files = {name: f"base: {names[(i + 1) % n]}\n" for i, name in enumerate(names)}
        files["exp.yaml"] = f"base: {draw(st.sampled_from(names))}\n" + exp
        return files, [], "the base chain loops"
    if kind == "blocked":  # a data set this machine holds, tiny: only the output check can refuse the run
        setting, value = draw(st.sampled_from([("train.checkpoint_dir", "blocker/ckpt"),
                                               ("tracking.uri", "sqlite:///blocker/sub/mlflow.db")]))
        real = yaml.safe_dump({"name": "g", "data": {"name": "fashion_mnist", "train_limit": 64, "test_limit": 64},
                               "train": {"epochs": 1}})
        return {"exp.yaml": real, "blocker": "a file\n"}, ["--set", f"{setting}={value}"], "blocker"
    value = draw(st.sampled_from(["-1", "0", str(10 ** 25)]))
    sweep = yaml.safe_load(SWEEP.read_text())
    return {"sweep.yaml": yaml.safe_dump(sweep)}, ["--max-concurrent", value], "--max-concurrent"


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian's Fashion-MNIST missing")
def test_generated_cycles_blocked_outputs_and_command_values(tmp_path_factory):
    @SETTINGS
    @given(environments())
    def check(example):
        files, extra, expected = example
        cwd = tmp_path_factory.mktemp("env")
        for name, text in files.items():
            (cwd / name).write_text(text)
        command = ["tune", "sweep.yaml"] if "sweep.yaml" in files else ["train", "exp.yaml"]
        code, err = _run_cli(command + extra, cwd)
        _assert_refused(code, err, expected, cwd)

    check()


@pytest.mark.parametrize("files, expected", [
    ({"a.yaml": "base: a.yaml\nname: a\n"}, "a.yaml -> a.yaml"),
    ({"a.yaml": "base: b.yaml\nname: a\n", "b.yaml": "base: a.yaml\n"}, "a.yaml -> b.yaml -> a.yaml"),
    ({"a.yaml": "base: b.yaml\nname: a\n", "b.yaml": "base: c.yaml\n", "c.yaml": "base: b.yaml\n"},
     "b.yaml -> c.yaml -> b.yaml"),
    ({"a.yaml": "base: sub/b.yaml\nname: a\n", "sub/b.yaml": "base: ../a.yaml\n"}, "a.yaml -> b.yaml -> a.yaml"),
])
def test_base_cycles_are_named(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    code, err = _run_cli(["train", "a.yaml"], tmp_path)
    _assert_refused(code, err, expected, tmp_path)
    assert "base" in err


def _fill(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file where a folder must be\n")


@pytest.mark.parametrize("blocker, sets, expected", [
    ("ckpt", ["train.checkpoint_dir=ckpt/run"], "train.checkpoint_dir"),
    ("store", ["tracking.uri=sqlite:///store/mlflow.db"], "tracking.uri"),
    ("db_folder", ["tracking.uri=sqlite:///db_folder"], "tracking.uri"),
    ("rr", ["scaling.num_workers=1", "scaling.storage_path=rr/runs"], "scaling.storage_path"),
])
def test_unwritable_outputs_are_refused_before_training(tmp_path, tiny_fmnist_root, blocker, sets, expected):
    """A file where the run's checkpoint folder, Ray storage or MLflow store must go: exit 2 before any training
    (the data set is found, so only the output check can refuse it)."""
    if blocker == "db_folder":
        (tmp_path / blocker).mkdir()  # the sqlite file's path is a folder
    else:
        _fill(tmp_path / blocker)
    exp = {"name": "out", "data": {"name": "fashion_mnist", "root": str(tiny_fmnist_root), "download": False},
           "model": {"num_experts": 2}, "train": {"epochs": 1}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    args = ["train", "exp.yaml"] + [a for s in sets for a in ("--set", s)]
    code, err = _run_cli(args, tmp_path)
    _assert_refused(code, err, expected, tmp_path)


@pytest.mark.parametrize("value", ["-1", "0", str(10 ** 30)])
def test_max_concurrent_from_the_command_line_is_checked_like_the_file(tmp_path, value):
    sweep = yaml.safe_load(SWEEP.read_text())
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    code, err = _run_cli(["tune", "sweep.yaml", "--max-concurrent", value], tmp_path)
    _assert_refused(code, err, "--max-concurrent", tmp_path)


def test_nested_optional_sections_keep_the_full_path(tmp_path):
    sweep = yaml.safe_load(SWEEP.read_text())
    sweep["scheduler"] = {"asha": {"grace": 1}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    code, err = _run_cli(["tune", "sweep.yaml"], tmp_path)
    _assert_refused(code, err, "scheduler.asha.grace", tmp_path)
    assert "grace_period" in err  # the allowed keys of the inner mapping


def test_corrupt_sweep_state_is_refused_on_resume(tmp_path):
    """A truncated Tune pickle in the sweep folder: --resume says which file and what to do; nothing unpickled."""
    import pickle

    sweep = yaml.safe_load(SWEEP.read_text())
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    folder = tmp_path / "sweeps" / "demo_fmnist"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"state": list(range(100))})[:-7])
    code, err = _run_cli(["tune", "sweep.yaml", "--resume", "--storage", str(tmp_path / "sweeps")], tmp_path)
    assert code == 2 and "tuner.pkl is corrupt or truncated" in err and "--name" in err, err


def test_commands_opening_one_new_store_at_once_all_succeed(tmp_path):
    """Three processes open the same new sqlite store at once (two `raymoe train` started together): without the
    lock, MLflow's migrations raced and left the store broken ("table _alembic_tmp_tags already exists")."""
    import subprocess
    import sys

    code = ("import sys; from raymoe.tracking.store_check import tracking_problem; "
            f"print(tracking_problem('sqlite:///{tmp_path}/mlflow.db'))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for _ in range(3)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["None"] * 3

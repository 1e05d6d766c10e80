"""Sweep files: valid ones load, malformed ones name the field path, the define-by-run space honours its
conditions (sampled offline with Optuna, no Ray), seeds repeat points, and the paper grids expand exactly."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from raymoe.cli import main as cli_main
from raymoe.errors import ConfigError
from raymoe.tune.points import DefineByRun
from raymoe.tune.sweep_load import load_sweep

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "gate.kind": {"type": "categorical", "choices": ["softmax", "attentive", "topk", "noisy_topk"]},
    "gate.top_k": {"type": "int", "low": 1, "high": 3, "when": {"gate.kind": ["topk", "noisy_topk"]}},
    "reg": {"type": "categorical", "choices": ["none", "importance", "sample_similarity"], "apply": False},
    "regularizer.importance": {"type": "float", "low": 0.2, "high": 1.0, "when": {"reg": "importance"}},
    "regularizer.sample_similarity.beta_s": {"type": "loguniform", "low": 1e-7, "high": 1e-5,
                                             "when": {"reg": "sample_similarity"}},
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "train.batch_size": {"type": "int", "low": 64, "high": 256, "step": 64},
}


def _sweep(**changes) -> dict:
    raw = {"name": "s", "base": {"name": "b", "train": {"epochs": 2}}, "space": dict(SPACE),
           "metric": "val_error", "mode": "min", "num_samples": 4}
    raw.update(changes)
    return raw


def _write(tmp_path: Path, raw: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["fmnist_gates", "demo_fmnist", "vit_routers"])
def test_shipped_sweep_files_load(name):
    sweep = load_sweep(ROOT / "tune_configs" / "sweeps" / f"{name}.yaml")
    assert sweep.name == name and sweep.num_trials >= 6 and sweep.space


def test_base_as_relative_path_and_overrides(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "e.yaml").write_text("name: e\ntrain:\n  epochs: 7\n  lr: 0.01\n")
    raw = _sweep(base="exp/e.yaml", overrides={"train.epochs": 3}, seeds=[3, 5])
    sweep = load_sweep(_write(tmp_path, raw), overrides=["data.train_limit=100"])
    assert sweep.base.train.epochs == 3 and sweep.base.train.lr == 0.01
    assert sweep.base.data.train_limit == 100
    assert sweep.base.scaling.num_workers == 1  # resources.num_workers default: every trial is a Train run
    assert sweep.num_trials == 4 * 2


def test_test_objective_only_when_asked():
    assert load_sweep(raw=_sweep(metric="test_error", allow_test_objective=True)).config.metrics == ["test_error"]
    assert load_sweep(raw=_sweep()).config.metrics == ["val_error"]


@pytest.mark.parametrize(
    "changes, path",
    [
        ({"spaces": {}}, "spaces"),                                                   # unknown top-level key
        ({"space": {}}, "space"),                                                     # empty space
        ({"space": {"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "space.train.lr.high"),  # low > high
        ({"space": {"gate.kind": {"type": "categorical", "choices": []}}}, "space.gate.kind.choices"),
        ({"space": {"gate.kindd": {"type": "categorical", "choices": ["softmax"]}}}, "space.gate.kindd"),
        ({"space": {"gate.kind": {"type": "categorical", "choices": ["softmax", "dense"]}}}, "space.gate.kind"),
        ({"space": {"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}}, "space.train.lr.low"),
        ({"space": {"train.lr": {"type": "float", "lo": 0.0, "high": 0.1}}}, "space.train.lr.lo"),
        ({"space": {"gate.top_k": {"type": "int", "low": 1, "high": 9}}}, "space.gate.top_k"),  # > num_experts
        ({"space": {"train.epochs": {"type": "int", "low": 1.5, "high": 3}}}, "space.train.epochs.low"),
        ({"space": {"gate.top_k": {"type": "int", "low": 1, "high": 2, "when": {"gate.knd": "topk"}}}},
         "space.gate.top_k.when.gate.knd"),
        ({"space": {"gate.kind": {"type": "categorical", "choices": ["topk"]},
                    "gate.top_k": {"type": "int", "low": 1, "high": 2, "when": {"gate.kind": "softmax"}}}},
         "space.gate.top_k.when.gate.kind"),                                           # condition can never hold
        ({"metric": "accuracy"}, "metric"),
        ({"metric": "test_error"}, "metric"),                                          # selects on the test set
        ({"stop_on": {"metric": "dead_expert_frac", "above": 2}}, "stop_on.above"),    # never fires
        ({"stop_on": {"metric": "nope", "above": 0.5}}, "stop_on.metric"),
        ({"stop_on": {"above": 0.5, "below": 0.1}}, "stop_on"),
        ({"stop_on": {"above": 0.5, "after": 0}}, "stop_on.after"),
        ({"stop_on": {"above": 0.5, "aftr": 2}}, "stop_on.aftr"),
        ({"metric": ["val_error", "test_loss"], "mode": ["min", "min"]}, "metric"),
        ({"base": {"name": "b", "data": {"val_fraction": None}}}, "metric"),           # val_error without a val split
        ({"base": {"name": "b", "data": {"val_fraction": 0.6}}}, "base.data.val_fraction"),
        ({"base": {"name": "b", "data": {"val_fraction": 0}}}, "base.data.val_fraction"),
        ({"metric": ["val_error", "mi_pred_bits"], "mode": "min"}, "mode"),
        ({"metric": ["val_error", "mi_pred_bits"], "mode": ["min", "max"],
          "scheduler": {"asha": {"grace_period": 1}}}, "scheduler.asha"),
        ({"resources": {"num_workers": 0}}, "resources.num_workers"),
        ({"resources": {"gpus_per_worker": 0.5}}, "resources.gpus_per_worker"),       # without use_gpu
        ({"resources": {"num_workers": 2, "launcher": "in_trial"}}, "resources.launcher"),  # one process only
        ({"resources": {"launcher": "inline"}}, "resources.launcher"),
        ({"name": "a/b"}, "name"),
        ({"base": None}, "base"),
        ({"base": {"name": "b", "gate": {"kind": "dense"}}}, "base.gate.kind"),
        ({"overrides": {"train.epoch": 2}}, "overrides.train.epoch"),
        ({"seeds": 0}, "seeds"),
        ({"strategy": "grid"}, "space"),                                               # grid takes rows
        ({"start_points": [{"gate.kind": "dense"}]}, "start_points[0].gate.kind"),
        ({"start_points": [{"train.lr": 0.5}]}, "start_points[0].train.lr"),             # outside [low, high]
        ({"start_points": [{"train.epochs": 2}]}, "start_points[0].train.epochs"),       # not in the space
    ],
)
def test_malformed_sweeps_name_the_field(tmp_path, changes, path):
    with pytest.raises(ConfigError) as info:
        load_sweep(_write(tmp_path, _sweep(**changes)))
    assert info.value.path == path, str(info.value)
    assert path in str(info.value)


def test_cli_rejects_bad_sweep_with_exit_2_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = _write(tmp_path, _sweep(metric="acc"))
    assert cli_main(["tune", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "metric" in err and "'acc'" in err
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_unwritable_tracking_store_is_a_config_error(tmp_path, monkeypatch):
    from raymoe.tune.driver import run_sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    sweep = load_sweep(raw=_sweep(tracking={"uri": f"sqlite:///{tmp_path}/afile/mlflow.db"}))
    with pytest.raises(ConfigError) as info:
        run_sweep(sweep)
    assert info.value.path == "tracking.uri"
    assert not (tmp_path / "ray_results").exists()


def test_existing_sweep_folder_needs_resume(tmp_path, monkeypatch):
    from raymoe.tune.driver import run_sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ray_results" / "sweeps" / "s").mkdir(parents=True)
    with pytest.raises(ConfigError, match="--resume") as info:
        run_sweep(load_sweep(raw=_sweep()))
    assert info.value.path == "name"
    with pytest.raises(ConfigError) as info:
        run_sweep(load_sweep(raw=_sweep(name="other")), resume=True)
    assert info.value.path == "--resume"
    # a restorable folder whose sweep was defined differently: resuming with an edited file is refused
    folder = tmp_path / "ray_results" / "sweeps" / "s"
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"a whole": "pickle"}))
    (folder / "raymoe_sweep.json").write_text(json.dumps({"definition": load_sweep(raw=_sweep()).digest}))
    with pytest.raises(ConfigError, match="changed") as info:
        run_sweep(load_sweep(raw=_sweep(num_samples=5)), resume=True)
    assert info.value.path == "--resume"


@pytest.mark.parametrize("sampler", [optuna.samplers.RandomSampler(seed=1), optuna.samplers.TPESampler(
    seed=1, multivariate=True, group=True, n_startup_trials=10)])
def test_define_by_run_respects_conditions_and_ranges(sampler):
    sweep = load_sweep(raw=_sweep())
    space = DefineByRun(sweep.space, {})
    study = optuna.create_study(sampler=sampler)
    seen_kinds, seen_regs = set(), set()
    for i in range(150):
        trial = study.ask()
        values = space(trial)
        assert values == trial.params  # what the trial config gets is what Optuna recorded
        kind, reg = values["gate.kind"], values["reg"]
        seen_kinds.add(kind)
        seen_regs.add(reg)
        assert ("gate.top_k" in values) == (kind in ("topk", "noisy_topk"))
        assert ("regularizer.importance" in values) == (reg == "importance")
        assert ("regularizer.sample_similarity.beta_s" in values) == (reg == "sample_similarity")
        if "gate.top_k" in values:
            assert isinstance(values["gate.top_k"], int) and 1 <= values["gate.top_k"] <= 3
        if "regularizer.importance" in values:
            assert 0.2 <= values["regularizer.importance"] <= 1.0
        if "regularizer.sample_similarity.beta_s" in values:
            assert 1e-7 <= values["regularizer.sample_similarity.beta_s"] <= 1e-5
        assert 1e-4 <= values["train.lr"] <= 1e-2
        assert values["train.batch_size"] in (64, 128, 192, 256)
        study.tell(trial, (i % 7) / 7.0)
    assert seen_kinds == {"softmax", "attentive", "topk", "noisy_topk"} and len(seen_regs) == 3


def test_condition_on_a_fixed_base_value():
    raw = _sweep(base={"name": "b", "gate": {"kind": "topk"}},
                 space={"gate.top_k": {"type": "int", "low": 1, "high": 2, "when": {"gate.kind": "topk"}}})
    sweep = load_sweep(raw=raw)
    from raymoe.config.load import flatten, to_dict

    space = DefineByRun(sweep.space, flatten(to_dict(sweep.base)))
    assert "gate.top_k" in space(optuna.create_study().ask())


def test_seed_repeat_search_runs_each_point_once_per_seed_and_tells_the_mean():
    from ray.tune.search.optuna import OptunaSearch

    from raymoe.tune.searcher import SeedRepeatSearch

    sweep = load_sweep(raw=_sweep(seeds=3))
    inner = OptunaSearch(space=DefineByRun(sweep.space, {}), metric="test_error", mode="min",
                         sampler=optuna.samplers.RandomSampler(seed=0))
    search = SeedRepeatSearch(inner, [0, 1, 2], "test_error", "min")
    configs = [search.suggest(f"t{i}") for i in range(6)]
    assert [c["seed"] for c in configs] == [0, 1, 2, 0, 1, 2]
    assert [c["point"] for c in configs] == ["p0000"] * 3 + ["p0001"] * 3
    strip = [{k: v for k, v in c.items() if k not in ("seed", "point")} for c in configs]
    assert strip[0] == strip[1] == strip[2] and strip[3] == strip[4] == strip[5] and strip[0] != strip[3]
    errors = [0.1, 0.2, 0.6, 0.3, None, 0.5]  # t4 failed: the point's mean uses the seeds that finished
    for i, err in enumerate(errors):
        search.on_trial_complete(f"t{i}", result=None if err is None else {"test_error": err}, error=err is None)
    told = sorted(t.value for t in inner._ot_study.trials)
    assert told == pytest.approx([0.3, 0.4])  # (0.1+0.2+0.6)/3 and (0.3+0.5)/2


def _presets(folder: Path) -> None:
    for name, body in {
        "original.yaml": "name: original\ntrain:\n  epochs: 2\n",
        "original_importance.yaml": "name: original-importance\nregularizer:\n  importance: 0.2\n",
        "original_ls.yaml": "name: original-ls\n",
    }.items():
        (folder / name).write_text(body)


def test_grid_expands_rows_times_grid_times_seeds(tmp_path):
    _presets(tmp_path)
    raw = {"name": "g", "strategy": "grid", "seeds": 3, "rows": [
        {"method": "original.yaml"},
        {"method": "original_importance.yaml", "grid": {"regularizer.importance": [0.2, 0.4, 0.6, 0.8, 1.0]}},
        {"method": "original_ls.yaml", "grid": {"regularizer.sample_similarity.beta_s": [1e-7, 1e-6],
                                                "regularizer.sample_similarity.beta_d": [1e-7, 1e-5, 1e-3]}}]}
    sweep = load_sweep(_write(tmp_path, raw))
    assert sweep.num_trials == (1 + 5 + 2 * 3) * 3
    labels = {p.label for p in sweep.points}
    assert len(labels) == 1 + 5 + 6
    assert {p.seed for p in sweep.points} == {0, 1, 2}
    assert [p.index for p in sweep.points] == list(range(sweep.num_trials))
    assert {p.category for p in sweep.points} == {"original", "original_importance", "original_ls"}
    bad = dict(raw, rows=[{"method": "original.yaml", "grid": {"regularizer.importance": [-1.0]}}])
    with pytest.raises(ConfigError) as info:
        load_sweep(_write(tmp_path, bad, "bad.yaml"))
    assert info.value.path == "rows[0].grid.regularizer.importance"
    with pytest.raises(ConfigError) as info:
        load_sweep(_write(tmp_path, dict(raw, rows=[{"method": "nope.yaml"}]), "bad2.yaml"))
    assert info.value.path == "rows[0].method"


def test_fmnist_paper_grid_has_the_paper_row_count():
    path = ROOT / "tune_configs" / "paper" / "fmnist" / "grid.yaml"
    sweep = load_sweep(path)
    per_category = {}
    for point in sweep.points:
        per_category.setdefault(point.category, set()).add(point.label)
    seeds = len(sweep.config.seed_list)
    assert seeds == 10  # paper: 10 runs per setting for MNIST / FMNIST
    # docs/paper-notes.md §1.3 / §3: importance w in {0.2..1.0}; L_s beta_s in {1e-7, 1e-6} x beta_d in {1e-7..1e-1}
    sizes = {c: len(labels) for c, labels in per_category.items()}
    assert sorted(sizes.values()) == sorted([1, 1, 1, 5, 5, 14, 14, 1, 1])  # nine table rows, distilled included
    assert sweep.num_trials == sum(sizes.values()) * seeds
    stages = {p.category: p.stage for p in sweep.points}
    assert {c for c, s in stages.items() if s == 1} == {"distilled_attentive_importance", "distilled_attentive_ls"}
    quick = load_sweep(path, quick=True)
    assert quick.name == "paper_fmnist-quick" and quick.num_trials == 9 and {p.seed for p in quick.points} == {0}
    betas = {p.overrides.get("regularizer.sample_similarity.beta_d") for p in sweep.points} - {None}
    assert sorted(betas) == pytest.approx([10.0 ** -k for k in range(7, 0, -1)])
    weights = {p.overrides.get("regularizer.importance") for p in sweep.points} - {None}
    assert sorted(weights) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_pareto_front_by_hand():
    from raymoe.tune.plots import pareto_front

    # minimise e, maximise m: (0.1, 0.5) and (0.2, 0.9) trade off; (0.3, 0.4) is dominated by both; (0.1, 0.3) by
    # (0.1, 0.5) (same error, less information); (0.05, 0.1) has the lowest error, so it stays on the front
    points = [{"index": i, "e": e, "m": m} for i, (e, m) in
              enumerate([(0.1, 0.5), (0.2, 0.9), (0.3, 0.4), (0.1, 0.3), (0.05, 0.1), (float("nan"), 1.0)])]
    front = pareto_front(points, ["e", "m"], ["min", "max"])
    assert sorted(p["index"] for p in front) == [0, 1, 4]


def test_every_metric_a_sweep_may_name_is_one_the_training_loop_reports():
    """LOOP_METRICS (what `metric:` may name) is kept by hand: each name must come out of train_fn's per-epoch
    metrics for a real evaluation of a gated MoE with more than 5 classes (top5_error exists only then)."""
    import torch

    from ep_harness import TinyMoE
    from raymoe.parallel.context import DistContext
    from raymoe.train.loop import epoch_metrics
    from raymoe.train.step import EpochResult, evaluate
    from raymoe.train.workload import image_metric_names, lm_metric_names
    from raymoe.tune.sweep_schema import IMAGE_ONLY, LM_ONLY, LOOP_METRICS, is_reported

    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 10, (32,))
    test, _ = evaluate(TinyMoE(num_experts=4, d_in=6, num_classes=10), [(x, y)], ctx=DistContext(),
                       num_experts=4, num_classes=10)
    result = EpochResult(loss=1.0, error=0.5, samples=32, steps=1, seconds=1.0, data_seconds=0.0, parts={})
    from raymoe.train.workload import RoutingStability

    stability = RoutingStability()
    stability.update([np.array([0, 1, 1])])  # routing stability needs an earlier evaluation
    routing = stability.update([np.array([0, 1, 0])])
    reported = epoch_metrics(result, {**image_metric_names(test, test), **routing}, eval_seconds=0.1)  # with val
    expected = set(LOOP_METRICS) - set(LM_ONLY)
    assert expected <= set(reported), sorted(expected - set(reported))
    assert sorted(k for k in reported if not is_reported(k)) == []  # and every reported key is a valid objective

    from raymoe.config.load import load_experiment
    from raymoe.metrics.lm import LanguageModelAccumulator
    from raymoe.models.build import build_model

    cfg = load_experiment(raw={"name": "lm", "data": {"name": "text", "text": {"block_size": 8}},
                               "model": {"arch": "gpt_moe", "num_experts": 4,
                                         "gpt": {"dim": 8, "depth": 2, "heads": 2, "mlp_dim": 8, "block_size": 8}},
                               "gate": {"kind": "topk", "top_k": 2}, "train": {"max_steps": 1}})
    idx, targets = torch.randint(0, 20, (3, 8)), torch.randint(0, 20, (3, 8))
    acc = LanguageModelAccumulator(20, 8, keep_items=16)
    with torch.no_grad():
        acc.update(build_model(cfg, 20, 0, 0)(idx), idx, targets)
    val = acc.compute(bytes_per_token=1.0)
    lm_stability = RoutingStability(per_layer=True)
    lm_stability.update(acc.first_top1())
    lm_routing = lm_stability.update(acc.first_top1())  # the same routing twice: no churn
    assert lm_routing["layer0/routing_churn"] == 0.0 and lm_routing["routing_ami"] == pytest.approx(1.0)
    reported = epoch_metrics(result, {**lm_metric_names(val, val), **lm_routing}, eval_seconds=0.1)
    expected = set(LOOP_METRICS) - set(IMAGE_ONLY)
    assert expected <= set(reported), sorted(expected - set(reported))
    assert sorted(k for k in reported if not is_reported(k)) == []


def _staged_presets(folder: Path) -> None:
    (folder / "att.yaml").write_text("name: att\ngate:\n  kind: attentive\n")
    (folder / "dist.yaml").write_text("name: dist\ntrain:\n  distill_from: SET-ME\n")


def test_staged_rows_run_in_dependency_order(tmp_path):
    """A best_of row waits for the row it names: stages 0, 1, 2 for att <- dist <- dist2; the row's own overrides
    travel with each point but not in its label."""
    _staged_presets(tmp_path)
    ref = {"best_of": "att", "by": "train_error"}
    raw = {"name": "g", "strategy": "grid", "seeds": 2, "rows": [
        {"method": "dist.yaml", "category": "dist2", "overrides": {"train.distill_from": {"best_of": "dist"}}},
        {"method": "dist.yaml", "overrides": {"train.distill_from": ref, "train.lr": 0.002}},
        {"method": "att.yaml"}]}
    sweep = load_sweep(_write(tmp_path, raw))
    stages = {p.category: p.stage for p in sweep.points}
    assert stages == {"att": 0, "dist": 1, "dist2": 2}
    dist = [p for p in sweep.points if p.category == "dist"]
    assert dist[0].fixed == {"train.distill_from": ref, "train.lr": 0.002} and dist[0].label == "dist"
    assert [p.index for p in sweep.points] == list(range(6))


@pytest.mark.parametrize("rows, path", [
    ([{"method": "dist.yaml", "overrides": {"train.distill_from": {"best_of": "nope"}}}],
     "rows[0].overrides.train.distill_from.best_of"),
    ([{"method": "dist.yaml", "overrides": {"train.distill_from": {"best_of": "dist"}}}],
     "rows[0].overrides.train.distill_from.best_of"),
    ([{"method": "att.yaml"}, {"method": "dist.yaml", "overrides": {"train.distill_from": {"best_of": "att",
                                                                                            "by": "accuracy"}}}],
     "rows[1].overrides.train.distill_from.by"),
    ([{"method": "att.yaml"}, {"method": "dist.yaml", "overrides": {"train.distill_from": {"best_of": "att",
                                                                                            "order": "min"}}}],
     "rows[1].overrides.train.distill_from.order"),
    ([{"method": "att.yaml"}, {"method": "dist.yaml", "overrides": {"train.lr": {"best_of": "att"}}}],
     "rows[1].overrides.train.lr"),
    ([{"method": "att.yaml"}, {"method": "dist.yaml", "overrides": {"train.nope": 1}}],
     "rows[1].overrides.train.nope"),
    ([{"method": "att.yaml"}, {"method": "dist.yaml", "overrides": {"train.lr": -1.0}}],
     "rows[1].overrides.train.lr"),
    ([{"method": "dist.yaml", "category": "a", "overrides": {"train.distill_from": {"best_of": "b"}}},
      {"method": "dist.yaml", "category": "b", "overrides": {"train.distill_from": {"best_of": "a"}}}],
     "rows[0].overrides"),
])
def test_bad_staged_rows_name_the_field(tmp_path, rows, path):
    _staged_presets(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_sweep(_write(tmp_path, {"name": "g", "strategy": "grid", "rows": rows}))
    assert info.value.path == path, info.value
    if path == "rows[0].overrides":
        assert info.value.value == "a -> b -> a"


def test_pick_best_by_metric_and_refuses_a_row_without_finished_runs():
    from raymoe.tune.stages import BestOf, pick_best

    def trial(index, category, status, error, checkpoint="ck"):
        return {"category": category, "index": index, "status": status, "metrics": {"train_error": error},
                "checkpoint": checkpoint}

    runs = [trial(0, "att", "TERMINATED", 0.3), trial(1, "att", "ERROR", 0.01), trial(2, "att", "TERMINATED", 0.2),
            trial(3, "att", "TERMINATED", 0.2), trial(4, "other", "TERMINATED", 0.0),
            trial(5, "att", "TERMINATED", 0.1, checkpoint=None), trial(6, "att", "TERMINATED", float("nan"))]
    assert pick_best(runs, BestOf(best_of="att"), "w")["index"] == 2  # lowest finished, the earlier of a tie
    assert pick_best(runs, BestOf(best_of="att", mode="max"), "w")["index"] == 0
    with pytest.raises(ConfigError) as info:
        pick_best(runs[:2], BestOf(best_of="other"), "rows[1].overrides.train.distill_from")
    assert info.value.path == "rows[1].overrides.train.distill_from.best_of"


def test_sweep_set_changes_the_sweep_keys_type_checked(tmp_path):
    path = ROOT / "tune_configs" / "sweeps" / "fmnist_gates.yaml"
    sweep = load_sweep(path, sweep_overrides=["num_samples=3", "seeds=2", "resources.cpus_per_worker=2"])
    assert sweep.num_trials == 6 and sweep.config.resources.cpus_per_worker == 2.0
    assert sweep.digest != load_sweep(path).digest  # a resume with other --sweep-set values is refused
    assert load_sweep(path, max_concurrent=3).digest == load_sweep(path).digest  # concurrency may change
    for bad, where in (["num_sample=3"], "--sweep-set num_sample"), (["num_samples=x"], "num_samples"), (
            ["scheduler.asha.grace=2"], "--sweep-set scheduler.asha.grace"), (["seeds=0"], "seeds"):
        with pytest.raises(ConfigError) as info:
            load_sweep(path, sweep_overrides=bad)
        assert info.value.path == where, info.value


def test_local_sweeps_run_no_more_trials_than_physical_cores():
    from raymoe.tune.driver import local_concurrency

    assert local_concurrency(4, 1.0, cores=2) == 2  # 4 logical CPUs on a 2-core laptop: 2 trials
    assert local_concurrency(4, 2.0, cores=2) == 1 and local_concurrency(4, 1.5, cores=8) == 4
    assert local_concurrency(1, 4.0, cores=2) == 1  # never 0


def test_per_layer_and_per_expert_metrics_are_valid_objectives():
    from raymoe.tune.sweep_schema import is_reported

    for good in ("layer1/dead_expert_frac", "load_share/3", "layer0/load_share/12", "routing_ami", "val_error"):
        assert is_reported(good), good
    for bad in ("layer/dead_expert_frac", "layer1/test_error", "load_share/x", "dead_expert"):
        assert not is_reported(bad), bad
    sweep = load_sweep(raw=_sweep(metric="layer1/dead_expert_frac", stop_on={"metric": "layer0/max_load_share",
                                                                             "above": 0.9}))
    assert sweep.config.metrics == ["layer1/dead_expert_frac"]


def test_a_point_the_study_already_finished_is_not_told_again(tmp_path):
    """The study lives in sqlite beside the sweep, so after a killed driver it can be ahead of the searcher's saved
    state: telling it again about a finished point is skipped, not a crash of the resumed sweep."""
    from ray.tune.search.optuna import OptunaSearch

    from raymoe.tune.searcher import SeedRepeatSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    inner = OptunaSearch(space=space, metric="val_error", mode="min", study_name="s", storage=storage)
    search = SeedRepeatSearch(inner, [0], "val_error", "min")
    search.suggest("t1")
    search.on_trial_complete("t1", {"val_error": 0.3, "training_iteration": 2})
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.value for t in study.trials] == [0.3]
    search.results["p0000"] = {}  # the searcher as saved before it told the study (a killed driver's state)
    search.last_step.pop("p0000", None)
    search.on_trial_result("t1", {"val_error": 0.2, "training_iteration": 1})  # would raise UpdateFinishedTrialError
    search.on_trial_complete("t1", {"val_error": 0.2, "training_iteration": 2})  # would raise "Cannot tell a ..."
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.value for t in study.trials] == [0.3]

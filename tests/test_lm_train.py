"""Language models end to end: `raymoe train` on the offline corpus (real MLflow sqlite store read back), and the
LM metrics against hand-worked values.

Shape legend: B windows, T positions, N = B*T tokens, E experts, V vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from raymoe.metrics.lm import LanguageModelAccumulator
from raymoe.models.output import ModelOutput
from raymoe.moe.routing import GateResult

FORTUNES = Path("/usr/share/games/fortunes")
needs_corpus = pytest.mark.skipif(not FORTUNES.is_dir(), reason="Debian's fortunes is not installed (make test does)")


def _tiny(tmp_path: Path, **patch) -> Path:
    raw = yaml.safe_load((Path(__file__).parents[1] / "tune_configs/lm/gshard_hypermoe.yaml").read_text())
    raw.update({"base": str(Path(__file__).parents[1] / "tune_configs/lm/gshard.yaml"), "name": "lm-tiny",
                "model": {"num_experts": 4, "gpt": {"dim": 32, "depth": 2, "heads": 2, "mlp_dim": 32, "moe_every": 1,
                                                    "block_size": 32}},
                "data": {"root": str(tmp_path / "data"), "text": {"block_size": 32, "val_tokens": 2048}},
                "train": {"batch_size": 8, "max_steps": 12, "eval_every": 6, "warmup_steps": 2, "progress": False,
                          "checkpoint_dir": str(tmp_path / "ck")},
                "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "lm-test"}})
    raw.update(patch)
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@needs_corpus
def test_train_a_hypermoe_language_model_and_log_everything(tmp_path, capsys):
    from mlflow import MlflowClient

    from raymoe.cli import main

    assert main(["train", str(_tiny(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "step 6/12" in out and "step 12/12" in out and "bits per byte" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("lm-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["gate.hypermoe.enabled"] == "True"
    metrics = run.data.metrics
    for key in ("val_loss", "val_perplexity", "val_bits_per_byte", "test_loss", "train_loss", "targets_per_s", "lr",
                "grad_norm", "layer0/usage_entropy_bits", "layer0/mi_next_token_bits", "layer0/mi_current_token_bits",
                "layer0/mi_position_bits", "layer0/load_share/3", "dead_expert_frac"):
        assert math.isfinite(metrics[key]), key
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-6)
    assert metrics["val_loss"] < math.log(256)  # learned something beyond a uniform byte
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [6, 12]
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs[1] < lrs[0]  # cosine decay after the warm-up
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures/layer0")}
    assert {"figures/layer0/expert_token.png", "figures/layer0/load_over_training.png"} <= artifacts
    # the observatory (docs/observatory.md): stability from the second evaluation on, token exemplars at the end
    churn = client.get_metric_history(run.info.run_id, "layer1/routing_churn")
    assert [m.step for m in churn] == [12] and 0.0 <= churn[0].value <= 1.0
    assert "figures/routing_stability.png" in {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    exemplars = Path(client.download_artifacts(run.info.run_id, "exemplars/tokens.md", str(tmp_path))).read_text()
    assert "## MoE layer 0" in exemplars and "## MoE layer 1" in exemplars
    assert exemplars.count("\n| 3 | ") == 2 * (1 + 6)  # expert 3: its load row and 6 exemplars, per layer
    capsys.readouterr()

    # counterfactual routing, one MoE layer at a time; the learned row is the run's own final test loss
    assert main(["analyze", run.data.tags["raymoe.run_name"], "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[1] for r in rows[:5]] == ["learned", "uniform mixture", "random expert", "load-matched random",
                                        "early gate"]
    assert len(rows) == 1 + 2 * 4  # learned, then 2 MoE layers x 4 counterfactuals
    assert float(rows[0][3].rstrip(" |")) == pytest.approx(metrics["test_loss"], abs=5e-5)  # printed to 4 digits
    assert float(client.get_run(run.info.run_id).data.metrics["cf/layer0/uniform_mixture/test_error"]) > 0


def _gate(top1_N: torch.Tensor, e: int) -> GateResult:
    probs = torch.nn.functional.one_hot(top1_N, e).double() * 0.9 + 0.1 / e
    return GateResult(probs_NE=probs, weights_NK=probs.max(-1, keepdim=True).values,
                      experts_NK=top1_N[:, None], logits_NE=probs.log())


def test_lm_metrics_on_hand_worked_tokens():
    """4 tokens 0..3 repeated; expert = token parity: I(E; current token) = H(E) = 1 bit; the next token is
    token + 1, so I(E; next token) is also 1 bit; uniform log-probs give loss ln V, bpb = log2 V / bytes."""
    v, t = 4, 8
    idx_BT = torch.arange(t).remainder(v).repeat(2, 1)
    next_BT = (idx_BT + 1).remainder(v)
    top1 = idx_BT.reshape(-1).remainder(2)
    out = ModelOutput(log_probs_BC=torch.full((2 * t, v), -math.log(v)), gates=[_gate(top1, 2)],
                      items_per_sample=t)
    acc = LanguageModelAccumulator(vocab_size=v, block_size=t)
    acc.update(out, idx_BT, next_BT)
    m = acc.compute(bytes_per_token=2.0)
    assert m["loss"] == pytest.approx(math.log(v)) and m["perplexity"] == pytest.approx(v)
    assert m["bits_per_byte"] == pytest.approx(math.log2(v) / 2.0)
    assert m["layer0/mi_current_token_bits"] == pytest.approx(1.0)
    assert m["layer0/mi_next_token_bits"] == pytest.approx(1.0)
    assert m["layer0/mi_position_bits"] == pytest.approx(1.0)  # position bucket = position, parity alternates
    assert m["layer0/load_share/0"] == pytest.approx(0.5) and m["dead_expert_frac"] == 0.0

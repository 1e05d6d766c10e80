"""`raymoe analyze`: counterfactual routings of a trained paper MoE, against the model's own evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from mlflow import MlflowClient

from raymoe.analysis.counterfactual import load_matched
from raymoe.cli import main


def test_load_matched_routing_keeps_every_experts_count():
    top1 = torch.tensor([0, 0, 0, 1, 2, 2, 3, 0, 1, 2])
    shuffled = load_matched(top1, torch.Generator().manual_seed(3))
    assert torch.equal(torch.bincount(shuffled, minlength=4), torch.bincount(top1, minlength=4))
    assert not torch.equal(shuffled, top1)  # but not the learned assignment


def test_analyze_a_trained_run(tmp_path, tiny_fmnist_root, monkeypatch, capsys, restore_torch_state):
    monkeypatch.chdir(tmp_path)
    exp = {"name": "cf", "data": {"name": "fashion_mnist", "root": str(tiny_fmnist_root), "download": False},
           "model": {"num_experts": 3}, "gate": {"kind": "attentive"}, "train": {"epochs": 2, "batch_size": 64},
           "tracking": {"system_metrics_s": None, "log_model": False}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert main(["train", "exp.yaml"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("raymoe").experiment_id])
    name = run.data.tags["raymoe.run_name"]
    capsys.readouterr()

    assert main(["analyze", name]) == 0
    out = capsys.readouterr().out
    assert "early gate from epoch 1" in out
    from pathlib import Path

    table = json.loads(Path(client.download_artifacts(run.info.run_id, "analysis/counterfactual.json",
                                                      str(tmp_path))).read_text())
    rows = {r["routing"]: r for r in table}
    assert list(rows) == ["learned", "learned top-1", "uniform mixture", "random expert", "load-matched random",
                          "early gate"]
    # the learned routing, recomputed from the expert outputs, is exactly the model's own final evaluation
    assert rows["learned"]["test_error"] == pytest.approx(run.data.metrics["test_error"], abs=1e-9)
    assert rows["learned"]["test_loss"] == pytest.approx(run.data.metrics["test_loss"], rel=1e-5)
    assert all(0.0 <= r["test_error"] <= 1.0 for r in table)
    logged = client.get_run(run.info.run_id).data.metrics
    capsys.readouterr()  # the download's progress bar
    assert logged["cf/load_matched_random/test_error"] == pytest.approx(rows["load-matched random"]["test_error"])

    assert main(["analyze", "no-such-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target" in err[0] and "no-such-run" in err[0]
    assert main(["analyze", name, "--early-epoch", "7"]) == 2


def test_compare_two_runs_logs_a_linked_comparison(tmp_path, tiny_fmnist_root, monkeypatch, capsys,
                                                   restore_torch_state):
    monkeypatch.chdir(tmp_path)
    exp = {"name": "cmp", "data": {"name": "fashion_mnist", "root": str(tiny_fmnist_root), "download": False},
           "model": {"num_experts": 2}, "train": {"epochs": 2, "batch_size": 64},
           "tracking": {"system_metrics_s": None, "log_model": False}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert main(["train", "exp.yaml"]) == 0 and main(["train", "exp.yaml", "--set", "seed=1"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    a, b = client.search_runs([client.get_experiment_by_name("raymoe").experiment_id],
                              order_by=["attributes.start_time ASC"])
    capsys.readouterr()
    assert main(["compare", a.data.tags["raymoe.run_name"], b.info.run_id]) == 0  # by name and by id
    out = capsys.readouterr().out
    row_a = next(line for line in out.splitlines() if line.startswith(f"| {a.data.tags['raymoe.run_name']} |"))
    assert f"{a.data.metrics['test_error']:.4g}" in row_a
    (comparison,) = client.search_runs([client.get_experiment_by_name("raymoe-compare").experiment_id])
    assert comparison.data.tags["raymoe.compared_runs"] == f"{a.info.run_id},{b.info.run_id}"
    assert {f.path for f in client.list_artifacts(comparison.info.run_id, "comparison")} == {
        "comparison/table.md", "comparison/curves.png"}
    assert main(["compare", "only-one"]) == 2


def test_counterfactual_router_modes_keep_what_they_promise():
    from raymoe.analysis.counterfactual import CounterfactualRouter
    from raymoe.moe.routing import GateResult

    class Fixed(torch.nn.Module):
        token_choice, num_experts, needs_expert_hidden = True, 4, False

        def forward(self, x, expert_keys=None):
            logits = torch.arange(24.0).view(6, 4) % 5
            probs = logits.softmax(-1)
            w, e = probs.topk(2, dim=-1)
            return GateResult(probs_NE=probs, weights_NK=w, experts_NK=e, logits_NE=logits)

    learned = Fixed()(None, None)
    gen = torch.Generator().manual_seed(0)
    matched = CounterfactualRouter(Fixed(), "load-matched random", gen)(torch.zeros(6, 3), None)
    assert torch.equal(torch.bincount(matched.experts_NK.flatten(), minlength=4),
                       torch.bincount(learned.experts_NK.flatten(), minlength=4))
    rand = CounterfactualRouter(Fixed(), "random expert", gen)(torch.zeros(6, 3), None)
    assert torch.equal(rand.weights_NK, learned.weights_NK)  # same weights, other experts, distinct per token
    assert all(len(set(row.tolist())) == 2 for row in rand.experts_NK)
    uniform = CounterfactualRouter(Fixed(), "uniform mixture", gen)(torch.zeros(6, 3), None)
    assert uniform.experts_NK.shape == (6, 4) and torch.allclose(uniform.weights_NK, torch.full((6, 4), 0.25))


def test_analyze_a_vit_moe_layer_by_layer(tmp_path, tiny_fmnist_root, monkeypatch, capsys, restore_torch_state):
    monkeypatch.chdir(tmp_path)
    exp = {"name": "cfvit", "data": {"name": "fashion_mnist", "root": str(tiny_fmnist_root), "download": False},
           "model": {"arch": "vit_moe", "num_experts": 4, "vit": {"patch_size": 7, "dim": 16, "depth": 2,
                                                                  "heads": 2, "mlp_dim": 16, "moe_every": 1}},
           "gate": {"kind": "topk", "top_k": 2}, "train": {"epochs": 2, "batch_size": 64},
           "tracking": {"system_metrics_s": None, "log_model": False}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert main(["train", "exp.yaml"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("raymoe").experiment_id])
    capsys.readouterr()
    assert main(["analyze", run.data.tags["raymoe.run_name"], "--no-log"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [line.split(" | ") for line in lines[1:]]
    assert len(rows) == 1 + 2 * 4  # learned, then 2 MoE layers x 4 counterfactuals
    assert float(rows[0][2]) == pytest.approx(run.data.metrics["test_error"], abs=5e-5)  # printed to 4 digits


def test_text_exemplars_pick_each_experts_highest_weighted_tokens_in_context():
    from raymoe.data.text.tokenizers import ByteTokenizer
    from raymoe.models.output import ModelOutput
    from raymoe.moe.routing import GateResult
    from raymoe.tracking.text_exemplars import exemplar_markdown, top_tokens

    class PipeLover(torch.nn.Module):
        """Expert 1 takes '|' with weight 0.9, expert 0 takes everything else with weight 0.9."""

        def forward(self, idx_BT):
            pipe_N = (idx_BT.reshape(-1) == ord("|")).float()
            probs_NE = torch.stack([0.9 - 0.8 * pipe_N, 0.1 + 0.8 * pipe_N], dim=-1)
            w_NK, e_NK = probs_NE.topk(1, dim=-1)
            gate = GateResult(probs_NE=probs_NE, weights_NK=w_NK, experts_NK=e_NK, logits_NE=probs_NE.log())
            return ModelOutput(log_probs_BC=torch.zeros(idx_BT.numel(), 256), gates=[gate])

    tok = ByteTokenizer()
    x_BT = torch.tensor(tok.encode_documents(["ab|cd\nefgh|ijklm"])).view(2, 8)  # two windows of 8 bytes
    (found,) = top_tokens(PipeLover(), x_BT, batch_size=1, per_expert=2)
    assert sorted(found["indices_EN"][1].tolist()) == [2, 10] and found["weights_EN"][1].tolist() == pytest.approx(
        [0.9, 0.9])
    assert found["counts_EV"][1].sum() == 2 and found["counts_EV"][0, ord("a")] == 1
    text = exemplar_markdown(x_BT, [found], tok)
    # the context stays inside the token's own window; Markdown specials and line breaks are shown, not interpreted
    assert "| 1 | 0.900 | ab**\\|**cd⏎e |" in text and "| 1 | 0.900 | gh**\\|**ijkl |" in text
    assert "| 1 | 0.125 | ⟨\\|⟩ (2, 100%) |" in text  # 2 of 16 tokens, every '|' of the text

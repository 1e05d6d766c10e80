"""The benchmark commands run and measure what they claim to measure: the timed variants compute the same function,
the dense baselines have the MoE's active parameters, the fidelity steps agree (timings themselves are not
checked)."""

from __future__ import annotations

import json

import pytest

from raymoe.cli import main as cli_main


def test_bench_moe_layer_quick_prints_one_line_per_size_and_k(capsys):
    assert cli_main(["bench", "moe-layer", "--quick", "--iters", "1", "--warmup", "0",
                     "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    header, rows = lines[0], lines[1:]
    assert header["dtype"] == "float32" and header["device"] == "cpu" and header["cpu"]
    assert [row["top_k"] for row in rows] == [1, 2]
    for row in rows:
        assert row["layer_ms"] > 0 and row["dense_chunked_ms"] > 0 and row["naive_ms"] > 0
        assert row["max_abs_diff_vs_naive"] < 1e-4  # the timed layer is the MoE the naive loop computes
        assert "hypermoe_overhead" in row and "hypermoe_overhead" in row["cpu_time"]
        # top-1 also times HyperMoE's own gather by set, and both HyperMoE paths compute the same function
        assert ("hypermoe_own_gather_overhead" in row) == (row["top_k"] == 1)
        if row["top_k"] == 1:
            assert row["max_abs_diff_hypermoe_paths"] < 1e-5 and "hypermoe_own_gather_overhead" in row["cpu_time"]
        # routing alone is the layer with identity experts: it computes sum_k w_k * x
        assert row["max_abs_diff_routing_only"] < 1e-6
        assert {"floor_vs_dense", "parts_vs_dense"} <= set(row["cpu_time"])


def test_bench_lm_quick_times_every_variant_and_derives_the_ratios(capsys):
    assert cli_main(["bench", "lm", "--quick", "--steps", "1", "--warmup", "0", "--precisions", "fp32",
                     "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    header, rows, summary = lines[0], lines[1:-1], lines[-1]
    assert header["device"] == "cpu" and header["cpu"]
    active = {row["variant"]: row["active_params_per_token"] - row["router_params"] for row in rows}
    assert set(active) == {"dense_k1", "moe_top1", "dense_k2", "moe_top2", "moe_top2_hypermoe"}
    # the ratios compare like with like: each dense baseline has its MoE's active parameters per token (routers
    # aside; k experts carry k output biases where the dense FFN has one)
    assert active["dense_k1"] == active["moe_top1"]
    assert active["dense_k2"] == pytest.approx(active["moe_top2"], rel=0.005)
    assert rows[1]["router_params"] > 0 == rows[0]["router_params"]
    assert active["moe_top2_hypermoe"] > active["moe_top2"]
    assert {"moe_over_dense_time_top1_fp32", "moe_over_dense_time_top2_fp32", "hypermoe_overhead_fp32"} <= set(summary)


def test_bench_lm_gpu_size_builds_the_gpu_presets_bpe_vocabulary(capsys):
    """--size gpu reads tune_configs/lm/gpu (16 experts, vocabulary 8192); --quick keeps its layers tiny."""
    args = ["bench", "lm", "--quick", "--steps", "1", "--warmup", "0", "--precisions", "fp32", "--device", "cpu"]
    sizes = {}
    for size in ("cpu", "gpu"):
        assert cli_main(args + ["--size", size, "--batch-size", "2"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert lines[0]["size"] == size
        sizes[size] = {row["variant"]: row for row in lines[1:-1]}
    dim = 32  # --quick's width
    # the tied embedding table grows by (8192 - 256) rows; 16 experts of which top_k are active in both sizes
    grown = sizes["gpu"]["dense_k1"]["active_params_per_token"] - sizes["cpu"]["dense_k1"]["active_params_per_token"]
    assert grown == (8192 - 256) * dim
    assert sizes["gpu"]["moe_top1"]["router_params"] == 2 * sizes["cpu"]["moe_top1"]["router_params"]  # 16 vs 8


def test_bench_fidelity_steps_part_reports_rounding_level_gaps(capsys):
    assert cli_main(["bench", "fidelity", "--steps", "2", "--rows", "single", "attentive"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["row"] for line in lines] == ["single", "attentive"]
    for line in lines:
        assert line["steps"] == 2 and line["within_rounding"] is True
        assert line["raymoe_vs_float64"]["loss"] < 1e-5


def test_bench_fidelity_distilled_row_trains_its_attentive_row_first_then_only_the_new_gate(capsys):
    assert cli_main(["bench", "fidelity", "--rows", "distilled_attentive_importance", "--steps", "0", "--seeds", "1",
                     "--epochs", "1", "--train-limit", "512", "--literal-only", "--set", "data.test_limit=256"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(line["part"], line["row"]) for line in lines] == [
        ("run", "attentive_importance"), ("run", "distilled_attentive_importance"),
        ("runs_summary", "distilled_attentive_importance")]
    for line in lines[:2]:
        assert 0 < line["literal"]["train_loss"] < 5 and 0 <= line["literal"]["test_error"] <= 1


@pytest.mark.parametrize("args", [["--steps", "0", "--seeds", "1"], ["--steps", "2", "--literal-only"]])
def test_bench_fidelity_refuses_what_a_distilled_row_cannot_run(args, capsys):
    assert cli_main(["bench", "fidelity", "--rows", "distilled_attentive_ls", *args]) == 2
    assert "--rows = 'distilled_attentive_ls'" in capsys.readouterr().err

"""The benchmark commands run and print what their docstrings promise (smoke tests: timings are not checked)."""

from __future__ import annotations

import json

from raymoe.cli import main as cli_main


def test_bench_moe_layer_quick_prints_one_line_per_size_and_k(capsys):
    assert cli_main(["bench", "moe-layer", "--quick", "--iters", "1", "--warmup", "0",
                     "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    header, rows = lines[0], lines[1:]
    assert header["dtype"] == "float32" and header["device"] == "cpu"
    assert [row["top_k"] for row in rows] == [1, 2]
    for row in rows:
        assert row["layer_ms"] > 0 and row["dense_chunked_ms"] > 0 and row["naive_ms"] > 0
        assert abs(row["ratio_vs_dense"] - row["layer_ms"] / row["dense_chunked_ms"]) < 0.01 * row["ratio_vs_dense"]
        assert "hypermoe_overhead" in row and "hypermoe_overhead" in row["cpu_time"]


def test_bench_lm_quick_times_every_variant_and_derives_the_ratios(capsys):
    assert cli_main(["bench", "lm", "--quick", "--steps", "1", "--warmup", "0", "--precisions", "fp32",
                     "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    header, rows, summary = lines[0], lines[1:-1], lines[-1]
    assert header["device"] == "cpu" and header["cpu"]
    step = {row["variant"]: row["step_ms"] for row in rows}
    assert set(step) == {"dense_k1", "moe_top1", "dense_k2", "moe_top2", "moe_top2_hypermoe"}
    assert summary["moe_over_dense_time_top2_fp32"] == round(step["moe_top2"] / step["dense_k2"], 3) or abs(
        summary["moe_over_dense_time_top2_fp32"] - step["moe_top2"] / step["dense_k2"]) < 0.01


def test_bench_fidelity_steps_part_reports_rounding_level_gaps(capsys):
    assert cli_main(["bench", "fidelity", "--steps", "2", "--rows", "single", "attentive"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["row"] for line in lines] == ["single", "attentive"]
    for line in lines:
        assert line["steps"] == 2 and line["within_rounding"] is True
        assert line["raymoe_vs_float64"]["loss"] < 1e-5

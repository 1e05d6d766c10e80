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

"""What a user sees: `raymoe ui` over a store with one finished `raymoe train` run, loaded in headless Chromium
(Debian's `chromium`, installed by `make test` when root). Asserts from the rendered DOM that the experiment opens
in MLflow's model-training view with the run, its dataset and its logged model, and that a metric series and a
figure artifact are served; saves screenshots under the test's temp dir."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from html import unescape
from pathlib import Path

import pytest
import yaml

from raymoe.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")]


def _page_text(url: str, screenshot: Path) -> str:
    """The rendered page as text (scripts and styles dropped, tags as separators), after the app's requests."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--virtual-time-budget=20000", "--window-size=1600,1200"]
    dom = subprocess.run([*args, "--dump-dom", f"--screenshot={screenshot}", url], capture_output=True, text=True,
                         timeout=180).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    return unescape(re.sub(r"\s*(<[^>]+>\s*)+", " | ", text))


def test_the_run_in_the_model_training_view(tmp_path, tiny_fmnist_root, monkeypatch):
    from test_ui import _free_port, _wait_http

    monkeypatch.chdir(tmp_path)
    exp = {"name": "browser", "data": {"name": "fashion_mnist", "root": str(tiny_fmnist_root), "download": False},
           "model": {"num_experts": 3}, "train": {"epochs": 2, "batch_size": 64}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert main(["train", "exp.yaml"]) == 0
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("raymoe")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id, name = run.info.run_id, run.data.tags["raymoe.run_name"]

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "raymoe.cli", "ui", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/health", server)
        first_line = server.stdout.readline()
        assert "workflowType=machine_learning" in first_line  # the URL raymoe prints opens the model-training view
        view = "?workflowType=machine_learning"
        runs = _page_text(f"{base}/#/experiments/{experiment.experiment_id}{view}", tmp_path / "runs.png")
        assert "Model training" in runs and "| Runs |" in runs, runs[:500]
        assert name in runs and "fashion_mnist-train" in runs, runs[:2000]  # the run and its Dataset column

        page = _page_text(f"{base}/#/experiments/{experiment.experiment_id}/runs/{run_id}{view}",
                          tmp_path / "run.png")
        assert "Datasets" in page and "fashion_mnist-train" in page and "test_error" in page, page[:2000]
        models = _page_text(f"{base}/#/experiments/{experiment.experiment_id}/models{view}", tmp_path / "models.png")
        assert "| model | Ready |" in models and name in models, models[:2000]  # the logged model, from this run

        history = json.load(urllib.request.urlopen(
            f"{base}/ajax-api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=test_error"))
        assert [m["step"] for m in history["metrics"]] == [1, 2]  # what the metric chart draws
        with urllib.request.urlopen(f"{base}/get-artifact?path=figures/expert_usage.png&run_uuid={run_id}") as r:
            assert r.status == 200 and r.read(8) == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "run.png").stat().st_size > 20_000
    finally:
        server.terminate()
        server.wait(timeout=60)

"""`raymoe train` on Ray Train end to end (real Ray, gloo, 2 CPU workers, tiny Fashion-MNIST-format data).

(a) a worker process is SIGKILLed during epoch 2 of 2 (after the first checkpoint): the run restarts, resumes from
    that checkpoint and ends with the metrics of an uninterrupted run.
(b) a worker that fails on every attempt stops after scaling.max_failures with its traceback; MLflow run FAILED.
(c) `ray job submit` to a head started on loopback with its own temp dir and ports; only that head is stopped.
Plus bad input: EP degree not dividing the experts, more workers than CPUs, an unreachable address.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from raymoe.config.load import load_experiment
from raymoe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"epoch_seconds", "train_seconds", "eval_seconds", "samples_per_s", "targets_per_s", "data_fraction"}


def _raw(data_root: Path, tmp: Path, name: str, epochs: int = 2, **scaling) -> dict:
    return {
        "name": name, "seed": 3,
        "data": {"name": "fashion_mnist", "root": str(data_root), "download": False},
        "model": {"num_experts": 2},
        "gate": {"kind": "attentive"},
        "regularizer": {"importance": 0.1},
        "train": {"epochs": epochs, "batch_size": 32, "eval_batch_size": 64, "progress": False, "device": "cpu",
                  "checkpoint_dir": str(tmp / "checkpoints")},
        "scaling": {"num_workers": 2, "expert_parallel": 2, "max_failures": 1, "storage_path": str(tmp / "ray"),
                    **scaling},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "ray-e2e"},
    }


def _spec(raw: dict, run_name: str | None):
    from raymoe.train.run_spec import make_run_spec

    return make_run_spec(load_experiment(raw=raw), run_name=run_name)


def _fail_on_rank1_after_epoch1(spec) -> None:
    """A Ray Train worker function: train_fn, except that rank 1 raises once it has reported epoch 1, in every
    attempt (so FailureConfig.max_failures is used up)."""
    from raymoe.train import reporter
    from raymoe.train.loop import train_fn

    report = reporter.RayReporter.report

    def report_then_fail(self, metrics, checkpoint_dir, epoch):
        report(self, metrics, checkpoint_dir, epoch)
        if self.rank == 1 and epoch >= 1:
            raise RuntimeError(f"injected worker failure on rank {self.rank} after epoch {epoch}")

    reporter.RayReporter.report = report_then_fail
    train_fn(spec)


def _my_train_workers():
    """Ray Train worker processes of the Ray instance this pytest process started (never anyone else's)."""
    import ray  # noqa: F401 - puts Ray's vendored psutil on the path
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def _registered_epochs(run_dir: Path) -> list[str]:
    """Checkpoint folders the Train controller has registered (its snapshot), e.g. ["epoch_0001"]."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []
    return sorted(r.get("checkpoint_dir_name", "") for r in snapshot.get("checkpoint_results", []))


def _mlflow_runs(tmp: Path, run_name: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ray-e2e")
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("raymoe.run_name") == run_name]


def _assert_same_metrics(got: dict, expected: dict) -> None:
    """Equal up to float32 rounding. Usually bit-identical on CPU; one configuration drifted by ~1e-6 relative
    (a z-loss of 42.88 after 2 epochs) between two uninterrupted runs, so exact equality would be flaky; and a
    near-zero entropy of float32 probabilities (sample_entropy_bits 0.0032) moved by 7.6e-8 bits between two
    uninterrupted runs on an Intel Xeon (each process probes its own fast paths), hence abs 1e-6. A resume that
    lost optimizer state or restarted from scratch moves these numbers by 1e-3 or more."""
    for key, value in expected.items():
        if key not in TIMING:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def ray_local():
    from ep_harness import ensure_test_ray

    ensure_test_ray()


def test_killed_worker_resumes_from_checkpoint_with_identical_metrics(ray_local, tiny_fmnist_root, tmp_path):
    from raymoe.train.ray_launch import existing_run_epoch, run_on_ray

    expected = run_on_ray(_spec(_raw(tiny_fmnist_root, tmp_path, "ft"), "ft-plain"))

    spec = _spec(_raw(tiny_fmnist_root, tmp_path, "ft"), "ft-killed")
    run_dir = tmp_path / "ray" / "ft-killed"
    killed: dict = {}
    finished = threading.Event()

    def kill_after_first_checkpoint():
        # watches for as long as the run lasts: a loaded machine may take minutes to reach the first checkpoint
        while not finished.is_set() and not killed:
            if _registered_epochs(run_dir) == ["epoch_0001"]:
                workers = _my_train_workers()
                if workers:
                    killed["pid"], killed["seen"] = workers[-1].pid, _registered_epochs(run_dir)
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    try:
        final = run_on_ray(spec)
    finally:
        finished.set()
    killer.join(timeout=5)
    assert killed.get("seen") == ["epoch_0001"], "the worker was not killed between epoch 1 and the end"
    assert final.keys() == expected.keys() and final["test_error"] == final["test_error"]  # not NaN
    _assert_same_metrics(final, expected)
    # the restarted workers loaded the epoch-1 checkpoint rather than starting over
    from ray._private.worker import _global_node

    logs = "".join(p.read_text(errors="replace") for p in Path(_global_node.get_logs_dir_path()).glob("worker-*.out"))
    assert "resuming ft-killed from epoch 1" in logs
    (run,) = _mlflow_runs(tmp_path, "ft-killed")
    assert run.info.status == "FINISHED"

    # launching the same run name again resumes it (run_on_ray prints "resuming run ft-killed from epoch 2";
    # the rerun of a finished run on Ray is exercised by the max_failures test's second attempt)
    assert existing_run_epoch(str(tmp_path / "ray"), "ft-killed") == 2
    assert existing_run_epoch(str(tmp_path / "ray"), "never-ran") is None


def test_worker_failing_every_attempt_stops_after_max_failures(ray_local, tiny_fmnist_root, tmp_path):
    from raymoe.train.ray_launch import run_on_ray

    from ep_harness import _ship_by_value

    _ship_by_value(sys.modules[__name__])  # the workers cannot import this test module
    with pytest.raises(RuntimeError) as info:
        run_on_ray(_spec(_raw(tiny_fmnist_root, tmp_path, "boom", epochs=1), "boom"),
                   worker=_fail_on_rank1_after_epoch1)
    message = str(info.value)
    assert "scaling.max_failures = 1" in message
    assert "Traceback" in message and "injected worker failure on rank 1 after epoch 1" in message
    (run,) = _mlflow_runs(tmp_path, "boom")
    assert run.info.status == "FAILED"
    assert "injected worker failure" in run.data.tags["raymoe.failure_reason"]
    deadline = time.time() + 30
    while _my_train_workers() and time.time() < deadline:
        time.sleep(0.5)
    assert not _my_train_workers(), "Ray Train workers left running after the failed run"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp_dir: str) -> None:
    """Stop only the head started with this temp dir (`ray stop` would stop every Ray on the machine)."""
    import ray  # noqa: F401
    import psutil

    me = {os.getpid()}
    roots = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in me
             and any(temp_dir in arg for arg in (p.info["cmdline"] or []))]
    procs = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=15)  # SIGKILL is asynchronous: the caller checks that nothing is left


def test_ray_job_submit_to_a_loopback_head(tiny_fmnist_root, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    dashboard = _free_port()
    # the venv first on PATH: the job's entrypoint runs with the raylet's PATH (docs/ray-notes.md §6.1)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token")
    ray_bin = str(Path(sys.executable).parent / "ray")
    raw = _raw(tiny_fmnist_root, tmp_path, "job", epochs=1, expert_parallel=1)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    submission = f"raymoe-test-{uuid.uuid4().hex[:8]}"
    try:
        start = subprocess.run(
            [ray_bin, "start", "--head", "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1",
             "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--include-dashboard=true", "--dashboard-agent-listen-port", str(_free_port()),
             "--dashboard-agent-grpc-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
             "--metrics-export-port", str(_free_port()), "--num-cpus", "4", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stdout + start.stderr
        address = f"http://127.0.0.1:{dashboard}"
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--submission-id",
             submission, "--", "raymoe", "train", str(config), "--set", "scaling.num_workers=2"],
            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        status = subprocess.run([ray_bin, "job", "status", "--address", address, submission],
                                env=env, capture_output=True, text=True, timeout=60)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        assert f"Job '{submission}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
        runs = _mlflow_runs(tmp_path, _spec(raw, None).run_name)
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert "test_error" in runs[0].data.metrics
    finally:
        _stop_head(temp_dir)
    import ray  # noqa: F401
    import psutil

    left = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in (p.info["cmdline"] or []))]
    assert not left, f"processes of the test head still running: {[p.pid for p in left]}"


def test_ep_degree_must_divide_the_experts():
    from ep_harness import TinyMoE
    from raymoe.parallel.context import DistContext
    from raymoe.parallel.expert_parallel import apply_expert_parallel

    with pytest.raises(ConfigError, match=r"scaling.expert_parallel = 3: must divide the number of experts \(4"):
        apply_expert_parallel(TinyMoE(num_experts=4), DistContext(rank=0, world_size=3, ep_size=3))
    with pytest.raises(ConfigError, match=r"must divide model.num_experts \(5\)"):
        load_experiment(raw={"name": "x", "model": {"num_experts": 5},
                             "scaling": {"num_workers": 2, "expert_parallel": 2}})


def test_more_workers_than_cpus_fails_fast_with_the_numbers(ray_local):
    import ray

    from raymoe.train.ray_session import ensure_ray

    have = int(ray.cluster_resources()["CPU"])
    start = time.time()
    with pytest.raises(ConfigError, match=rf"needs {have + 5} CPUs .* has {have}"):
        ensure_ray(None, num_cpus_needed=have + 5)
    with pytest.raises(ConfigError, match=r"needs 2 GPUs but the Ray cluster has 0"):
        ensure_ray(None, num_cpus_needed=2, num_gpus_needed=2)
    assert time.time() - start < 10
    assert ray.is_initialized()  # a shared instance this call did not start stays up


def test_unreachable_address_is_a_clear_error(tiny_fmnist_root, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_raw(tiny_fmnist_root, tmp_path, "unreachable", epochs=1)))
    port = _free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "raymoe.cli", "train", str(config), "--address",
                           f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"--address = '127.0.0.1:{port}': no Ray cluster reachable there" in proc.stderr
    assert time.time() - started < 60
    assert not (tmp_path / "ray").exists()


def test_a_config_error_inside_the_workers_exits_2_with_its_line(tmp_path, tiny_fmnist_root):
    """A checkpoint that does not fit is found only where the model is built, inside the Ray Train worker: the
    user still gets exit 2 and the one config-error line naming the field, as in one process."""
    import subprocess
    import sys

    import yaml

    raw = _raw(tiny_fmnist_root, tmp_path, "worker-config-error", epochs=1, num_workers=1, expert_parallel=1)
    raw["gate"] = {"kind": "softmax"}
    raw["regularizer"] = {}
    (tmp_path / "not_a_checkpoint").mkdir()
    raw["train"]["distill_from"] = str(tmp_path / "not_a_checkpoint")
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "raymoe.cli", "train", str(tmp_path / "exp.yaml")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("raymoe train: config error: ") and "train.distill_from" in last, last

"""`raymoe ui [--port 5000] [--uri sqlite:///mlflow.db]`: the MLflow UI over the project's tracking store."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from raymoe.errors import ConfigError
from raymoe.tracking.uri import absolute_tracking_uri, sqlite_path

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow 3.17's UI picks GenAI or model training from this URL parameter (else the browser's last choice; GenAI
# first); raymoe's experiments also carry the experiment-kind tag (raymoe/tracking/mlflow_run.py)
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=5000, help="port of the UI (default 5000)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--uri", default=DEFAULT_URI,
                        help="tracking store (default sqlite:///mlflow.db in this directory, where `raymoe train` "
                             "writes by default)")


def ui_command_line(uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The `mlflow ui` invocation for a store; relative sqlite paths become absolute."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", absolute_tracking_uri(uri),
            "--host", host, "--port", str(port)]


def port_problem(host: str, port: int) -> str | None:
    """Why the UI cannot listen on host:port (None if it can): checked before the server starts."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port"
    return None


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ConfigError("--port", args.port, "must be a TCP port in 1..65535")
    problem = port_problem(args.host, args.port)
    if problem:
        raise ConfigError("--port", args.port, problem)
    db = sqlite_path(absolute_tracking_uri(args.uri))
    if db is not None and not db.exists():
        print(f"raymoe ui: note: {db} does not exist yet (no run has been tracked here); the UI will be empty",
              file=sys.stderr)
    command = ui_command_line(args.uri, args.port, args.host)
    print(f"MLflow UI on http://{args.host}:{args.port}/#/experiments{MODEL_TRAINING_VIEW}  (store "
          f"{absolute_tracking_uri(args.uri)}; Ctrl+C stops it)", flush=True)
    return serve(command)


def serve(command: list[str], grace_s: float = 10.0) -> int:
    """Run the server in its own process group; SIGINT/SIGTERM go to the whole group (the server and its
    workers), and this returns only when none of them is left (docs/reliability.md)."""
    server = subprocess.Popen(command, start_new_session=True)
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        _signal_group(server.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _reap_group(server.pid, grace_s)
    return 0 if stopping else code


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _reap_group(pgid: int, grace_s: float) -> None:
    """SIGTERM whatever is left of the server's group, SIGKILL it after grace_s."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False

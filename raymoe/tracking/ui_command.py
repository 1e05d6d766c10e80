"""`raymoe ui [--port 5000] [--uri sqlite:///mlflow.db]`: the MLflow UI over the project's tracking store."""

from __future__ import annotations

import argparse
import subprocess
import sys

from raymoe.config.errors import ConfigError
from raymoe.train.loop_config import absolute_tracking_uri, sqlite_path

DEFAULT_URI = "sqlite:///mlflow.db"


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


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ConfigError("--port", args.port, "must be a TCP port in 1..65535")
    db = sqlite_path(absolute_tracking_uri(args.uri))
    if db is not None and not db.exists():
        print(f"raymoe ui: note: {db} does not exist yet (no run has been tracked here); the UI will be empty",
              file=sys.stderr)
    command = ui_command_line(args.uri, args.port, args.host)
    print(f"MLflow UI on http://{args.host}:{args.port}  (store {absolute_tracking_uri(args.uri)}; Ctrl+C stops it)",
          flush=True)
    return subprocess.call(command)

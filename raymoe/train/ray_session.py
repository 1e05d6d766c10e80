"""Connect to a Ray cluster, or start a quiet local one, and check it can hold the job before anything starts.

Token authentication (Ray >= 2.59): `ray.init()`/`ray start --head` create ~/.ray/auth_token and a head started
while that file exists requires it, but clients only send it when RAY_AUTH_MODE=token (docs/ray-notes.md §6.1).
A token-mode client also connects to a cluster without auth, so we set RAY_AUTH_MODE=token whenever a token is
available and the user left RAY_AUTH_MODE unset.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from raymoe.errors import ConfigError

CONNECT_TIMEOUT_S = 10.0
LOCAL_MIN_CPUS = 4


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def _enable_token_auth_if_possible() -> None:
    """Client side of token auth for joining an existing cluster (a new local one is handled by ray.init)."""
    if "RAY_AUTH_MODE" in os.environ or not _token_available():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import; refresh it as ray's own _enable_token_auth does
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # noqa: BLE001 - private API; the env var alone still covers child processes
        pass


def _check_reachable(address: str, source: str) -> None:
    """TCP-probe a GCS address (host:port); raise ConfigError quickly instead of letting ray.init retry for minutes."""
    if address == "auto" or address.startswith(("ray://", "anyscale://")):
        return  # Ray Client / auto-discovery: let ray.init report
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme in ("http", "https"):
        raise ConfigError(source, address, "that looks like the dashboard/job-server URL; for training give the "
                                           "GCS address host:6379 (or submit with `ray job submit`)")
    if not parsed.hostname or not parsed.port:
        raise ConfigError(source, address, "expected host:port of the Ray head (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(source, address, f"no Ray cluster reachable there ({exc.strerror or exc}); start one with "
                                           f"`ray start --head` or fix the address") from None


def ensure_ray(address: str | None, num_cpus_needed: int, num_gpus_needed: int = 0) -> bool:
    """Make sure this process is connected to Ray with enough resources for the job.

    Args:
        address: a cluster address ("host:port", "auto", "ray://..."); None = RAY_ADDRESS, else start local Ray.
        num_cpus_needed: CPUs the job reserves (Train workers, Tune trial drivers).
        num_gpus_needed: GPUs the job reserves.
    Returns:
        True if this call started a local Ray instance (the caller may shut it down), else False.
    Raises:
        ConfigError: the address is unreachable, or the cluster lacks the CPUs/GPUs (the numbers are named).
    """
    import ray

    started = connected = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        source = "--address" if address and address != os.environ.get("RAY_ADDRESS") else "RAY_ADDRESS"
        if address:
            _enable_token_auth_if_possible()
            _check_reachable(address, source)
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            except ConnectionError as exc:
                raise ConfigError(source, address, f"could not connect to the Ray cluster: {exc}") from None
            connected = True
        else:
            if num_cpus_needed > local_cpus() and not os.environ.get("RAYMOE_SKIP_RESOURCE_CHECK"):
                _raise_short(num_cpus_needed, num_gpus_needed, [f"the job needs {num_cpus_needed} CPUs (one per "
                             f"Train worker) but the local Ray instance would have {local_cpus()}"], True)
            ray.init(num_cpus=local_cpus(), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                     configure_logging=True)
            started = True
    try:
        _check_resources(num_cpus_needed, num_gpus_needed, started)
    except ConfigError:
        if started or connected:
            ray.shutdown()  # leave nothing running (or connected) that this call set up
        raise
    return started


def local_cpus() -> int:
    """Logical CPUs of a local Ray instance: the cores, but at least LOCAL_MIN_CPUS (RAYMOE_LOCAL_CPUS overrides).

    Logical CPUs only bound how many workers Ray schedules at once; 4 lets 2 Train workers plus a Tune trial
    driver run on a 2-core laptop, while a job asking for far more than the machine fails fast.
    """
    override = os.environ.get("RAYMOE_LOCAL_CPUS")
    if override:
        return int(override)
    return max(os.cpu_count() or 1, LOCAL_MIN_CPUS)


def _check_resources(cpus: int, gpus: int, started: bool) -> None:
    import ray

    if os.environ.get("RAYMOE_SKIP_RESOURCE_CHECK"):  # autoscaling clusters grow on demand
        return
    have = ray.cluster_resources()
    have_cpus, have_gpus = int(have.get("CPU", 0)), int(have.get("GPU", 0))
    where = "the local Ray instance" if started else "the Ray cluster"
    problems = []
    if cpus > have_cpus:
        problems.append(f"the job needs {cpus} CPUs (one per Train worker) but {where} has {have_cpus}")
    if gpus > have_gpus:
        problems.append(f"the job needs {gpus} GPUs but {where} has {have_gpus}")
    if problems:
        _raise_short(cpus, gpus, problems, started)


def _raise_short(cpus: int, gpus: int, problems: list[str], local: bool) -> None:
    if local:
        hint = f" (this machine has {os.cpu_count()} cores; RAYMOE_LOCAL_CPUS raises the local limit)"
    else:
        hint = " (on an autoscaling cluster set RAYMOE_SKIP_RESOURCE_CHECK=1)"
    raise ConfigError("scaling", f"{cpus} CPU, {gpus} GPU", "; ".join(problems) + hint)

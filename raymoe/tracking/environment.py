"""What a run ran on: package versions, Python, git commit, device, threads (logged as MLflow tags + JSON)."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "ray", "mlflow", "optuna", "numpy")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(where: Path | None = None) -> str | None:
    """HEAD of the project checkout (with '-dirty' when tracked files changed), or None outside git."""
    where = where or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # the CPU model, e.g. "AMD EPYC 7B13"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: torch.device, world_size: int = 1) -> dict[str, str]:
    """Flat string dict; keys become `raymoe.env.<key>` tags."""
    env = {f"{p}_version": _version(p) for p in PACKAGES}
    env.update(
        python=sys.version.split()[0],
        platform=platform.platform(),
        device=str(device),
        device_name=device_name(device),
        num_threads=str(torch.get_num_threads()),
        world_size=str(world_size),
        git_commit=git_commit() or "none",
    )
    return env

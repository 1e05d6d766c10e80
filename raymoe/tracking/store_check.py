"""Can the outputs of a run be written? Checked before anything starts (docs/reliability.md): a file standing
where a folder must be, or a folder without write permission, is a ConfigError, not a traceback after training."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be used (or created) for writing files; None if it can."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} exists and is not a folder"
        return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable"
    ancestor = folder.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {folder} cannot be a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create folders in {ancestor}"
    return None


def tracking_problem(uri: str) -> str | None:
    """Why this tracking store cannot be written (None if it can): its file and folder, then a real connection."""
    from raymoe.tracking.mlflow_run import _retry, client_for
    from raymoe.tracking.uri import sqlite_path

    path = sqlite_path(uri)
    if path is not None:
        if path.exists() and not path.is_file():
            return f"{path} exists and is not a file"
        if path.exists() and not os.access(path, os.W_OK):
            return f"{path} is not writable"
        problem = folder_problem(path.parent)
        if problem:
            return problem
    try:
        # two commands opening one new sqlite store at once would both run MLflow's schema migrations and leave it
        # broken (a leftover _alembic_tmp_* table): the first open of a store is serialised by a lock file beside it
        with _store_lock(path):
            client = client_for(uri)
            _retry(client.search_experiments, max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the store is a config problem
        return f"cannot open the tracking store: {str(exc).splitlines()[0]}"
    return None


@contextlib.contextmanager
def _store_lock(db: Path | None):
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

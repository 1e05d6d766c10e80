"""Tracking-store URIs as the workers and the UI see them."""

from __future__ import annotations

import os
from pathlib import Path

_SQLITE = "sqlite:///"


def absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` -> `sqlite:////<cwd>/mlflow.db`; other URIs unchanged."""
    if not uri.startswith(_SQLITE):
        return uri
    path = uri[len(_SQLITE):]
    if path.startswith("/") or path in ("", ":memory:"):
        return uri
    return _SQLITE + os.path.abspath(path)


def sqlite_path(uri: str) -> Path | None:
    """The database file behind a `sqlite:///` URI (None for servers)."""
    if not uri.startswith(_SQLITE):
        return None
    return Path(uri[len(_SQLITE):])

"""Small JSON records in the user cache directory (``$INFOKV_CACHE``, default ``~/.cache/infokv-local``), where
the patched library's build cache lives too: what was measured or checked once per machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    return Path(os.environ.get("INFOKV_CACHE", Path.home() / ".cache" / "infokv-local"))


def read_json(name: str) -> dict[str, Any]:
    """The record ``name`` (empty when it is missing or unreadable)."""
    try:
        data = json.loads((cache_dir() / name).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def update_json(name: str, key: str, value: Any) -> None:
    """Set ``key`` in the record ``name``. Written atomically (another process reads the old file or the new
    one); a cache that cannot be written (a read-only home) is left alone: the work is redone next time."""
    path = cache_dir() / name
    data = read_json(name)
    data[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass

"""Where tlkit keeps what it can compute again (features, image facts, decoded images, backbone cards).

Everything here is a cache: deleting the folder costs time, never results. Files are written to a
temporary name and renamed, so a concurrent reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CACHE_ENV = "TLKIT_CACHE"
DEFAULT_CACHE = ".tlkit/cache"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: `path`, else $TLKIT_CACHE, else .tlkit/cache under the working directory."""
    return Path(path or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or damaged (a cache is recomputed, not trusted)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    from tlkit.core.files import write_bytes

    write_bytes(path, json.dumps(data, separators=(",", ":")).encode())


def package_version(name: str) -> str:
    """Installed version of a distribution, without importing it ('' when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""

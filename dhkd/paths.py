"""Where dhkd keeps things: the cache directory and the expansion of configured paths. Imports
nothing of dhkd, so the config and the data sets can both use it."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DHKD_CACHE`` or ``~/.cache/dhkd``."""
    return Path(os.environ.get("DHKD_CACHE") or Path.home() / ".cache" / "dhkd")


def expand_path(path: str | None) -> str | None:
    """Expand ``{cache}``, ``~`` and environment variables in a configured path."""
    if path is None:
        return None
    return os.path.expandvars(os.path.expanduser(path.replace("{cache}", str(cache_dir()))))

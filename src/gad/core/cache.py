"""Where gad keeps what it makes once per machine: converted built-in models, unpacked
evaluation sets, the precision probe."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: `$GAD_CACHE`, default `~/.cache/gad`."""
    return Path(os.environ.get("GAD_CACHE") or Path.home() / ".cache" / "gad").expanduser()

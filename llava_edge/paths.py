"""Where llava-edge's own files are: the assets shipped inside the package, and the user's cache dir.

A leaf (no torch): the runtime reads the demo bundle from here, export its calibration photos, the demo
build installs into it.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
CALIBRATION_DIR = ASSETS / "calibration"  # real photos that export and bench calibrate/measure the vision graph on
DEMO_CHECKPOINT = ASSETS / "demo" / "checkpoint"  # the trained demo model (docs/design.md, "The shapes world")
DEMO_BUNDLE = ASSETS / "demo" / "bundle"  # its edge bundle: what `llava-edge chat` uses without --bundle


def cache_dir() -> Path:
    """$LLAVA_EDGE_CACHE, else $XDG_CACHE_HOME/llava-edge, else ~/.cache/llava-edge."""
    root = os.environ.get("LLAVA_EDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-edge"
    return Path(root)

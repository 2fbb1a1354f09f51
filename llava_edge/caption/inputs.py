"""Which files a caption run reads: files named, image files in folders (optionally below), glob matches."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def find_images(inputs: list[str], recursive: bool = False) -> list[str]:
    """Each input file once (by absolute path), in the order given; a folder's images and a pattern's matches
    sorted. A named file is kept whatever its suffix, missing or not: its line says what is wrong with it."""
    found: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            found.append(path)

    for text in inputs:
        path = Path(text)
        if path.is_dir():
            for p in folder_images(path, recursive):
                add(p)
        elif not path.exists() and any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                print(f"llava-edge: note: no file matches {text}", file=sys.stderr)
            for m in matches:
                if os.path.isdir(m):
                    for p in folder_images(Path(m), recursive):
                        add(p)
                else:
                    add(m)
        else:
            add(text)
    return found


def folder_images(folder: Path, recursive: bool) -> list[str]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(str(f) for f in files if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())

"""The edge bundle on disk: files written into a temp dir beside the target, manifest last, then renamed.

An interrupted export (Ctrl-C, a crash, a kill) leaves neither the bundle dir nor the temp dir behind
(the temp dir is removed on any exception; after SIGKILL it is removed by the next export to that path).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError

FORMAT_VERSION = 1
TEMP_PREFIX = ".llava-edge-export-"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    return {"name": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size}


@contextlib.contextmanager
def staged_dir(target: Path, overwrite: bool = False):
    """Yield a temp dir next to `target`; on success it becomes `target` by rename, on failure it goes."""
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists already (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{TEMP_PREFIX}{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed outright
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(bundle_dir: Path, manifest: dict) -> Path:
    path = Path(bundle_dir) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(bundle_dir: Path, verify: bool = True) -> dict:
    """The manifest of a bundle, checked: present, parseable, every listed file there with its sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"{bundle_dir}: not an edge bundle (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {manifest.get('format_version')!r}, this llava-edge reads {FORMAT_VERSION}")
    for role in ("vision", "decoder"):
        if role not in manifest.get("files", {}):
            raise UserError(f"{path}: no {role!r} file listed")
    for role, entry in manifest["files"].items():
        f = bundle_dir / entry["name"]
        if not f.is_file():
            raise UserError(f"{bundle_dir}: {role} file {entry['name']} is missing")
        if f.stat().st_size != entry["bytes"]:
            raise UserError(f"{f}: {f.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated copy?)")
        if verify and sha256_of(f) != entry["sha256"]:
            raise UserError(f"{f}: sha256 does not match the manifest (corrupted or replaced file)")
    return manifest

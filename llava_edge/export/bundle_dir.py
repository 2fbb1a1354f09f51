"""The edge bundle on disk: files written into a temp dir beside the target, manifest last, then renamed.

An interrupted export (Ctrl-C, a crash, a kill) leaves neither the bundle dir nor the temp dir behind
(the temp dir is removed on any exception; after SIGKILL it is removed by the next export to that path).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from ..runtime.bundle import sha256_of

TEMP_PREFIX = ".llava-edge-export-"


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
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the bundle dir should be like any dir the user makes
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_manifest(bundle_dir: Path, manifest: dict) -> Path:
    path = Path(bundle_dir) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path

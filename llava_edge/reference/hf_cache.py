"""Checkpoint names -> directories: a local dir, else a snapshot in the local Hugging Face cache. Never the network.

No torch: only paths and the one-line error that says where it looked and how to get the checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"


def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def find_in_hf_cache(name: str) -> Path | None:
    """Newest snapshot of `org/name` or of any `*/name` in the local Hugging Face cache."""
    pattern = "models--" + name.replace("/", "--") if "/" in name else f"models--*--{name}"
    snapshots = []
    for cache in hf_cache_dirs():
        for repo in cache.glob(pattern):
            snapshots += [p for p in (repo / "snapshots").glob("*") if (p / "config.json").exists()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def resolve_checkpoint(name: str | os.PathLike, what: str = "checkpoint", hint: str = "") -> Path:
    """A local directory, else a snapshot in the local Hugging Face cache. Never the network."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: a {what} must be a directory, not a file")
    found = find_in_hf_cache(str(name))
    if found is not None:
        return found
    looked = ", ".join([str(path.resolve())] + [str(d) for d in hf_cache_dirs()])
    get = hint or download_hint(str(name))
    raise CheckpointError(f"{what} {str(name)!r} not found (looked in {looked}); get it with: {get}")


KNOWN_REPOS = {
    "llava-v1.5-7b": "liuhaotian/llava-v1.5-7b",
    "llava-v1.5-13b": "liuhaotian/llava-v1.5-13b",
    "llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b-hf": "llava-hf/llava-1.5-13b-hf",
}


def download_hint(name: str) -> str:
    repo = KNOWN_REPOS.get(name, name)
    hint = f"huggingface-cli download {repo}"
    if repo.startswith("liuhaotian/"):  # its CLIP tower is a separate download
        hint += f" and huggingface-cli download {DEFAULT_CLIP}"
    return hint

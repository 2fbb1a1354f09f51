"""Weights files of a checkpoint dir, read one tensor at a time (safetensors, or memory-mapped torch zip files).

`.bin` files are only ever opened with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..architectures import read_json
from ..errors import CheckpointError


class TensorFile:
    """One weights file: names without loading, tensors one at a time."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            try:
                self._st = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
            self._bin = None
        else:
            self._st = None
            self._bin = load_bin(path)

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._bin)

    def get(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if self._st is not None else self._bin[key]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._bin[key].shape)


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        mmap = zipfile.is_zipfile(path)  # legacy (non-zip) torch files cannot be memory-mapped
        with warnings.catch_warnings():  # the unpickler warns about protocols before refusing the file
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a plain tensor checkpoint ({first_line})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__} with other values")
    return obj


def weight_files(ckpt: Path) -> list[Path]:
    """The weights files of a checkpoint dir: a sharded index wins over single files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            files = [ckpt / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
            return files
    singles = sorted(ckpt.glob("*.safetensors")) or sorted(ckpt.glob("pytorch_model*.bin"))
    if not singles:
        raise CheckpointError(f"{ckpt}: no weights found (*.safetensors, pytorch_model*.bin or an index)")
    return singles


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, TensorFile]]:
    for path in files:
        tf = TensorFile(path)
        for key in tf.keys():
            yield key, path, tf

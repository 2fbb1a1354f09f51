"""The edge bundle's manifest.json checked field by field (docs/design.md, "Edge bundle"): a malformed manifest is one
line naming the field, never a KeyError or TypeError further down. No torch.
"""

from __future__ import annotations

import math
import re

from ..conversation import TEMPLATES
from ..errors import UserError
from ..image import ASPECTS

FILE_ROLES_REQUIRED = ("vision", "decoder")
FILE_ROLES_OPTIONAL = ("mmproj",)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Fields:
    """Typed reads of one JSON object; `where` is the dotted path used in messages (e.g. files.vision)."""

    def __init__(self, obj, where: str, origin: str):
        self.where, self.origin = where, origin
        if not isinstance(obj, dict):
            self.fail(where, f"must be an object (got {_kind(obj)})")
        self.obj = obj

    def fail(self, field: str, problem: str):
        raise UserError(f"{self.origin}: manifest field {field!r} {problem}")

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, required: bool = True):
        if key not in self.obj:
            if required:
                self.fail(self._name(key), "is missing")
            return None
        return self.obj[key]

    def integer(self, key: str, minimum: int | None = None, required: bool = True) -> int | None:
        value = self.get(key, required)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(self._name(key), f"must be an integer (got {_kind(value)})")
        if minimum is not None and value < minimum:
            self.fail(self._name(key), f"must be >= {minimum} (got {value})")
        return value

    def text(self, key: str, choices: tuple[str, ...] | None = None, required: bool = True) -> str | None:
        value = self.get(key, required)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            self.fail(self._name(key), f"must be a non-empty string (got {_kind(value)})")
        if choices is not None and value not in choices:
            self.fail(self._name(key), f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    def numbers(self, key: str, count: int, positive: bool = False) -> tuple[float, ...]:
        value = self.get(key)
        ok = isinstance(value, list) and len(value) == count and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
        if not ok:
            self.fail(self._name(key), f"must be a list of {count} finite numbers (got {_kind(value)})")
        if positive and min(value) <= 0:
            self.fail(self._name(key), f"must hold numbers > 0 (got {value})")
        return tuple(float(x) for x in value)

    def child(self, key: str, required: bool = True) -> _Fields | None:
        value = self.get(key, required)
        if value is None and not required:
            return None
        return _Fields(value, self._name(key), self.origin)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value[:40]!r}" if value else "an empty string"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def check_file_entry(entry: _Fields) -> None:
    name = entry.text("name")
    if "/" in name or "\\" in name or name in (".", ".."):
        entry.fail(f"{entry.where}.name", f"must be a file name inside the bundle (got {name!r})")
    sha = entry.text("sha256")
    if not _SHA256.fullmatch(sha):
        entry.fail(f"{entry.where}.sha256", f"must be 64 lowercase hex digits (got {sha[:70]!r})")
    entry.integer("bytes", minimum=0)


def validate_manifest(manifest, origin: str) -> dict:
    """Check every field the runtime reads; returns the manifest unchanged. `origin` names the file in messages."""
    top = _Fields(manifest, "", origin)
    files = top.child("files")
    for role in FILE_ROLES_REQUIRED:
        check_file_entry(files.child(role))
    for role in FILE_ROLES_OPTIONAL:
        entry = files.child(role, required=False)
        if entry is not None:
            check_file_entry(entry)
    for role, value in files.obj.items():
        if role not in FILE_ROLES_REQUIRED + FILE_ROLES_OPTIONAL:
            check_file_entry(_Fields(value, f"files.{role}", origin))

    vision = top.child("vision")
    vision.text("precision")
    vision.integer("image_size", minimum=1)
    vision.integer("patch_size", minimum=1)
    n_tokens = vision.integer("n_image_tokens", minimum=1)
    if vision.text("image_tokens_input", required=False) is not None:  # bundles from before token reduction lack it
        low = vision.integer("image_tokens_min", minimum=1)
        if low >= n_tokens:
            vision.fail("vision.image_tokens_min", f"must be below n_image_tokens {n_tokens} (got {low})")
    vision.numbers("mean", 3)
    vision.numbers("std", 3, positive=True)
    vision.text("aspect", ASPECTS)

    decoder = top.child("decoder")
    decoder.integer("n_embd", minimum=1)
    decoder.integer("n_ctx_train", minimum=1)
    decoder.text("quant")
    decoder.integer("bos_id", minimum=0)
    decoder.integer("eos_id", minimum=0)

    top.text("template", tuple(TEMPLATES))
    top.text("domain", required=False)
    return manifest

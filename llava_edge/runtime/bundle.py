"""An edge bundle read back: manifest.json checked against the files it lists, and the fields the runtime needs.

Checksums of big files cost seconds (a 7B decoder is 4 GB), so a file whose sha256 matched once is
remembered by (path, size, mtime) in the user's cache and not hashed again until it changes. No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..paths import cache_dir
from .manifest_schema import validate_manifest

FORMAT_VERSION = 1
DEMO_DOMAIN = "shapes-demo"  # manifest "domain" of the demo bundle: a model of the synthetic shapes world only


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class _VerifiedFiles:
    """sha256 verdicts remembered per file stamp; a cache that cannot be read or written is just skipped."""

    def __init__(self) -> None:
        self.path = cache_dir() / "verified-files.json"
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def matches(self, path: Path, sha256: str) -> bool:
        stamp = _stamp(path)
        if self.known.get(stamp) == sha256:
            return True
        if sha256_of(path) != sha256:
            return False
        self.known[stamp] = sha256
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.known))
            tmp.replace(self.path)
        except OSError:
            pass
        return True


def read_manifest(bundle_dir: Path, verify: bool = True) -> dict:
    """The manifest of a bundle, checked: present, parseable, every listed file there with its sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / "manifest.json"
    if not bundle_dir.exists():
        raise UserError(f"{bundle_dir}: bundle directory not found")
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir}: not a directory (a bundle is the folder `llava-edge export --out` wrote)")
    if not path.is_file():
        raise UserError(f"{bundle_dir}: not an edge bundle (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: the manifest must be a JSON object")
    if type(manifest.get("format_version")) is not int or manifest["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {manifest.get('format_version')!r}, this llava-edge reads {FORMAT_VERSION}")
    validate_manifest(manifest, str(path))
    verified = _VerifiedFiles() if verify else None
    for role, entry in manifest["files"].items():
        f = bundle_dir / entry["name"]
        if not f.is_file():
            raise UserError(f"{bundle_dir}: {role} file {entry['name']} is missing")
        if f.stat().st_size != entry["bytes"]:
            raise UserError(f"{f}: {f.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated copy?)")
        if verified is not None and not verified.matches(f, entry["sha256"]):
            raise UserError(f"{f}: sha256 does not match the manifest (corrupted or replaced file)")
    return manifest


@dataclass(frozen=True)
class VisionSpec:
    precision: str
    image_size: int
    patch_size: int
    n_image_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: str
    image_tokens_input: str | None = None  # the graph input for fewer tokens; None: a bundle from before token reduction
    image_tokens_min: int = 1  # the fewest tokens it gives

    @property
    def reducible(self) -> bool:
        return self.image_tokens_input is not None


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    vision_file: Path
    decoder_file: Path
    mmproj_file: Path | None
    vision: VisionSpec
    n_embd: int
    n_ctx_train: int
    quant: str
    bos_id: int
    eos_id: int
    template: str
    domain: str | None = None  # what the model knows, when the bundle says ("shapes-demo": the demo's synthetic world)


def open_bundle(bundle_dir: str | os.PathLike, verify: bool = True) -> Bundle:
    bundle_dir = Path(bundle_dir)
    m = read_manifest(bundle_dir, verify)
    v, d, files = m["vision"], m["decoder"], m["files"]
    vision = VisionSpec(
        precision=v["precision"], image_size=v["image_size"], patch_size=v["patch_size"],
        n_image_tokens=v["n_image_tokens"], mean=tuple(float(x) for x in v["mean"]),
        std=tuple(float(x) for x in v["std"]), aspect=v["aspect"],
        image_tokens_input=v.get("image_tokens_input"), image_tokens_min=v.get("image_tokens_min", 1),
    )
    return Bundle(
        path=bundle_dir, manifest=m,
        vision_file=bundle_dir / files["vision"]["name"], decoder_file=bundle_dir / files["decoder"]["name"],
        mmproj_file=bundle_dir / files["mmproj"]["name"] if "mmproj" in files else None,
        vision=vision, n_embd=d["n_embd"], n_ctx_train=d["n_ctx_train"], quant=d["quant"],
        bos_id=d["bos_id"], eos_id=d["eos_id"], template=m["template"], domain=m.get("domain"),
    )

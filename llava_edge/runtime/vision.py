"""The vision half of a bundle on ONNX Runtime: image file -> pixels (per the manifest) -> image embeddings.

Embeddings are cached by the sha256 of the image bytes (and of the vision graph, and the number of image
tokens asked for): in memory as a bounded LRU, optionally on disk as .npy files, so asking again about the
same photo costs no encode. Fewer image tokens (`image_tokens=K`) are chosen by the vision graph itself
(token reduction, in bundles exported since it exists; the budget is checked by `Model.image_budget`). No torch.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..image import load_image, preprocess, read_image_source
from ..onnx_session import ort_session
from .bundle import Bundle
from .image_budget import ImageBudget

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_warned: set[str] = set()


def choose_providers(device: str, available: list[str]) -> list[str]:
    """ORT providers for a device choice, best first, always ending in CPU. An explicit GPU choice that this
    onnxruntime cannot serve falls back to CPU with one note on stderr (once per process)."""
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r} (expected one of: {', '.join(DEVICES)})")
    wanted = {"auto": ["tensorrt", "cuda"], "tensorrt": ["tensorrt", "cuda"], "cuda": ["cuda"], "cpu": []}[device]
    chosen = [PROVIDERS[d] for d in wanted if PROVIDERS[d] in available]
    if device in ("cuda", "tensorrt") and PROVIDERS[device] not in available and device not in _warned:
        _warned.add(device)
        print(f"llava-edge: onnxruntime here has no {PROVIDERS[device]}; vision runs on "
              f"{chosen[0] if chosen else 'CPU'} (install onnxruntime-gpu for {device})", file=sys.stderr)
    return chosen + [PROVIDERS["cpu"]]


@dataclass
class EncodedImage:
    embeds: np.ndarray  # [n_tokens, n_embd] float32, C-contiguous
    sha256: str  # of the image bytes
    vision_ms: float  # 0.0 when it came from a cache
    cached: bool
    budget_tag: str = ""  # the ImageBudget's tag: "" for every token, "-kK" for K of them

    @property
    def n_tokens(self) -> int:
        return self.embeds.shape[0]

    @property
    def image_id(self) -> str:
        """What names these embeddings in every cache: the image bytes' sha256 and the budget's tag (the same
        image at another budget is other positions)."""
        return self.sha256 + self.budget_tag


class EmbeddingCache:
    """LRU of image embeddings bounded in bytes, with an optional directory of .npy files behind it.
    Thread-safe: the server encodes images on several request threads."""

    def __init__(self, max_bytes: int = 256 << 20, disk_dir: str | os.PathLike | None = None):
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        if self.disk_dir is not None:
            path = self.disk_dir / f"{key}.npy"
            try:
                value = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                return None
            self._remember(key, value)
            return value
        return None

    def put(self, key: str, value: np.ndarray) -> None:
        self._remember(key, value)
        if self.disk_dir is not None:
            try:
                self.disk_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.disk_dir / f"{key}.{os.getpid()}.{threading.get_ident()}.tmp.npy"
                np.save(tmp, value, allow_pickle=False)
                tmp.replace(self.disk_dir / f"{key}.npy")
            except OSError:
                pass  # a cache that cannot be written is only slower

    def _remember(self, key: str, value: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key).nbytes
            if value.nbytes > self.max_bytes:
                return
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._items)


class VisionEncoder:
    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        threads: int | None = None,
        cache: EmbeddingCache | None = None,
    ):
        import onnxruntime as ort

        self.spec = bundle.vision
        providers = choose_providers(device, ort.get_available_providers())
        try:  # lean: one image at a time, beside llama.cpp on the same cores
            self.session = ort_session(bundle.vision_file, threads, providers, lean=True, quiet=True)
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise UserError(f"{bundle.vision_file}: onnxruntime could not load it ({' '.join(str(e).split())[:200]})") from None
        self.provider = self.session.get_providers()[0]
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        io = bundle.manifest["vision"]
        if io.get("input") not in inputs or io.get("output") not in outputs:
            raise UserError(f"{bundle.vision_file}: graph has inputs {list(inputs)} and outputs {list(outputs)}, "
                            f"the manifest says {io.get('input')!r} -> {io.get('output')!r}")
        self.input_name, self.output_name = io["input"], io["output"]
        out_shape = outputs[self.output_name].shape
        self.n_embd = out_shape[-1] if isinstance(out_shape[-1], int) else bundle.n_embd
        if self.n_embd != bundle.n_embd:
            raise UserError(f"{bundle.vision_file}: image embeddings have n_embd {self.n_embd}, "
                            f"the decoder takes {bundle.n_embd}: vision and decoder are from different models")
        self.cache = cache if cache is not None else EmbeddingCache()
        self.graph_sha = bundle.manifest["files"]["vision"]["sha256"]
        self.image_tokens_input = self.spec.image_tokens_input
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        if self.image_tokens_input is not None and self.image_tokens_input not in overridable | set(inputs):
            raise UserError(f"{bundle.vision_file}: the manifest names the input {self.image_tokens_input!r} for "
                            "fewer image tokens; the graph has none")

    def pixels(self, image_bytes: bytes, name: str | None = None) -> np.ndarray:
        s = self.spec
        return preprocess(load_image(image_bytes, name), s.image_size, s.mean, s.std, s.aspect)

    def encode_pixels(self, pixels: np.ndarray, budget: ImageBudget | None = None) -> np.ndarray:
        """[B, 3, S, S] float32 -> [B, K, n_embd] float32, K per the budget (checked by Model.image_budget;
        None: every token)."""
        feeds = {self.input_name: np.ascontiguousarray(pixels, np.float32)}
        if budget is not None and budget.graph_tokens is not None:
            feeds[self.image_tokens_input] = np.array(budget.graph_tokens, np.int64)
        (out,) = self.session.run([self.output_name], feeds)
        expected = (pixels.shape[0], self.spec.n_image_tokens if budget is None else budget.n_tokens, self.n_embd)
        if out.shape != expected:
            raise UserError(f"vision graph returned {out.shape}, the manifest promises {expected}")
        return out

    def identify(self, source: str | os.PathLike | bytes) -> tuple[str, bytes, str]:
        """(name, bytes, sha256) of an image file or its bytes, without decoding it."""
        name, data = read_image_source(source)
        return name, data, hashlib.sha256(data).hexdigest()

    def _key(self, image_id: str) -> str:
        return f"{self.graph_sha[:16]}-{image_id}"

    def cached(self, sha256: str, budget: ImageBudget | None = None) -> EncodedImage | None:
        """The embeddings of these bytes at this budget, when the cache has them."""
        tag = "" if budget is None else budget.tag
        hit = self.cache.get(self._key(sha256 + tag))
        return None if hit is None else EncodedImage(hit, sha256, 0.0, True, tag)

    def remember(self, embeds: np.ndarray, sha256: str, ms: float, budget: ImageBudget | None = None) -> EncodedImage:
        """Embeddings encoded elsewhere (caption's batched vision runs), put in the cache."""
        tag = "" if budget is None else budget.tag
        self.cache.put(self._key(sha256 + tag), embeds)
        return EncodedImage(embeds, sha256, ms, False, tag)

    def encode(self, source: str | os.PathLike | bytes, budget: ImageBudget | None = None) -> EncodedImage:
        """One image file (or its bytes) -> its embeddings at this budget (None: every token), from the cache
        when the same bytes were seen at the same budget."""
        name, data, sha = self.identify(source)
        hit = self.cached(sha, budget)
        if hit is not None:
            return hit
        t0 = time.perf_counter()  # preprocessing counts: it is part of what an image costs
        pixels = self.pixels(data, name)
        embeds = np.ascontiguousarray(self.encode_pixels(pixels[None], budget)[0])
        return self.remember(embeds, sha, 1000 * (time.perf_counter() - t0), budget)

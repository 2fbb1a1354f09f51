"""The decoder engine: one llama.cpp context, N sequences, continuous batching, prefix reuse. No torch.

A request is a chat (messages with images) rendered exactly as the reference renders it, as a list of
positions: token ids, and image slots tagged with the image's content hash. Each slot (one llama.cpp
sequence) remembers the positions its KV holds; a new request takes the free slot sharing the longest
prefix with its prompt and evaluates only the rest, never resuming inside an image.

Each `step` packs into one `llama_decode` the next token of every decoding sequence plus prefill chunks of
the waiting ones (text), then at most one chunk of image embeddings (a `llama_batch` carries either tokens
or embeddings). Everything llama.cpp would abort on (batch size, token ids, embedding shapes, room in the
sequence) is checked here first. `start()` runs the steps on a thread (serve, caption); without it the
consumer of a Generation steps the engine itself (chat), so Ctrl-C lands in the caller's thread.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from ..conversation import IMAGE_TOKEN_INDEX, render_messages, stop_strings, tokenize_prompt
from ..errors import ContextOverflow, UserError
from .answer import Timings
from .bundle import DEMO_BUNDLE, Bundle, open_bundle
from .decoder import Decoder
from .generation import Generation, Key, Message
from .llama_loader import open_llama
from .prefix_state import PrefixStates
from .sampling import SamplingConfig, sample_token
from .vision import EmbeddingCache, EncodedImage, VisionEncoder

ROLES = ("system", "user", "assistant")


@dataclass
class EngineConfig:
    parallel: int = 1  # sequences (slots) in the one context
    n_ctx: int | None = None  # positions per sequence (default: the model's trained context, at most 4096)
    n_batch: int = 512  # most positions in one llama_decode
    threads: int | None = None
    queue: int = 16  # requests that may wait for a slot; one more is refused (EngineBusy)
    device: str = "auto"  # vision: auto|cpu|cuda|tensorrt
    f32_kv: bool = False
    image_cache_dir: str | None = None  # image embeddings as .npy files too
    kv_cache_dir: str | None = None  # KV state after the image prefix, on disk

    def __post_init__(self):
        for name in ("parallel", "n_batch", "queue"):
            if getattr(self, name) < (0 if name == "queue" else 1):
                raise UserError(f"{name.replace('_', '-')} must be at least {0 if name == 'queue' else 1}")
        if self.n_ctx is not None and self.n_ctx < 16:
            raise UserError(f"n-ctx must be at least 16 (got {self.n_ctx})")


class EngineBusy(Exception):
    """Every slot is busy and the queue is full: try again later."""


@dataclass
class _Slot:
    seq: int
    held: list[Key] = field(default_factory=list)  # what this sequence's KV holds, position by position
    gen: Generation | None = None
    last_used: float = 0.0
    last_logits: np.ndarray | None = None


class Engine:
    def __init__(self, bundle: Bundle, vision: VisionEncoder, llm: llama_cpp.Llama, config: EngineConfig,
                 n_ctx_seq: int):
        self.bundle, self.vision, self.llm, self.config = bundle, vision, llm, config
        self.decoder = Decoder(llm)  # tokenizer, token pieces, vocab and n_embd checks
        if self.decoder.n_embd != bundle.n_embd or vision.n_embd != bundle.n_embd:
            raise UserError(f"{bundle.path}: the decoder takes n_embd {self.decoder.n_embd}, the manifest says "
                            f"{bundle.n_embd} and the vision graph gives {vision.n_embd}")
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = min(config.n_batch, llm.n_batch)
        self.n_image_tokens = bundle.vision.n_image_tokens
        self.stops = stop_strings(bundle.template)
        self.specials = {"</s>": bundle.eos_id}
        self.slots = [_Slot(i) for i in range(config.parallel)]
        self.image_cache_hits = 0
        self._waiting: deque[Generation] = deque()
        self._lock = threading.Lock()  # the waiting queue and slot ownership
        self._step_lock = threading.Lock()  # one stepper at a time: llama.cpp's context is not thread-safe
        self._wakeup = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._memory = llama_cpp.llama_get_memory(llm.ctx)
        self.prefix_states = PrefixStates(config.kv_cache_dir, llm, bundle.manifest["files"]["decoder"]["sha256"],
                                          bundle.template, config.f32_kv) if config.kv_cache_dir else None
        self._tokens = self._batch(0)
        self._embeds = self._batch(self.decoder.n_embd)

    @classmethod
    def open(cls, bundle_dir: str | os.PathLike | None = None, config: EngineConfig | None = None,
             verify: bool = True) -> Engine:
        """Load a bundle (default: the demo bundle in the package) with `config.parallel` sequences."""
        config = config or EngineConfig()
        bundle = open_bundle(bundle_dir or DEMO_BUNDLE, verify=verify)
        vision = VisionEncoder(bundle, config.device, config.threads, EmbeddingCache(disk_dir=config.image_cache_dir))
        n_ctx_seq = config.n_ctx or min(bundle.n_ctx_train or 4096, 4096)
        # llama.cpp pads the whole context to a multiple of 256 and splits it evenly: give each sequence a
        # multiple of 256 so the split is exact (the engine still holds each to n_ctx_seq)
        per_sequence = -(-n_ctx_seq // 256) * 256
        llm = open_llama(bundle.decoder_file, n_ctx=per_sequence * config.parallel, n_threads=config.threads,
                         n_batch=config.n_batch, f32_kv=config.f32_kv, n_seq_max=config.parallel)
        return cls(bundle, vision, llm, config, n_ctx_seq)

    # ------------------------------------------------------------------ requests

    def generate(self, messages: list[Message], sampling: SamplingConfig | None = None) -> Generation:
        """Queue a chat for an answer; images are encoded here (or come from the cache)."""
        sampling = sampling or SamplingConfig()
        t_start = time.perf_counter()
        timings = Timings()
        keys, images = self._prompt(messages, timings)
        timings.n_prompt_tokens = len(keys)
        if len(keys) >= self.n_ctx_seq:
            raise ContextOverflow(f"the prompt is {len(keys)} positions (each image takes {self.n_image_tokens}); "
                                  f"the context holds {self.n_ctx_seq}: shorten the conversation (/reset in the chat) "
                                  "or use a larger --n-ctx", len(keys), self.n_ctx_seq)
        gen = Generation(self, keys, images, sampling, self.stops + list(sampling.stop), timings, t_start)
        with self._lock:
            free = sum(s.gen is None for s in self.slots)
            if len(self._waiting) >= self.config.queue + free:
                raise EngineBusy(f"all {len(self.slots)} slots are busy and {len(self._waiting) - free} requests wait")
            self._waiting.append(gen)
            self._wakeup.notify()
        return gen

    def _prompt(self, messages: list[Message], timings: Timings) -> tuple[list[Key], dict[int, np.ndarray]]:
        """The reference's prompt as positions, and each image's embeddings by its first position."""
        if not messages:
            raise UserError("the conversation has no messages")
        encoded: list[EncodedImage] = []
        for m in messages:
            if m.role not in ROLES:
                raise UserError(f"unknown message role {m.role!r} (expected system, user or assistant)")
            if m.images and m.role != "user":
                raise UserError("images can only be in user messages")
            for source in m.images:
                if isinstance(source, EncodedImage):  # encoded by the caller, who reports its cost
                    encoded.append(source)
                    continue
                image = self.vision.encode(source)
                self.image_cache_hits += image.cached
                timings.vision_ms += image.vision_ms
                timings.image_cached = timings.image_cached or image.cached
                encoded.append(image)
        prompt = render_messages(self.bundle.template, [(m.role, m.text, len(m.images)) for m in messages])
        ids = tokenize_prompt(prompt, self.decoder.tokenize, self.bundle.bos_id, IMAGE_TOKEN_INDEX, self.specials)
        if ids.count(IMAGE_TOKEN_INDEX) != len(encoded):  # an "<image>" typed in the text would shift the images
            raise UserError("the text contains '<image>'; send images as image parts instead")
        keys: list[Key] = []
        images: dict[int, np.ndarray] = {}
        n_image = 0
        for t in ids:
            if t != IMAGE_TOKEN_INDEX:
                keys.append(int(t))
                continue
            image = encoded[n_image]
            n_image += 1
            if image.embeds.shape != (self.n_image_tokens, self.decoder.n_embd):
                raise UserError(f"image embeddings have shape {image.embeds.shape}; the decoder needs "
                                f"[{self.n_image_tokens}, {self.decoder.n_embd}]")
            images[len(keys)] = image.embeds
            keys.extend(("image", image.sha256, i) for i in range(self.n_image_tokens))
        bad = [k for k in keys if isinstance(k, int) and not 0 <= k < self.decoder.n_vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the decoder's vocab of {self.decoder.n_vocab}")
        return keys, images

    # ------------------------------------------------------------------ stepping

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Run the steps on a background thread (several concurrent users)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="llava-edge-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = self.step()
            except Exception as e:  # the step already ended the answers it was making, with the error
                print(f"llava-edge: engine step failed: {e}", file=sys.stderr)
                busy = True
            if not busy:
                with self._lock:
                    if not self._stopping and not self._waiting:
                        self._wakeup.wait(0.5)

    def _wake(self) -> None:
        with self._lock:
            self._wakeup.notify()

    def step(self) -> bool:
        """One round: admit waiting requests, drop cancelled ones, one decode of tokens (+ one of image
        embeddings), sample. Returns whether there was anything to do."""
        with self._step_lock:
            self._admit()
            for slot in self.slots:
                if slot.gen is not None and slot.gen._cancel is not None:
                    self._release(slot, slot.gen._cancel)
            active = [s for s in self.slots if s.gen is not None]
            if not active:
                return False
            before = {s.seq: len(s.held) for s in active}
            try:
                self._decode_round(active)
            except BaseException as e:
                # A decode may or may not have happened: cut each sequence back to what it surely holds.
                for s in active:
                    self._truncate(s, min(before[s.seq], len(s.held)))
                    if s.gen is not None and not isinstance(e, KeyboardInterrupt):
                        s.gen.error = f"llama.cpp decode failed: {e}"
                        self._release(s, "error")
                    elif s.gen is not None:
                        self._release(s, "interrupted")
                raise
            return True

    def _admit(self) -> None:
        admitted = []
        with self._lock:
            while self._waiting:
                free = [s for s in self.slots if s.gen is None]
                if not free:
                    break
                gen = self._waiting.popleft()
                if gen._cancel is not None:
                    gen.finish(gen._cancel)
                    continue
                slot = max(free, key=lambda s: (_common_prefix(s.held, gen.keys), -s.last_used))
                slot.gen, gen.slot = gen, slot
                admitted.append(slot)
        # Outside the queue lock: the slot is ours, and only the stepping thread touches the KV.
        for slot in admitted:
            gen = slot.gen
            keep = min(_common_prefix(slot.held, gen.keys), len(gen.keys) - 1)
            for start in gen.images:  # never resume inside an image
                if start < keep < start + self.n_image_tokens:
                    keep = start
            self._truncate(slot, keep)
            end = _prefix_end(gen, self.n_image_tokens)
            if self.prefix_states is not None and gen.images and keep < end:
                restored = self.prefix_states.restore(slot.seq, gen.keys[:end])
                if restored is not None:
                    slot.held, keep = (list(gen.keys[:end]), end) if restored else ([], 0)
                    gen.timings.kv_restored = restored
            gen.cursor = keep
            gen.timings.n_cached = keep
            gen.timings.n_prefilled = len(gen.keys) - keep
            gen.t_prefill = time.perf_counter()

    def _decode_round(self, active: list[_Slot]) -> None:
        tokens: list[tuple[_Slot, int, bool]] = []  # (slot, token id, wants logits)
        for s in active:
            if s.gen.pending is not None:
                tokens.append((s, s.gen.pending, True))
        budget = self.n_batch - len(tokens)
        image_chunk = None  # (slot, first position, end): one image chunk per step, after the tokens
        for s in sorted((s for s in active if s.gen.pending is None), key=lambda s: s.gen.t_prefill):
            gen, keys = s.gen, s.gen.keys
            i = gen.cursor
            while budget > 0 and i < len(keys) and not isinstance(keys[i], tuple):
                tokens.append((s, keys[i], i == len(keys) - 1))
                budget -= 1
                i += 1
            if budget > 0 and image_chunk is None and i < len(keys) and isinstance(keys[i], tuple):
                start = _span_start(gen, i, self.n_image_tokens)
                end = min(start + self.n_image_tokens, i + budget)
                image_chunk = (s, i, end)
                budget -= end - i
        if tokens:
            self._decode_tokens(tokens)
        if image_chunk is not None:
            self._decode_image_chunk(*image_chunk)

    def _decode_tokens(self, entries: list[tuple[_Slot, int, bool]]) -> None:
        batch = self._tokens
        for n, (s, token, wants) in enumerate(entries):
            batch.token[n] = token
            batch.pos[n] = len(s.held)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = s.seq
            batch.logits[n] = wants
            s.held.append(token)
            if s.gen.pending is None:
                s.gen.cursor += 1
        batch.n_tokens = len(entries)
        self._decode(batch)
        for n, (s, token, wants) in enumerate(entries):
            if wants:
                s.gen.pending = None
                self._sample(s, n)

    def _decode_image_chunk(self, s: _Slot, begin: int, end: int) -> None:
        gen = s.gen
        start = _span_start(gen, begin, self.n_image_tokens)
        chunk = np.ascontiguousarray(gen.images[start][begin - start : end - start], dtype=np.float32)
        batch = self._embeds
        m = chunk.shape[0]
        ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
        for n in range(m):
            batch.pos[n] = len(s.held) + n
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = s.seq
            batch.logits[n] = 0
        last = end == len(gen.keys)
        batch.logits[m - 1] = last
        batch.n_tokens = m
        s.held.extend(gen.keys[begin:end])
        gen.cursor = end
        self._decode(batch)
        if self.prefix_states is not None and end == _prefix_end(gen, self.n_image_tokens):
            self.prefix_states.save(s.seq, gen.keys[:end])
        if last:
            self._sample(s, m - 1)

    def _decode(self, batch) -> None:
        rc = llama_cpp.llama_decode(self.llm.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode of {batch.n_tokens} positions returned {rc}")

    def _sample(self, s: _Slot, index: int) -> None:
        """Draw the next token of slot s from row `index` of the last decode's logits."""
        gen = s.gen
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, index),
                                       shape=(self.decoder.n_vocab,))
        s.last_logits = logits.copy()
        now = time.perf_counter()
        t = gen.timings
        if not gen.t_first:
            gen.t_first = now
            t.prefill_ms = 1000 * (now - gen.t_prefill)
            t.ttft_ms = 1000 * (now - gen.t_start)
        token = sample_token(s.last_logits, gen.sampling.temperature, gen.sampling.top_p, gen.rng)
        if token == self.bundle.eos_id and not gen.sampling.ignore_eos:
            return self._release(s, "stop")
        t.n_generated += 1
        gen.emit(gen.text.add(self.decoder.piece(token)))
        if gen.text.stopped:
            return self._release(s, "stop")
        if t.n_generated >= gen.sampling.max_tokens or len(s.held) >= self.n_ctx_seq:
            return self._release(s, "length")
        gen.pending = token

    def _release(self, s: _Slot, reason: str) -> None:
        gen, s.gen = s.gen, None
        s.last_used = time.perf_counter()
        if gen is not None:
            gen.pending = None
            gen.finish(reason)

    def _truncate(self, s: _Slot, keep: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, s.seq, keep, -1)
        del s.held[keep:]

    # ------------------------------------------------------------------ state

    def stats(self) -> dict:
        with self._lock:
            return {"slots": len(self.slots), "busy": sum(s.gen is not None for s in self.slots),
                    "queued": len(self._waiting), "image_cache_hits": self.image_cache_hits,
                    "image_cache_entries": len(self.vision.cache)}

    def close(self) -> None:
        """Stop stepping; unfinished answers end as "cancelled"; free the context."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._step_lock:
            for gen in waiting:
                gen.finish("cancelled")
            for s in self.slots:
                if s.gen is not None:
                    self._release(s, "cancelled")
            for batch in (self._tokens, self._embeds):
                if batch is not None:
                    llama_cpp.llama_batch_free(batch)
            self._tokens = self._embeds = None
            self.decoder.close()
            self.llm.close()

    def _batch(self, n_embd: int):
        return llama_cpp.llama_batch_init(self.n_batch, n_embd, 1)


def _common_prefix(a: list[Key], b: list[Key]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prefix_end(gen: Generation, n_image_tokens: int) -> int:
    """The position after the first image: the prompt prefix whose KV the disk cache keeps."""
    return min(gen.images) + n_image_tokens if gen.images else 0


def _span_start(gen: Generation, i: int, n_image_tokens: int) -> int:
    """The first position of the image span that holds position i."""
    for start in gen.images:
        if start <= i < start + n_image_tokens:
            return start
    raise KeyError(i)

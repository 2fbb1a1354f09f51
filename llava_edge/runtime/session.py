"""A chat about an image: the reference's prompt, image embeddings spliced into llama.cpp, streamed answers.

Every turn the whole conversation is rendered and tokenized exactly as the reference would (template,
"<image>\\n" before the first question, BOS, "</s>" after each answer), and compared with what the KV cache
already holds: only the part after the longest common prefix is evaluated. So a second question about the
same image costs its own few tokens, never a new image encode or a new prefill of the image.
No torch.
"""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from ..conversation import IMAGE_TOKEN_INDEX, render_prompt, stop_strings, tokenize_prompt
from ..errors import UserError
from .bundle import DEMO_BUNDLE, Bundle, open_bundle
from .decoder import IMAGE_INPUT_ID, Decoder
from .llama_loader import open_llama
from .sampling import SamplingConfig, sample_token
from .vision import EmbeddingCache, EncodedImage, VisionEncoder


@dataclass
class Timings:
    vision_ms: float = 0.0  # preprocessing + ONNX encode of this turn's image; 0 when cached or already in KV
    prefill_ms: float = 0.0  # evaluating the new part of the prompt (image embeddings + text)
    ttft_ms: float = 0.0  # from the question to the first answer token, plus vision_ms
    decode_tokens_per_s: float = 0.0  # answer tokens after the first, per second
    n_prompt_tokens: int = 0  # positions of the whole prompt, image included
    n_prefilled: int = 0  # of which evaluated this turn (the rest came from the KV cache)
    n_generated: int = 0
    image_cached: bool = False


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" (EOS or a template stop), "length" (max tokens or context), "interrupted"
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict:
        return {"answer": self.text, "finish_reason": self.finish_reason, "n_prompt_tokens": self.timings.n_prompt_tokens,
                "n_generated_tokens": self.timings.n_generated, "timings": asdict(self.timings)}


class ChatSession:
    def __init__(self, bundle: Bundle, vision: VisionEncoder, decoder: Decoder):
        if decoder.n_embd != bundle.n_embd or vision.n_embd != decoder.n_embd:
            raise UserError(f"{bundle.path}: the decoder takes n_embd {decoder.n_embd}, the manifest says "
                            f"{bundle.n_embd} and the vision graph gives {vision.n_embd}")
        self.bundle, self.vision, self.decoder = bundle, vision, decoder
        self.stops = stop_strings(bundle.template)
        self.specials = {"</s>": bundle.eos_id}
        self.image: EncodedImage | None = None
        self._image_fresh = False  # the image's encode time has not been reported by a turn yet
        self.turns: list[tuple[str, str]] = []
        self.last: Answer | None = None

    @classmethod
    def open(
        cls,
        bundle_dir: str | os.PathLike | None = None,
        device: str = "auto",
        threads: int | None = None,
        n_ctx: int | None = None,
        f32_kv: bool = False,
        cache_dir: str | os.PathLike | None = None,
        verify: bool = True,
    ) -> ChatSession:
        """Load a bundle (default: the demo bundle in the package) for chatting."""
        bundle = open_bundle(bundle_dir or DEMO_BUNDLE, verify=verify)
        vision = VisionEncoder(bundle, device, threads, EmbeddingCache(disk_dir=cache_dir))
        n_ctx = n_ctx or min(bundle.n_ctx_train, 4096)
        llm = open_llama(bundle.decoder_file, n_ctx=n_ctx, n_threads=threads, f32_kv=f32_kv)
        return cls(bundle, vision, Decoder(llm))

    # ------------------------------------------------------------------ conversation state

    def set_image(self, source: str | os.PathLike | bytes) -> EncodedImage:
        """Start a new conversation about this image (encoded now, or taken from the cache)."""
        encoded = self.vision.encode(source)
        self.image, self._image_fresh = encoded, True
        self.turns = []
        self.decoder.truncate(0)  # a different image: nothing in the KV cache can be reused
        return encoded

    def reset(self) -> None:
        """Forget the questions and answers; keep the image (its KV is reused by the next question)."""
        self.turns = []

    def prompt_positions(self, question: str) -> list[int]:
        """The reference's prompt for the next turn, as positions: token ids, IMAGE_INPUT_ID for each image slot."""
        turns = [*self.turns, (question, None)]
        prompt = render_prompt(self.bundle.template, turns, image=self.image is not None)
        ids = tokenize_prompt(prompt, self.decoder.tokenize, self.bundle.bos_id, IMAGE_TOKEN_INDEX, self.specials)
        positions: list[int] = []
        for t in ids:
            positions.extend([IMAGE_INPUT_ID] * self.bundle.vision.n_image_tokens if t == IMAGE_TOKEN_INDEX else [t])
        return positions

    # ------------------------------------------------------------------ answering

    def ask(self, question: str, sampling: SamplingConfig | None = None) -> Iterator[str]:
        """Stream the answer to a question as text pieces; `self.last` holds the whole Answer afterwards,
        also when the caller stops early (Ctrl-C): the partial answer is then part of the conversation."""
        sampling = sampling or SamplingConfig()
        question = question.strip()
        if not question:
            raise UserError("the question is empty")
        t_start = time.perf_counter()
        timings = Timings()
        if self.image is not None and self._image_fresh:
            timings.vision_ms, timings.image_cached = self.image.vision_ms, self.image.cached
            self._image_fresh = False
        target = self.prompt_positions(question)
        timings.n_prompt_tokens = len(target)
        if len(target) >= self.decoder.n_ctx:
            raise UserError(f"the prompt is {len(target)} positions (the image takes {self.bundle.vision.n_image_tokens}); "
                            f"the context holds {self.decoder.n_ctx}: ask a shorter question or /reset the conversation")

        t0 = time.perf_counter()
        timings.n_prefilled = self._prefill(target)
        timings.prefill_ms = 1000 * (time.perf_counter() - t0)

        rng = np.random.default_rng(sampling.seed)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        raw, text, emitted, finish = "", "", 0, "length"
        t_first = None
        try:
            token = None
            for _ in range(sampling.max_tokens):
                if token is not None:  # the previous answer token goes into the KV only if another one follows
                    if self.decoder.room() == 0:
                        break
                    self.decoder.eval_tokens([token])
                logits = self.decoder.logits_last()
                token = sample_token(logits, sampling.temperature, sampling.top_p, rng)
                if t_first is None:  # time to first token counts this turn's image encode, as a user waits for it
                    t_first = time.perf_counter()
                    timings.ttft_ms = timings.vision_ms + 1000 * (t_first - t_start)
                if token == self.bundle.eos_id and not sampling.ignore_eos:
                    finish = "stop"
                    break
                timings.n_generated += 1
                raw += utf8.decode(self.decoder.piece(token))
                text, stopped = self._answer_text(raw)
                if stopped:
                    finish = "stop"
                    break
                safe = len(text) - _held_back(text, self.stops)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            text, _ = self._answer_text(raw + utf8.decode(b"", final=True))
            if len(text) > emitted:
                yield text[emitted:]
        except (KeyboardInterrupt, GeneratorExit):
            finish = "interrupted"
            raise
        finally:
            if t_first is not None and timings.n_generated > 1:
                timings.decode_tokens_per_s = (timings.n_generated - 1) / max(time.perf_counter() - t_first, 1e-9)
            self.turns.append((question, text.strip()))
            self.last = Answer(text.strip(), finish, timings)

    def _answer_text(self, raw: str) -> tuple[str, bool]:
        """The answer so far (leading space dropped, as the reference's .strip()) and whether a stop string ended it."""
        text = raw.lstrip()
        cut = _first_stop(text, self.stops)
        return (text, False) if cut is None else (text[:cut], True)

    def answer(self, question: str, sampling: SamplingConfig | None = None) -> Answer:
        for _ in self.ask(question, sampling):
            pass
        assert self.last is not None
        return self.last

    def _prefill(self, target: list[int]) -> int:
        """Bring the KV cache to `target` by evaluating only what differs; returns how many positions that was."""
        cached = self.decoder.sequence()
        keep = 0
        for a, b in zip(cached, target):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(target) - 1)  # the last position is evaluated again: its logits are needed
        image_at = [i for i, t in enumerate(target) if t == IMAGE_INPUT_ID]
        if image_at and image_at[0] < keep <= image_at[-1]:
            keep = image_at[0]  # never resume in the middle of an image
        self.decoder.truncate(keep)
        i = keep
        while i < len(target):
            if target[i] == IMAGE_INPUT_ID:
                if self.image is None:
                    raise RuntimeError("image slot in a prompt without an image")
                n = self.bundle.vision.n_image_tokens
                self.decoder.eval_embeddings(self.image.embeds)
                i += n
            else:
                j = i
                while j < len(target) and target[j] != IMAGE_INPUT_ID:
                    j += 1
                self.decoder.eval_tokens(target[i:j])
                i = j
        return len(target) - keep

    def close(self) -> None:
        self.decoder.close()
        self.decoder.llm.close()


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of text that could be the start of a stop string (not streamed out yet)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                longest = max(longest, k)
                break
    return longest

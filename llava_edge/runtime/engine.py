"""The decoder engine: one llama.cpp context, N sequences, continuous batching, prefix reuse. No torch.

The parts, each in its own file: `prompt` renders a chat as positions and checks it; `scheduler` (pure) keeps the
queue and the slots and plans each step; `executor` fills llama.cpp's batches and owns the KV; `generation` is one
request's answer. The engine glues them: it encodes the images, runs the plan, draws the tokens.

`start()` runs the steps on a thread (serve, caption); without it the consumer of a Generation steps the engine
itself (chat), so Ctrl-C lands in the caller's thread.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np

from ..conversation import stop_strings
from ..errors import ContextOverflow, UserError
from .answer import Timings
from .constraint import FormatCompiler
from .engine_config import EngineConfig
from .executor import Executor
from .generation import Generation
from .model import ImageBudget, Model
from .prefix_state import PrefixStates
from .prompt import DeferredImage, Message, Prompt, PromptRenderer, check_messages
from .sampling import SamplingConfig
from .scheduler import EmbeddingChunk, EngineBusy, Job, Scheduler, Slot, StepPlan, common_prefix
from .step_budget import StepCost, plan_step
from .tokenizer import Tokenizer
from .vision import EncodedImage

__all__ = ["Engine", "EngineBusy", "EngineConfig"]


class Engine:
    def __init__(self, model: Model, config: EngineConfig | None = None, owns_model: bool = False):
        """N sequences of one llama.cpp context over the model's decoder (config.parallel). owns_model: close()
        closes the model too (Engine.open)."""
        config = config or EngineConfig()
        self.model, self.config, self.owns_model = model, config, owns_model
        self.bundle, self.vision = model.bundle, model.vision
        self.n_ctx_seq = model.context_length(config.n_ctx)
        self.default_budget = model.image_budget(config.image_tokens)
        # llama.cpp pads the whole context to a multiple of 256 and splits it evenly: give each sequence a
        # multiple of 256 so the split is exact (the engine still holds each to n_ctx_seq)
        per_sequence = -(-self.n_ctx_seq // 256) * 256
        self.llm = model.open_decoder(per_sequence * config.parallel, config.parallel, config.n_batch, config.kv_type)
        self.tokenizer = Tokenizer(self.llm)
        n_embd, n_vocab = self.tokenizer.n_embd, self.tokenizer.n_vocab
        if n_embd != self.bundle.n_embd or self.vision.n_embd != self.bundle.n_embd:
            model.close_decoder(self.llm)
            raise UserError(f"{self.bundle.path}: the decoder takes n_embd {n_embd}, the manifest says "
                            f"{self.bundle.n_embd} and the vision graph gives {self.vision.n_embd}")
        self.n_batch = min(config.n_batch, self.llm.n_batch)
        self.stops = stop_strings(self.bundle.template)
        self.renderer = PromptRenderer(self.bundle.template, self.tokenizer.tokenize, self.bundle.bos_id,
                                       self.bundle.eos_id, n_vocab, n_embd, model.n_image_tokens)
        table = model.token_rows if config.embed_text else None
        self.token_rows = table if table is not None and (table.n_embd, table.n_vocab) == (n_embd, n_vocab) else None
        self.scheduler = Scheduler(config.parallel, config.queue, self.n_batch, embed_text=self.token_rows is not None)
        self.executor = Executor(self.llm, self.n_batch, n_embd, n_vocab)
        self.prefix_states = PrefixStates(config.kv_cache_dir, self.bundle.manifest["files"]["decoder"]["sha256"],
                                          self.bundle.template, self.executor.kv_description) \
            if config.kv_cache_dir else None
        self.formats = FormatCompiler(self.tokenizer, self.bundle.eos_id)  # the answer formats (JSON schemas), compiled
        self.image_cache_hits = 0
        self.answer_tokens = 0  # answer tokens drawn or forced, every request's, finished or not
        self.step_cost = StepCost()  # measured decode times, for the step budget
        self._step_lock = threading.Lock()  # one stepper at a time: llama.cpp's context is not thread-safe
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def open(cls, bundle_dir: str | os.PathLike | None = None, config: EngineConfig | None = None,
             **model_options) -> Engine:
        """Model.open(bundle_dir, **model_options) and an engine over it that owns it (closes it with itself)."""
        model = Model.open(bundle_dir, **model_options)
        try:
            return cls(model, config, owns_model=True)
        except BaseException:
            model.close()
            raise

    @property
    def slots(self) -> list[Slot]:
        return self.scheduler.slots

    # ------------------------------------------------------------------ requests (any thread)

    def generate(self, messages: list[Message], sampling: SamplingConfig | None = None,
                 image_tokens: int | None = None) -> Generation:
        """Queue a chat for an answer. The queue place is taken first (EngineBusy when there is none), then the
        images are encoded here (or come from the cache), with image_tokens tokens each (None: the engine's
        config.image_tokens)."""
        return self._queue(messages, sampling or SamplingConfig(), image_tokens, prefill_only=False)

    def prefill(self, messages: list[Message], image_tokens: int | None = None) -> Generation:
        """Evaluate a chat's positions up to the end of its last image into a slot's KV and draw nothing (finish
        reason "prefilled"): a question asked after it about the same image evaluates only its own tokens (the
        chat's prefill while the user types). The text after the last image is not evaluated."""
        return self._queue(messages, SamplingConfig(max_tokens=1), image_tokens, prefill_only=True)

    def budget(self, image_tokens: int | ImageBudget | None = None) -> ImageBudget:
        """A request's image budget: the engine's own (checked once, when it was made), one already checked, or
        the request's K, checked now."""
        if image_tokens is None:
            return self.default_budget
        return image_tokens if isinstance(image_tokens, ImageBudget) else self.model.image_budget(image_tokens)

    def count_positions(self, messages: list[Message], image_tokens: int | None = None) -> int:
        """The positions this chat's prompt takes, images included, without reading or encoding an image (the
        server picks where to cut a conversation that does not fit with it)."""
        check_messages(messages)
        budget = self.budget(image_tokens)
        placeholders = [DeferredImage(b"", "", budget.n_tokens, budget) for m in messages for _ in m.images]
        return len(self.renderer.render(messages, placeholders).keys)

    def _queue(self, messages, sampling, image_tokens, prefill_only) -> Generation:
        t_start = time.perf_counter()
        budget = self.budget(image_tokens)
        check_messages(messages)
        constraint = self.formats.open(sampling.format)  # here, in the caller's thread, before any image encode
        self.scheduler.reserve()
        try:
            timings = Timings(image_tokens=budget.n_tokens)
            images = [self._image(source, budget) for m in messages for source in m.images]
            prompt = self.renderer.render(messages, images)
            if prefill_only and not prompt.images:
                raise UserError("nothing to prefill: the conversation has no image")
            self._check_room(prompt, budget)
            self._encode_what_no_cache_holds(prompt, timings)
            if prefill_only:
                prompt = prompt.upto_last_image()
            timings.n_prompt_tokens = len(prompt.keys)
        except BaseException:
            self.scheduler.unreserve()
            raise
        gen = Generation(self, prompt.images, sampling, self.stops + list(sampling.stop), timings, t_start,
                         constraint, [k for k in prompt.keys if isinstance(k, int)])
        gen.job = Job(prompt.keys, prompt.image_spans, prefill_only, owner=gen)
        if self.prefix_states is not None:  # the disk store saves the KV at the first image's end
            gen.job.cut = gen.job.first_image_end()
        self.scheduler.submit(gen.job)
        self._wake()
        return gen

    def _check_room(self, prompt: Prompt, budget: ImageBudget) -> None:
        n = len(prompt.keys)
        if n >= self.n_ctx_seq:
            asked = self.config.n_ctx
            cut = f" (--n-ctx {asked} was cut to the model's trained context)" if asked and asked > self.n_ctx_seq else ""
            raise ContextOverflow(
                f"the prompt is {n} positions (each image takes {budget.n_tokens}); the context holds "
                f"{self.n_ctx_seq} per conversation{cut}", n_positions=n, n_ctx=self.n_ctx_seq)

    def prefix_stored(self, messages: list[Message], budget: ImageBudget) -> bool:
        """Whether the disk store holds the KV of this chat up to the end of its first image: then the image need
        not be encoded (the chat asks before it encodes a new image)."""
        if self.prefix_states is None:
            return False
        check_messages(messages)
        images = [self._image(source, budget) for m in messages for source in m.images]
        prompt = self.renderer.render(messages, images)
        if not prompt.images:
            return False
        start = min(prompt.images)
        return self.prefix_states.has(prompt.keys[:start + prompt.image_spans[start]])

    def _image(self, source, budget: ImageBudget) -> EncodedImage | DeferredImage:
        """The embeddings when they are at hand (given, or in the embedding cache), else a DeferredImage."""
        if isinstance(source, EncodedImage):  # encoded by the caller, who reports its cost
            return source
        _, data, sha = self.vision.identify(source)
        hit = self.vision.cached(sha, budget)
        if hit is not None:
            self.image_cache_hits += 1
            return hit
        return DeferredImage(data, sha, budget.n_tokens, budget)

    def _encode_what_no_cache_holds(self, prompt: Prompt, timings: Timings) -> None:
        """Encode the deferred images whose positions no KV holds: a free slot's KV, or the disk store's entry for
        the prompt up to its first image (then a restart skips the encode as well as the prefill)."""
        first = min(prompt.images) if prompt.images else None
        for start, image in prompt.images.items():
            if not isinstance(image, DeferredImage):
                continue
            end = start + image.n_tokens
            held = any(common_prefix(s.held, prompt.keys) >= end for s in self.slots if s.job is None)
            stored = self.prefix_states is not None and start == first and self.prefix_states.has(prompt.keys[:end])
            if held or stored:
                timings.image_cached = True
                continue
            encoded = self.vision.encode(image.source, image.budget)
            timings.vision_ms += encoded.vision_ms
            timings.image_cached = timings.image_cached or encoded.cached
            prompt.images[start] = encoded.embeds

    def cancel(self, gen: Generation, reason: str) -> None:
        self.scheduler.cancel(gen.job, reason)
        self._wake()

    # ------------------------------------------------------------------ stepping

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Run the steps on a background thread (several concurrent users; the chat's prefill while typing)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="llava-edge-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current step; requests stay where they are, and whoever
        iterates a Generation steps the engine again."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        if hasattr(signal, "pthread_sigmask"):
            # Ctrl-C is for the main thread (the chat's line reader, the server's shutdown): a SIGINT the kernel
            # gave this thread would leave a readline prompt blind to it until the next key.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while not self._stopping:
            try:
                busy = self.step()
            except Exception as e:  # the step already ended the answers it was making, with the error
                print(f"llava-edge: engine step failed: {e}", file=sys.stderr)
                busy = True
            if not busy:
                with self._wakeup:
                    if not self._stopping and not self.scheduler.has_waiting:
                        self._wakeup.wait(0.5)

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def step(self) -> bool:
        """One round: admit waiting requests, drop cancelled ones, one decode of tokens (+ one of image
        embeddings), draw. Returns whether there was anything to do."""
        with self._step_lock:
            self._admit()
            for slot in self.scheduler.cancelled():
                self._release(slot, slot.job.cancel_reason)
            active = self.scheduler.active()
            if not active:
                return False
            plan = plan_step(self.scheduler, self.step_cost, self.n_batch, self.config.decode_slowdown,
                             self.config.prefill_ahead_step_seconds)
            try:
                self._execute(plan)
            except BaseException as e:
                # A decode may or may not have happened: cut each sequence back to what it surely holds.
                for s in active:
                    self.executor.truncate(s.seq, len(s.held))
                    if s.job is not None:
                        if not isinstance(e, KeyboardInterrupt):
                            s.job.owner.error = f"llama.cpp decode failed: {e}"
                        self._release(s, "interrupted" if isinstance(e, KeyboardInterrupt) else "error")
                raise
            for s in active:
                if s.job is not None and s.job.prefill_only and s.job.prefilled:
                    self._release(s, "prefilled")
            return True

    def _admit(self) -> None:
        admitted, dropped = self.scheduler.admit()
        for job in dropped:
            job.owner.finish(job.cancel_reason)
        for a in admitted:
            self.executor.truncate(a.slot.seq, a.keep)
            restored = None
            end = a.job.first_image_end()
            if self.prefix_states is not None and end and a.keep < end:
                blob = self.prefix_states.get(a.job.keys[:end])
                if blob is not None:
                    restored = self.executor.write_state(a.slot.seq, blob, end)
                    self.scheduler.restored(a.slot, end if restored else 0)
            a.job.owner.started(a.job.cursor, len(a.job.keys) - a.job.cursor, bool(restored))

    def _execute(self, plan: StepPlan) -> None:
        if plan.tokens:
            t0 = time.perf_counter()
            self.executor.decode_tokens([(e.slot.seq, e.pos, e.token, e.wants_logits) for e in plan.tokens])
            self.step_cost.add(len(plan.tokens), time.perf_counter() - t0)
            self.scheduler.commit_tokens(plan)
            for row, e in enumerate(plan.tokens):
                if e.wants_logits:
                    self._draw(e.slot, row)
        if plan.embeddings is not None:
            c = plan.embeddings
            embeds = self._chunk_rows(c)
            t0 = time.perf_counter()
            self.executor.decode_embeddings(c.slot.seq, c.pos, embeds, c.wants_logits)
            self.step_cost.add(c.end - c.begin, time.perf_counter() - t0)
            self.scheduler.commit_embeddings(plan)
            if self.prefix_states is not None and c.end == c.slot.job.first_image_end():
                self.prefix_states.put(c.slot.job.keys[:c.end], self.executor.read_state(c.slot.seq))
            if c.wants_logits:
                self._draw(c.slot, c.end - c.begin - 1)

    def _chunk_rows(self, c: EmbeddingChunk) -> np.ndarray:
        """The embedding rows of a chunk's positions: image embeddings, and token-table rows for its text."""
        job, gen = c.slot.job, c.slot.job.owner
        parts, i = [], c.begin
        while i < c.end:
            start = job.span_start(i)
            if start is None:
                j = i
                while j < c.end and job.span_start(j) is None:
                    j += 1
                parts.append(self.token_rows.rows(job.keys[i:j]))
            else:
                image = gen.images[start]
                if isinstance(image, DeferredImage):  # the KV that held it was lost meanwhile
                    gen.images[start] = self.vision.encode(image.source, image.budget).embeds
                j = min(c.end, start + job.image_spans[start])
                parts.append(gen.images[start][i - start:j - start])
            i = j
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _draw(self, slot: Slot, row: int) -> None:
        gen = slot.job.owner
        tokens, reason = gen.draw(self.executor.logits(row), self.bundle.eos_id, self.tokenizer.piece,
                                  self.n_ctx_seq - len(slot.held), self.n_batch // len(self.slots))
        if reason is not None:
            self._release(slot, reason)
        else:
            self.scheduler.feed(slot, tokens)

    def _release(self, slot: Slot, reason: str) -> None:
        if slot.job is not None:  # counted before the slot shows free
            self.answer_tokens += slot.job.owner.timings.n_generated
        job = self.scheduler.release(slot)
        if job is not None:
            gen = job.owner
            if reason == "prefilled":
                gen.timings.prefill_ms = 1000 * (time.perf_counter() - gen.t_prefill)
            gen.finish(reason)

    def forget(self) -> None:
        """Empty every free slot's KV (benchmarks: the next request starts cold)."""
        with self._step_lock:
            for slot in self.slots:
                if slot.job is None:
                    self.executor.truncate(slot.seq, 0)
                    self.scheduler.truncate(slot, 0)

    # ------------------------------------------------------------------ state

    def stats(self) -> dict:
        return {**self.scheduler.counts(), "image_cache_hits": self.image_cache_hits, "answer_tokens": self.answer_tokens,
                "image_cache_entries": len(self.vision.cache)}

    def close(self) -> None:
        """Stop stepping; unfinished answers end as "cancelled"; free the context."""
        self.stop()
        with self._step_lock:
            for job in self.scheduler.clear_waiting():
                job.owner.finish("cancelled")
            for s in self.slots:
                if s.job is not None:
                    self._release(s, "cancelled")
            self.executor.close()
            self.model.close_decoder(self.llm)
        if self.owns_model:
            self.model.close()

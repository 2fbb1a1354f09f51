"""A caption run: the files not yet in --out, vision on the feeder thread, N answers decoded together by one
engine, each finished answer appended as one line. Ctrl-C (or SIGTERM) ends it cleanly: the lines finished
are written, the answers in progress are dropped (a rerun makes them), and the run says it was interrupted.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..conversation import render_messages
from ..errors import UserError
from ..runtime import Engine, EngineConfig, Message, Model, SamplingConfig
from ..runtime.generation import Generation
from .caption_config import DEFAULT_PROMPT, VISION_BATCH, CaptionConfig  # noqa: F401  (callers import them from here)
from .feeder import END, Feeder, Item
from .inputs import find_images
from .results import ResultFile, done_key, run_fields



@dataclass
class CaptionSummary:
    found: int = 0  # input files
    already_done: int = 0  # skipped: their lines were in --out before this run
    written: int = 0  # lines this run wrote
    errors: int = 0  # of which error lines
    encoded: int = 0  # vision runs (an image whose bytes were seen before is not encoded again)
    failed: int = 0  # answers the engine failed: no line written, so a rerun makes them
    seconds: float = 0.0
    interrupted: bool = False
    demo: bool = False  # the demo model answered (the command says so once)

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """130: interrupted; 1: some inputs have no answer (error lines, or answers the engine failed); 0: all
        answered. A rerun tries the inputs without an answer again."""
        if self.interrupted:
            return 130
        return 1 if self.errors or self.failed else 0


def vision_batch_size(precision: str, wanted: int | None) -> int:
    """An int8 graph quantizes its activations with one scale per tensor, i.e. over the whole batch: an image's
    embeddings would depend on its batch mates (max |diff| 0.47 on the demo graph), and its answer could differ
    from `chat`'s. So int8 encodes one image per run (still on the feeder thread, ahead of the decoder)."""
    if wanted is not None:
        return wanted
    return 1 if precision == "int8" else VISION_BATCH


def context_per_sequence(model: Model, prompt: str, max_tokens: int) -> int:
    """Positions one caption can need (the prompt's bytes bound its tokens), at most the engine's default: N
    sequences of the model's whole context would cost N times its KV cache for nothing."""
    text = render_messages(model.bundle.template, [("user", prompt, 1)])
    needed = model.n_image_tokens + len(text.encode()) + 1 + max_tokens
    return min(needed, model.context_length())


def run_caption(cfg: CaptionConfig, caption=None) -> CaptionSummary:
    """The files not yet in --out, captioned by `caption` (default: one engine in this process; `--ray`
    passes its own, called the same way)."""
    prompt = cfg.prompt
    sampling = SamplingConfig(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed,
                              format=cfg.format)
    paths = find_images(cfg.inputs, cfg.recursive)
    if not paths:
        raise UserError(f"no image files in {' '.join(cfg.inputs)}" + ("" if cfg.recursive else " (--recursive looks in subfolders)"))
    results = ResultFile(cfg.out)
    done = results.open()
    try:
        todo = [p for p in paths if done_key(p, prompt, cfg.format, cfg.image_tokens) not in done]
        summary = CaptionSummary(found=len(paths), already_done=len(paths) - len(todo))
        if todo:
            (caption or _caption)(cfg, prompt, sampling, todo, results, summary)
        return summary
    finally:
        results.close()


def open_engine(cfg: CaptionConfig, queue: int) -> tuple[Engine, int]:
    """The engine of a caption run (contexts sized for its prompt) and its vision batch size."""
    model = Model.open(cfg.bundle, device=cfg.device, threads=cfg.threads)
    try:
        engine = Engine(model, EngineConfig(
            parallel=cfg.parallel, n_ctx=context_per_sequence(model, cfg.prompt, cfg.max_tokens), queue=queue,
            image_tokens=cfg.image_tokens, kv_type=cfg.kv_type), owns_model=True)
    except BaseException:
        model.close()
        raise
    return engine, vision_batch_size(model.bundle.vision.precision, cfg.vision_batch)


def _caption(cfg: CaptionConfig, prompt: str, sampling: SamplingConfig, todo: list[str], results: ResultFile,
             summary: CaptionSummary) -> None:
    engine, batch = open_engine(cfg, queue=2 * cfg.parallel)
    summary.demo = engine.model.is_demo
    feeder = Feeder(engine.vision, todo, batch, depth=2 * cfg.parallel + batch, budget=engine.default_budget)
    lines = LineWriter(results, summary, progress_bar(cfg, summary))
    run = LocalRun(engine, feeder, prompt, sampling, lines, run_fields(cfg.format, cfg.image_tokens), 2 * cfg.parallel)
    stop = StopOnSignal()
    t0 = time.perf_counter()
    try:
        engine.start()
        feeder.start()
        while not stop.requested and not (run.fed_all and not run.inflight):
            run.feed(stop)
            run.take_finished()
        summary.interrupted = stop.requested
    except KeyboardInterrupt:  # a second Ctrl-C: the lines written are whole, the rest is for the rerun
        summary.interrupted = True
    finally:
        stop.restore()
        feeder.stop.set()
        for _, gen in run.inflight:
            gen.cancel()
        summary.seconds = time.perf_counter() - t0
        summary.encoded = feeder.encoded
        lines.bar.close()
        engine.close()
        feeder.join(5)


def progress_bar(cfg: CaptionConfig, summary: CaptionSummary):
    """The run's bar on stderr: images of all found, the lines already there counted in, errors beside."""
    from tqdm import tqdm

    bar = tqdm(total=summary.found, initial=summary.already_done, unit="img", desc="caption", file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1, disable=not cfg.progress)
    bar.set_postfix(errors=0)
    return bar


@dataclass
class LineWriter:
    """Appends a run's lines to --out, counted in the summary and on the bar."""

    results: ResultFile
    summary: CaptionSummary
    bar: object  # tqdm

    def write(self, record: dict) -> None:
        self.results.append(record)
        self.summary.written += 1
        self.summary.errors += "error" in record
        self.bar.update(1)
        if "error" in record:
            self.bar.set_postfix(errors=self.summary.errors)

    def note_failed(self, what: str) -> None:
        """An answer the engine failed: no line, so that a rerun tries it again."""
        self.summary.failed += 1
        self.bar.write(f"llava-edge: {what}; not written (a rerun tries again)", file=sys.stderr)


@dataclass
class LocalRun:
    """The decoder side of a local run: the feeder's items handed to the engine, finished answers written."""

    engine: Engine
    feeder: Feeder
    prompt: str
    sampling: SamplingConfig
    lines: LineWriter
    fields: dict  # the run's format and tokens per image (results.run_fields), in every line
    most_inflight: int  # N answers decoding and N waiting for a slot keep the engine's queue full
    inflight: deque[tuple[Item, Generation]] = field(default_factory=deque)
    fed_all: bool = False

    def feed(self, stop: StopOnSignal) -> None:
        """Hand the engine what the feeder has ready, up to most_inflight; wait briefly only when idle."""
        while not self.fed_all and len(self.inflight) < self.most_inflight and not stop.requested:
            try:
                item = self.feeder.items.get(timeout=0.1 if not self.inflight else 0)
            except queue.Empty:
                return
            if item is END:
                self.fed_all = True
                if self.feeder.failure is not None:
                    raise self.feeder.failure
            elif item.error is not None:
                self.lines.write(error_record(self.prompt, item, self.fields))
            else:
                message = Message("user", self.prompt, [item.image])
                self.inflight.append((item, self.engine.generate([message], self.sampling)))

    def take_finished(self) -> None:
        """Write the answers that have finished, in the order they finished."""
        if self.inflight and not self.inflight[0][1].finished:
            self.inflight[0][1].wait(0.02)  # short: an image the feeder hands over meanwhile waits at most this
        for entry in [e for e in self.inflight if e[1].finished]:
            self.inflight.remove(entry)
            record = answer_record(self.prompt, *entry, self.fields)
            if record is None:  # not the image's fault
                self.lines.note_failed(f"{entry[0].path}: {entry[1].error}")
            else:
                self.lines.write(record)


def answer_record(prompt: str, item: Item, gen: Generation, fields: dict | None = None) -> dict | None:
    """The line of a finished answer; None when the engine failed it (llama.cpp's decode returned an error).
    fields: the run's format and tokens per image (results.run_fields); with a format the line also holds the
    answer parsed (`parsed`, null when it was cut short)."""
    answer = gen.answer
    if gen.error is not None:
        return None
    timings = answer.timings
    timings.vision_ms, timings.image_cached = item.image.vision_ms, item.image.cached
    record = {"path": item.path, "sha256": item.sha256, "prompt": prompt, **(fields or {}), "answer": answer.text,
              "finish_reason": answer.finish_reason, "timings": asdict(timings)}
    if "format" in record:
        record["parsed"] = parsed_answer(answer)
    return record


def error_record(prompt: str, item: Item, fields: dict) -> dict:
    """The line of an image that could not be read."""
    return {"path": item.path, "sha256": item.sha256, "prompt": prompt, **fields, "error": item.error}


def parsed_answer(answer):
    """The JSON value of an answer held to a format; None when it was cut short (max tokens)."""
    if answer.finish_reason != "stop":
        return None
    try:
        return json.loads(answer.text)
    except json.JSONDecodeError:
        return None


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the run to stop after the lines in hand; a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nllava-edge: stopping after the lines in hand (Ctrl-C again to quit at once)", file=sys.stderr)

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


def format_summary(summary: CaptionSummary, out: str | Path) -> str:
    parts = [f"{summary.written} lines written to {out}"]
    if summary.errors:
        parts.append(f"{summary.errors} errors (a rerun tries them again)")
    if summary.failed:
        parts.append(f"{summary.failed} answers failed in the engine and were not written")
    if summary.already_done:
        parts.append(f"{summary.already_done} already there")
    text = (f"llava-edge: {', '.join(parts)}; {summary.encoded} images encoded; {summary.seconds:.1f} s, "
            f"{summary.images_per_s:.2f} images/s")
    if summary.interrupted:
        text += "; interrupted: run the same command again to continue"
    return text

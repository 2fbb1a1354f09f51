"""One worker of `caption --ray`: a Ray actor that holds one engine for the whole run and answers a batch of
image paths per call, reading the images itself (so the paths must be readable on its node).

Each call returns one row per input path: `line`, the JSON text of the record the driver writes (an answer
or an image's error), or `failed`, why the engine failed that answer (no line: a rerun tries it again), or
`fatal`, why this worker cannot caption at all (its bundle did not open); the driver stops on it.
"""

from __future__ import annotations

import json
import socket

from ..errors import UserError
from ..runtime import Message, SamplingConfig
from .feeder import END, Feeder
from .local_run import CaptionConfig, answer_record, open_engine
from .results import run_fields

CALLS_AT_ONCE = 2  # batches one worker answers together: the next one's images are read while this one decodes


class CaptionWorker:
    def __init__(self, cfg: CaptionConfig, batch_rows: int):
        self.prompt = cfg.prompt
        self.sampling = SamplingConfig(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                       format=cfg.format)
        self.fields = run_fields(cfg.format, cfg.image_tokens)
        self.engine, self.fatal = None, None
        try:
            self.engine, self.vision_batch = open_engine(cfg, queue=CALLS_AT_ONCE * batch_rows)
            self.engine.start()
        except Exception as e:  # reported by the driver in one line, whatever it was
            detail = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.fatal = f"a worker on {socket.gethostname()} cannot open the bundle: {' '.join(detail.split())}"

    def __call__(self, batch: dict) -> dict:
        given, files = [str(p) for p in batch["path"]], [str(f) for f in batch["file"]]
        if self.fatal is not None:
            return {"line": [""] * len(given), "failed": [""] * len(given), "fatal": [self.fatal] * len(given)}
        rows = {f: {"line": "", "failed": "", "fatal": ""} for f in files}
        shown = dict(zip(files, given))  # the path as the user gave it, as local `caption` writes it
        feeder = Feeder(self.engine.vision, files, self.vision_batch, depth=len(files) + 1,
                        budget=self.engine.default_budget)
        pending = []
        feeder.start()
        try:
            while (item := feeder.items.get()) is not END:
                path = shown[item.path]
                if item.error is not None:
                    rows[item.path]["line"] = json.dumps(
                        {"path": path, "sha256": item.sha256, "prompt": self.prompt, **self.fields,
                         "error": item.error.replace(item.path, path, 1)}, ensure_ascii=False)
                else:
                    pending.append((item, self.engine.generate([Message("user", self.prompt, [item.image])],
                                                               self.sampling)))
            if feeder.failure is not None:
                raise feeder.failure
            for item, gen in pending:
                gen.wait()
                record = answer_record(self.prompt, item, gen, self.fields)
                if record is None:
                    rows[item.path]["failed"] = str(gen.error)
                else:
                    record["path"] = shown[item.path]
                    rows[item.path]["line"] = json.dumps(record, ensure_ascii=False)
        finally:
            feeder.stop.set()
            for _, gen in pending:
                if not gen.finished:
                    gen.cancel()
            feeder.join(5)
        return {key: [rows[f][key] for f in files] for key in ("line", "failed", "fatal")}

    def __del__(self):
        if self.engine is not None:
            self.engine.close()

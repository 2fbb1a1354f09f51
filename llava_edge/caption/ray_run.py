"""`caption --ray`: the images not yet in --out, captioned by N Ray actors, each holding one engine and
reading its images itself; this process alone writes --out, through the same results writer, resume and
summary as a local run.

Ray retries the batch of an actor that dies, so an answer can arrive twice: the driver writes the first and
drops the other (by path and prompt, the key resume uses). Ctrl-C writes the answers in hand and ends the
run (this run's actors go with it); the rerun goes on from --out.
"""

from __future__ import annotations

import json
import queue
import sys
import time
from dataclasses import dataclass

from ..errors import UserError
from ..runtime.sampling import SamplingConfig
from .local_run import CaptionConfig, CaptionSummary, LineWriter, StopOnSignal, progress_bar, run_caption
from .ray_cluster import connect, is_client_address, node_cpus, plan_workers
from .ray_dataset import END, one_line, plan_for, rows_here, rows_through_client
from .results import ResultFile, record_key

ROWS_PER_PARALLEL = 2  # a batch: twice the answers a worker decodes at once


@dataclass
class RayConfig:
    address: str  # local | auto | HOST:PORT | ray://HOST:PORT
    workers: int | None = None  # default: one per node

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1 (got {self.workers})")


def run_caption_ray(cfg: CaptionConfig, ray_cfg: RayConfig) -> CaptionSummary:
    def caption(cfg, prompt, sampling, todo, results, summary):
        _caption_on_ray(cfg, ray_cfg, sampling, todo, results, summary)

    return run_caption(cfg, caption)


def _caption_on_ray(cfg: CaptionConfig, ray_cfg: RayConfig, sampling: SamplingConfig, todo: list[str],
                    results: ResultFile, summary: CaptionSummary) -> None:
    ray = connect(ray_cfg.address)
    try:
        cpus = node_cpus(ray)
        workers, threads = plan_workers(cpus, ray_cfg.workers, cfg.threads)
        print(f"llava-edge: {workers} workers of {threads} threads, on a cluster of {len(cpus)} nodes "
              f"({sum(cpus)} CPUs)", file=sys.stderr)
        plan = plan_for(cfg, todo, workers, threads, ROWS_PER_PARALLEL * cfg.parallel)
        rows = rows_through_client(ray, plan) if is_client_address(ray_cfg.address) else rows_here(plan)
        _write_rows(rows, cfg, results, summary)
    finally:
        ray.shutdown()


def _write_rows(rows: queue.Queue, cfg: CaptionConfig, results: ResultFile, summary: CaptionSummary) -> None:
    lines = LineWriter(results, summary, progress_bar(cfg, summary))
    written: set[tuple] = set()

    def take(row: dict) -> None:
        if row["fatal"]:
            raise UserError(row["fatal"])
        if row["failed"]:
            lines.note_failed(f"an answer failed in the engine ({row['failed']})")
            return
        record = json.loads(row["line"])
        key = record_key(record)
        if key in written:  # from a batch Ray ran again after its worker died
            return
        written.add(key)
        lines.write(record)
        summary.encoded += "answer" in record and not record["timings"]["image_cached"]

    stop = StopOnSignal()  # installed after ray.init: ours, not Ray's
    t0 = time.perf_counter()
    try:
        while True:
            try:
                row = rows.get(timeout=0.1) if not stop.requested else rows.get_nowait()
            except queue.Empty:
                if stop.requested:  # what had come is written; the rest is for the rerun
                    break
                continue
            if row == END:
                break
            if isinstance(row, BaseException):
                raise UserError(one_line(row)) from None
            take(row)
        summary.interrupted = stop.requested
    except KeyboardInterrupt:  # a second Ctrl-C
        summary.interrupted = True
    finally:
        stop.restore()
        summary.seconds = time.perf_counter() - t0
        lines.bar.close()

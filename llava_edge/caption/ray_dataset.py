"""The Ray Data side of `caption --ray`: the paths to caption as a dataset, mapped by a fixed pool of
CaptionWorker actors, and its rows handed to the driver on a queue as they come.

A driver joined through Ray Client (ray://) cannot run Ray Data's executor itself, nor take a streaming
generator's results; there the dataset runs in a small actor on the cluster, which the driver polls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
import warnings
from dataclasses import dataclass

from ..errors import UserError
from .local_run import CaptionConfig
from .ray_worker import CALLS_AT_ONCE, CaptionWorker

END = "end"  # the last thing on the queue, after every row (or an exception, when the run failed)
POLL_ROWS = 256  # most rows one poll of the cluster-side actor returns


@dataclass
class DatasetPlan:
    worker: CaptionConfig  # what each actor opens and asks
    paths: list[str]  # as given: written in the lines
    workers: int
    threads: int
    rows: int  # per batch


def plan_for(cfg: CaptionConfig, todo: list[str], workers: int, threads: int, rows: int) -> DatasetPlan:
    worker = dataclasses.replace(cfg, inputs=[], threads=threads, progress=False,
                                 bundle=os.path.abspath(cfg.bundle) if cfg.bundle else None)
    return DatasetPlan(worker, todo, workers, threads, rows)


def dataset(plan: DatasetPlan):
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notes on execution and progress bars
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")  # a run of few images
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's bar counts images across the cluster
    context.print_on_execution_start = False
    # absolute for the workers, whose working directory is not the driver's
    items = [{"path": p, "file": os.path.abspath(p)} for p in plan.paths]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / plan.rows)))
    return ds.map_batches(
        CaptionWorker, fn_constructor_args=(plan.worker, plan.rows), batch_size=plan.rows, num_cpus=plan.threads,
        compute=ray.data.ActorPoolStrategy(size=plan.workers, max_concurrent_calls_per_actor=CALLS_AT_ONCE,
                                           enable_true_multi_threading=True))


def rows_here(plan: DatasetPlan) -> queue.Queue:
    """The rows, iterated by a thread of this process (so that its main thread can stop on Ctrl-C while a batch
    is being answered); then END, or the exception that ended the run."""
    out: queue.Queue = queue.Queue()
    ds = dataset(plan)

    def iterate() -> None:
        try:
            for row in ds.iter_rows():
                out.put(row)
            out.put(END)
        except BaseException as e:
            out.put(e)

    threading.Thread(target=iterate, name="llava-edge-ray-rows", daemon=True).start()
    return out


class RowsOnCluster:
    """The dataset's iteration in an actor on the cluster, for a Ray Client driver: `take` hands over what
    has come, waiting a little for the first row."""

    def __init__(self, plan: DatasetPlan):
        self.rows = rows_here(plan)

    def take(self, wait_s: float) -> list:
        got = []
        try:
            got.append(self.rows.get(timeout=wait_s))
            while len(got) < POLL_ROWS and got[-1] != END and not isinstance(got[-1], BaseException):
                got.append(self.rows.get_nowait())
        except queue.Empty:
            pass
        if got and isinstance(got[-1], BaseException):  # sent as text: its type may not unpickle here
            got[-1] = UserError(one_line(got[-1]))
        return got


def rows_through_client(ray, plan: DatasetPlan) -> queue.Queue:
    out: queue.Queue = queue.Queue()
    actor = ray.remote(num_cpus=0)(RowsOnCluster).remote(plan)

    def poll() -> None:
        try:
            while True:
                for row in ray.get(actor.take.remote(1.0)):
                    out.put(row)
                    if row == END or isinstance(row, BaseException):
                        return
        except BaseException as e:
            out.put(e)

    threading.Thread(target=poll, name="llava-edge-ray-poll", daemon=True).start()
    return out


def one_line(e: BaseException) -> str:
    """A failure of the run on the cluster (not of one image), in one line."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, UserError):
        return str(cause)
    first = next((line for line in str(cause).splitlines() if line.strip()), "")
    return f"the Ray run failed: {type(cause).__name__}: {first.strip()[:300]}"

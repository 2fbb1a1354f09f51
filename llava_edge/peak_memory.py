"""Peak anonymous and file-backed memory of this process and its children, sampled on a thread.

The kernel's own high-water mark (VmHWM) adds anonymous memory (heap, tensors, llama.cpp buffers) to
file-backed pages (memory-mapped checkpoints and GGUFs: page cache the kernel can drop at any time), so a
7B export that maps a 14 GB checkpoint reads as 15 GB while holding 2 GB of its own. Here RssAnon and
RssFile come from /proc/<pid>/status every `interval_s`, summed over this process and its descendants,
and each kind's peak is kept, overall and per named step. A spike shorter than the interval can be
missed; VmHWM is reported beside them as the kernel's bound on the total. Linux only (elsewhere: empty).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

KINDS = ("RssAnon", "RssFile")


def read_status(pid: str = "self") -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of one process in KiB ({} when it is gone or /proc is missing)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in (*KINDS, "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def descendants(pid: str = "self") -> list[str]:
    """Child processes, recursively (from /proc/<pid>/task/*/children)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = children.read_text().split()
        except OSError:
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


class PeakMemory:
    """`with PeakMemory() as mem: ...; mem.step("quantize"); ...; mem.result()`"""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak = dict.fromkeys(KINDS, 0)
        self.by_step: dict[str, dict[str, int]] = {}
        self.current_step: str | None = None
        self.n_samples = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._start = time.perf_counter()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def step(self, name: str) -> None:
        """Peaks from now on are also kept under `name` (until the next step)."""
        self.sample()
        with self._lock:
            self.current_step = name
            self.by_step.setdefault(name, dict.fromkeys(KINDS, 0))
        self.sample()

    def sample(self) -> None:
        total = dict.fromkeys(KINDS, 0)
        for pid in ["self", *descendants()]:
            status = read_status(pid)
            for kind in KINDS:
                total[kind] += status.get(kind, 0)
        with self._lock:
            self.n_samples += 1
            targets = [self.peak] + ([self.by_step[self.current_step]] if self.current_step else [])
            for peaks in targets:
                for kind in KINDS:
                    peaks[kind] = max(peaks[kind], total[kind])

    def result(self) -> dict:
        """MiB figures: overall peaks, per-step anonymous peaks, VmHWM, the sampling interval, seconds so far."""
        self.sample()
        with self._lock:
            return {
                "peak_rss_anon_mb": round(self.peak["RssAnon"] / 1024),
                "peak_rss_file_mb": round(self.peak["RssFile"] / 1024),
                "vm_hwm_mb": round(read_status().get("VmHWM", 0) / 1024),
                "peak_rss_anon_mb_by_step": {k: round(v["RssAnon"] / 1024) for k, v in self.by_step.items()},
                "sampled_every_ms": round(self.interval_s * 1000),
                "seconds": round(time.perf_counter() - self._start, 1),
            }


def format_peaks(result: dict) -> str:
    """One line for the end of a command."""
    return (f"peak memory: {result['peak_rss_anon_mb']} MiB anonymous, {result['peak_rss_file_mb']} MiB file-backed "
            f"(VmHWM {result['vm_hwm_mb']} MiB), {result['seconds']:.0f} s")

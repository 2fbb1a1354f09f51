"""Peak anonymous and file-backed memory of this process and its children, sampled by a watcher process.

The kernel's own high-water mark (VmHWM) adds anonymous memory (heap, tensors, llama.cpp buffers) to
file-backed pages (memory-mapped checkpoints and GGUFs: page cache the kernel can drop at any time), so a
7B export that maps a 14 GB checkpoint reads as 15 GB while holding 2 GB of its own. Here RssAnon and
RssFile come from /proc/<pid>/status every `interval_s`, summed over this process and its descendants,
and each kind's peak is kept, overall and per named step. The sampling runs in a small child process
(plain Python, no imports beyond the standard library), not a thread: a thread cannot run while a C
extension holds the GIL (protobuf parsing an ONNX model does), and missed exactly those peaks (2.0 GB
reported where a watcher outside saw 2.7 GB). A spike shorter than the interval can still be missed;
VmHWM is reported beside them as the kernel's bound on the total. A child caught between fork and exec still
shares this process's pages and is counted with them, once more (a sample can land in that window on a
loaded machine). Linux only (elsewhere: zeros).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("RssAnon", "RssFile")

# The watcher: samples the parent and its descendants (itself excluded); reads commands on stdin:
# "step NAME" (peaks from now on also kept under NAME; answers "ok" once it has sampled under NAME), "result"
# (samples, then answers one JSON line of peaks so far). Each answer comes after a sample taken after the
# command arrived, so what the caller did before asking is in it.
_WATCHER = r"""
import json, os, select, sys
parent, interval, me = sys.argv[1], float(sys.argv[2]), str(os.getpid())
KINDS = ("RssAnon", "RssFile")

def status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in KINDS:
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out

def descendants(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids = f.read().split()
        except OSError:
            continue
        for kid in kids:
            if kid != me:
                found += [kid] + descendants(kid)
    return found

peak, by_step, step, n = dict.fromkeys(KINDS, 0), {}, None, 0

def sample():
    global n
    total = dict.fromkeys(KINDS, 0)
    for pid in [parent] + descendants(parent):
        for kind, value in status(pid).items():
            total[kind] += value
    n += 1
    for peaks in [peak] + ([by_step[step]] if step else []):
        for kind in KINDS:
            peaks[kind] = max(peaks[kind], total[kind])

sample()
print("ready", flush=True)
# stdin read raw: a buffered readline could keep a second command that came in the same read out of select's sight
pending, open_ = b"", True
while open_:
    ready, _, _ = select.select([0], [], [], interval)
    sample()
    if not ready:
        continue
    data = os.read(0, 4096)
    open_ = bool(data)
    pending += data
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        command, _, arg = line.decode().strip().partition(" ")
        if command == "step":
            step = arg
            by_step.setdefault(step, dict.fromkeys(KINDS, 0))
            sample()
            print("ok", flush=True)
        elif command == "result":
            print(json.dumps({"peak": peak, "by_step": by_step, "n": n}), flush=True)
"""


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


class PeakMemory:
    """`with PeakMemory() as mem: ...; mem.step("quantize"); ...; mem.result()`"""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self._watcher: subprocess.Popen | None = None
        self._last: dict = {"peak": dict.fromkeys(KINDS, 0), "by_step": {}, "n": 0}
        self._start = time.perf_counter()

    def __enter__(self) -> PeakMemory:
        if Path("/proc/self/status").exists():
            self._watcher = subprocess.Popen(
                [sys.executable, "-c", _WATCHER, str(os.getpid()), str(self.interval_s)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            self._watcher.stdout.readline()  # "ready": the first sample is taken
        return self

    def __exit__(self, *exc) -> None:
        if self._watcher is not None:
            self._ask("result")
            self._watcher.stdin.close()
            self._watcher.wait()
            self._watcher = None

    def _ask(self, command: str) -> None:
        """Send a command and wait for its answer: a step has begun, or the peaks so far."""
        if self._watcher is None or self._watcher.poll() is not None:
            return
        self._watcher.stdin.write(command + "\n")
        self._watcher.stdin.flush()
        answer = self._watcher.stdout.readline()
        if command == "result" and answer:
            self._last = json.loads(answer)

    def step(self, name: str) -> None:
        """Peaks from now on are also kept under `name` (until the next step). Returns once the watcher has
        switched: what runs after this call is never counted in the step before."""
        self._ask(f"step {name}")

    def result(self) -> dict:
        """MiB figures: overall peaks, per-step anonymous peaks, VmHWM, the sampling interval, seconds so far."""
        self._ask("result")
        peak, by_step = self._last["peak"], self._last["by_step"]
        return {
            "peak_rss_anon_mb": round(peak["RssAnon"] / 1024),
            "peak_rss_file_mb": round(peak["RssFile"] / 1024),
            "vm_hwm_mb": round(read_status().get("VmHWM", 0) / 1024),
            "peak_rss_anon_mb_by_step": {k: round(v["RssAnon"] / 1024) for k, v in by_step.items()},
            "sampled_every_ms": round(self.interval_s * 1000),
            "seconds": round(time.perf_counter() - self._start, 1),
        }


def format_peaks(result: dict) -> str:
    """One line for the end of a command."""
    return (f"peak memory: {result['peak_rss_anon_mb']} MiB anonymous, {result['peak_rss_file_mb']} MiB file-backed "
            f"(VmHWM {result['vm_hwm_mb']} MiB), {result['seconds']:.0f} s")

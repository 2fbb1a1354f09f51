"""Can this machine + this llama.cpp build run quantized models with llama.cpp's CPU "extra buffer types"?

The extra buffer types (AMX, and the repacked Q4_0/Q4_K/IQ4 layouts) route matrix products to special
kernels. A build can ship a kernel that dies with SIGILL: llama-cpp-python 0.3.36 compiled with GCC 12
for a CPU with AMX does exactly that at the first multi-token decode of any quantized model (GCC 12's
`_tile_loadconfig` declares an 8-byte memory operand, so the stores that fill ggml's 64-byte tile config
are dropped as dead; `ldtilecfg` loads tiles with zero rows and the first `tilezero` raises #UD).

A crash kills the process, so the question is asked in a child process, once per machine and library
build, and the verdict cached in llava-edge's cache dir (`paths.cache_dir`). `LLAVA_EDGE_EXTRA_BUFTS=0|1` skips the probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..paths import cache_dir

ENV_OVERRIDE = "LLAVA_EDGE_EXTRA_BUFTS"
PROBE_KINDS = ("Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "F16")
PROBE_TIMEOUT_S = 180
_OK = "llava-edge-probe-ok"


@dataclass
class Verdict:
    extra_bufts: bool  # whether the model may use llama.cpp's extra buffer types
    reason: str
    key: str


def cache_path() -> Path:
    return cache_dir() / "llama_cpp_probe.json"


def machine_key() -> str:
    """What the verdict depends on: the llama.cpp build, the CPU and its flags, the kernel."""
    import llama_cpp

    parts = [llama_cpp.__version__, platform.machine(), platform.release()]
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for lib in sorted(lib_dir.glob("*")) if lib_dir.is_dir() else []:
        if lib.is_file() and not lib.is_symlink():
            st = lib.stat()
            parts.append(f"{lib.name}:{st.st_size}:{int(st.st_mtime)}")
    parts += _cpu_identity()
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _cpu_identity() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [platform.processor()]
    wanted = ("model name", "flags", "Features", "CPU part")
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted and key.strip() not in found:
            found[key.strip()] = value.strip()
    return [f"{k}={v}" for k, v in sorted(found.items())]


def extra_bufts_verdict(refresh: bool = False) -> Verdict:
    override = os.environ.get(ENV_OVERRIDE)
    if override in ("0", "1"):
        return Verdict(override == "1", f"set by {ENV_OVERRIDE}", "env")
    key = machine_key()
    cached = _read_cache().get(key)
    if cached and not refresh:
        return Verdict(**cached)
    verdict, definitive = _probe(key)
    if definitive:
        _write_cache(verdict)
    return verdict


def _probe(key: str) -> tuple[Verdict, bool]:
    """(verdict, whether it is worth caching: a timed-out child on a busy machine proves nothing)."""
    ok_with, detail_with, definitive_with = _run_child(extra_bufts=True)
    if ok_with:
        return Verdict(True, "quantized decode with extra buffer types works", key), True
    ok_without, detail_without, definitive_without = _run_child(extra_bufts=False)
    if ok_without:
        reason = f"extra buffer types fail ({detail_with}); plain CPU buffers work"
        return Verdict(False, reason, key), definitive_with
    if not definitive_without:  # no evidence either way: the safe choice, not remembered
        return Verdict(False, f"probe inconclusive ({detail_without})", key), False
    raise UserError(
        f"llama.cpp cannot run a quantized model on this machine ({detail_without}); "
        "reinstall llama-cpp-python built for this CPU"
    )


def _run_child(extra_bufts: bool) -> tuple[bool, str, bool]:
    """(ok, detail, definitive) for one child process probing with or without extra buffer types."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="llava-edge-probe-") as tmp:
        cmd = [sys.executable, "-m", "llava_edge.runtime.llama_probe", tmp, "1" if extra_bufts else "0"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env, check=False)
        except subprocess.TimeoutExpired:
            return False, f"probe timed out after {PROBE_TIMEOUT_S} s", False
    if done.returncode == 0 and _OK in done.stdout:
        return True, "ok", True
    if done.returncode < 0:
        return False, f"killed by {signal.Signals(-done.returncode).name}", True
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return False, f"exit {done.returncode}: {last[:200]}", True


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(verdict: Verdict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[verdict.key] = asdict(verdict)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only means probing again next time


def _child(workdir: Path, extra_bufts: bool) -> None:
    """Quantize the probe model to each kind and decode a multi-token batch and a single token."""
    import llama_cpp
    import numpy as np

    from .llama_construct import construct_llama
    from .probe_model import quantize_probe, write_probe_gguf

    f32 = write_probe_gguf(workdir / "probe-F32.gguf")
    for kind in PROBE_KINDS:
        path = quantize_probe(f32, workdir / f"probe-{kind}.gguf", kind)
        llm = construct_llama(path, extra_bufts=extra_bufts, n_ctx=128, n_batch=64, n_threads=1)
        llm.eval(list(range(3, 3 + 40)))  # M > 1: the tiled (AMX) and repacked GEMM kernels
        llm.eval([7])  # M = 1: the GEMV kernels
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        if not np.isfinite(logits).all():
            raise SystemExit(f"non-finite logits from {kind}")
        llm.close()
    print(_OK)


if __name__ == "__main__":
    _child(Path(sys.argv[1]), sys.argv[2] == "1")

"""What a bench report was measured on: CPU, cores, threads, RAM, OS, GPU, package versions."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata

PACKAGES = ("llava-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "torch", "pillow")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def describe(threads: int) -> dict:
    cores = os.cpu_count() or 1
    info = {
        "cpu": cpu_model(), "cores": cores, "threads_used": threads, "ram_gb": round(ram_bytes() / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
        "python": platform.python_version(), "gpus": gpu_names(), "versions": versions(),
        "no_amx": xeon_without_amx(),
    }
    info["id"] = device_id(info)
    return info


def xeon_without_amx() -> bool:
    """A CPU with AVX-512 but no AMX: Xeons of one model name come with and without AMX (the CPU changes between
    machines), and llama.cpp's speed differs between the two, so their reports must not share a name."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512f" in flags and "amx_tile" not in flags


def device_id(info: dict) -> str:
    """A file-name-safe id: cpu model, cores, threads used (and the first GPU)."""
    cpu = re.sub(r"\(R\)|\(TM\)|CPU|@.*$|Processor", "", info["cpu"])
    parts = [cpu, f"{info['cores']}c", f"{info['threads_used']}t"] + (["no-amx"] if info.get("no_amx") else [])
    parts += info["gpus"][:1]
    return re.sub(r"[^a-z0-9]+", "-", " ".join(parts).lower()).strip("-")

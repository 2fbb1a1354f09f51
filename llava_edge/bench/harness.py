"""`llava-edge bench` / `python -m bench`: every path of every case measured in one run on this device, then
the per-device report (json + md + png). Each path runs in its own process (its own peak memory), and the
paths' timed runs are interleaved (A B C, B C A, ...) so that a change in the machine's load cannot skew a
ratio between paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import device, roofline
from .cases import Case, demo_case, llava7b_case
from .measured_paths import summarize
from .report import write_reports

TARGETS = {  # llava-edge / baseline, as the bench issue states them
    "vision_vs_llamacpp": ("<=", 0.12),
    "second_turn_ttft_vs_handler": ("<=", 0.05),
    "decode_vs_llamacpp": (">=", 0.97),
    "peak_rss_vs_llamacpp": ("<=", 1.0),
    "kv_cache_ttft_vs_cold": ("<=", 0.1),
}
N_CTX = 2048


@dataclass
class BenchConfig:
    out_dir: str = "bench/reports"
    work_dir: str = "runs/bench"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    runs: int = 5
    n_decode: int = 32
    quick: bool = False  # 1 decoder block, the bundle's vision graph only, no PyTorch path
    shape: str = "small"  # llava7b decoder depth: "small" (2 blocks, 1 when quick) or "7b" (all 32)
    cases: tuple[str, ...] = ("demo", "llava7b")
    torch_baseline: bool = True


def case_paths(case: Case, cfg: BenchConfig) -> list[str]:
    paths = ["edge", "edge_kv", "edge_vision", "mtmd_vision", "handler", "plain"]
    return paths + (["torch"] if cfg.torch_baseline and not cfg.quick and _torch_fits(case) else [])


def _torch_fits(case: Case) -> bool:
    weights = sum(f.stat().st_size for f in case.checkpoint.rglob("*.safetensors"))
    return weights * 2.5 < device.ram_bytes()  # fp16 files, fp32 in memory, plus headroom


class Worker:
    """One measured path in its own process (`measured_paths`), loaded and warmed up once, then driven one
    timed run at a time. Its stderr (llama.cpp's logs) goes to a file, named in any error."""

    def __init__(self, name: str, spec: dict, log_dir: Path):
        from .measured_paths import MARK

        self.name, self.mark = name, MARK
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{time.strftime('%H%M%S')}-{os.getpid()}-{id(self)}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "llava_edge.bench.measured_paths", name, json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.ready = self._receive()

    def _receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(self.mark):
                return json.loads(line[len(self.mark):])
        self.proc.wait()
        self._log.flush()
        tail = [t for t in self.log_path.read_text(errors="replace").strip().splitlines() if t.strip()][-1:]
        raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {tail[0][:300] if tail else 'no output'} "
                           f"(log: {self.log_path})")

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._receive()

    def end(self) -> dict:
        try:
            self.proc.stdin.write("end\n")
            self.proc.stdin.flush()
            return self._receive()
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def case_spec(case: Case, cfg: BenchConfig) -> dict:
    return {"bundle": str(case.bundle), "checkpoint": str(case.checkpoint), "image": str(case.image),
            "reference_embeds": str(case.reference_embeds),
            "vision_graphs": {k: str(v) for k, v in case.vision_graphs.items()},
            "threads": cfg.threads, "n_decode": cfg.n_decode,
            "n_ctx": case_n_ctx(case)}  # the same context (and KV cache size) on every llama.cpp path


def case_n_ctx(case: Case) -> int:
    """N_CTX, or the model's trained context when it is shorter (the runtime goes no further)."""
    from ..runtime.bundle import open_bundle

    return min(N_CTX, open_bundle(case.bundle, verify=False).n_ctx_train or N_CTX)


def measure_case(case: Case, cfg: BenchConfig, work: Path, progress) -> dict:
    """Every path of a case, interleaved: all workers loaded and warmed up first, then round r runs each path
    once, in an order rotated by r, so a change of the machine's load reaches every path alike."""
    kv_dir = work / f"kv-cache-{case.name}"
    shutil.rmtree(kv_dir, ignore_errors=True)
    run = CaseRun(case_spec(case, cfg), work / "logs", kv_dir)
    names = case_paths(case, cfg)
    run.start_all(names, progress)
    rotation = [n for n in names if n in run.workers or (n == "edge_kv" and run.kv_ok)]
    for r in range(cfg.runs):
        for name in round_order(rotation, r):
            run.run_once(name)
        progress.update(1)
    return run.results_in_order(names)


@dataclass
class CaseRun:
    """One case's measurement under way: its loaded workers, their timed runs so far, and each path's result
    (an error in place of a path that failed). edge_kv runs as a new process each time, over `kv_dir`."""

    spec: dict
    logs: Path
    kv_dir: Path
    results: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, list[dict]] = field(default_factory=dict)
    workers: dict[str, Worker] = field(default_factory=dict)
    kv_ends: list[dict] = field(default_factory=list)
    kv_ok: bool = False

    def start(self, name: str, extra: dict | None = None) -> Worker | None:
        try:
            return Worker(name, {**self.spec, **(extra or {})}, self.logs)
        except (RuntimeError, OSError) as e:
            self.results[name] = {"error": str(e)}
            return None

    def start_all(self, names: list[str], progress) -> None:
        """Every path's worker loaded and warmed up; for edge_kv, a process that prefills the image and saves
        its prefix state (the timed edge_kv runs then find it)."""
        for name in names:
            if name == "edge_kv":
                filler = self.start("edge_kv", {"kv_cache_dir": str(self.kv_dir)})
                if filler is not None:
                    self.results["edge_kv_fill"] = _finish(filler, [filler.run()])
                progress.update(1)
                continue
            extra = {}
            if name == "plain" and "edge" in self.workers:  # a prompt as long as the edge path's
                extra = {"n_prompt_tokens": self.workers["edge"].ready.get("n_prompt_tokens", 128)}
            worker = self.start(name, extra)
            if worker is not None:
                self.workers[name] = worker
                self.runs[name] = []
            progress.update(1)
        self.kv_ok = "edge_kv" in names and "error" not in self.results.get("edge_kv_fill", {"error": ""})
        if self.kv_ok:
            self.runs["edge_kv"] = []

    def run_once(self, name: str) -> None:
        """One timed run of a path; a path that fails is dropped with its error."""
        try:
            if name == "edge_kv":  # a NEW process each time: what a later run of the program meets
                w = Worker("edge_kv", {**self.spec, "kv_cache_dir": str(self.kv_dir)}, self.logs)
                self.runs[name].append(w.run())
                self.kv_ends.append(w.end())
            elif name in self.workers:
                self.runs[name].append(self.workers[name].run())
        except (RuntimeError, OSError) as e:
            self.results[name] = {"error": str(e)}
            if name in self.workers:
                self.workers.pop(name).close()
            if name == "edge_kv":
                self.kv_ok = False

    def results_in_order(self, names: list[str]) -> dict:
        """Each path's summary (the workers ended), in the order of `names`."""
        for name, worker in self.workers.items():
            if name not in self.results:
                try:
                    self.results[name] = _finish(worker, self.runs[name])
                except (RuntimeError, OSError) as e:
                    self.results[name] = {"error": str(e)}
        if self.kv_ok and self.runs.get("edge_kv"):
            self.results["edge_kv"] = {"n_ctx": self.kv_ends[-1].get("n_ctx"), **_peaks(self.kv_ends),
                                       **summarize(self.runs["edge_kv"]), "processes": len(self.kv_ends)}
        ordered = {n: self.results[n] for n in [*names, "edge_kv_fill"] if n in self.results}
        if "edge_vision" in ordered and "graphs" in ordered["edge_vision"]:
            for precision, g in ordered["edge_vision"]["graphs"].items():
                g["vision_ms"] = ordered["edge_vision"].pop(f"{precision}_vision_ms", None)
        return ordered


def round_order(names: list[str], r: int) -> list[str]:
    """Round r's order: the paths rotated by r, so no path always runs right after the same one."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def _finish(worker: Worker, path_runs: list[dict]) -> dict:
    end = worker.end()
    return {**end, **summarize(path_runs), "interleaved_runs": len(path_runs)}


def _peaks(ends: list[dict]) -> dict:
    return {k: max(e.get(k, 0) for e in ends) for k in ("peak_rss_mb", "peak_rss_anon_mb", "peak_rss_file_mb")}


def run_bench(cfg: BenchConfig) -> dict:
    from tqdm import tqdm

    work = Path(cfg.work_dir)
    started = time.time()
    info = device.describe(cfg.threads)
    print(f"[bench] {info['cpu']}, {info['cores']} cores, {cfg.threads} threads; preparing models in {work}", file=sys.stderr)
    layers = 32 if cfg.shape == "7b" else (1 if cfg.quick else 2)
    cases = []
    for name in cfg.cases:
        cases.append(demo_case(work / "demo") if name == "demo" else llava7b_case(work, layers, cfg.threads, not cfg.quick))
    ceilings = roofline.measure(cfg.threads, quick=cfg.quick)

    results: dict[str, dict] = {}
    total = sum(len(case_paths(c, cfg)) + cfg.runs for c in cases)
    with tqdm(total=total, desc="bench", unit="step") as progress:
        for case in cases:
            results[case.name] = {"case": case.to_dict(), "paths": measure_case(case, cfg, work, progress)}

    report = {
        "device": info, "config": asdict(cfg), "n_ctx": N_CTX, "roofline": ceilings, "cases": results,
        "seconds": round(time.time() - started, 1),
        "method": "each path in its own process, loaded and warmed up once; timed runs interleaved round by "
                  "round (order rotated each round); medians over the rounds",
    }
    for name, case in zip(results, cases):
        results[name]["ratios"] = ratios(results[name]["paths"])
        results[name]["fidelity"] = fidelity(results[name]["paths"])
        results[name]["roofline"] = roofline_fractions(case, results[name]["paths"], ceilings)
    headline = results.get("llava7b") or next(iter(results.values()))
    report["ratios"] = {k: v for k, v in headline["ratios"].items() if v is not None}
    report["ratios_case"] = "llava7b" if "llava7b" in results else next(iter(results))
    report["fidelity"] = headline["fidelity"]
    report["targets"] = {k: {"op": op, "target": t} for k, (op, t) in TARGETS.items()}
    write_reports(report, Path(cfg.out_dir))
    return report


def _median(paths: dict, path: str, metric: str) -> float | None:
    value = paths.get(path, {}).get(metric)
    return value.get("median") if isinstance(value, dict) else value


def ratios(paths: dict) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    return {
        "vision_vs_llamacpp": ratio(_median(paths, "edge", "vision_ms"), _median(paths, "mtmd_vision", "vision_ms")),
        "second_turn_ttft_vs_handler": ratio(_median(paths, "edge", "second_turn_ttft_ms"),
                                             _median(paths, "handler", "second_turn_ttft_ms")),
        "decode_vs_llamacpp": ratio(_median(paths, "edge", "decode_tokens_per_s"), _median(paths, "plain", "decode_tokens_per_s")),
        "peak_rss_vs_llamacpp": ratio(paths.get("edge", {}).get("peak_rss_mb"), paths.get("handler", {}).get("peak_rss_mb")),
        "kv_cache_ttft_vs_cold": ratio(_median(paths, "edge_kv", "ttft_ms"), _median(paths, "edge", "ttft_ms")),
    }


def fidelity(paths: dict) -> dict:
    out = {}
    if "embedding_cosine" in paths.get("edge", {}):
        out["edge"] = paths["edge"]["embedding_cosine"]["mean"]
    for precision, g in paths.get("edge_vision", {}).get("graphs", {}).items():
        out[f"onnx_{precision}"] = g["embedding_cosine"]["mean"]
    if "embedding_cosine" in paths.get("mtmd_vision", {}):
        out["llamacpp_mtmd_f16"] = paths["mtmd_vision"]["embedding_cosine"]["mean"]
    return out


def roofline_fractions(case: Case, paths: dict, ceilings: dict) -> dict:
    """Decode tokens/s against bandwidth / bytes read per token; vision against the matmul peak."""
    from ..reference.checkpoint import read_llava_config

    cfg, _ = read_llava_config(case.checkpoint)
    decoder_bytes = _decoder_bytes_per_token(case)
    bound = ceilings["memory_bandwidth_gbs"] * 1e9 / decoder_bytes
    out = {"decoder_bytes_per_token_mb": decoder_bytes / 2**20, "decode_bound_tokens_per_s": bound}
    decode = _median(paths, "edge", "decode_tokens_per_s")
    if decode:
        out["decode_fraction_of_bandwidth_bound"] = decode / bound
    v = cfg.vision
    layers_used = v.num_hidden_layers + 1 + cfg.feature_layer if cfg.feature_layer < 0 else cfg.feature_layer
    n_out = (v.image_size // v.patch_size) ** 2
    flops = roofline.vit_flops(v.image_size, v.patch_size, v.hidden_size, v.intermediate_size, layers_used,
                               cfg.projector.in_features, cfg.projector.out_features, cfg.projector.out_features, n_out)
    out["vision_gflops_per_image"] = flops / 1e9
    precision = open_precision(case)
    ms = _median(paths, "edge", "vision_ms")
    if ms:
        peak = ceilings["matmul_int8_gops"] if precision == "int8" else ceilings["matmul_fp32_gflops"]
        out["vision_fraction_of_matmul_peak"] = flops / (ms / 1000) / 1e9 / peak
        out["vision_peak_used"] = "int8" if precision == "int8" else "fp32"
    return out


def open_precision(case: Case) -> str:
    from ..runtime.bundle import open_bundle

    return open_bundle(case.bundle, verify=False).vision.precision


def _decoder_bytes_per_token(case: Case) -> int:
    """Every weight of the GGUF is read once per generated token, except the token embedding (one row)."""
    from gguf import GGUFReader

    from ..runtime.bundle import open_bundle

    reader = GGUFReader(str(open_bundle(case.bundle, verify=False).decoder_file))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")

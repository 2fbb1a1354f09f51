"""Caption throughput: `llava-edge caption` at --parallel 1, 2 and 4 against a loop of llama-cpp-python's
Llava15ChatHandler over the same images (the model loaded once), in one process, the four paths interleaved
round by round; medians of images/s, and whether the answers of the parallel runs agree.

    python -m llava_edge.bench.caption_case [--case demo llava7b] [--images 12] [--rounds 3] [--threads N]

The edge runs time `run_caption` from the first image read to the last line written (the bundle load is not
timed, as the handler's model load is not); the handler loop times its create_chat_completion calls.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..caption.local_run import DEFAULT_PROMPT, CaptionConfig, run_caption
from .cases import demo_case, llava7b_case

PARALLEL = (1, 2, 4)


def make_images(folder: Path, n: int, seed: int = 5) -> list[Path]:
    """Distinct shapes-world scenes (for the random-weight 7B case any picture costs the same)."""
    from ..train.shapes import render_scene, sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"scene_{i:03d}.png"
        render_scene(sample_scene(rng)).save(path)
        paths.append(path)
    return paths


def edge_run(bundle: Path, images: list[Path], parallel: int, threads: int, max_tokens: int, work: Path) -> dict:
    out = work / f"edge-p{parallel}.jsonl"
    out.unlink(missing_ok=True)
    summary = run_caption(CaptionConfig([str(p) for p in images], str(out), DEFAULT_PROMPT, str(bundle), parallel,
                                        max_tokens, threads=threads, progress=False))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(images) and not summary.errors, f"edge p{parallel}: {summary}"
    return {"images_per_s": len(images) / summary.seconds, "seconds": summary.seconds,
            "answers": {Path(r["path"]).name: r["answer"] for r in lines},
            "tokens": sum(r["timings"]["n_generated"] for r in lines)}


@contextmanager
def native_output_to(path: Path):
    """fd 1 and 2 into a file: mtmd prints its progress for every image from C, whatever `verbose` says."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


class HandlerLoop:
    """What a llama-cpp-python user writes today: one Llama with Llava15ChatHandler, one chat per image."""

    def __init__(self, bundle: Path, threads: int, log: Path):
        from llama_cpp.llama_chat_format import Llava15ChatHandler

        from ..runtime.llama_loader import open_llama

        self.log = log
        m = json.loads((bundle / "manifest.json").read_text())
        with native_output_to(log):
            handler = Llava15ChatHandler(clip_model_path=str(bundle / m["files"]["mmproj"]["name"]), verbose=False)
            self.llm = open_llama(bundle / m["files"]["decoder"]["name"], n_ctx=2048, n_threads=threads,
                                  chat_handler=handler)

    def run(self, images: list[Path], max_tokens: int) -> dict:
        with native_output_to(self.log):
            return self._run(images, max_tokens)

    def _run(self, images: list[Path], max_tokens: int) -> dict:
        answers, tokens = {}, 0
        t0 = time.perf_counter()
        for path in images:
            url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
            reply = self.llm.create_chat_completion(
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": DEFAULT_PROMPT}]}],
                max_tokens=max_tokens, temperature=0.0)
            answers[path.name] = reply["choices"][0]["message"]["content"].strip()
            tokens += reply["usage"]["completion_tokens"]
        seconds = time.perf_counter() - t0
        return {"images_per_s": len(images) / seconds, "seconds": seconds, "answers": answers, "tokens": tokens}

    def close(self) -> None:
        self.llm.close()


def bench_case(name: str, bundle: Path, images: list[Path], rounds: int, threads: int, max_tokens: int,
               work: Path) -> dict:
    handler = HandlerLoop(bundle, threads, work / "handler-native.log")
    paths = ["handler"] + [f"edge_p{p}" for p in PARALLEL]
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for r in range(rounds):
        order = paths[r % len(paths):] + paths[: r % len(paths)]  # each path in each place once in 4 rounds
        for path in order:
            if path == "handler":
                got = handler.run(images, max_tokens)
            else:
                got = edge_run(bundle, images, int(path.removeprefix("edge_p")), threads, max_tokens, work)
            runs[path].append(got)
            print(f"[caption bench] {name} round {r + 1}/{rounds} {path}: {got['images_per_s']:.3f} images/s "
                  f"({got['tokens']} tokens)", file=sys.stderr)
    handler.close()
    result = {"images": len(images), "rounds": rounds, "threads": threads, "max_tokens": max_tokens, "paths": {}}
    for path, got in runs.items():
        ips = [g["images_per_s"] for g in got]
        result["paths"][path] = {"images_per_s_median": statistics.median(ips), "images_per_s_runs": ips,
                                 "tokens_per_run": [g["tokens"] for g in got]}
    base = result["paths"]["handler"]["images_per_s_median"]
    result["ratios_vs_handler"] = {f"edge_p{p}": result["paths"][f"edge_p{p}"]["images_per_s_median"] / base
                                   for p in PARALLEL}
    first = runs["edge_p1"][0]["answers"]
    result["answers_equal_p1"] = {f"edge_p{p}": sum(g["answers"] == first for g in runs[f"edge_p{p}"])
                                  / len(runs[f"edge_p{p}"]) for p in PARALLEL}
    result["images_answered_as_p1"] = {
        f"edge_p{p}": min(sum(g["answers"][k] == first[k] for k in first) for g in runs[f"edge_p{p}"])
        for p in PARALLEL}
    result["handler_answers_equal_edge"] = sum(runs["handler"][0]["answers"][k] == first[k] for k in first)
    result["sample_answers"] = {p: dict(list(runs[p][0]["answers"].items())[:2]) for p in ("handler", "edge_p1")}
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", nargs="+", default=["demo", "llava7b"], choices=["demo", "llava7b"])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-tokens", type=int, default=32, help="per answer (the 7B case's random weights run to it)")
    ap.add_argument("--layers", type=int, default=2, help="7B case: decoder blocks (32 = the real depth)")
    ap.add_argument("--work-dir", default="runs/bench")
    ap.add_argument("--out", default=None, help="JSON file (default: WORK_DIR/caption.json)")
    args = ap.parse_args(argv)

    work = Path(args.work_dir)
    report = {"cases": {}}
    for name in args.case:
        case = demo_case(work / "demo") if name == "demo" else llava7b_case(work, args.layers, args.threads, False)
        scratch = work / "caption" / name
        shutil.rmtree(scratch, ignore_errors=True)
        images = make_images(scratch / "images", args.images)
        report["cases"][name] = bench_case(name, case.bundle, images, args.rounds, args.threads, args.max_tokens,
                                           scratch)
        report["cases"][name]["bundle"] = str(case.bundle)
    out = Path(args.out or work / "caption.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for name, r in report["cases"].items():
        cells = " | ".join(f"{p} {v['images_per_s_median']:.2f}" for p, v in r["paths"].items())
        ratios = ", ".join(f"{p} {v:.2f}x" for p, v in r["ratios_vs_handler"].items())
        print(f"{name}: images/s {cells}; vs handler: {ratios}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""`caption --ray local` with 1 and 2 workers against a local `caption`, on the same images and the same cores:
each path run as a user runs it (the CLI in its own process), the paths interleaved round by round; medians of
images/s and the ratios to local.

    python -m llava_edge.bench.ray_case [--case demo llava7b] [--images 16 48] [--rounds 3] [--threads N]

Two rates per path and round. Steady: each path captions a small and a large set (the large one's first
images are the small set), and the extra images over the extra wall time are what a long run gets, every
fixed cost (model loads, and for Ray starting the cluster and its actors) cancelled out. End to end: the large
set over the command's whole wall time, every start included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..caption.local_run import DEFAULT_PROMPT
from .caption_case import make_images
from .cases import demo_case, llava7b_case


def paths_for(threads: int) -> dict[str, list[str]]:
    """Path name -> its caption options; the same cores for each: one engine of all of them, or one Ray
    worker of all of them, or two of half."""
    return {"local": ["--threads", str(threads)],
            "ray_1": ["--ray", "local", "--workers", "1", "--threads", str(threads)],
            "ray_2": ["--ray", "local", "--workers", "2", "--threads", str(max(1, threads // 2))]}


def timed_run(options: list[str], bundle: Path, images: list[Path], parallel: int, max_tokens: int,
              out: Path, log: Path) -> dict:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "llava_edge.cli", "caption", *map(str, images), "--out", str(out),
           "--bundle", str(bundle), "--parallel", str(parallel), "--max-tokens", str(max_tokens), *options]
    t0 = time.perf_counter()
    with open(log, "ab") as sink:
        rc = subprocess.run(cmd, stdout=sink, stderr=sink, timeout=3600).returncode
    wall = time.perf_counter() - t0
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if rc != 0 or len(lines) != len(images) or any("error" in r for r in lines):
        raise RuntimeError(f"{' '.join(options)}: exit {rc}, {len(lines)} lines of {len(images)}; see {log}")
    return {"wall_s": wall, "load_average": os.getloadavg()[0],  # the other jobs on these cores, roughly
            "answers": {Path(r["path"]).name: r["answer"] for r in lines}}


def bench_case(name: str, bundle: Path, images: list[Path], small: int, rounds: int, threads: int, parallel: int,
               max_tokens: int, work: Path) -> dict:
    paths = paths_for(threads)
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    names = list(paths)
    for r in range(rounds):
        for path in names[r % len(names):] + names[: r % len(names)]:  # each path in each place in turn
            few = timed_run(paths[path], bundle, images[:small], parallel, max_tokens, work / f"{path}.jsonl",
                            work / "runs.log")
            many = timed_run(paths[path], bundle, images, parallel, max_tokens, work / f"{path}.jsonl",
                             work / "runs.log")
            got = {"steady_images_per_s": (len(images) - small) / max(1e-9, many["wall_s"] - few["wall_s"]),
                   "end_to_end_images_per_s": len(images) / many["wall_s"],
                   "wall_s_small": few["wall_s"], "wall_s_large": many["wall_s"], "answers": many["answers"],
                   "load_average": many["load_average"]}
            runs[path].append(got)
            print(f"[ray bench] {name} round {r + 1}/{rounds} {path}: steady {got['steady_images_per_s']:.3f}, "
                  f"end to end {got['end_to_end_images_per_s']:.3f} images/s ({few['wall_s']:.1f} s for "
                  f"{small}, {many['wall_s']:.1f} s for {len(images)})", file=sys.stderr)
    metrics = ("steady_images_per_s", "end_to_end_images_per_s", "wall_s_small", "wall_s_large", "load_average")
    result = {"images_small": small, "images_large": len(images), "rounds": rounds, "threads": threads,
              "parallel": parallel, "max_tokens": max_tokens, "options": {p: " ".join(o) for p, o in paths.items()},
              "paths": {path: {m: {"median": statistics.median(v := [g[m] for g in got]), "runs": v} for m in metrics}
                        for path, got in runs.items()}}
    local = result["paths"]["local"]
    result["ratios_vs_local"] = {path: {m: result["paths"][path][m]["median"] / local[m]["median"] for m in metrics[:2]}
                                 for path in paths if path != "local"}
    reference = runs["local"][0]["answers"]
    result["answers_equal_local"] = {p: all(g["answers"] == reference for g in got) for p, got in runs.items()}
    return result


def markdown(report: dict) -> str:
    rows = ["# `caption --ray local` vs local `caption`", "",
            f"{report['machine']}; other agents were using the same cores meanwhile, so single runs are noisy: "
            "medians of interleaved rounds.", "",
            "steady: the large set's extra images over its extra wall time against the small set (model loads, "
            "cluster and actor starts cancel out); end to end: the large set over the command's wall time, "
            "everything included. load average: the 1-minute load at the end of each large run, the run's own "
            "threads included (a quiet machine reads about the thread count).", ""]
    for name, r in report["cases"].items():
        rows += [f"## {name}: {r['images_small']} and {r['images_large']} images, --parallel {r['parallel']}, "
                 f"--max-tokens {r['max_tokens']}, {r['rounds']} rounds", "", f"{r['description']}", "",
                 "| path | options | steady images/s | vs local | end to end images/s | vs local | "
                 f"wall s ({r['images_small']} / {r['images_large']}) | load average | answers = local |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for path, v in r["paths"].items():
            ratio = r["ratios_vs_local"].get(path, {})
            loads = " ".join(f"{x:.1f}" for x in v["load_average"]["runs"])
            rows.append(f"| {path} | `{r['options'][path]}` | {v['steady_images_per_s']['median']:.3f} | "
                        f"{ratio.get('steady_images_per_s', 1.0):.2f} | {v['end_to_end_images_per_s']['median']:.3f} | "
                        f"{ratio.get('end_to_end_images_per_s', 1.0):.2f} | {v['wall_s_small']['median']:.1f} / "
                        f"{v['wall_s_large']['median']:.1f} | {loads} | {r['answers_equal_local'][path]} |")
        rows.append("")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", nargs="+", default=["demo", "llava7b"], choices=["demo", "llava7b"])
    ap.add_argument("--images", type=int, nargs=2, default=[16, 48], metavar=("SMALL", "LARGE"),
                    help="the two set sizes (multiples of 2 x --parallel x 2 keep two workers' batches even)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32, help="per answer (the 7B case's random weights run to it)")
    ap.add_argument("--layers", type=int, default=2, help="7B case: decoder blocks (32 = the real depth)")
    ap.add_argument("--work-dir", default="runs/bench")
    ap.add_argument("--out-dir", default="bench/reports")
    args = ap.parse_args(argv)

    work = Path(args.work_dir)
    out_dir = Path(args.out_dir)
    report = {"machine": f"{os.cpu_count()} CPU cores ({_cpu_name()})", "prompt": DEFAULT_PROMPT, "cases": {}}
    for name in args.case:
        case = demo_case(work / "demo") if name == "demo" else llava7b_case(work, args.layers, args.threads, False)
        scratch = work / "ray" / name
        shutil.rmtree(scratch, ignore_errors=True)
        small, large = sorted(args.images)
        images = make_images(scratch / "images", large)
        report["cases"][name] = bench_case(name, case.bundle, images, small, args.rounds, args.threads,
                                           args.parallel, args.max_tokens, scratch)
        report["cases"][name]["description"] = case.description
        out_dir.mkdir(parents=True, exist_ok=True)  # written after each case: a later one may take long
        (out_dir / "ray_case.json").write_text(json.dumps(report, indent=2))
        (out_dir / "ray_case.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out_dir / 'ray_case.md'} and .json")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()

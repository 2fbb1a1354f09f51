"""A lone request, before and after a change: `llava-edge serve` from another git revision (a worktree made for the
run) and from this checkout, side by side on one bundle, one request at a time, in turns (A B A B ...).

Each request is what the server case's clients send: a new image, a question, exactly `n_decode` answer tokens
(EOS banned), streamed over the OpenAI API. The report gives each side's median time from send to the answer's
end and to its first token, and the ratio now / before (a change to the scheduler must not slow the lone user).

    python -m llava_edge.bench.lone_request --before REV [--bundle DIR] [--rounds 4] [--n-decode 32]
        [--parallel 4] [--threads N] [--n-ctx 2048] [--out bench/reports]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from ..runtime.bundle import open_bundle
from .device import describe
from .server_clients import Images, image_question, openai_request
from .server_procs import ServerCaseConfig, start_llava_edge

REPO = Path(__file__).resolve().parents[2]


def checkout(rev: str, into: Path) -> str:
    """A detached worktree of `rev` at `into`; returns the commit it names."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(into), rev], check=True,
                   capture_output=True)
    return subprocess.run(["git", "-C", str(into), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def run(cfg: ServerCaseConfig, before: str, rounds: int, parallel: int) -> dict:
    eos_id = open_bundle(cfg.bundle).eos_id
    images = Images()
    with tempfile.TemporaryDirectory(prefix="llava-edge-before-") as tmp:
        source = Path(tmp) / "src"
        commit = checkout(before, source)
        now_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        servers = {}
        try:
            servers["before"] = start_llava_edge(cfg, parallel, source, f"llava-edge {commit}")
            servers["now"] = start_llava_edge(cfg, parallel, None, f"llava-edge {now_commit}")
            for server in servers.values():  # warm-up: first decode, first image encode
                openai_request(server.url, [image_question(images.next_uri())], 4, eos_id)
            samples: dict[str, list[dict]] = {"before": [], "now": []}
            for i in range(rounds):
                order = ("before", "now") if i % 2 == 0 else ("now", "before")  # neither always goes first
                for side in order:
                    r = openai_request(servers[side].url, [image_question(images.next_uri())], cfg.n_decode, eos_id)
                    if r.error or not r.t_first:
                        raise RuntimeError(f"{servers[side].name}: {r.error or 'no token'}")
                    samples[side].append({"latency_s": r.t_end - r.t_send, "ttft_s": r.t_first - r.t_send})
                    print(f"round {i + 1} {side:>6}: answer ended {samples[side][-1]['latency_s']:.2f} s, first "
                          f"token {samples[side][-1]['ttft_s']:.2f} s", flush=True)
        finally:
            for server in servers.values():
                server.stop()
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(source)],
                           capture_output=True)
    median = {side: {k: statistics.median(s[k] for s in v) for k in ("latency_s", "ttft_s")}
              for side, v in samples.items()}
    return {"bundle": str(cfg.bundle), "before": {"rev": before, "commit": commit}, "now": {"commit": now_commit},
            "threads": cfg.threads, "parallel": parallel, "n_decode": cfg.n_decode, "n_ctx": cfg.n_ctx,
            "rounds": rounds, "samples": samples, "median": median,
            "ratios": {"latency_now_vs_before": median["now"]["latency_s"] / median["before"]["latency_s"],
                       "ttft_now_vs_before": median["now"]["ttft_s"] / median["before"]["ttft_s"]},
            "device": describe(cfg.threads)}


def markdown(report: dict) -> str:
    d, m, r = report["device"], report["median"], report["ratios"]
    lines = [f"# A lone request, before and after: {report['bundle']}", "",
             f"{d['cpu']}, {d['cores']} cores, {report['threads']} threads; `serve --parallel {report['parallel']} "
             f"--n-ctx {report['n_ctx']}`; one request at a time, a new image each, {report['n_decode']} answer "
             f"tokens (EOS banned); the two servers in turns, {report['rounds']} rounds, medians.", "",
             "| server | commit | answer ended (median) | first token (median) | each round's answer ended |",
             "|---|---|---:|---:|---|"]
    for side, label in (("before", f"before ({report['before']['rev']})"), ("now", "now")):
        each = ", ".join(f"{s['latency_s']:.1f}" for s in report["samples"][side])
        lines.append(f"| {label} | {report[side]['commit']} | {m[side]['latency_s']:.2f} s | "
                     f"{m[side]['ttft_s']:.2f} s | {each} |")
    lines += ["", f"Now / before: answer ended **{r['latency_now_vs_before']:.3f}x**, first token "
              f"{r['ttft_now_vs_before']:.3f}x."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the git revision to compare with (a commit, tag or branch)")
    p.add_argument("--bundle", type=Path, default=Path("runs/bench/llava7b-L32/bundle"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--n-decode", type=int, default=32)
    p.add_argument("--parallel", type=int, default=4, help="both servers' --parallel (a lone request in a server "
                                                           "that could batch)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("bench/reports"))
    a = p.parse_args(argv)
    if not (a.bundle / "manifest.json").exists():
        raise SystemExit(f"--bundle {a.bundle}: no manifest.json (build the 7B case with `llava-edge bench`)")
    t0 = time.perf_counter()
    report = run(ServerCaseConfig(a.bundle, a.threads, a.n_decode, (1,), a.n_ctx), a.before, a.rounds, a.parallel)
    report["seconds"] = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"lone_request-{report['device']['id']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

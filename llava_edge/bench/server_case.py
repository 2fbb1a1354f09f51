"""Server case: `llava-edge serve` against llama-cpp-python's own server (`python -m llama_cpp.server`,
chat_format llava-1-5, the bundle's mmproj as clip_model_path) on the same GGUF, both over the OpenAI API.

At 1, 2 and 4 concurrent clients, each with its own image (a new one per request, so no server finds it in a
cache), every answer exactly `n_decode` tokens (EOS banned with logit_bias): wall time, aggregate decode
tokens/s (answer tokens after each first one, per second of time in which at least one answer was decoding),
TTFT p50/p90. The random-weight model's tokens mostly have no text (its GGUF vocab is padded past a tiny
tokenizer), and llava-edge sends no chunk for a token without text, so its first token cannot be seen in the
stream: its TTFT is the one it reports (`timings.ttft_ms`, from the request's arrival in the engine: the HTTP body
and base64 decode, a few ms, are left out). llama-cpp-python's server sends a chunk per token, text or not, and
its TTFT is the client's time to the first.
Then the second turn of a conversation re-sent in full: its TTFT through llava-edge's OpenAI and Ollama APIs and
through llama-cpp-python's server. The two servers run side by side and are measured in turns (interleaved),
level by level. With --busy-neighbour the levels run twice: on the quiet machine, then with one process spinning
on one core (`--neighbour-core`, pinned with sched_setaffinity), as a test suite or a browser would; the report
gives both rows (machine: quiet, busy) and the ratios of each. Servers, clients and the soak are in
server_procs.py, server_clients.py and server_soak.py.

    python -m llava_edge.bench.server_case [--bundle DIR] [--threads N] [--n-decode 128] [--busy-neighbour]
        [--out bench/reports]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from ..paths import DEMO_BUNDLE
from ..runtime.bundle import open_bundle
from .device import describe
from .server_clients import Images, concurrent_level, image_question, openai_request, second_turn
from .server_procs import ServerCaseConfig, busy_neighbour, run_llamacpp_server, start_llamacpp, start_llava_edge
from .server_soak import soak

__all__ = ["ServerCaseConfig", "main", "markdown", "run_server_case"]
SEVEN_B = Path("runs/bench/llava7b-L2/bundle")  # what `llava-edge bench` builds for its llava7b case
EDGE, BASE = "llava-edge", "llama-cpp-python server"


def run_server_case(cfg: ServerCaseConfig) -> dict:
    eos_id = open_bundle(cfg.bundle).eos_id
    images = Images()
    t_start = time.perf_counter()
    edge = start_llava_edge(cfg, max(cfg.levels))
    try:
        baseline = start_llamacpp(cfg)
    except BaseException:
        edge.stop()
        raise
    rows, turns = [], []
    try:
        for server in (edge, baseline):  # warm-up: first decode, first image encode
            openai_request(server.url, [image_question(images.next_uri())], 4, eos_id)
        for machine in ("quiet", "busy") if cfg.busy_neighbour else ("quiet",):
            with busy_neighbour(cfg.neighbour_core) if machine == "busy" else nullcontext():
                for clients in cfg.levels:
                    for server in (edge, baseline):
                        rows.append({"machine": machine, **concurrent_level(server, clients, images, cfg, eos_id)})
                        print(_row_line(rows[-1]), flush=True)
        for server, api in ((edge, "openai"), (baseline, "openai"), (edge, "ollama")):
            turns.append(second_turn(server, images, cfg, eos_id, api))
            print(turns[-1], flush=True)
    finally:
        edge.stop()
        baseline.stop()
    device = describe(cfg.threads)
    report = {"bundle": str(cfg.bundle), "threads": cfg.threads, "n_decode": cfg.n_decode, "n_ctx": cfg.n_ctx,
              "cpu": device["cpu"], "cores": device["cores"], "device": device, "rows": rows, "second_turn": turns,
              "ratios": _ratios(rows, turns, max(cfg.levels)), "seconds": time.perf_counter() - t_start}
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        stem = cfg.out / f"server_case-{device['id']}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
    return report


def _ratios(rows: list[dict], turns: list[dict], top: int) -> dict:
    """llava-edge over the serial server at `top` clients, per machine state (busy ones prefixed `busy_`)."""
    out = {}
    for machine in dict.fromkeys(r.get("machine", "quiet") for r in rows):
        def row(server: str, clients: int) -> dict:
            return next(r for r in rows if (r["server"], r["clients"], r.get("machine", "quiet")) ==
                        (server, clients, machine))

        prefix = "" if machine == "quiet" else f"{machine}_"
        out[f"{prefix}wall_{top}_clients_vs_llamacpp_server"] = row(EDGE, top)["wall_s"] / row(BASE, top)["wall_s"]
        out[f"{prefix}mean_latency_{top}_clients_vs_llamacpp_server"] = (
            row(EDGE, top)["mean_latency_s"] / row(BASE, top)["mean_latency_s"])
        if any(r["clients"] == 1 for r in rows):
            out[f"{prefix}decode_{top}_clients_vs_own_1_client"] = (
                row(EDGE, top)["decode_tokens_per_s"] / row(EDGE, 1)["decode_tokens_per_s"])
    turn = {(t["server"], t["api"]): t["second_ttft_ms"] for t in turns}
    out["second_turn_ttft_vs_llamacpp_server"] = turn[(EDGE, "openai")] / turn[(BASE, "openai")]
    out["second_turn_ttft_ollama_api_vs_llamacpp_server"] = turn[(EDGE, "ollama")] / turn[(BASE, "openai")]
    return out


def _row_line(r: dict) -> str:
    return (f"{r.get('machine', 'quiet'):>5} {r['server']:>24} {r['clients']} clients: wall {r['wall_s']:.2f} s, "
            f"mean latency {r['mean_latency_s']:.1f} s, decode {r['decode_tokens_per_s']:.1f} tok/s, "
            f"TTFT p50 {r['ttft_ms_p50']:.0f} ms p90 {r['ttft_ms_p90']:.0f} ms")


def markdown(report: dict) -> str:
    lines = [f"# Server case: {report['bundle']}", "",
             f"{report['cpu']}, {report['cores']} cores, {report['threads']} threads; {report['n_decode']} tokens per "
             f"answer (EOS banned), one new image per request; the two servers measured in turns. Machine busy: one "
             f"other process spinning on one core.", "",
             "| machine | server | clients | wall | answers ended (s) | mean latency | aggregate decode | TTFT p50 | "
             "TTFT p90 | RSS |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ended = ", ".join(f"{x:.0f}" for x in r["latency_s"])
        lines.append(f"| {r.get('machine', 'quiet')} | {r['server']} | {r['clients']} | {r['wall_s']:.2f} s | "
                     f"{ended} | {r['mean_latency_s']:.1f} s | {r['decode_tokens_per_s']:.1f} tok/s | "
                     f"{r['ttft_ms_p50']:.0f} ms | {r['ttft_ms_p90']:.0f} ms | {r['rss_mb']:.0f} MB |")
    lines += ["", "| second turn re-sent in full | API | 1st-turn TTFT | 2nd-turn TTFT |", "|---|---|---:|---:|"]
    for t in report["second_turn"]:
        lines.append(f"| {t['server']} | {t['api']} | {t['first_ttft_ms']:.0f} ms | {t['second_ttft_ms']:.0f} ms |")
    lines += ["", "| ratio | measured |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["llamacpp-server"]:
        return run_llamacpp_server(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=SEVEN_B if (SEVEN_B / "manifest.json").exists() else DEMO_BUNDLE)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--n-decode", type=int, default=128)
    p.add_argument("--levels", default="1,2,4")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--busy-neighbour", action="store_true", help="the levels again with one busy process on one core")
    p.add_argument("--neighbour-core", type=int, default=0, help="the core the busy process is pinned to")
    p.add_argument("--out", type=Path, default=Path("bench/reports"))
    p.add_argument("--soak", type=int, default=0, help="instead: N requests through llava-edge alone (failures, RSS)")
    a = p.parse_args(argv)
    if a.soak:
        result = soak(ServerCaseConfig(a.bundle, a.threads, a.n_decode, n_ctx=a.n_ctx), a.soak)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "server_soak.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return None
    levels = tuple(int(x) for x in a.levels.split(","))
    report = run_server_case(ServerCaseConfig(a.bundle, a.threads, a.n_decode, levels, a.n_ctx, a.out,
                                              a.busy_neighbour, a.neighbour_core))
    print(markdown(report))


if __name__ == "__main__":
    main()

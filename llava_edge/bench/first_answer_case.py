"""First-answer case: how long a user waits for the first answer about a new image, by path, in one process.

Paths, each timed on a new image (one pixel changed, so no cache knows it), interleaved round by round with the
order rotated:

    edge_all       llava-edge, every image token (the reference), cold: encode + prefill + first token
    edge_K<k>      the same with --image-tokens k (VisionZip-style reduction in the vision graph)
    *_split        edge_all and the smallest edge_K with the text decoded apart from the image (EngineConfig
                   embed_text=False: one decode per run of text, as before the text rode in the image's decode)
    edge_typed     the interactive chat: the image prefix was prefilled while the user typed; from the question
    edge_kv_hit    the image prefix's KV from the on-disk store (its slot KV and embedding cache emptied first)
    handler        llama-cpp-python's Llava15ChatHandler (llama.cpp's mtmd + the same GGUF), as its users call it

TTFT is the time to the first answer token (one token is drawn). Ratios are of medians, each path against
edge_all, measured in the same run.

    python -m llava_edge.bench.first_answer_case --bundle DIR [--tokens 192 128 64] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .caption_case import native_output_to
from .device import describe
from .server_clients import Images

QUESTION = "Describe the image."


def edge_cold(session, image: bytes, image_tokens: int | None) -> dict:
    from ..runtime.sampling import SamplingConfig
    from ..runtime.vision import EmbeddingCache

    session.vision.cache = EmbeddingCache()
    session.engine.forget()
    t0 = time.perf_counter()
    session.set_image(image, image_tokens)
    answer = session.answer(QUESTION, SamplingConfig(max_tokens=1))
    t = answer.timings
    return {"ttft_ms": 1000 * (time.perf_counter() - t0), "vision_ms": t.vision_ms, "prefill_ms": t.prefill_ms,
            "n_prompt_tokens": t.n_prompt_tokens, "image_tokens": t.image_tokens}


def edge_typed(session, image: bytes) -> dict:
    """The chat's REPL: set_image, the prefix prefilled while the user types, then the question."""
    from ..runtime.sampling import SamplingConfig

    session.engine.forget()
    session.set_image(image)
    with session.while_typing():
        prefill = session.prefill()
        prefill.wait()
    t0 = time.perf_counter()
    answer = session.answer(QUESTION, SamplingConfig(max_tokens=1))
    return {"ttft_ms": 1000 * (time.perf_counter() - t0), "n_cached": answer.timings.n_cached,
            "prefill_ahead_ms": prefill.answer.timings.prefill_ms}


def edge_kv_hit(session, image: bytes) -> dict:
    """Ask once (its prefix KV goes to disk), empty the slot's KV and the embedding cache, ask again."""
    from ..runtime.sampling import SamplingConfig
    from ..runtime.vision import EmbeddingCache

    session.set_image(image)
    session.answer(QUESTION, SamplingConfig(max_tokens=1))
    session.vision.cache = EmbeddingCache()
    session.engine.forget()
    t0 = time.perf_counter()
    session.set_image(image)
    answer = session.answer(QUESTION, SamplingConfig(max_tokens=1))
    t = answer.timings
    return {"ttft_ms": 1000 * (time.perf_counter() - t0), "kv_restored": t.kv_restored, "vision_ms": t.vision_ms}


class Handler:
    def __init__(self, bundle: Path, threads: int, log: Path):
        from llama_cpp.llama_chat_format import Llava15ChatHandler

        from ..runtime.llama_loader import decoder_gpu_layers, open_llama

        m = json.loads((bundle / "manifest.json").read_text())
        self.log = log
        with native_output_to(log):
            handler = Llava15ChatHandler(clip_model_path=str(bundle / m["files"]["mmproj"]["name"]), verbose=False)
            self.llm = open_llama(bundle / m["files"]["decoder"]["name"], n_ctx=2048, n_threads=threads,
                                  chat_handler=handler, n_gpu_layers=decoder_gpu_layers("auto"))  # as llava-edge's

    def run(self, image: bytes) -> dict:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        t0 = time.perf_counter()
        with native_output_to(self.log):
            self.llm.create_chat_completion(
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": QUESTION}]}],
                max_tokens=1, temperature=0.0)
        return {"ttft_ms": 1000 * (time.perf_counter() - t0)}


def run_case(bundle: Path, tokens: list[int], rounds: int, threads: int, handler: bool) -> dict:
    from ..runtime import ChatSession, EngineConfig, Model

    work = Path(tempfile.mkdtemp(prefix="llava-edge-first-answer-"))
    model = Model.open(bundle, threads=threads)
    try:
        sessions = {"edge": ChatSession(model, EngineConfig(n_ctx=2048)),
                    "split": ChatSession(model, EngineConfig(n_ctx=2048, embed_text=False)),
                    "kv": ChatSession(model, EngineConfig(n_ctx=2048, kv_cache_dir=str(work / "kv")))}
        baseline = Handler(bundle, threads, work / "handler.log") if handler else None
        new_image = Images().next_png  # a photo with one pixel changed each call: a cache miss, the same compute
        paths = (["edge_all", *[f"edge_K{k}" for k in tokens], "edge_typed", "edge_kv_hit", "edge_all_split"]
                 + [f"edge_K{min(tokens)}_split"] * bool(tokens) + ["handler"] * handler)
        runs: dict[str, list[dict]] = {p: [] for p in paths}
        for path in paths:  # warm-up: every path once (page cache, ORT and llama.cpp first-call costs)
            _one(path, sessions, baseline, new_image())
        for r in range(rounds):
            order = paths[r % len(paths):] + paths[:r % len(paths)]
            for path in order:
                got = _one(path, sessions, baseline, new_image())
                runs[path].append(got)
                print(f"[first answer] round {r + 1}/{rounds} {path}: {got['ttft_ms']:.0f} ms", file=sys.stderr)
        for session in sessions.values():
            session.close()
    finally:
        n_image_tokens = model.n_image_tokens
        model.close()
        shutil.rmtree(work, ignore_errors=True)  # the KV store holds ~330 MB per image at 7B
    medians = {p: statistics.median(g["ttft_ms"] for g in got) for p, got in runs.items()}
    return {"bundle": str(bundle), "n_image_tokens": n_image_tokens, "rounds": rounds, "threads": threads,
            "device": describe(threads), "runs": runs, "ttft_ms_median": medians,
            "ratio_vs_edge_all": {p: medians[p] / medians["edge_all"] for p in paths}}


def _one(path, sessions, baseline, image: bytes) -> dict:
    session = sessions["split" if path.endswith("_split") else "edge"]
    name = path.removesuffix("_split")
    if name == "edge_all":
        return edge_cold(session, image, None)
    if name.startswith("edge_K"):
        return edge_cold(session, image, int(name.removeprefix("edge_K")))
    if name == "edge_typed":
        return edge_typed(session, image)
    if name == "edge_kv_hit":
        return edge_kv_hit(sessions["kv"], image)
    return baseline.run(image)


def markdown(report: dict) -> str:
    d = report["device"]
    lines = [f"# First answer about a new image: {d['cpu']}, {d['threads_used']} threads", "",
             f"Bundle `{report['bundle']}` ({report['n_image_tokens']} image tokens); median of {report['rounds']} "
             "interleaved rounds after one warm-up round; one answer token drawn.", "",
             "| path | TTFT ms (median) | ÷ edge_all | runs (ms) |", "|---|---:|---:|---|"]
    for path, ms in report["ttft_ms_median"].items():
        runs = ", ".join(f"{g['ttft_ms']:.0f}" for g in report["runs"][path])
        lines.append(f"| {path} | {ms:.0f} | {report['ratio_vs_edge_all'][path]:.3f} | {runs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--tokens", type=int, nargs="*", default=[192, 128, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-handler", action="store_true", help="leave out llama-cpp-python's handler")
    parser.add_argument("--out", type=Path, default=Path("bench/reports"))
    args = parser.parse_args(argv)
    report = run_case(args.bundle, args.tokens, args.rounds, args.threads, not args.no_handler)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"first_answer-{report['device']['id']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

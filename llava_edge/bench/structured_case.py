"""Structured answers: seconds per output token of an answer held to a JSON schema against a free answer of the
same length, on one engine, greedy, interleaved round by round (a script, not a timed test).

    python -m llava_edge.bench.structured_case [--case demo|llava7b] [--layers 32] [--rounds 3] [--threads 2]
                                               [--work runs/bench] [--out bench/reports]

Paths, each timed on the decode after the first token (its prefill is reused from the KV):
  keys          a key-heavy schema (long property names, enums, small integers), forced tokens decoded together
  keys_single   the same, each forced token in its own decode (SamplingConfig.forced_together=False)
  free_keys     no format, ignore_eos, as many tokens as `keys` gave
  string        a schema with one free string field
  free_string   no format, as many tokens as `string` gave
  llamacpp_keys llama-cpp-python's grammar path: LlamaGrammar.from_json_schema with Llava15ChatHandler
The report (<out>/structured_<case>-<device>.json and .md) holds each path's median seconds per token and the
ratios keys/free_keys (target <= 0.6), string/free_string (target <= 1.05) and llamacpp_keys/free_keys.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
from pathlib import Path

from ..paths import DEMO_BUNDLE
from .device import describe
from ..runtime.engine_config import MAX_DEFAULT_N_CTX
from ..runtime import Engine, EngineConfig, Message
from ..runtime.sampling import SamplingConfig

KEY_HEAVY = {"type": "object", "properties": {
    "primary_object_category": {"enum": ["geometric_shape", "household_item", "vehicle", "animal"]},
    "primary_object_colour_name": {"enum": ["red", "green", "blue", "yellow", "other"]},
    "number_of_distinct_objects_visible": {"type": "integer", "minimum": 0, "maximum": 9},
    "is_the_background_a_plain_colour": {"type": "boolean"},
    "estimated_position_of_main_object": {"enum": ["top_left", "top_right", "centre", "bottom_left",
                                                   "bottom_right"]},
    "image_quality_assessment_rating": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["primary_object_category", "primary_object_colour_name", "number_of_distinct_objects_visible",
                 "is_the_background_a_plain_colour", "estimated_position_of_main_object",
                 "image_quality_assessment_rating"], "additionalProperties": False}
ONE_STRING = {"type": "object", "properties": {"description": {"type": "string", "maxLength": 120}},
              "required": ["description"], "additionalProperties": False}
QUESTION = "Describe the image as JSON."
MAX_TOKENS = 192  # room for the whole key-heavy object (about 90 tokens in Vicuna's vocabulary)


def seconds_per_token(answer) -> float:
    t = answer.timings
    return 1.0 / t.decode_tokens_per_s if t.decode_tokens_per_s > 0 else float("nan")


class EnginePaths:
    def __init__(self, bundle: Path, image: Path, threads: int):
        self.engine = Engine.open(bundle, EngineConfig(), threads=threads)
        self.engine.start()  # steps on its own thread: Generation.wait() returns the answer
        self.image = image.read_bytes()

    def answer(self, **sampling):
        return self.engine.generate([Message("user", QUESTION, [self.image])],
                                    SamplingConfig(**sampling)).wait()

    def round(self, lengths: dict) -> dict:
        out = {}
        keys = self.answer(max_tokens=MAX_TOKENS, format=KEY_HEAVY)
        out["keys"] = seconds_per_token(keys)
        out["keys_single"] = seconds_per_token(self.answer(max_tokens=MAX_TOKENS, format=KEY_HEAVY,
                                                           forced_together=False))
        lengths["keys"] = keys.timings.n_generated
        out["free_keys"] = seconds_per_token(self.answer(max_tokens=lengths["keys"], ignore_eos=True))
        string = self.answer(max_tokens=MAX_TOKENS, format=ONE_STRING)
        out["string"] = seconds_per_token(string)
        lengths["string"] = string.timings.n_generated
        out["free_string"] = seconds_per_token(self.answer(max_tokens=lengths["string"], ignore_eos=True))
        return out


class LlamaCppGrammar:
    """llama-cpp-python as its users hold an answer to a schema: a GBNF grammar from the schema, sampled by
    llama.cpp's grammar sampler, the image through Llava15ChatHandler (mtmd with the bundle's mmproj)."""

    def __init__(self, bundle: Path, image: Path, threads: int):
        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_chat_format import Llava15ChatHandler

        from ..runtime.llama_loader import open_llama

        m = json.loads((bundle / "manifest.json").read_text())
        handler = Llava15ChatHandler(clip_model_path=str(bundle / m["files"]["mmproj"]["name"]), verbose=False)
        n_ctx = min(m["decoder"]["n_ctx_train"] or MAX_DEFAULT_N_CTX, MAX_DEFAULT_N_CTX)  # the engine's default
        self.llm = open_llama(bundle / m["files"]["decoder"]["name"], n_ctx=n_ctx, n_threads=threads,
                              chat_handler=handler)
        self.grammar = LlamaGrammar.from_json_schema(json.dumps(KEY_HEAVY), verbose=False)
        url = f"data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"
        self.messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTION}]}]

    def seconds_per_token(self) -> float:
        first, n = None, 0
        for chunk in self.llm.create_chat_completion(messages=self.messages, max_tokens=MAX_TOKENS, temperature=0.0,
                                                     grammar=self.grammar, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                n += 1
        return (time.perf_counter() - first) / (n - 1) if first and n > 1 else float("nan")


def run(bundle: Path, image: Path, rounds: int, threads: int, with_llamacpp: bool) -> dict:
    ours = EnginePaths(bundle, image, threads)
    theirs = LlamaCppGrammar(bundle, image, threads) if with_llamacpp else None
    samples: dict[str, list[float]] = {}
    lengths: dict[str, int] = {}
    try:
        ours.round({})  # warm-up: compiles the schemas, fills the caches
        for _ in range(rounds):
            for path, value in ours.round(lengths).items():
                samples.setdefault(path, []).append(value)
            if theirs is not None:
                samples.setdefault("llamacpp_keys", []).append(theirs.seconds_per_token())
    finally:
        ours.engine.close()
    median = {path: statistics.median(v) for path, v in samples.items()}
    ratios = {"keys_vs_free": median["keys"] / median["free_keys"],
              "keys_single_vs_free": median["keys_single"] / median["free_keys"],
              "string_vs_free": median["string"] / median["free_string"]}
    if "llamacpp_keys" in median:
        ratios["llamacpp_keys_vs_free"] = median["llamacpp_keys"] / median["free_keys"]
    return {"seconds_per_token": median, "samples": samples, "tokens": lengths, "ratios": ratios,
            "targets": {"keys_vs_free": 0.6, "string_vs_free": 1.05}}


def markdown(report: dict) -> str:
    d, med, r = report["device"], report["seconds_per_token"], report["ratios"]
    lines = [f"# Structured answers: seconds per output token ({report['case']}, {d['cpu']}, {d['cores']} cores)", "",
             f"{report['description']}; greedy; {report['threads']} threads; {report['rounds']} rounds, the paths "
             f"interleaved in each, medians. Each answer's time is its decode after the first token (the image and "
             f"prompt come from the KV, but llama-cpp-python's, which encodes the image again and is timed from its "
             f"first token too). Tokens per answer: key-heavy {report['tokens'].get('keys')}, one string "
             f"{report['tokens'].get('string')}.", "",
             "| path | s / token | vs its free answer |", "|---|---:|---:|"]
    label = {"keys": "key-heavy schema, forced tokens together", "keys_single": "key-heavy schema, one token per decode",
             "free_keys": "free answer, as long as key-heavy", "string": "one free string field",
             "free_string": "free answer, as long as the string one",
             "llamacpp_keys": "key-heavy schema, llama-cpp-python grammar (LlamaGrammar + Llava15ChatHandler)"}
    vs = {"keys": "keys_vs_free", "keys_single": "keys_single_vs_free", "string": "string_vs_free",
          "llamacpp_keys": "llamacpp_keys_vs_free"}
    for path, value in med.items():
        ratio = f"{r[vs[path]]:.3f}x" if path in vs else ""
        lines.append(f"| {label[path]} | {value:.4f} | {ratio} |")
    lines += ["", f"Targets: key-heavy <= {report['targets']['keys_vs_free']}x, one string <= "
              f"{report['targets']['string_vs_free']}x of a free answer's seconds per token."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=["demo", "llava7b"], default="demo")
    ap.add_argument("--layers", type=int, default=32, help="llava7b: decoder blocks (32 = Vicuna-7B's depth)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama-cpp-python's grammar path")
    ap.add_argument("--work", type=Path, default=Path("runs/bench"), help="llava7b: where its bundle is built")
    ap.add_argument("--out", type=Path, default=Path("bench/reports"))
    args = ap.parse_args(argv)
    if args.case == "demo":
        bundle, image = DEMO_BUNDLE, Path(__file__).parents[2] / "examples" / "red_circle_blue_triangle.png"
        description = "The demo bundle"
    else:
        from .cases import llava7b_case

        case = llava7b_case(args.work, args.layers, args.threads, all_precisions=False)
        bundle, image, description = case.bundle, case.image, case.description
    report = {"case": args.case, "description": description, "threads": args.threads, "rounds": args.rounds,
              "device": describe(args.threads),
              **run(bundle, image, args.rounds, args.threads, not args.no_llamacpp)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"structured_{args.case}-{report['device']['id']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"written to {stem}.md")


if __name__ == "__main__":
    main()

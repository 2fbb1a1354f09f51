"""Measured paths, one process each (its own peak memory), driven one timed run at a time so that the harness
can interleave the paths (A B C A B C ...) and drift of the machine's load cannot skew a ratio:

    python -m llava_edge.bench.measured_paths PATH SPEC_JSON
        -> "@bench {ready json}" once loaded and warmed up; then, for each line "run" on stdin, one
           "@bench {that run's figures}"; for "end", "@bench {the path's summary}" and exit.

edge          llava-edge: ChatSession on the bundle (ONNX Runtime vision, embeddings into llama.cpp). Every run
              starts cold: a new image encode (empty embedding cache) and an empty KV cache.
edge_kv       llava-edge in a NEW process with `kv_cache_dir` holding the image's prefix state (one run per
              process; the harness starts a fresh one each round)
edge_vision   the case's vision graphs (fp32 / fp16 / int8) alone on ONNX Runtime
mtmd_vision   llama.cpp's own image encoder (mtmd) on the bundle's f16 mmproj of the same weights
handler       llama-cpp-python's Llava15ChatHandler (mtmd + the same GGUF), as its users call it
plain         plain llama-cpp-python generate on the same GGUF, a text prompt as long as the image prompt
torch         the PyTorch eager reference (fp32)
"""

from __future__ import annotations

import base64
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

Q1 = "Describe the image."
Q2 = "What color is the triangle?\nAnswer the question using a single word or phrase."
MARK = "@bench "  # protocol lines on stdout (libraries may print there too)


def stats(values: list[float]) -> dict:
    v = sorted(values)
    return {"median": statistics.median(v), "p90": v[min(len(v) - 1, round(0.9 * (len(v) - 1)))], "n": len(v)}


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's ru_maxrss survives exec (a child would report its parent's peak when
    that is higher), so /proc's VmHWM, which starts afresh with the new address space, comes first."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def cosine(got: np.ndarray, want: np.ndarray) -> dict:
    if got.shape != want.shape:
        return {"mean": None, "min": None, "note": f"{got.shape[0]} image tokens vs the reference's {want.shape[0]}"}
    a, b = got.astype(np.float64), want.astype(np.float64)
    per_token = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return {"mean": float(per_token.mean()), "min": float(per_token.min())}


def summarize(runs: list[dict]) -> dict:
    """Per-run figures -> median/p90 of each number (None where a run had none)."""
    out = {}
    for key in dict.fromkeys(k for r in runs for k in r):
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        out[key] = stats(values) if values else runs[-1].get(key)
    return out


class Edge:
    def __init__(self, spec: dict, kv_cache_dir: str | None = None):
        from ..runtime.session import ChatSession

        self.spec = spec
        self.session = ChatSession.open(spec["bundle"], threads=spec["threads"], n_ctx=spec["n_ctx"],
                                        kv_cache_dir=kv_cache_dir)
        self.image = Path(spec["image"]).read_bytes()
        self.pixels = self.session.vision.pixels(self.image)

    def warm_up(self) -> dict:
        self.session.vision.encode_pixels(self.pixels[None])
        first = self.turn(max_tokens=2)
        return {"n_prompt_tokens": first["n_prompt_tokens"]}

    def forget(self) -> None:
        """A cold start for the next turn: no cached embeddings, nothing in the KV cache."""
        from ..runtime.vision import EmbeddingCache

        self.session.vision.cache = EmbeddingCache()
        engine = self.session.engine
        for slot in engine.slots:
            engine._truncate(slot, 0)

    def turn(self, max_tokens: int) -> dict:
        from ..runtime.sampling import SamplingConfig

        self.forget()
        self.session.set_image(self.image)
        t = self.session.answer(Q1, SamplingConfig(max_tokens=max_tokens, ignore_eos=True)).timings
        return {"ttft_ms": t.ttft_ms, "vision_in_ttft_ms": t.vision_ms, "prefill_ms": t.prefill_ms,
                "prefill_tokens_per_s": t.n_prefilled / (t.prefill_ms / 1000) if t.prefill_ms else None,
                "decode_tokens_per_s": t.decode_tokens_per_s or None, "n_prompt_tokens": t.n_prompt_tokens,
                "n_prefilled": t.n_prefilled, "kv_restored": bool(getattr(t, "kv_restored", False))}

    def run(self) -> dict:
        from ..runtime.sampling import SamplingConfig

        t0 = time.perf_counter()
        self.session.vision.encode_pixels(self.pixels[None])
        vision_ms = 1000 * (time.perf_counter() - t0)
        out = self.turn(self.spec["n_decode"])
        second = self.session.answer(Q2, SamplingConfig(max_tokens=1)).timings
        return {"vision_ms": vision_ms, **out, "second_turn_ttft_ms": second.ttft_ms,
                "second_turn_prefilled": second.n_prefilled}

    def end(self) -> dict:
        ref = np.load(self.spec["reference_embeds"])
        embeds = self.session.vision.encode(self.image).embeds
        return {"embedding_cosine": cosine(embeds, ref), "vision_provider": self.session.vision.provider,
                "n_ctx": self.session.engine.n_ctx_seq}


class EdgeKV(Edge):
    """The first answer about an image whose prefix state a previous process saved (one run per process)."""

    def __init__(self, spec: dict):
        super().__init__(spec, kv_cache_dir=spec["kv_cache_dir"])

    def warm_up(self) -> dict:
        return {}  # a new process meets the image for the first time: nothing to warm

    def run(self) -> dict:
        from ..runtime.sampling import SamplingConfig

        self.session.set_image(self.image)
        t = self.session.answer(Q1, SamplingConfig(max_tokens=2, ignore_eos=True)).timings
        return {"ttft_ms": t.ttft_ms, "vision_in_ttft_ms": t.vision_ms, "n_prefilled": t.n_prefilled,
                "kv_restored": bool(getattr(t, "kv_restored", False))}

    def end(self) -> dict:
        return {"n_ctx": self.session.engine.n_ctx_seq}


class EdgeVision:
    def __init__(self, spec: dict):
        from ..image import load_image, preprocess
        from ..onnx_session import ort_session

        self.spec = spec
        m = json.loads((Path(spec["bundle"]) / "manifest.json").read_text())["vision"]
        self.pixels = preprocess(load_image(spec["image"]), m["image_size"], m["mean"], m["std"], m["aspect"])[None]
        self.sessions = {p: ort_session(g, spec["threads"], lean=True, quiet=True) for p, g in spec["vision_graphs"].items()}
        self.embeds = {}

    def warm_up(self) -> dict:
        self.run()
        return {}

    def run(self) -> dict:
        out = {}
        for precision, sess in self.sessions.items():
            t0 = time.perf_counter()
            (embeds,) = sess.run(["image_embeds"], {"pixel_values": self.pixels})  # every token (the default)
            out[f"{precision}_vision_ms"] = 1000 * (time.perf_counter() - t0)
            self.embeds[precision] = embeds[0]
        return out

    def end(self) -> dict:
        ref = np.load(self.spec["reference_embeds"])
        return {"graphs": {p: {"embedding_cosine": cosine(e, ref), "file_mb": Path(self.spec["vision_graphs"][p]).stat().st_size / 2**20}
                           for p, e in self.embeds.items()}}


class MtmdVision:
    def __init__(self, spec: dict):
        from ..image import load_image
        from .llamacpp_mtmd import MtmdImageEncoder

        self.spec = spec
        bundle = Path(spec["bundle"])
        m = json.loads((bundle / "manifest.json").read_text())
        rgb = np.asarray(load_image(spec["image"]))
        self.encoder = MtmdImageEncoder(bundle / m["files"]["mmproj"]["name"], bundle / m["files"]["decoder"]["name"],
                                        rgb, threads=spec["threads"])

    def warm_up(self) -> dict:
        self.encoder.encode()
        return {}

    def run(self) -> dict:
        t0 = time.perf_counter()
        self.encoder.encode()
        return {"vision_ms": 1000 * (time.perf_counter() - t0)}

    def end(self) -> dict:
        embeds = self.encoder.embeddings()
        self.encoder.close()
        return {"n_image_tokens": embeds.shape[0], "embedding_cosine": cosine(embeds, np.load(self.spec["reference_embeds"]))}


class Handler:
    def __init__(self, spec: dict):
        from llama_cpp.llama_chat_format import Llava15ChatHandler

        from ..runtime.llama_loader import open_llama

        self.spec = spec
        bundle = Path(spec["bundle"])
        m = json.loads((bundle / "manifest.json").read_text())
        handler = Llava15ChatHandler(clip_model_path=str(bundle / m["files"]["mmproj"]["name"]), verbose=False)
        self.llm = open_llama(bundle / m["files"]["decoder"]["name"], n_ctx=spec["n_ctx"], n_threads=spec["threads"],
                              chat_handler=handler)
        suffix = Path(spec["image"]).suffix.lstrip(".").replace("jpg", "jpeg")
        url = f"data:image/{suffix};base64," + base64.b64encode(Path(spec["image"]).read_bytes()).decode()
        self.user1 = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": Q1}]}

    def timed(self, messages, max_tokens):
        t0 = time.perf_counter()
        first, n, text = None, 0, ""
        for chunk in self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece is None:
                continue
            if first is None:
                first = time.perf_counter()
            n += 1
            text += piece
        end = time.perf_counter()
        first = first or end
        return 1000 * (first - t0), (n - 1) / (end - first) if n > 1 else None, text

    def warm_up(self) -> dict:
        self.timed([self.user1], 2)
        return {}

    def run(self) -> dict:
        ttft, decode, answer = self.timed([self.user1], self.spec["n_decode"])
        ttft2, _, _ = self.timed([self.user1, {"role": "assistant", "content": answer}, {"role": "user", "content": Q2}], 1)
        return {"ttft_ms": ttft, "decode_tokens_per_s": decode, "second_turn_ttft_ms": ttft2}

    def end(self) -> dict:
        return {"n_ctx": self.llm.n_ctx()}


class Plain:
    def __init__(self, spec: dict):
        from ..runtime.llama_loader import open_llama

        self.spec = spec
        bundle = Path(spec["bundle"])
        m = json.loads((bundle / "manifest.json").read_text())
        self.llm = open_llama(bundle / m["files"]["decoder"]["name"], n_ctx=spec["n_ctx"], n_threads=spec["threads"])
        rng = np.random.default_rng(0)
        self.prompt = [m["decoder"]["bos_id"]] + rng.integers(3, min(self.llm.n_vocab(), 500), spec["n_prompt_tokens"] - 1).tolist()

    def timed(self, n_decode: int) -> dict:
        self.llm.reset()
        t0 = time.perf_counter()
        first = None
        for i, _token in enumerate(self.llm.generate(self.prompt, temp=0.0, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == n_decode:
                break
        end = time.perf_counter()
        return {"ttft_ms": 1000 * (first - t0), "prefill_tokens_per_s": len(self.prompt) / (first - t0),
                "decode_tokens_per_s": (n_decode - 1) / (end - first)}

    def warm_up(self) -> dict:
        self.timed(2)
        return {}

    def run(self) -> dict:
        return self.timed(self.spec["n_decode"])

    def end(self) -> dict:
        return {"n_ctx": self.llm.n_ctx(), "n_prompt_tokens": len(self.prompt)}


class Torch:
    def __init__(self, spec: dict):
        import sentencepiece as spm
        import torch

        from ..conversation import render_prompt, tokenize_prompt
        from ..image import load_image, preprocess
        from ..reference.checkpoint import load_checkpoint

        self.spec = spec
        torch.set_num_threads(spec["threads"])
        loaded = load_checkpoint(spec["checkpoint"], dtype=torch.float32)
        self.model, cfg = loaded.model, loaded.config
        sp = spm.SentencePieceProcessor(model_file=str(loaded.tokenizer_path))

        def ids(turns):
            return torch.tensor([tokenize_prompt(render_prompt(cfg.template, turns), sp.encode, cfg.text.bos_token_id,
                                                 cfg.image_token_index, {"</s>": cfg.text.eos_token_id})])

        self.input_ids, self.input_ids2 = ids([(Q1, None)]), ids([(Q1, "A red circle."), (Q2, None)])
        self.pixels = torch.from_numpy(preprocess(load_image(spec["image"]), cfg.vision.image_size, cfg.image_mean,
                                                  cfg.image_std, cfg.aspect))[None]

    def warm_up(self) -> dict:
        self.run()
        return {}

    def run(self) -> dict:
        import torch

        model, n_decode = self.model, self.spec["n_decode"]
        with torch.no_grad():
            t0 = time.perf_counter()
            embeds = model.encode_images(self.pixels)
            vision = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(self.input_ids, self.pixels, max_new_tokens=1)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(self.input_ids, image_embeds=embeds, max_new_tokens=n_decode)
            total = time.perf_counter() - t0
            t0 = time.perf_counter()  # eager generate keeps no cache between calls: the whole prompt again
            model.generate(self.input_ids2, self.pixels, max_new_tokens=1)
            ttft2 = time.perf_counter() - t0
        return {"vision_ms": 1000 * vision, "ttft_ms": 1000 * ttft,
                "decode_tokens_per_s": (n_decode - 1) / max(total - (ttft - vision), 1e-9), "second_turn_ttft_ms": 1000 * ttft2}

    def end(self) -> dict:
        return {}


PATHS = {"edge": Edge, "edge_kv": EdgeKV, "edge_vision": EdgeVision, "mtmd_vision": MtmdVision, "handler": Handler,
         "plain": Plain, "torch": Torch}


def say(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    from ..peak_memory import PeakMemory

    name, spec = sys.argv[1], json.loads(sys.argv[2])
    with PeakMemory(interval_s=0.1) as memory:
        path = PATHS[name](spec)
        say({"ready": True, **path.warm_up()})
        runs = []
        for line in sys.stdin:
            if line.strip() != "run":
                break
            runs.append(path.run())
            say(runs[-1])
        summary = {**summarize(runs), **path.end(), "pid": os.getpid()}
    peaks = memory.result()
    say({**summary, "peak_rss_mb": peak_rss_mb(), "peak_rss_anon_mb": peaks["peak_rss_anon_mb"],
         "peak_rss_file_mb": peaks["peak_rss_file_mb"]})


if __name__ == "__main__":
    main()

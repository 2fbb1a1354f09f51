"""One measured path per process, so that each peak RSS is that path's own:

    python -m llava_edge.bench.measured_paths PATH SPEC_JSON   ->  one JSON object on the last stdout line

edge          llava-edge: ChatSession on the bundle (ONNX Runtime vision, embeddings into llama.cpp)
edge_vision   the case's vision graphs (fp32 / fp16 / int8) alone on ONNX Runtime
mtmd_vision   llama.cpp's own image encoder (mtmd) on the bundle's f16 mmproj of the same weights
handler       llama-cpp-python's Llava15ChatHandler (mtmd + the same GGUF), as its users call it
plain         plain llama-cpp-python generate on the same GGUF, a text prompt as long as the image prompt
torch         the PyTorch eager reference (fp32)

Timed runs follow one warm-up; every run of a path happens in the same process.
"""

from __future__ import annotations

import base64
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

Q1 = "Describe the image."
Q2 = "What color is the triangle?\nAnswer the question using a single word or phrase."


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


def path_edge(spec: dict) -> dict:
    from ..runtime.sampling import SamplingConfig
    from ..runtime.session import ChatSession
    from ..runtime.vision import EmbeddingCache

    session = ChatSession.open(spec["bundle"], threads=spec["threads"], n_ctx=spec.get("n_ctx"))
    image = Path(spec["image"])
    pixels = session.vision.pixels(image.read_bytes())
    t0 = time.perf_counter()
    session.vision.pixels(image.read_bytes())
    preprocess_ms = 1000 * (time.perf_counter() - t0)
    vision = []
    for _ in range(spec["runs"] + 1):
        t0 = time.perf_counter()
        session.vision.encode_pixels(pixels[None])
        vision.append(1000 * (time.perf_counter() - t0))
    turns = []
    for _ in range(spec["runs"] + 1):
        session.vision.cache = EmbeddingCache()  # every run pays for its image, as a new photo would
        session.set_image(image)
        first = session.answer(Q1, SamplingConfig(max_tokens=spec["n_decode"], ignore_eos=True))
        second = session.answer(Q2, SamplingConfig(max_tokens=1))
        t = first.timings
        turns.append({"ttft_ms": t.ttft_ms, "prefill_tokens_per_s": t.n_prefilled / (t.prefill_ms / 1000),
                      "decode_tokens_per_s": t.decode_tokens_per_s, "second_turn_ttft_ms": second.timings.ttft_ms,
                      "n_prompt_tokens": t.n_prompt_tokens, "second_turn_prefilled": second.timings.n_prefilled})
    turns = turns[1:]
    ref = np.load(spec["reference_embeds"])
    return {
        "vision_ms": stats(vision[1:]), "preprocess_ms": preprocess_ms,
        "ttft_ms": stats([t["ttft_ms"] for t in turns]),
        "prefill_tokens_per_s": stats([t["prefill_tokens_per_s"] for t in turns]),
        "decode_tokens_per_s": stats([t["decode_tokens_per_s"] for t in turns]),
        "second_turn_ttft_ms": stats([t["second_turn_ttft_ms"] for t in turns]),
        "n_prompt_tokens": turns[0]["n_prompt_tokens"], "second_turn_prefilled": turns[0]["second_turn_prefilled"],
        "embedding_cosine": cosine(session.image.embeds, ref), "vision_provider": session.vision.provider,
        "peak_rss_mb": peak_rss_mb(),
    }


def path_edge_vision(spec: dict) -> dict:
    from ..image import load_image, preprocess
    from ..onnx_session import ort_session

    m = json.loads((Path(spec["bundle"]) / "manifest.json").read_text())["vision"]
    pixels = preprocess(load_image(spec["image"]), m["image_size"], m["mean"], m["std"], m["aspect"])[None]
    ref = np.load(spec["reference_embeds"])
    out = {}
    for precision, graph in spec["vision_graphs"].items():
        sess = ort_session(graph, spec["threads"], quiet=True)
        times = []
        for _ in range(spec["runs"] + 1):
            t0 = time.perf_counter()
            (embeds,) = sess.run(None, {"pixel_values": pixels})
            times.append(1000 * (time.perf_counter() - t0))
        out[precision] = {"vision_ms": stats(times[1:]), "embedding_cosine": cosine(embeds[0], ref),
                          "file_mb": Path(graph).stat().st_size / 2**20}
        del sess
    return {"graphs": out, "peak_rss_mb": peak_rss_mb()}


def path_mtmd_vision(spec: dict) -> dict:
    from .llamacpp_mtmd import llamacpp_image_embeddings
    from ..image import load_image

    bundle = Path(spec["bundle"])
    m = json.loads((bundle / "manifest.json").read_text())
    rgb = np.asarray(load_image(spec["image"]))
    got = llamacpp_image_embeddings(bundle / m["files"]["mmproj"]["name"], bundle / m["files"]["decoder"]["name"],
                                    rgb, threads=spec["threads"], repeats=spec["runs"] + 1)
    return {"vision_ms": stats(got.encode_ms_runs[1:]), "n_image_tokens": got.embeddings.shape[0],
            "embedding_cosine": cosine(got.embeddings, np.load(spec["reference_embeds"])), "peak_rss_mb": peak_rss_mb()}


def path_handler(spec: dict) -> dict:
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from ..runtime.llama_loader import open_llama

    bundle = Path(spec["bundle"])
    m = json.loads((bundle / "manifest.json").read_text())
    handler = Llava15ChatHandler(clip_model_path=str(bundle / m["files"]["mmproj"]["name"]), verbose=False)
    llm = open_llama(bundle / m["files"]["decoder"]["name"], n_ctx=spec.get("n_ctx") or 2048,
                     n_threads=spec["threads"], chat_handler=handler)
    suffix = Path(spec["image"]).suffix.lstrip(".").replace("jpg", "jpeg")
    url = f"data:image/{suffix};base64," + base64.b64encode(Path(spec["image"]).read_bytes()).decode()
    user1 = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": Q1}]}

    def timed(messages, max_tokens):
        t0 = time.perf_counter()
        first, n, text = None, 0, ""
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True):
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

    turns = []
    for _ in range(spec["runs"] + 1):
        ttft, decode, answer = timed([user1], spec["n_decode"])
        ttft2, _, _ = timed([user1, {"role": "assistant", "content": answer}, {"role": "user", "content": Q2}], 1)
        turns.append((ttft, decode, ttft2))
    turns = turns[1:]
    decodes = [d for _, d, _ in turns if d is not None]
    return {"ttft_ms": stats([t for t, _, _ in turns]), "second_turn_ttft_ms": stats([t for _, _, t in turns]),
            "decode_tokens_per_s": stats(decodes) if decodes else None, "peak_rss_mb": peak_rss_mb()}


def path_plain(spec: dict) -> dict:
    from ..runtime.llama_loader import open_llama

    bundle = Path(spec["bundle"])
    m = json.loads((bundle / "manifest.json").read_text())
    llm = open_llama(bundle / m["files"]["decoder"]["name"], n_ctx=spec.get("n_ctx") or 2048, n_threads=spec["threads"])
    rng = np.random.default_rng(0)
    prompt = [m["decoder"]["bos_id"]] + rng.integers(3, min(llm.n_vocab(), 500), spec["n_prompt_tokens"] - 1).tolist()
    ttfts, decodes = [], []
    for _ in range(spec["runs"] + 1):
        llm.reset()
        t0 = time.perf_counter()
        first = None
        for i, _token in enumerate(llm.generate(prompt, temp=0.0, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == spec["n_decode"]:
                break
        end = time.perf_counter()
        ttfts.append(1000 * (first - t0))
        decodes.append((spec["n_decode"] - 1) / (end - first))
    return {"ttft_ms": stats(ttfts[1:]), "prefill_tokens_per_s": stats([spec["n_prompt_tokens"] / (t / 1000) for t in ttfts[1:]]),
            "decode_tokens_per_s": stats(decodes[1:]), "peak_rss_mb": peak_rss_mb()}


def path_torch(spec: dict) -> dict:
    import torch

    from ..conversation import render_prompt, tokenize_prompt
    from ..image import load_image, preprocess
    from ..reference.checkpoint import load_checkpoint

    torch.set_num_threads(spec["threads"])
    loaded = load_checkpoint(spec["checkpoint"], dtype=torch.float32)
    model, cfg = loaded.model, loaded.config
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(loaded.tokenizer_path))
    ids = tokenize_prompt(render_prompt(cfg.template, [(Q1, None)]), sp.encode, cfg.text.bos_token_id,
                          cfg.image_token_index, {"</s>": cfg.text.eos_token_id})
    pixels = torch.from_numpy(preprocess(load_image(spec["image"]), cfg.vision.image_size, cfg.image_mean,
                                         cfg.image_std, cfg.aspect))[None]
    ids2 = tokenize_prompt(render_prompt(cfg.template, [(Q1, "A red circle."), (Q2, None)]), sp.encode,
                           cfg.text.bos_token_id, cfg.image_token_index, {"</s>": cfg.text.eos_token_id})
    input_ids = torch.tensor([ids])
    vision, ttft, decode, ttft2 = [], [], [], []
    with torch.no_grad():
        for _ in range(spec["runs"] + 1):
            t0 = time.perf_counter()
            embeds = model.encode_images(pixels)
            vision.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            model.generate(input_ids, pixels, max_new_tokens=1)
            ttft.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            model.generate(input_ids, image_embeds=embeds, max_new_tokens=spec["n_decode"])
            total = time.perf_counter() - t0
            prefill = ttft[-1] / 1000 - vision[-1] / 1000
            decode.append((spec["n_decode"] - 1) / max(total - prefill, 1e-9))
            t0 = time.perf_counter()  # eager generate keeps no cache between calls: the whole prompt again
            model.generate(torch.tensor([ids2]), pixels, max_new_tokens=1)
            ttft2.append(1000 * (time.perf_counter() - t0))
    return {"vision_ms": stats(vision[1:]), "ttft_ms": stats(ttft[1:]), "decode_tokens_per_s": stats(decode[1:]),
            "second_turn_ttft_ms": stats(ttft2[1:]),
            "peak_rss_mb": peak_rss_mb()}


PATHS = {"edge": path_edge, "edge_vision": path_edge_vision, "mtmd_vision": path_mtmd_vision,
         "handler": path_handler, "plain": path_plain, "torch": path_torch}


def main() -> None:
    name, spec = sys.argv[1], json.loads(sys.argv[2])
    result = PATHS[name](spec)
    sys.stdout.flush()
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    main()

"""The torch-free runtime: vision on ONNX Runtime, embeddings spliced into llama.cpp, ChatSession.

Oracles: the PyTorch reference model with SentencePiece ids (first-token logits, answers), and a fresh
session for every KV-reuse shortcut (reusing must not change what the model sees)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llava_edge.conversation import render_prompt, tokenize_prompt
from llava_edge.errors import UserError
from llava_edge.export import pipeline
from llava_edge.image import load_image, preprocess
from llava_edge.reference.checkpoint import load_checkpoint
from llava_edge.paths import DEMO_BUNDLE
from llava_edge.runtime.bundle import open_bundle
from llava_edge.runtime.sampling import SamplingConfig, sample_token
from llava_edge.runtime.session import ChatSession
from llava_edge.runtime.vision import EmbeddingCache, VisionEncoder, choose_providers
from llava_edge.paths import DEMO_CHECKPOINT as ASSETS
from tiny_checkpoints import make_liuhaotian_checkpoint

THREADS = 1
DATA = Path(__file__).parent / "data"
EXAMPLES = Path(__file__).parents[1] / "examples"
SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny LLaVA (liuhaotian layout) and its F32 bundle with an fp32 vision graph."""
    root = tmp_path_factory.mktemp("runtime")
    ckpt = make_liuhaotian_checkpoint(root, seed=3, fmt="safetensors", n_shards=1)
    out = root / "bundle"
    pipeline.export_bundle(pipeline.ExportOptions(str(ckpt), str(out), quant="F32", vision_precision="fp32",
                                                  threads=THREADS, progress=False))
    return ckpt, out


@pytest.fixture(scope="module")
def demo():
    session = ChatSession.open(threads=THREADS)
    yield session
    session.close()


def reference_logits(ckpt, image_path, question):
    """Last-position logits of the PyTorch reference on the reference's own prompt ids and pixels."""
    import sentencepiece as spm

    loaded = load_checkpoint(ckpt, dtype=torch.float32)
    cfg = loaded.config
    sp = spm.SentencePieceProcessor(model_file=str(loaded.tokenizer_path))
    prompt = render_prompt(cfg.template, [(question, None)], image=True)
    ids = tokenize_prompt(prompt, sp.encode, cfg.text.bos_token_id, cfg.image_token_index, {"</s>": cfg.text.eos_token_id})
    pixels = preprocess(load_image(image_path), cfg.vision.image_size, cfg.image_mean, cfg.image_std, cfg.aspect)
    with torch.no_grad():
        logits, _ = loaded.model(torch.tensor([ids]), pixel_values=torch.from_numpy(pixels)[None])
    return logits[0, -1].numpy()


@pytest.mark.slow
def test_first_token_logits_match_the_reference_at_f32(tiny):
    ckpt, bundle = tiny
    session = ChatSession.open(bundle, threads=THREADS, kv_type="f32")
    image = DATA / "astronaut_wide.png"
    session.set_image(image)
    answer = session.answer("What is in the picture?", SamplingConfig(max_tokens=1))
    got = session.last_logits()  # max_tokens=1: the logits the first token was drawn from
    want = reference_logits(ckpt, image, "What is in the picture?")
    assert answer.timings.n_prompt_tokens == session.n_past
    assert int(np.argmax(got)) == int(np.argmax(want))
    assert np.abs(got - want).max() <= 1e-3
    session.close()


def test_second_question_reuses_image_and_prefix(demo, monkeypatch):
    encodes = []
    original = demo.vision.encode_pixels
    monkeypatch.setattr(demo.vision, "encode_pixels", lambda *args: encodes.append(1) or original(*args))
    demo.vision.cache = EmbeddingCache()
    demo.set_image(EXAMPLES / "green_triangle.png")
    first = demo.answer("What color is the triangle?" + SUFFIX)
    second = demo.answer("How many shapes are there?" + SUFFIX)
    assert len(encodes) == 1
    assert first.timings.n_prefilled == first.timings.n_prompt_tokens
    question_tokens = len(demo.tokenize("USER: How many shapes are there?" + SUFFIX + " ASSISTANT:"))
    # only the first answer's tokens, its </s> and the new question were evaluated
    assert second.timings.n_prefilled <= question_tokens + first.timings.n_generated + 2
    assert second.timings.vision_ms == 0.0
    # ...and that shortcut changes nothing: a fresh session prefilling the whole conversation agrees
    fresh = ChatSession.open(threads=THREADS)
    fresh.set_image(EXAMPLES / "green_triangle.png")
    fresh.turns = [("What color is the triangle?" + SUFFIX, first.text)]
    again = fresh.answer("How many shapes are there?" + SUFFIX)
    assert again.timings.n_prefilled == again.timings.n_prompt_tokens
    assert again.text == second.text
    fresh.close()


def test_new_image_in_the_same_session(demo):
    demo.set_image(EXAMPLES / "green_triangle.png")
    demo.answer("Describe the image.")
    demo.set_image(EXAMPLES / "red_triangle_yellow_square_yellow_triangle.png")
    got = demo.answer("What color is the square?" + SUFFIX)
    # the system text before the image may come from the KV cache; the new image and all after it may not
    before_image = len(demo.tokenize(render_prompt(demo.bundle.template, [("q", None)]).split("<image>")[0])) + 1
    assert got.text == "Yellow" and got.timings.n_prefilled >= got.timings.n_prompt_tokens - before_image
    assert len(demo.turns) == 1


@pytest.mark.slow
def test_demo_bundle_answers_like_the_reference(tmp_path):
    """Greedy answers of the shipped bundle on unseen shapes-world images vs the reference on the fp16
    checkpoint it was exported from."""
    from llava_edge.eval.benchmarks import load_benchmark
    from llava_edge.eval.engine_runner import answers_of_bundle
    from llava_edge.scoring import load_test_records
    from llava_edge.train.reference_answers import answer_questions
    from llava_edge.train.shapes import build_dataset

    build_dataset(tmp_path, 0, 24, seed=123, progress=False)
    records = load_test_records(tmp_path / "test.json")
    loaded = load_checkpoint(ASSETS)
    ref = answer_questions(loaded.model, loaded.config, loaded.tokenizer_path, records, tmp_path, progress=False)
    questions = load_benchmark("shapes", tmp_path / "test.json").questions
    answers = answers_of_bundle(None, questions, parallel=4, max_tokens=24, threads=THREADS)
    got = [answers[q.key] for q in questions]
    same = np.mean([a == b for a, b in zip(ref, got)])
    assert len(records) >= 100 and same >= 0.95, [(a, b) for a, b in zip(ref, got) if a != b]


def test_interrupted_answer_keeps_the_session_usable(demo):
    demo.set_image(EXAMPLES / "green_triangle.png")
    stream = demo.ask("Describe the image.")
    next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.throw(KeyboardInterrupt)
    assert demo.last.finish_reason == "interrupted" and len(demo.turns) == 1
    after = demo.answer("What color is the triangle?" + SUFFIX)
    assert after.text == "Green" and after.finish_reason == "stop"


def test_sampling_is_seeded_and_greedy_is_argmax(demo):
    demo.set_image(EXAMPLES / "green_triangle.png")
    runs = []
    for _ in range(2):
        demo.reset()
        runs.append(demo.answer("Describe the image.", SamplingConfig(temperature=1.5, seed=5)).text)
    assert runs[0] == runs[1]
    logits = np.array([0.0, 3.0, 2.9, -1.0])
    assert sample_token(logits, 0.0, 1.0, np.random.default_rng(0)) == 1
    rng = np.random.default_rng(0)
    drawn = {sample_token(logits, 1.0, 0.5, rng) for _ in range(200)}
    assert drawn == {1, 2} or drawn == {1}  # top-p 0.5 keeps the nucleus only
    assert {sample_token(logits, 1.0, 1.0, rng) for _ in range(400)} >= {0, 1, 2}


def test_prompt_longer_than_the_context_is_a_user_error(demo):
    demo.set_image(EXAMPLES / "green_triangle.png")
    with pytest.raises(UserError, match="context holds"):
        demo.answer("square " * 600)
    assert demo.answer("What color is the triangle?" + SUFFIX).text == "Green"  # still fine after


def test_embedding_cache_is_bounded_and_on_disk(tmp_path):
    cache = EmbeddingCache(max_bytes=3 * 400, disk_dir=tmp_path)
    for i in range(5):
        cache.put(f"k{i}", np.full((10, 10), i, np.float32))
    assert len(cache) == 3 and cache.get("k0") is not None  # evicted from memory, back from disk
    bundle = open_bundle(DEMO_BUNDLE)
    first = VisionEncoder(bundle, threads=THREADS, cache=EmbeddingCache(disk_dir=tmp_path / "e"))
    a = first.encode(EXAMPLES / "green_triangle.png")
    second = VisionEncoder(bundle, threads=THREADS, cache=EmbeddingCache(disk_dir=tmp_path / "e"))
    second.encode_pixels = None  # a disk hit must not run the graph
    b = second.encode((EXAMPLES / "green_triangle.png").read_bytes())
    assert not a.cached and b.cached and np.array_equal(a.embeds, b.embeds)


def test_providers(capsys):
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    assert choose_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in capsys.readouterr().err
    with pytest.raises(UserError):
        choose_providers("npu", ["CPUExecutionProvider"])


@pytest.mark.slow
def test_vision_matches_the_reference_on_exif_rotated_and_rgba_images(tiny, tmp_path):
    """Images that need care (EXIF rotation, alpha, 16-bit) reach the graph exactly as the reference sees them."""
    from PIL import Image

    ckpt, bundle_dir = tiny
    bundle = open_bundle(bundle_dir)
    enc = VisionEncoder(bundle, threads=THREADS)
    upright = Image.open(DATA / "chelsea_portrait.jpg").convert("RGB")
    rotated = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CW to view": undoes the ROTATE_90 above
    rotated.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright_from_exif = load_image(tmp_path / "rotated.jpg")
    assert upright_from_exif.size == upright.size
    loaded = load_checkpoint(ckpt, dtype=torch.float32)
    cfg = loaded.config
    for path in (tmp_path / "rotated.jpg", DATA / "astronaut_rgba.png", DATA / "camera_16bit.png"):
        got = enc.encode(path).embeds
        pixels = preprocess(load_image(path), cfg.vision.image_size, cfg.image_mean, cfg.image_std, cfg.aspect)
        with torch.no_grad():
            want = loaded.model.encode_images(torch.from_numpy(pixels)[None])[0].numpy()
        assert np.abs(got - want).max() < 1e-4


def test_bundle_with_another_models_decoder_is_refused(tmp_path):
    from tiny_text_gguf import write_tiny_llama_gguf

    from llava_edge.runtime.bundle import sha256_of

    bad = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    gguf = write_tiny_llama_gguf(bad / manifest["files"]["decoder"]["name"], n_embd=64)
    manifest["files"]["decoder"].update(sha256=sha256_of(gguf), bytes=gguf.stat().st_size)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="n_embd"):
        ChatSession.open(bad, threads=THREADS)


def test_stop_strings_cut_the_answer_and_hold_back_their_prefixes():
    from llava_edge.conversation import stop_strings
    from llava_edge.runtime.answer import first_stop as _first_stop, held_back as _held_back

    assert stop_strings("vicuna_v1") == [] and stop_strings("plain") == ["\n"] and stop_strings("llava_hf") == ["USER:"]
    assert _first_stop("A cat. USER: more", ["USER:"]) == 7
    assert _first_stop("A cat.", ["USER:"]) is None
    assert _held_back("A cat. US", ["USER:"]) == 2  # "US" might start "USER:": not streamed yet
    assert _held_back("A cat. UX", ["USER:"]) == 0

"""The decoder GGUF against the PyTorch reference, SentencePiece and stock llama-cpp-python.

Tiny models whose widths are multiples of 256, so llama.cpp's K-quants and its AMX/repack kernels
really apply: hidden 256, ffn 768, 4 heads of 64 (2 KV heads), 2 layers. Both checkpoint formats:
liuhaotian (vocab = SentencePiece size) and llava-hf (SentencePiece + <image>, <pad>, padded to 64).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jinja2
import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize
from spm_fixture import train_tiny_spm
from tiny_checkpoints import save_full_clip, save_hf_layout, save_liuhaotian_layout

from llava_edge.conversation import TEMPLATES, render_prompt
from llava_edge.errors import UserError
from llava_edge.export.decoder_source import source_from_checkpoint, source_from_loaded
from llava_edge.export.gguf_decoder import write_decoder_gguf
from llava_edge.export.gguf_parity import (
    TOKENIZER_STRINGS,
    compare_logits,
    decoder_parity,
    gguf_logits,
    reference_logits,
    tokenizer_parity,
)
from llava_edge.export.gguf_vocab import chat_template_jinja
from llava_edge.quant.gguf import quantize_gguf
from llava_edge.reference.checkpoint import load_checkpoint
from llava_edge.runtime.llama_loader import open_llama
from tiny_checkpoints import make_llava

HF_SP_SIZE, HF_VOCAB, HF_IMAGE, HF_PAD = 330, 384, 330, 331
IMAGE_SIZE = 56  # 16 image tokens
THREADS = {"n_threads": 1}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    for name in ("spm-liu", "spm-hf"):
        (root / name).mkdir()
    liu_tok = train_tiny_spm(root / "spm-liu", 400)
    hf_tok = train_tiny_spm(root / "spm-hf", HF_SP_SIZE)

    liu = make_llava(400, 32000, None, seed=3)
    liu_dir = save_liuhaotian_layout(liu, root / "liuhaotian", "clip", n_shards=2, fmt="safetensors")
    save_full_clip(liu, liu_dir / "clip")
    (liu_dir / "tokenizer.model").write_bytes(liu_tok.read_bytes())

    hf = make_llava(HF_VOCAB, HF_IMAGE, HF_PAD, seed=4)
    hf_dir = save_hf_layout(hf, root / "llava-hf", "save_pretrained")
    (hf_dir / "tokenizer.model").write_bytes(hf_tok.read_bytes())
    return {"liuhaotian": liu_dir, "llava-hf": hf_dir, "root": root}


@pytest.fixture(scope="module")
def ggufs(ckpts):
    """F32 and F16 from both paths (streamed from files, and from a loaded model), and quantized ones."""
    out = {}
    root = ckpts["root"]
    for ftype in ("F32", "F16"):
        source = source_from_checkpoint(ckpts["liuhaotian"])
        out[f"liu-{ftype}"] = write_decoder_gguf(source, root / f"liu-{ftype}.gguf", ftype, progress=False)
    loaded = load_checkpoint(ckpts["llava-hf"])
    out["hf-F32"] = write_decoder_gguf(source_from_loaded(loaded), root / "hf-F32.gguf", "F32", progress=False)
    for quant in ("Q8_0", "Q4_K_M"):
        dst = root / f"liu-{quant}.gguf"
        out[f"liu-{quant}"] = quantize_gguf(out["liu-F16"], dst, quant, n_threads=1, progress=False)
    return out


def sequence(model, n_text: int, seed: int = 0) -> list[int]:
    """BOS, text, the image placeholder, more text: n_text + n_image_tokens positions."""
    rng = np.random.default_rng(seed)
    n_sp = 400 if model.cfg.format == "liuhaotian" else HF_SP_SIZE
    text = [int(i) for i in rng.integers(3, n_sp, size=n_text - 1)]
    return [1] + text[:10] + [model.cfg.image_token_index] + text[10:]


def pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- logits vs the reference


@pytest.mark.parametrize("fmt,key", [("liuhaotian", "liu-F32"), ("llava-hf", "hf-F32")])
def test_f32_matches_reference_at_every_position(ckpts, ggufs, fmt, key):
    model = load_checkpoint(ckpts[fmt]).model
    ids = sequence(model, 60)
    report = decoder_parity(ggufs[key], model, ids, pixel_values=pixels(), **THREADS)
    assert report["n_positions"] == 60 + 16 >= 64
    assert report["argmax_identical"], report["mismatch_positions"]
    assert report["max_abs_diff"] <= 1e-3


def test_f16_argmax_identical(ckpts, ggufs):
    """Against the reference holding the weights the file holds (2-D weights rounded to fp16): argmax
    identical everywhere. Against the fp32 reference: identical wherever its top-2 gap is not a near-tie
    that fp16 rounding of the weights alone can flip."""
    model = load_checkpoint(ckpts["liuhaotian"]).model
    ids, pix = sequence(model, 112, seed=1), pixels(2)
    with torch.no_grad():
        embeds = model.encode_images(pix)
        fp32 = reference_logits(model, ids, [embeds[0]])
        for p in model.language.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    report = decoder_parity(ggufs["liu-F16"], model, ids, image_embeds=embeds, **THREADS)
    assert report["n_positions"] == 128
    assert report["argmax_identical"], report["mismatch_positions"]
    assert report["max_abs_diff"] <= 0.1

    gguf = gguf_logits(ggufs["liu-F16"], ids, [embeds[0].numpy()], model.cfg.image_token_index, n_threads=1)
    top2 = np.sort(fp32, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.1
    assert clear.mean() > 0.9
    assert (gguf.argmax(-1) == fp32.argmax(-1))[clear].all()


def model_with_gguf_weights(model, gguf_path: Path):
    """The reference holding exactly the weights stored in a GGUF: dequantized by gguf-py's own numpy code,
    Q/K rows put back from llama.cpp's interleaved RoPE order into Hugging Face's half-split order."""
    text = model.cfg.text
    params = dict(model.language.named_parameters())
    blocks = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    top = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
    with torch.no_grad():
        for t in GGUFReader(gguf_path).tensors:
            parts = t.name.split(".")
            name = (f"layers.{parts[1]}.{blocks[parts[2]]}" if parts[0] == "blk" else top[parts[0]]) + ".weight"
            w = dequantize(t.data, t.tensor_type).reshape(params[name].shape)
            if parts[-2] in ("attn_q", "attn_k"):
                heads = text.num_attention_heads if parts[-2] == "attn_q" else text.num_key_value_heads
                w = w.reshape(heads, text.head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            params[name].copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
    return model


def decisive_agreement(reference: np.ndarray, candidate: np.ndarray, margin: float) -> bool:
    """Same argmax wherever the reference's top-2 gap exceeds `margin` (not a near-tie)."""
    top2 = np.sort(reference, -1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > margin
    return bool((reference.argmax(-1) == candidate.argmax(-1))[decisive].all())


@pytest.mark.parametrize("quant,min_top1", [("Q8_0", 0.99), ("Q4_K_M", 0.97)])
def test_quantized_top1_and_kl(ckpts, ggufs, quant, min_top1):
    """Against the reference holding the file's own (dequantized) weights, llama.cpp's quantized kernels
    agree on top-1: they differ only by rounding activations to 8 bits (logit noise ~0.06 here, so
    random-weight near-ties flip: checked to agree wherever the gap is > 0.3). Against the fp32 reference
    the KL is reported and grows as bits drop."""
    ids, pix = sequence(load_checkpoint(ckpts["liuhaotian"]).model, 224, seed=2), pixels(3)
    path = ggufs[f"liu-{quant}"]
    model = model_with_gguf_weights(load_checkpoint(ckpts["liuhaotian"]).model, path)
    with torch.no_grad():
        embeds = model.encode_images(pix)
    same_ref = reference_logits(model, ids, [embeds[0]])
    got = gguf_logits(path, ids, [embeds[0].numpy()], model.cfg.image_token_index, n_threads=1)
    same = compare_logits(same_ref, got)
    fp32 = decoder_parity(path, load_checkpoint(ckpts["liuhaotian"]).model, ids, pixel_values=pix, **THREADS)
    print(f"{quant}: vs same weights top1 {same['top1_agreement']:.4f} KL {same['mean_kl']:.2e}; "
          f"vs fp32 reference top1 {fp32['top1_agreement']:.4f} KL {fp32['mean_kl']:.2e} "
          f"max|d| {fp32['max_abs_diff']:.2f}")
    assert same["n_positions"] == 240
    assert same["top1_agreement"] >= min_top1
    assert decisive_agreement(same_ref, got, margin=0.3)
    assert same["mean_kl"] < fp32["mean_kl"] < 1.0


def test_quantized_files_hold_k_quants_and_kl_grows(ggufs, ckpts):
    types = {GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(ggufs["liu-Q4_K_M"]).tensors}
    assert {"Q4_K", "Q6_K"} <= types  # real K-quants: rows are multiples of 256, no fallback types
    model = load_checkpoint(ckpts["liuhaotian"]).model
    ids, pix = sequence(model, 112, seed=5), pixels(6)
    kl = {q: decoder_parity(ggufs[f"liu-{q}"], model, ids, pixel_values=pix, **THREADS)["mean_kl"]
          for q in ("F16", "Q8_0", "Q4_K_M")}
    assert kl["F16"] < kl["Q8_0"] < kl["Q4_K_M"]


def test_chunked_decode_matches_reference(ckpts, ggufs):
    """n_batch 8: the 16 image embeddings and the text go in as several decodes each."""
    model = load_checkpoint(ckpts["llava-hf"]).model
    ids = sequence(model, 60, seed=7)
    report = decoder_parity(ggufs["hf-F32"], model, ids, pixel_values=pixels(8), n_batch=8, **THREADS)
    assert report["argmax_identical"] and report["max_abs_diff"] <= 1e-3


def test_streamed_and_in_memory_exports_hold_the_same_tensors(ckpts, ggufs, tmp_path):
    from_memory = write_decoder_gguf(source_from_loaded(load_checkpoint(ckpts["liuhaotian"])), tmp_path / "m.gguf", "F32", progress=False)
    streamed = {t.name: np.array(t.data) for t in GGUFReader(ggufs["liu-F32"]).tensors}
    loaded = {t.name: np.array(t.data) for t in GGUFReader(from_memory).tensors}
    assert streamed.keys() == loaded.keys() and len(streamed) == 2 + 9 * 2 + 1
    assert all(np.array_equal(streamed[k], loaded[k]) for k in streamed)


# ----------------------------------------------------------------------------- vocab, tokenizer, template


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def test_llava_hf_vocab_has_added_and_padding_tokens(ckpts, ggufs):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ckpts["llava-hf"] / "tokenizer.model"))
    r = GGUFReader(ggufs["hf-F32"])
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == HF_VOCAB == field(r, "llama.vocab_size")
    assert tokens[:HF_SP_SIZE] == [sp.id_to_piece(i) for i in range(HF_SP_SIZE)]
    assert (tokens[HF_IMAGE], types[HF_IMAGE]) == ("<image>", TokenType.CONTROL)
    assert (tokens[HF_PAD], types[HF_PAD]) == ("<pad>", TokenType.CONTROL)
    assert tokens[HF_PAD + 1:] == [f"[PAD{i}]" for i in range(HF_PAD + 1, HF_VOCAB)]
    assert set(types[HF_PAD + 1:]) == {TokenType.UNUSED}
    assert types[0] == TokenType.UNKNOWN and types[1] == types[2] == TokenType.CONTROL
    byte_ids = [i for i in range(HF_SP_SIZE) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and {types[i] for i in byte_ids} == {TokenType.BYTE}
    assert field(r, "tokenizer.ggml.scores")[5] == pytest.approx(sp.get_score(5))
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert (field(r, "tokenizer.ggml.unknown_token_id"), field(r, "tokenizer.ggml.padding_token_id")) == (0, HF_PAD)
    assert field(r, "tokenizer.ggml.add_bos_token") is True and field(r, "tokenizer.ggml.add_eos_token") is False
    assert field(r, "tokenizer.ggml.model") == "llama"
    hp = {k: field(r, f"llama.{k}") for k in ("context_length", "embedding_length", "block_count",
                                              "feed_forward_length", "attention.head_count",
                                              "attention.head_count_kv", "rope.dimension_count")}
    assert hp == {"context_length": 512, "embedding_length": 256, "block_count": 2, "feed_forward_length": 768,
                  "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 64}
    assert field(r, "general.file_type") == 0


@pytest.mark.parametrize("key,fmt", [("liu-F32", "liuhaotian"), ("hf-F32", "llava-hf")])
def test_tokenization_identical_to_sentencepiece(ckpts, ggufs, key, fmt):
    report = tokenizer_parity(ggufs[key], ckpts[fmt] / "tokenizer.model", TOKENIZER_STRINGS)
    assert report["identical"] == report["n_strings"] == len(TOKENIZER_STRINGS), report["mismatches"]


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_chat_template_renders_like_the_reference(template):
    env = jinja2.Environment()
    tpl = env.from_string(chat_template_jinja(template))
    turns = [("What color is the circle?", "Red."), ("How many shapes are there?", None)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0][0]}]},
                {"role": "assistant", "content": turns[0][1]}, {"role": "user", "content": turns[1][0]}]
    rendered = tpl.render(messages=messages, add_generation_prompt=True, bos_token="<s>")
    assert rendered == "<s>" + render_prompt(template, turns, image=True)
    text_only = [{"role": "user", "content": "Hi"}]
    rendered = tpl.render(messages=text_only, add_generation_prompt=True, bos_token="<s>")
    assert rendered == "<s>" + render_prompt(template, [("Hi", None)], image=False)


def test_gguf_runs_in_plain_llama_cpp_python(ckpts, ggufs):
    """Stock llama-cpp-python, nothing of ours: greedy text generation equals the reference's, and its
    chat completion uses the template stored in the file."""
    model = load_checkpoint(ckpts["liuhaotian"]).model
    prompt = [1] + sequence(model, 20, seed=9)[1:11]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=12, eos_token_id=-1)
    llm = llama_cpp.Llama(str(ggufs["liu-F32"]), n_ctx=128, n_threads=1, n_threads_batch=1, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    got = []
    for token in llm.generate(prompt, temp=0.0):
        got.append(token)
        if len(got) == 12:
            break
    assert got == want
    assert llm.metadata["tokenizer.chat_template"] == chat_template_jinja("vicuna_v1")
    question = "What color is the circle?"
    reply = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=4, temperature=0)
    one_bos = llm.tokenize(render_prompt("vicuna_v1", [(question, None)], image=False).encode(), add_bos=True)
    assert reply["usage"]["prompt_tokens"] == len(one_bos)
    assert reply["usage"]["completion_tokens"] >= 1
    llm.close()


# ----------------------------------------------------------------------------- runtime loader and decoder


def test_safe_loader_runs_quantized_models_without_crashing(ggufs, tmp_path):
    """In a child process (a SIGILL would kill pytest): the probe decides, the model decodes a multi-token
    batch and image embeddings. On this build + an AMX CPU, extra buffer types die with SIGILL."""
    script = f"""
import numpy as np
from llava_edge.runtime.llama_loader import open_llama
from llava_edge.runtime.llama_probe import extra_bufts_verdict
from llava_edge.runtime.tokenizer import Tokenizer
from llava_edge.runtime.executor import Executor, sequence_logits
for path in {[str(ggufs['liu-Q4_K_M']), str(ggufs['liu-Q8_0'])]!r}:
    llm = open_llama(path, n_ctx=128, n_batch=32, n_threads=1)
    dec = Tokenizer(llm)
    image = np.random.default_rng(0).standard_normal((40, dec.n_embd)).astype(np.float32)
    logits = sequence_logits(Executor(llm, 32, dec.n_embd, dec.n_vocab), [list(range(3, 43)), image, [5, 6]])
    assert logits.shape == (82, dec.n_vocab) and np.isfinite(logits).all()
print("verdict", extra_bufts_verdict())
import sys; assert "torch" not in sys.modules
print("ok")
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("LLAVA_EDGE_EXTRA_BUFTS", None)
    cmd = [sys.executable, "-c", script]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])
    assert (tmp_path / "llava-edge" / "llama_cpp_probe.json").exists()
    print(done.stdout.splitlines()[0])


def test_bad_names_and_interrupted_export(ckpts, tmp_path):
    with pytest.raises(UserError, match="Q4_K_M"):
        quantize_gguf(tmp_path / "x.gguf", tmp_path / "y.gguf", "Q3_XL")
    with pytest.raises(UserError):
        write_decoder_gguf(source_from_checkpoint(ckpts["liuhaotian"]), tmp_path / "z.gguf", "Q4_K_M")
    with pytest.raises(UserError, match="not found"):
        open_llama(tmp_path / "missing.gguf")
    source = source_from_checkpoint(ckpts["liuhaotian"])

    def broken():
        raise KeyboardInterrupt

    source.weights["layers.1.mlp.up_proj.weight"] = broken
    with pytest.raises(KeyboardInterrupt):
        write_decoder_gguf(source, tmp_path / "half.gguf", "F16", progress=False)
    assert not (tmp_path / "half.gguf").exists()


def test_near_ties_are_counted_apart():
    ref = np.array([[2.0, 1.95, 0.0], [3.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
    cand = np.array([[1.9, 2.0, 0.0], [3.0, 0.1, 0.0], [0.0, 1.0, 5.0]])  # a near-tie flipped, a clear one flipped
    got = compare_logits(ref, cand)
    assert got["top1_agreement"] == pytest.approx(1 / 3)
    assert got["top1_agreement_clear"] == pytest.approx(1 / 2)
    assert got["mismatch_positions"] == [0, 2]


# ----------------------------------------------------------------------------- token-embedding rows


DEMO_DECODER = Path(__file__).resolve().parents[1] / "llava_edge" / "assets" / "demo" / "bundle" / "decoder-Q4_K_M.gguf"


@pytest.mark.parametrize("key", ["liu-F32", "liu-F16", "liu-Q8_0", "liu-Q4_K_M", "Q4_0", "Q5_K_M", "demo"])
def test_token_embedding_rows_are_the_ones_llama_cpp_looks_up(ggufs, key, tmp_path):
    """The text of a prompt decoded as embedding rows gives llama.cpp's own logits for those token ids, bit for
    bit (the same batch, so the same kernels: any difference is the rows')."""
    from llava_edge.runtime.executor import Executor
    from llava_edge.runtime.token_embeddings import BLOCK, Q4_K, TokenEmbeddings

    if key in ("Q4_0", "Q5_K_M"):
        path = quantize_gguf(ggufs["liu-F16"], tmp_path / f"{key}.gguf", key, n_threads=1, progress=False)
    else:
        path = DEMO_DECODER if key == "demo" else ggufs[key]
    types = {t.name: int(t.tensor_type) for t in GGUFReader(path).tensors}
    table = TokenEmbeddings.open(path)
    if key == "demo":
        assert types["token_embd.weight"] == Q4_K  # the shipped model covers the K-quant path
    assert (table is not None) == (types["token_embd.weight"] in BLOCK)
    if table is None:
        pytest.skip(f"token_embd is ggml type {types['token_embd.weight']}: decoded as tokens")
    llm = open_llama(path, n_ctx=128, n_threads=1, n_batch=64)
    executor = Executor(llm, 64, table.n_embd, table.n_vocab)
    ids = [1] + [int(i) for i in np.random.default_rng(3).integers(3, table.n_vocab, size=40)]
    executor.decode_tokens([(0, i, t, True) for i, t in enumerate(ids)])
    by_token = np.stack([executor.logits(i) for i in range(len(ids))])
    executor.truncate(0, 0)
    executor.decode_embeddings(0, 0, table.rows(ids), [True] * len(ids))
    by_row = np.stack([executor.logits(i) for i in range(len(ids))])
    executor.close()
    llm.close()
    assert np.array_equal(by_token, by_row)

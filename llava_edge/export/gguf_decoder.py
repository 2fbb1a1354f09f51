"""The LLaMA decoder as a standard `llama`-architecture GGUF (F32 or F16), streamed one tensor at a time.

The header, metadata and every tensor's info are written first; then each tensor is loaded, converted
and written on its own, so peak memory stays near the largest tensor (the embedding table), not the model.
Q and K rows are permuted per head: Hugging Face LLaMA rotates the two halves of each head
(`rotate_half`), while llama.cpp's `llama` graph uses NORM RoPE, which rotates adjacent pairs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

from ..errors import CheckpointError, UserError
from .decoder_source import DecoderSource, expected_shapes
from .gguf_vocab import read_sentencepiece_vocab, write_vocab

ARCH = "llama"
FTYPES = {"F32": (LlamaFileType.ALL_F32, np.float32), "F16": (LlamaFileType.MOSTLY_F16, np.float16)}


def gguf_tensor_name(name: str) -> str:
    """Reference (HF LLaMA) weight name -> llama.cpp tensor name."""
    fixed = {
        "embed_tokens.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in fixed:
        return fixed[name]
    _, i, rest = name.split(".", 2)
    block = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }[rest]
    return f"blk.{i}.{block}"


def permute_for_norm_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, reorder output rows from [x_0..x_{h/2-1}, y_0..y_{h/2-1}] to [x_0, y_0, x_1, y_1, ...]."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_decoder_gguf(source: DecoderSource, out_path: str | os.PathLike, ftype: str = "F16", progress: bool = True) -> Path:
    """Write the decoder as GGUF. `source` says where each tensor comes from (decoder_source.py:
    `source_from_checkpoint` streams from the files, `source_from_loaded` reads a model in memory)."""
    if ftype not in FTYPES:
        raise UserError(f"GGUF export writes {' or '.join(FTYPES)} (got {ftype!r}); quantize afterwards")
    text = source.text
    shapes = expected_shapes(text)
    missing = [n for n in shapes if n not in source.weights]
    if missing:
        raise CheckpointError(f"{len(missing)} decoder tensors missing, e.g. {', '.join(missing[:3])}")
    if text.head_dim % 2:
        raise CheckpointError(f"head_dim {text.head_dim} is odd: RoPE needs pairs")
    file_type, float_dtype = FTYPES[ftype]
    vocab = read_sentencepiece_vocab(
        source.tokenizer_path, text.vocab_size, text.bos_token_id, text.eos_token_id,
        text.pad_token_id, source.added_tokens,
    )

    out_path = Path(out_path)
    writer = GGUFWriter(out_path, ARCH)
    _write_hparams(writer, source, file_type)
    write_vocab(writer, vocab, source.template)

    def stored_dtype(shape) -> type:
        return np.float32 if len(shape) == 1 else float_dtype  # norms stay F32, as llama.cpp's converter

    for name, shape in shapes.items():
        dtype = np.dtype(stored_dtype(shape))
        writer.add_tensor_info(gguf_tensor_name(name), shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    total = sum(int(np.prod(s)) * np.dtype(stored_dtype(s)).itemsize for s in shapes.values())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = _progress_bar(total, f"GGUF {ftype} {out_path.name}") if progress else None
        for name, shape in shapes.items():
            array = source.weights[name]()
            if tuple(array.shape) != shape:
                raise CheckpointError(f"tensor {name} has shape {tuple(array.shape)}, expected {shape}")
            if name.endswith("q_proj.weight"):
                array = permute_for_norm_rope(array, text.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                array = permute_for_norm_rope(array, text.num_key_value_heads)
            array = np.ascontiguousarray(array, dtype=stored_dtype(shape))
            writer.write_tensor_data(array)
            if bar is not None:
                bar.update(array.nbytes)
            del array
        if bar is not None:
            bar.close()
    except BaseException:
        writer.close()
        out_path.unlink(missing_ok=True)
        raise
    writer.close()
    return out_path


def _write_hparams(writer: GGUFWriter, source: DecoderSource, file_type: int) -> None:
    t = source.text
    writer.add_name(source.name)
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_block_count(t.num_hidden_layers)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(t.num_attention_heads)
    writer.add_head_count_kv(t.num_key_value_heads)
    writer.add_rope_freq_base(t.rope_theta)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_rope_dimension_count(t.head_dim)
    if t.head_dim * t.num_attention_heads != t.hidden_size:
        writer.add_key_length(t.head_dim)
        writer.add_value_length(t.head_dim)
    writer.add_vocab_size(t.vocab_size)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(GGML_QUANT_VERSION)


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)

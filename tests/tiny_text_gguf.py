"""A tiny random llama-architecture GGUF of a given width: the text model llama.cpp's mtmd requires
next to an mmproj (it checks the projector's output width against n_embd). Its weights do not matter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType


def write_tiny_llama_gguf(path: Path, n_embd: int, n_ff: int | None = None, n_head: int = 2, seed: int = 0) -> Path:
    n_ff = n_ff or 2 * n_embd
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a", "b", "c"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * 4
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    vocab = len(tokens)
    writer.add_tensor("token_embd.weight", w(vocab, n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    writer.add_tensor("output.weight", w(vocab, n_embd))
    for name, shape in {
        "attn_norm": None, "ffn_norm": None, "attn_q": (n_embd, n_embd), "attn_k": (n_embd, n_embd),
        "attn_v": (n_embd, n_embd), "attn_output": (n_embd, n_embd), "ffn_gate": (n_ff, n_embd),
        "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff),
    }.items():
        writer.add_tensor(f"blk.0.{name}.weight", np.ones(n_embd, np.float32) if shape is None else w(*shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

"""The reference LLaMA decoder run one layer at a time in fp32, for models whose fp32 copy does not fit.

`load_checkpoint` leaves the weights where they are (memory-mapped safetensors or `.bin` files, usually
fp16): the whole-model reference would need `language.float()`, 27 GB for a 7B decoder. Here each
`DecoderLayer` is rebuilt in fp32 from its stored weights, run over the whole sequence, and dropped
before the next one, so the anonymous memory is one layer in fp32 (0.8 GB at 7B) plus the hidden states
of the sequence. The final norm and lm_head follow, lm_head in chunks of vocabulary rows. The maths is
the reference's own (`DecoderLayer`, `RMSNorm`, `rope_cos_sin`), on the same fp32 values as
`language.float()`; only the order of lm_head's output columns is split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .llama import DecoderLayer, Llama, RMSNorm, rope_cos_sin

LM_HEAD_ROWS = 4096  # vocabulary rows of lm_head in fp32 at a time (64 MB at width 4096)


def fp32_copy(module: nn.Module, empty: nn.Module) -> nn.Module:
    """`empty` (built on the meta device with module's shapes) holding module's weights in fp32.

    A weight already in fp32 is shared, not copied (tiny models in memory)."""
    state = {k: v.float() for k, v in module.state_dict().items()}
    empty.load_state_dict(state, assign=True)
    return empty.eval()


@torch.no_grad()
def embed_sequence(
    model, input_ids: Sequence[int], image_embeds: Sequence[torch.Tensor] = (), image_token_id: int | None = None
) -> torch.Tensor:
    """[1, T, D] fp32 input embeddings of one sequence: each image placeholder in input_ids becomes the
    rows of the next image's embeddings; text rows are read from the table in its stored dtype (exact)
    and widened to fp32, without an fp32 copy of the whole table."""
    image_token_id = model.cfg.image_token_index if image_token_id is None else image_token_id
    table = model.language.embed_tokens.weight
    ids = torch.tensor([int(i) for i in input_ids], dtype=torch.long)
    cut = (ids == image_token_id).nonzero().flatten().tolist()
    if len(cut) != len(image_embeds):
        raise ValueError(f"{len(image_embeds)} images given but {len(cut)} placeholders in input_ids")
    pieces, start = [], 0
    for n, pos in enumerate(cut + [len(ids)]):
        pieces.append(F.embedding(ids[start:pos], table).float())
        if pos < len(ids):
            pieces.append(image_embeds[n].reshape(-1, table.shape[1]).float())
        start = pos + 1
    return torch.cat(pieces)[None]


@torch.no_grad()
def streamed_hidden_states(language: Llama, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """The last layer's output [1, T, D] fp32 for one unpadded sequence [1, T, D], one fp32 layer at a time."""
    cfg = language.cfg
    x = inputs_embeds.float()
    positions = torch.arange(x.shape[1])[None]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    for i, stored in enumerate(language.layers):
        with torch.device("meta"):
            empty = DecoderLayer(cfg, i)
        layer = fp32_copy(stored, empty)
        x = layer(x, cos, sin, None)  # mask None: plain causal attention, as Llama.forward without padding
        del layer, empty
    return x


@torch.no_grad()
def streamed_logits(language: Llama, inputs_embeds: torch.Tensor, lm_head_rows: int = LM_HEAD_ROWS) -> torch.Tensor:
    """Logits [T, V] fp32 of one sequence, equal to `language.float()(inputs_embeds)[0]` up to rounding."""
    cfg = language.cfg
    x = streamed_hidden_states(language, inputs_embeds)
    with torch.device("meta"):
        empty_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    x = fp32_copy(language.norm, empty_norm)(x)[0]
    head = language.lm_head.weight
    logits = torch.empty(x.shape[0], head.shape[0], dtype=torch.float32)
    for start in range(0, head.shape[0], lm_head_rows):
        rows = head[start: start + lm_head_rows].float()
        logits[:, start: start + rows.shape[0]] = F.linear(x, rows)
        del rows
    return logits


@torch.no_grad()
def streamed_reference_logits(
    model, input_ids: Sequence[int], image_embeds: Sequence[torch.Tensor] = (), image_token_id: int | None = None
) -> torch.Tensor:
    """A `Llava` model's logits [T, V] fp32 for one sequence with image placeholders, streamed."""
    return streamed_logits(model.language, embed_sequence(model, input_ids, image_embeds, image_token_id))

"""The layer-by-layer fp32 reference (reference/streamed.py) equals the whole-model fp32 reference.

Checkpoints are tiny, stored in fp16 as real ones are, in both real layouts: llava-hf (sharded safetensors,
written by transformers) and liuhaotian (sharded `.bin` with a separate CLIP dir). The oracle is the
reference model converted whole to fp32 (`language.float()`) and run by `Llama.forward`.
"""

import pytest
import torch

from llava_edge.reference.checkpoint import load_checkpoint
from llava_edge.reference.streamed import embed_sequence, streamed_reference_logits
from tiny_checkpoints import make_hf_model, make_llava, save_full_clip, save_hf_layout, save_liuhaotian_layout


def fp16_llava_hf(root):
    model = make_hf_model(image_size=28, kv_heads=2, seed=5).half()
    return save_hf_layout(model, root / "llava-hf", "sharded")


def fp16_liuhaotian(root):
    model = make_llava(400, 32000, None, seed=6).half()
    path = save_liuhaotian_layout(model, root / "llava-v1.5-tiny", "clip", n_shards=2, fmt="bin")
    save_full_clip(model, path / "clip")
    return path


@pytest.fixture(scope="module", params=["llava-hf", "liuhaotian"])
def ckpt(request, tmp_path_factory):
    make = fp16_llava_hf if request.param == "llava-hf" else fp16_liuhaotian
    return make(tmp_path_factory.mktemp(request.param))


def sequence(model, n_text=70):
    """Text, one image in the middle, more text: ids with the model's own placeholder, and the image rows."""
    g = torch.Generator().manual_seed(3)
    vocab = model.cfg.text.vocab_size
    ids = torch.randint(3, min(vocab, 300), (n_text,), generator=g).tolist()
    ids = [1] + ids[:20] + [model.cfg.image_token_index] + ids[20:]
    image = torch.randn(model.cfg.n_image_tokens, model.cfg.text.hidden_size, generator=g) * 0.5
    return ids, image


def whole_model_logits(ckpt, ids, image):
    model = load_checkpoint(ckpt).model
    model.language.float()
    with torch.no_grad():
        mm = model.embed(torch.tensor([ids]), [image])
        return model.language(mm.inputs_embeds)[0]


def test_streamed_equals_whole_model_reference(ckpt):
    model = load_checkpoint(ckpt).model
    assert model.language.embed_tokens.weight.dtype == torch.float16  # stored as real checkpoints are
    ids, image = sequence(model)
    got = streamed_reference_logits(model, ids, [image])
    want = whole_model_logits(ckpt, ids, image)
    assert got.dtype == torch.float32 and got.shape == want.shape == (len(ids) - 1 + len(image), model.cfg.text.vocab_size)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    # the stored weights were read, not converted in place
    assert all(p.dtype == torch.float16 for p in model.language.parameters())


def test_lm_head_chunks_do_not_change_the_logits(ckpt):
    model = load_checkpoint(ckpt).model
    ids, image = sequence(model, n_text=10)
    whole = streamed_reference_logits(model, ids, [image])
    from llava_edge.reference.streamed import streamed_logits

    chunked = streamed_logits(model.language, embed_sequence(model, ids, [image]), lm_head_rows=7)
    assert (chunked - whole).abs().max().item() <= 1e-5 * max(1.0, whole.abs().max().item())


def test_embed_sequence_splices_images_in_order(ckpt):
    model = load_checkpoint(ckpt).model
    img = model.cfg.image_token_index
    n, d = model.cfg.n_image_tokens, model.cfg.text.hidden_size
    a, b = torch.full((n, d), 1.5), torch.full((n, d), -2.0)
    x = embed_sequence(model, [1, 5, img, 6, img, 7], [a, b])[0]
    table = model.language.embed_tokens.weight.float()
    assert x.shape == (4 + 2 * n, d) and x.dtype == torch.float32
    assert torch.equal(x[:2], table[[1, 5]]) and torch.equal(x[2: 2 + n], a)
    assert torch.equal(x[2 + n], table[6]) and torch.equal(x[3 + n: 3 + 2 * n], b) and torch.equal(x[-1], table[7])
    with pytest.raises(ValueError, match="placeholders"):
        embed_sequence(model, [1, img, 5], [])

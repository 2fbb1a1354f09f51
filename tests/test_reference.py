"""The reference model against transformers' LlavaForConditionalGeneration (the oracle)."""

import pytest
import torch

from llava_edge.reference.checkpoint import load_checkpoint
from tiny_checkpoints import IMAGE_TOKEN, hf_ids, make_hf_model, save_hf_layout

PROMPT = [1, 17, 42, IMAGE_TOKEN, 99, 7, 250, 13]
VARIANTS = {
    "gqa-layer-2-default-28": dict(kv_heads=2, feature_layer=-2, strategy="default", image_size=28),
    "mha-layer-1-full-56": dict(kv_heads=4, feature_layer=-1, strategy="full", image_size=56, rope_theta=500.0),
    "tied-theta1e6-56": dict(kv_heads=1, feature_layer=-2, strategy="default", image_size=56, rope_theta=1e6, tied=True),
    "multi-layer-features": dict(kv_heads=2, feature_layer=[-3, -1], strategy="default", image_size=28),
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def pair(request, tmp_path_factory):
    hf = make_hf_model(**VARIANTS[request.param])
    path = save_hf_layout(hf, tmp_path_factory.mktemp(request.param), "save_pretrained")
    return hf, load_checkpoint(path).model


def pixels(n, size, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(pair):
    hf, ours = pair
    size = hf.config.vision_config.image_size
    pix = pixels(1, size)
    with torch.no_grad():
        expected = hf(input_ids=hf_ids(PROMPT, hf), pixel_values=pix).logits
        got, _ = ours(torch.tensor([PROMPT]), pixel_values=pix)
    assert got.shape == expected.shape
    assert expected.abs().max() > 1.0  # the weights are large enough for differences to show
    assert (got - expected).abs().max().item() <= 1e-4


def test_two_images_in_one_prompt(pair):
    hf, ours = pair
    size = hf.config.vision_config.image_size
    prompt = [1, IMAGE_TOKEN, 5, 6, IMAGE_TOKEN, 9]
    pix = pixels(2, size, seed=3)
    with torch.no_grad():
        expected = hf(input_ids=hf_ids(prompt, hf), pixel_values=pix).logits
        got, _ = ours(torch.tensor([prompt]), pixel_values=pix)
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(pair):
    hf, ours = pair
    pix = pixels(1, hf.config.vision_config.image_size, seed=5)
    ids = hf_ids(PROMPT, hf)
    with torch.no_grad():
        expected = hf.generate(
            input_ids=ids, pixel_values=pix, max_new_tokens=20, do_sample=False,
            eos_token_id=hf.config.text_config.eos_token_id, pad_token_id=0,
        )[0, ids.shape[1]:].tolist()
    got = ours.generate(torch.tensor([PROMPT]), pixels(1, hf.config.vision_config.image_size, seed=5), max_new_tokens=20)
    eos = hf.config.text_config.eos_token_id
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert len(expected) > 0
    assert got == expected


def test_kv_cache_matches_full_recompute(pair):
    _, ours = pair
    from llava_edge.reference.llama import KVCache

    ids = torch.tensor([[1, 5, 9, 200, 33, 47, 81, 2, 64]])
    x = ours.language.embed_tokens(ids)
    with torch.no_grad():
        full = ours.language(x)
        cache = KVCache(len(ours.language.layers))
        first = ours.language(x[:, :5], cache=cache)
        rest = ours.language(x[:, 5:], cache=cache)
    assert (torch.cat([first, rest], 1) - full).abs().max().item() <= 1e-4


def test_padded_batch_matches_single_rows(pair):
    """Right padding (training batches) changes nothing for the real positions."""
    hf, ours = pair
    size = hf.config.vision_config.image_size
    a, b = [1, IMAGE_TOKEN, 5, 6, 7, 8], [1, IMAGE_TOKEN, 9]
    pix = pixels(2, size, seed=7)
    batch = torch.tensor([a, b + [0] * 3])
    attn = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        together, _ = ours(batch, pixel_values=pix, attn_2d=attn)
        alone_b, _ = ours(torch.tensor([b]), pixel_values=pix[1:])
    n = alone_b.shape[1]
    assert (together[1, :n] - alone_b[0]).abs().max().item() <= 1e-4


def test_mask_is_skipped_only_where_plain_causal_attention_is_exact():
    from llava_edge.reference.llama import attention_mask

    neg = torch.finfo(torch.float32).min
    right = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert attention_mask(right, 3, 0, torch.float32, "cpu") is None
    assert attention_mask(None, 3, 0, torch.float32, "cpu") is None
    left = attention_mask(torch.tensor([[1, 1, 1], [0, 1, 1]]), 3, 0, torch.float32, "cpu")
    assert left[1, 0, 2].tolist() == [neg, 0.0, 0.0] and left[0, 0, 0].tolist() == [0.0, neg, neg]
    cached = attention_mask(None, 1, 2, torch.float32, "cpu")  # decoding one token after two cached ones
    assert cached is not None and cached[0, 0, 0].tolist() == [0.0, 0.0, 0.0]


def test_sampling_is_seeded_and_top_p_restricts():
    from llava_edge.reference.llava import sample_token

    logits = torch.tensor([5.0, 4.9, -3.0, -3.0])
    draws = {sample_token(logits, 1.0, 0.5, torch.Generator().manual_seed(s)) for s in range(30)}
    assert draws == {0}  # top_p 0.5 keeps only the first token (p > 0.5)
    draws = {sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(30)}
    assert draws == {0, 1}
    assert sample_token(logits, 0.0, 1.0) == 0


def test_cpu_bf16_autocast_stays_close_to_transformers_fp32(pair):
    """The training path under CPU bf16 autocast (attention done in fp32) still computes the same model."""
    hf, ours = pair
    pix = pixels(1, hf.config.vision_config.image_size, seed=7)
    with torch.no_grad():
        expected = hf(input_ids=hf_ids(PROMPT, hf), pixel_values=pix).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, loss = ours(torch.tensor([PROMPT]), pixel_values=pix, labels=torch.tensor([PROMPT]))
    loss.backward()
    grads = [p.grad for p in ours.parameters() if p.grad is not None]
    ours.zero_grad(set_to_none=True)
    assert got.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    assert (got.float() - expected).abs().max().item() <= 0.05 * scale
    assert grads and all(torch.isfinite(g).all() for g in grads)

"""Token reduction in the reference (reference/token_reduction.py, Llava.reduced_image_tokens) against a plain
re-implementation written here (numpy, loops) on transformers' CLIP tower (eager attention: its attention
probabilities are the oracle's [CLS] scores) and projector."""

import numpy as np
import pytest
import torch

from llava_edge.reference.checkpoint import load_checkpoint
from llava_edge.reference.token_reduction import contextual_count, reduce_image_tokens
from tiny_checkpoints import make_hf_model, save_hf_layout

VARIANTS = {  # 112 px / 14 = 64 patches, as the demo model
    "layer-2-patch": dict(image_size=112, feature_layer=-2, strategy="default"),
    "layers-3-1-patch": dict(image_size=112, feature_layer=[-3, -1], strategy="default", seed=2),
    "layer-1-full": dict(image_size=84, feature_layer=-1, strategy="full", seed=1),  # 36 patches + CLS
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf = make_hf_model(**VARIANTS[request.param])
    hf.set_attn_implementation("eager")
    ours = load_checkpoint(save_hf_layout(hf, tmp_path_factory.mktemp(request.param), "save_pretrained")).model
    return hf, ours


def pixels(n, size, seed=4):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def plain_reduction(features, cls_attention, keys, budget):
    """One image: features [N, F], cls_attention [heads, N], keys [heads, N, hd] -> (tokens [K, F], patches)."""
    n = len(features)
    n_contextual = budget * 5 // 32
    n_dominant = budget - n_contextual
    score = [sum(float(cls_attention[h][i]) for h in range(len(cls_attention))) for i in range(n)]
    ranked = sorted(range(n), key=lambda i: (-score[i], i))
    dominant = sorted(ranked[:n_dominant])
    rest = [i for i in range(n) if i not in dominant]
    tokens = [features[i] for i in dominant]
    if n_contextual == 0:
        return np.array(tokens), dominant
    step = max(1, len(rest) // n_contextual)
    targets = [rest[j * step] for j in range(n_contextual)]
    metric = keys.mean(axis=0)
    unit = [m / np.linalg.norm(m) for m in metric]
    groups = {t: [t] for t in targets}
    for i in rest:
        if i in groups:
            continue
        best, best_sim = None, -np.inf
        for t in targets:
            sim = float(unit[i] @ unit[t])
            if sim > best_sim:
                best, best_sim = t, sim
        groups[best].append(i)
    for t in targets:
        tokens.append(np.mean([features[i] for i in groups[t]], axis=0))
    return np.array(tokens), dominant + targets


def oracle(hf, pix, budget):
    """Embeddings [B, K, E] and patches [B, K] from transformers' tower + projector and plain_reduction."""
    cfg = hf.config
    layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
    full = cfg.vision_feature_select_strategy == "full"
    with torch.no_grad():
        out = hf.model.vision_tower(pix, output_hidden_states=True, output_attentions=True)
        deepest = max(len(out.hidden_states) + layer if layer < 0 else layer for layer in layers)
        attention = out.attentions[deepest - 1]  # the attention inside the layer that outputs hidden_states[deepest]
        tower = hf.model.vision_tower
        block = getattr(tower, "vision_model", tower).encoder.layers[deepest - 1]
        keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[deepest - 1]))
        heads = cfg.vision_config.num_attention_heads
        keys = keys.view(*keys.shape[:2], heads, -1).transpose(1, 2)
        states = torch.cat([out.hidden_states[layer] for layer in layers], dim=-1)
    embeds, patches = [], []
    for b in range(pix.shape[0]):
        tokens, kept = plain_reduction(states[b, 1:].numpy(), attention[b, :, 0, 1:].numpy(),
                                       keys[b, :, 1:].numpy(), budget - full)
        if full:
            tokens, kept = np.concatenate([states[b, :1].numpy(), tokens]), [-1] + kept
        with torch.no_grad():
            embeds.append(hf.model.multi_modal_projector(torch.from_numpy(tokens)).numpy())
        patches.append(kept)
    return np.array(embeds), np.array(patches)


@pytest.mark.parametrize("fraction", [1 / 64, 0.1, 0.25, 0.5, 0.75, 0.99])
def test_reduced_tokens_match_the_plain_reimplementation(pair, fraction):
    hf, ours = pair
    n = ours.cfg.n_image_tokens
    budget = min(n - 1, max(1 + ours.cfg.keeps_cls, round(fraction * n)))
    pix = pixels(2, ours.cfg.vision.image_size)
    want_embeds, want_patches = oracle(hf, pix, budget)
    with torch.no_grad():
        got_embeds, got_patches = ours.reduced_image_tokens(pix, budget)
        again = ours.encode_images(pix, image_tokens=budget)
    assert got_embeds.shape == (2, budget, ours.cfg.projector.out_features)
    assert got_patches.tolist() == want_patches.tolist()
    assert np.abs(got_embeds.numpy() - want_embeds).max() <= 1e-4
    assert torch.equal(again, got_embeds)


def test_dominant_tokens_are_the_most_attended_patches_in_raster_order(pair):
    hf, ours = pair
    pix = pixels(1, ours.cfg.vision.image_size, seed=9)
    with torch.no_grad():
        states, (attention, keys) = ours.vision.forward_with_probe(pix, ours.cfg.feature_layers)
    features = torch.cat([s[:, 1:] for s in states], dim=-1)
    score = attention[0].sum(0)
    for budget in (1, 9, 20, features.shape[1] - 1):
        reduced = reduce_image_tokens(features, attention, keys, budget)
        dominant = reduced.patches[0, : reduced.n_dominant]
        assert reduced.n_dominant == budget - contextual_count(budget)
        assert dominant.tolist() == sorted(dominant.tolist())
        others = torch.ones_like(score, dtype=torch.bool)
        others[dominant] = False
        assert score[dominant].min() >= score[others].max()
        # each dominant token is its patch's features, untouched
        assert torch.equal(reduced.tokens[0, : reduced.n_dominant], features[0, dominant])
        targets = reduced.patches[0, reduced.n_dominant:]
        assert targets.tolist() == sorted(targets.tolist()) and not set(targets.tolist()) & set(dominant.tolist())


def test_all_tokens_is_the_unreduced_encoding(pair):
    _, ours = pair
    pix = pixels(2, ours.cfg.vision.image_size, seed=5)
    n = ours.cfg.n_image_tokens
    with torch.no_grad():
        embeds, patches = ours.reduced_image_tokens(pix, n)
        assert torch.equal(embeds, ours.encode_images(pix))
    expected = list(range(ours.cfg.vision.num_patches))
    assert patches[1].tolist() == ([-1] + expected if ours.cfg.keeps_cls else expected)


def test_the_papers_splits():
    assert [(k - contextual_count(k), contextual_count(k)) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert contextual_count(6) == 0 and contextual_count(7) == 1


@pytest.mark.parametrize("budget", [0, -3, "one past all", 2.5, True, "8"])
def test_a_budget_outside_the_tokens_is_refused(pair, budget):
    _, ours = pair
    if budget == "one past all":
        budget = ours.cfg.n_image_tokens + 1
    with pytest.raises(ValueError, match="image_tokens must be an integer"):
        ours.encode_images(pixels(1, ours.cfg.vision.image_size), image_tokens=budget)
    if ours.cfg.keeps_cls:  # the CLS token is always kept: at least one patch token besides it
        with pytest.raises(ValueError, match="from 2 to"):
            ours.encode_images(pixels(1, ours.cfg.vision.image_size), image_tokens=1)
    with pytest.raises(ValueError, match="token budget"):
        reduce_image_tokens(torch.zeros(1, 8, 4), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8, 2), 8)

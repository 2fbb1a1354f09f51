"""Fewer image tokens, chosen by the vision tower itself (VisionZip, arXiv 2412.04467): the definition.

Of a budget of K tokens, `contextual_count(K) = K * 5 // 32` are contextual and the rest dominant
(64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30, the paper's splits).

- Dominant: the patches the [CLS] token attends to most in the feature layer (its attention probabilities
  summed over heads; equal scores: the lower patch index first).
- Contextual: the other patches, in raster order, give C evenly spaced targets (every `max(1, R // C)`-th of
  the R remaining, the first C of them); every other remaining patch joins the target its key is most similar
  to (cosine of the layer's keys averaged over heads; equal similarity: the lower target index). A contextual
  token is the mean of its group's features, the target's own included.
- Order: the dominant tokens in raster order, then the contextual tokens in the raster order of their targets
  (as VisionZip concatenates them).

Where VisionZip's public code differs: it also keeps the [CLS] hidden state as one more token (65 for
"54 + 10"), and it makes a contextual token as target + mean(others) rather than the mean of the group.
Here K counts every token the decoder receives, and a group's token is its mean: a target with no
others is its own patch, unchanged, and merged tokens keep the scale the projector was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def contextual_count(budget: int) -> int:
    return budget * 5 // 32


@dataclass
class ReducedTokens:
    tokens: torch.Tensor  # [B, K, F] dominant tokens, then contextual ones
    patches: torch.Tensor  # [B, K] long: the patch each token stands for (a contextual token: its target)
    n_dominant: int


def check_budget(budget: int, n_patches: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget < n_patches:
        raise ValueError(f"the token budget must be an integer from 1 to {n_patches - 1}, not {budget!r}")


def reduce_image_tokens(
    features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, budget: int
) -> ReducedTokens:
    """features [B, N, F] of the N patches (no CLS); cls_attention [B, heads, N]: the feature layer's [CLS]
    attention probabilities over the patches; keys [B, heads, N, head_dim]: that layer's patch keys."""
    n_patches = features.shape[1]
    check_budget(budget, n_patches)
    rows = [_reduce_one(f, a.sum(0), k.mean(0), budget) for f, a, k in zip(features, cls_attention, keys)]
    return ReducedTokens(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                         budget - contextual_count(budget))


def _reduce_one(features, score, metric, budget):
    n_contextual = contextual_count(budget)
    n_dominant = budget - n_contextual
    by_score = torch.argsort(score, descending=True, stable=True)
    dominant = torch.sort(by_score[:n_dominant]).values
    is_dominant = torch.zeros(len(score), dtype=torch.bool)
    is_dominant[dominant] = True
    remaining = (~is_dominant).nonzero().flatten()  # raster order
    if n_contextual == 0:
        return features[dominant], dominant
    step = max(1, len(remaining) // n_contextual)
    target_at = torch.arange(0, len(remaining), step)[:n_contextual]
    targets = remaining[target_at]
    is_target = torch.zeros(len(remaining), dtype=torch.bool)
    is_target[target_at] = True
    others = remaining[~is_target]
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    group_of_other = (unit[others] @ unit[targets].T).argmax(dim=1)
    contextual = torch.stack([
        torch.cat([features[t][None], features[others[group_of_other == j]]]).mean(0) for j, t in enumerate(targets)
    ])
    return torch.cat([features[dominant], contextual]), torch.cat([dominant, targets])

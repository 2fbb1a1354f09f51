"""Token reduction as the vision graph computes it: reference/token_reduction.py with a budget that is a tensor.

The budget is a graph input, so nothing here may depend on its value through a shape: every step works on
all N patches at once ([B, N] and [B, N, N] tensors: under 1 % of the tower's work at ViT-L's 576 patches)
and the caller cuts the first K rows in the end (a Range of the budget, the one dynamic shape). There is no
sort (TorchScript's exporter has none that is stable): a patch's rank is the number of patches that beat it
(higher score, or equal score and lower index), which is the reference's stable descending order.
"""

from __future__ import annotations

import torch


def cls_probe(q: torch.Tensor, k_transposed: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the reference's VisionAttention.cls_probe returns, from a layer's own queries [B, heads, T, hd] and
    transposed keys [B, heads, hd, T] (token 0 = CLS): ([B, heads, N] CLS attention over the N patches,
    [B, heads, N, hd] patch keys). Only the CLS row of the attention is computed again.

    The softmax is written out (no Softmax node) so that the graph keeps one Softmax per layer."""
    logits = (q[:, :, :1] @ k_transposed) * head_dim**-0.5
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    probs = e / e.sum(dim=-1, keepdim=True)
    return probs[:, :, 0, 1:], k_transposed.transpose(-1, -2)[:, :, 1:]


def reduce_static(features, cls_attention, keys, budget) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, N, F], cls_attention [B, heads, N], keys [B, heads, N, hd], budget: int64 scalar tensor P.

    Returns rows [B, N, F] and patches [B, N] (int64) whose first P rows are the reference's reduce_image_tokens
    for budget P (tokens, patches); a budget of N or more gives every patch in raster order."""
    B, N, _ = features.shape
    idx = torch.arange(N)
    score = cls_attention.sum(dim=1)
    mine, theirs = score[:, :, None], score[:, None, :]
    beaten_by = (theirs > mine) | ((theirs == mine) & (idx[None, None, :] < idx[None, :, None]))
    rank = beaten_by.to(torch.int64).sum(dim=-1)

    n_contextual = budget * 5 // 32
    n_dominant = budget - n_contextual
    dominant = rank < n_dominant
    remaining = ~dominant
    position = torch.cumsum(remaining.to(torch.int64), dim=1) - 1  # among the remaining, raster order
    step = torch.clamp((N - n_dominant) // torch.clamp(n_contextual, min=1), min=1)
    target = remaining & (position % step == 0) & (position // step < n_contextual)

    metric = keys.mean(dim=1)
    metric = metric / torch.clamp(metric.abs().amax(dim=-1, keepdim=True), min=1e-6)  # cosine-neutral; fp16-safe
    unit = metric / torch.clamp(torch.sqrt((metric * metric).sum(dim=-1, keepdim=True)), min=1e-6)
    similarity = torch.where(target[:, None, :], unit @ unit.transpose(1, 2), torch.full((), -3.0))
    group = torch.where(target, idx[None, :], torch.argmax(similarity, dim=-1))
    member = (group[:, :, None] == idx[None, None, :]) & remaining[:, :, None]  # [B, patch, target]
    member = member.to(features.dtype)
    weights = member / torch.clamp(member.sum(dim=1, keepdim=True), min=1.0)  # each target's column: its mean
    contextual = weights.transpose(1, 2) @ features
    candidates = torch.where(dominant[:, :, None], features, contextual)

    slot = torch.where(dominant, torch.cumsum(dominant.to(torch.int64), dim=1) - 1,
                       torch.where(target, n_dominant + torch.cumsum(target.to(torch.int64), dim=1) - 1, N + idx[None, :]))
    source = torch.argmax((slot[:, None, :] == idx[None, :, None]).to(torch.int32), dim=-1)  # [B, slot] -> patch
    rows = torch.gather(candidates, 1, source[:, :, None].expand(-1, -1, features.shape[2]))
    every = budget >= N
    return torch.where(every, features, rows), torch.where(every, idx[None, :].expand(B, -1), source)

"""LoRA for the language model's linear layers, as LLaVA's `--lora_enable` (all linears but the
projector and the vision tower). Adapters are merged into the base weights before saving."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: training starts from the base model
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A) * self.scale
        return self.base


def add_lora(module: nn.Module, r: int, alpha: float, dropout: float) -> int:
    """Wrap every nn.Linear below `module` (tied lm_head excepted); returns how many were wrapped."""
    wrapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            if name == "lm_head" and child.weight is getattr(getattr(module, "embed_tokens", None), "weight", None):
                continue
            setattr(module, name, LoRALinear(child, r, alpha, dropout))
            wrapped += 1
        else:
            wrapped += add_lora(child, r, alpha, dropout)
    return wrapped


def merge_lora(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.merged())
        else:
            merge_lora(child)

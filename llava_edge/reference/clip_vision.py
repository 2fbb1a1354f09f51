"""CLIP vision transformer, as LLaVA uses it: hidden states of one layer, not the pooled output.

Parameter names follow transformers' CLIPVisionTransformer so checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..architectures import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # [B, P, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape

        def heads(t):
            return t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))

    def cls_probe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What token reduction reads of this attention on input x [B, T, D] (token 0 = CLS): the CLS query's
        attention probabilities over the patches [B, heads, T-1] and the patches' keys [B, heads, T-1, hd]."""
        B, T, D = x.shape
        hd = D // self.n_heads
        q = self.q_proj(x[:, :1]).view(B, 1, self.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, hd).transpose(1, 2)
        weights = F.softmax((q @ k.transpose(-1, -2)).float() * hd**-0.5, dim=-1)
        return weights[:, :, 0, 1:], k[:, :, 1:]


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    """CLIP ViT. `forward` returns the hidden states after each index in `layers` (0 = embeddings)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: CLIP's spelling
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # used by CLIP pooling only

    def forward(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        return self._run(pixel_values, layers)[0]

    def forward_with_probe(self, pixel_values: torch.Tensor, layers: list[int]):
        """`forward`, plus the CLS probe (see VisionAttention.cls_probe) of the deepest layer in `layers`."""
        if max(layers) < 1:
            raise ValueError("token reduction needs a transformer layer's attention; the features are the embeddings")
        return self._run(pixel_values, layers, probe_layer=max(layers))

    def _run(self, pixel_values: torch.Tensor, layers: list[int], probe_layer: int | None = None):
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x} if 0 in layers else {}
        probe = None
        for i, layer in enumerate(self.encoder.layers[: max(layers)], start=1):
            if i == probe_layer:
                probe = layer.self_attn.cls_probe(layer.layer_norm1(x))
            x = layer(x)
            if i in layers:
                states[i] = x
        return [states[i] for i in layers], probe

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's image representation (post-LayerNorm CLS of the last layer), for contrastive training."""
        last = self.forward(pixel_values, [self.cfg.num_hidden_layers])[0]
        return self.post_layernorm(last[:, 0])

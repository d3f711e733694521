"""The CrossMAE decoder block (Fu et al., 2024, "Rethinking Patch Dependence for Masked Autoencoders",
https://arxiv.org/abs/2401.14391): queries for the patches to predict attend to the encoder's tokens only.

A query is the shared mask token plus the decoder position row of its patch; keys and values are the encoder's
output (prefix tokens and visible patches) projected to the decoder width once (``decoder_embed``). Queries do not
attend to each other (no self-attention), so each query's prediction depends on its position and the visible
tokens alone: decoding a subset of the removed patches gives, for that subset, exactly what decoding all of them
gives, and the attention costs ``queries x visible`` instead of ``(visible + removed)^2``.

The block is timm's pre-norm ``Block`` with the attention made cross: ``x + attn(norm1(x), norm_kv(memory))``, then
``x + mlp(norm2(x))``. Its keys are ``norm1``, ``norm_kv``, ``attn.q``, ``attn.kv``, ``attn.proj``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

__all__ = ["CrossAttention", "CrossAttentionBlock"]


class CrossAttention(nn.Module):
    """Multi-head attention from queries (N, Q, D) to a memory (N, M, D) of the same width."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by decoder_num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x (N, Q, D), memory (N, M, D) -> (N, Q, D)."""
        batch, queries, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).reshape(batch, queries, heads, head_dim).transpose(1, 2)  # (N, h, Q, hd)
        kv = self.kv(memory).reshape(batch, memory.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (N, h, M, hd) each
        x = F.scaled_dot_product_attention(q, k, v)  # (N, h, Q, hd)
        return self.proj(x.transpose(1, 2).reshape(batch, queries, dim))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP block (see the module docstring); ``forward(x, memory)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm_kv = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x (N, Q, D) queries, memory (N, M, D) encoder tokens -> (N, Q, D)."""
        x = x + self.attn(self.norm1(x), self.norm_kv(memory))
        return x + self.mlp(self.norm2(x))

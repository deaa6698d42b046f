"""Multi-head attention shared by the SD and Imagen UNets.

`attention` is the one place that decides between PyTorch's fused `scaled_dot_product_attention` and the
explicit softmax(Q K^T / sqrt(d)) V math; both give the same result up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a key mask (B, Tk) bool, True = real token, into an additive bias (B, 1, 1, Tk).

    A large finite negative (not -inf) keeps a fully masked row finite (uniform weights) instead of NaN.
    """
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~mask.bool(), torch.finfo(dtype).min)
    return bias[:, None, None, :]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    use_sdpa: bool = True,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over the last two dims.

    q: (B, H, Nq, d); k, v: (B, H, Nk, d); mask: (B, Nk) bool with True = attend, or None for all keys.
    Returns (B, H, Nq, d) in q's dtype. The explicit path computes scores and softmax in float32.
    """
    if use_sdpa:
        bias = None if mask is None else key_padding_bias(mask, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if mask is not None:
        scores = scores + key_padding_bias(mask, torch.float32)
    weights = scores.softmax(dim=-1)
    return torch.matmul(weights, v.float()).to(q.dtype)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d) as a view."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class CrossAttention(nn.Module):
    """Multi-head attention from tokens x to a context (itself when context is None).

    Keys match CompVis/diffusers: `to_q`, `to_k`, `to_v` (no bias), `to_out.0` (with bias).
    x: (B, N, query_dim); context: (B, T, context_dim) | None; mask: (B, T) bool | None -> (B, N, query_dim).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        use_sdpa: bool = True,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.use_sdpa = use_sdpa
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(context), self.heads)
        v = split_heads(self.to_v(context), self.heads)
        out = attention(q, k, v, mask=mask, use_sdpa=self.use_sdpa)
        return self.to_out(merge_heads(out))


class SelfAttention(CrossAttention):
    """CrossAttention whose keys and values always come from x itself. x: (B, N, dim) -> (B, N, dim)."""

    def __init__(
        self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, use_sdpa: bool = True
    ):
        super().__init__(dim, None, heads=heads, dim_head=dim_head, dropout=dropout, use_sdpa=use_sdpa)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, None, mask)

"""Imagen conditioning: scalar embeddings (time, noise augmentation) and the text conditioner (NeMo semantics).

The text conditioner projects T5-style token embeddings to the attention context, pools them (mean or attention
pooling, padding excluded) into a vector added to the time embedding, and appends the learned null token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError
from t2i.models.layers import timestep_embedding

POOLING_TYPES = ("attention", "mean")


# ----------------------------------------------------------------------------------------------- embeddings
class SinusoidalEmbedding(nn.Module):
    """Fixed sinusoidal embedding of a scalar (cos half first). (B,) -> (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class LearnedSinusoidalEmbedding(nn.Module):
    """Learned-frequency Fourier features (crowsonkb v-diffusion): [t, sin(2 pi w t), cos(2 pi w t)].

    (B,) -> (B, dim + 1).
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ConfigError(f"model.unet.learned_sinu_pos_emb_dim: {dim} must be even")
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()[:, None]
        angles = t * self.weights[None, :].float() * (2 * math.pi)
        return torch.cat([t, angles.sin(), angles.cos()], dim=-1)


class ScalarEmbedding(nn.Module):
    """Scalar -> sinusoidal features -> Linear -> SiLU -> Linear. (B,) -> (B, out_dim).

    learned_dim = 0 uses fixed sinusoids of width `embed_dim`; > 0 learned ones of width learned_dim + 1.
    """

    def __init__(self, embed_dim: int, learned_dim: int, out_dim: int):
        super().__init__()
        if learned_dim < 0:
            raise ConfigError(
                f"model.unet.learned_sinu_pos_emb_dim: {learned_dim}; expected 0 or a positive size"
            )
        if learned_dim > 0:
            self.features: nn.Module = LearnedSinusoidalEmbedding(learned_dim)
            width = learned_dim + 1
        else:
            self.features, width = SinusoidalEmbedding(embed_dim), embed_dim
        self.linear_1 = nn.Linear(width, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.features(t).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(h)))


# ------------------------------------------------------------------------------------------ text conditioning
def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens. tokens (B, T, D), mask (B, T) bool -> (B, D); zero for an all-padding row."""
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class AttentionPooling(nn.Module):
    """Self-attention pooling (Safari et al. 2020): softmax over tokens of a learned score, padding excluded.

    tokens (B, T, D), mask (B, T) bool -> (B, D); zero for an all-padding row.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.W = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(tokens.dtype, torch.float32)
        scores = self.W(tokens).squeeze(-1).to(wide).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = scores.softmax(dim=1).nan_to_num(0.0).to(tokens.dtype)
        return (tokens * weights[..., None]).sum(dim=1)


class TextConditioner(nn.Module):
    """Turns T5-style token embeddings into (attention context, context mask, vector added to the time cond).

    text_embed (B, T, text_embed_dim), text_mask (B, T) bool -> context (B, T', cond_dim), mask (B, T'),
    hidden (B, time_embed_dim); T' = T + 1 with the learned null token appended (`use_null_token`).
    """

    def __init__(
        self, text_embed_dim: int, cond_dim: int, time_embed_dim: int, pooling: str, use_null_token: bool
    ):
        super().__init__()
        self.text_embed_dim = text_embed_dim
        self.pooling = pooling
        if pooling == "attention":
            self.attention_pooling = AttentionPooling(text_embed_dim)
            self.pool_proj = nn.Sequential(nn.LayerNorm(text_embed_dim), nn.Linear(text_embed_dim, cond_dim))
        self.text_to_cond = nn.Linear(text_embed_dim, cond_dim)
        self.to_text_non_attn_cond = nn.Sequential(
            nn.LayerNorm(cond_dim),
            nn.Linear(cond_dim, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        self.null_text_embedding = nn.Parameter(torch.randn(1, 1, cond_dim)) if use_null_token else None

    def forward(
        self, text_embed: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int, ref: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if text_embed is None:
            # unconditional: one all-padding token, so only the null token (if any) is attended to
            text_embed = ref.new_zeros(batch, 1, self.text_embed_dim)
            text_mask = torch.zeros(batch, 1, dtype=torch.bool, device=ref.device)
        elif text_mask is None:
            text_mask = torch.ones(text_embed.shape[:2], dtype=torch.bool, device=text_embed.device)
        text_mask = text_mask.bool()
        text_embed = text_embed.to(self.text_to_cond.weight.dtype)
        context = self.text_to_cond(text_embed)
        if self.pooling == "attention":
            pooled = self.pool_proj(self.attention_pooling(text_embed, text_mask))
        else:
            pooled = masked_mean(context, text_mask)
        hidden = self.to_text_non_attn_cond(pooled)
        if self.null_text_embedding is not None:
            null = self.null_text_embedding.to(context.dtype).expand(context.shape[0], 1, -1)
            context = torch.cat([context, null], dim=1)
            text_mask = F.pad(text_mask, (0, 1), value=True)
        return context, text_mask, hidden

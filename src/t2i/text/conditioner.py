"""The conditioner: what a training batch (or a list of prompts) becomes for the backbone, with classifier-free
guidance's text dropout as one step at a rate per embedder.

An embedder reads one input and writes entries of the cond dict that the denoiser passes to the backbone:

- `TextEmbedder`: captions through a frozen text encoder, or token embeddings precached by `t2i precache`
  (`batch["captions_encoded"]`), -> `context` (B, T, D) [+ `context_mask` (B, T) bool]. A dropped sample gets
  the embedder's null conditioning: the encoding of "" (`null="empty_prompt"`, the SD family: what diffusers
  samples the unconditional branch with) or zeros with an all-False mask (`null="zeros"`, Imagen).

- `ContextPooledEmbedder`: a flow transformer's text (Flux): one encoder's tokens -> `context` [+
  `context_mask`], a pooled vector -> `pooled` (a second encoder's, FLUX.1's CLIP, or the first one's own), dropped
  together to the encodings of "".

Families with several inputs (SDXL: two text encoders and size embedders) list several embedders, each with its
own rate. Random draws come from the generator, one per embedder in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from t2i.errors import ConfigError

NullKind = Literal["empty_prompt", "zeros"]


def fit_tokens(embeddings: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (zeros, mask False) or trim (B, T, D) / (B, T) to T = length."""
    tokens = embeddings.shape[1]
    if tokens > length:
        return embeddings[:, :length], mask[:, :length]
    if tokens < length:
        embeddings = F.pad(embeddings, (0, 0, 0, length - tokens))
        mask = F.pad(mask, (0, length - tokens), value=False)
    return embeddings, mask


def drop_samples(
    entries: dict[str, torch.Tensor], null: dict[str, torch.Tensor], rate: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """`entries` with each sample (row) replaced by its `null` row with probability `rate` (one draw per row)."""
    context = entries["context"]
    keep = torch.rand(context.shape[0], generator=generator, device=generator.device) >= rate
    keep = keep.to(context.device)
    return {k: torch.where(keep.view(-1, *([1] * (v.ndim - 1))), v, null[k]) for k, v in entries.items()}


@dataclass
class TextEmbedder:
    """Text conditioning of one encoder.

    Args:
        encoder: returns the frozen `TextEncoder` (called on first use, so precached runs never build it).
        drop_rate: probability that a training sample gets the null conditioning.
        null: `empty_prompt` (the encoding of "") or `zeros`.
        masked: also emit `context_mask` (Imagen's backbones mask padding tokens; SD's attend to all).
        precached_key: the embeddings' name inside a precached batch's `captions_encoded`.
        token_length: pad or trim the tokens to this length (None: as the encoder gives them).
        empty: returns the encoding of "" (1, T, D), e.g. read from a precached folder's `uncond.safetensors`
            (None: encode "" with the encoder).
        dim: the width the backbone expects (checked against the embeddings; None: unchecked).
    """

    encoder: Callable[[], Any]
    drop_rate: float = 0.0
    null: NullKind = "empty_prompt"
    masked: bool = False
    precached_key: str = "embeddings"
    token_length: int | None = None
    empty: Callable[[], torch.Tensor] | None = None
    dim: int | None = None
    dim_key: str = "model.cond_stage_config"

    def __post_init__(self) -> None:
        self._empty: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------ encoding

    def encode_prompts(self, prompts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """prompts -> cond entries on `device`; with gradients when the encoder carries trainable weights."""
        encoder = self.encoder()
        if any(p.requires_grad for p in encoder.parameters()):
            encoding = encoder.forward_tokens(*encoder.tokenize(list(prompts)))
        else:
            encoding = encoder.encode(list(prompts))
        return self.entries(encoding.embeddings, encoding.mask, device)

    def encode_batch(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        """A training batch's captions (online) or precached embeddings -> cond entries on `device`."""
        if "captions_encoded" in batch:
            encoded = batch["captions_encoded"]
            embeddings = encoded.get(self.precached_key, encoded["embeddings"])
            mask = encoded.get("mask")
            if mask is None:  # shards without a mask: every token is real
                mask = torch.ones(embeddings.shape[:2], dtype=torch.bool)
            return self.entries(embeddings, mask, device)
        return self.encode_prompts(list(batch["captions"]), device)

    def entries(self, embeddings: torch.Tensor, mask: torch.Tensor, device: Any) -> dict[str, torch.Tensor]:
        """Encoder output (B, T, D) and mask (B, T) -> cond entries (checked width, fitted length) on `device`."""
        if self.dim is not None and embeddings.shape[-1] != self.dim:
            raise ConfigError(
                f"{self.dim_key}: the backbone expects {self.dim}-d text embeddings, but they are "
                f"{embeddings.shape[-1]}-d; expected the text encoder the model was built for"
            )
        embeddings, mask = embeddings.float(), mask.bool()
        if self.token_length is not None:
            embeddings, mask = fit_tokens(embeddings, mask, self.token_length)
        entries = {"context": embeddings.to(device)}
        if self.masked:
            entries["context_mask"] = mask.to(device)
        return entries

    # ------------------------------------------------------------------------------------ null conditioning

    def empty_embedding(self) -> torch.Tensor:
        """The encoding of "" (1, T, D) float32 on the CPU, computed (or read) once."""
        if self._empty is None:
            if self.empty is not None:
                self._empty = self.empty().float().cpu()
            else:
                self._empty = self.encoder().encode([""]).embeddings.detach().float().cpu()[:1]
        return self._empty

    def null_like(self, entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The null conditioning shaped like `entries` (what a dropped sample and CFG's uncond branch get)."""
        context = entries["context"]
        if self.null == "zeros":
            out = {"context": torch.zeros_like(context)}
            if "context_mask" in entries:
                out["context_mask"] = torch.zeros_like(entries["context_mask"])
            return out
        empty = self.empty_embedding().to(context.device, context.dtype)
        if empty.shape[1:] != context.shape[1:]:
            raise ConfigError(
                f"uncond.safetensors: the encoding of \"\" has shape {tuple(empty.shape[1:])}, the captions "
                f"{tuple(context.shape[1:])}; re-run t2i precache with this config's text encoder"
            )
        out = {"context": empty.expand_as(context)}
        if "context_mask" in entries:
            out["context_mask"] = torch.ones_like(entries["context_mask"])
        return out

    def drop(self, entries: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Replace each sample's entries by the null conditioning with probability `drop_rate`."""
        if self.drop_rate <= 0:
            return entries
        return drop_samples(entries, self.null_like(entries), self.drop_rate, generator)


@dataclass
class ContextPooledEmbedder:
    """Text conditioning of a flow transformer: `context` (B, T, D) [+ `context_mask`] from `context_encoder`'s
    tokens and `pooled` (B, D_pooled) from `pooled_encoder`'s pooled output (None: the context encoder's own), one
    dropout decision per sample for both, to the encodings of "" (what FluxPipeline's CFG branch uses).

    Args:
        context_encoder, pooled_encoder: return the frozen `TextEncoder`s (called on first use).
        drop_rate: probability that a training sample gets the null conditioning.
        masked: also emit `context_mask` (True = real token).
    """

    context_encoder: Callable[[], Any]
    pooled_encoder: Callable[[], Any] | None = None
    drop_rate: float = 0.0
    masked: bool = False

    def __post_init__(self) -> None:
        self._empty: dict[str, torch.Tensor] | None = None

    def encode_prompts(self, prompts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """prompts -> {context, pooled[, context_mask]} float32 on `device` (no gradients: frozen encoders)."""
        encoding = self.context_encoder().encode(list(prompts))
        pooled = encoding.pooled
        if self.pooled_encoder is not None:
            pooled = self.pooled_encoder().encode(list(prompts)).pooled
        entries = {"context": encoding.embeddings.float().to(device), "pooled": pooled.float().to(device)}
        if self.masked:
            entries["context_mask"] = encoding.mask.bool().to(device)
        return entries

    def encode_batch(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        if "captions_encoded" in batch:
            raise ConfigError(
                "model.cond_stage_key: precached text for flow models is not supported yet; expected captions"
            )
        return self.encode_prompts(list(batch["captions"]), device)

    def null_like(self, entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The encodings of "" shaped like `entries` (the mask of "" marks its real tokens)."""
        if self._empty is None:
            self._empty = {k: v[:1].cpu() for k, v in self.encode_prompts([""], "cpu").items()}
        batch = entries["context"].shape[0]
        return {k: self._empty[k].to(entries[k].device).expand(batch, *entries[k].shape[1:]) for k in entries}

    def drop(self, entries: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Replace each sample's entries (all of them together) by the null conditioning with probability
        `drop_rate`."""
        if self.drop_rate <= 0:
            return entries
        return drop_samples(entries, self.null_like(entries), self.drop_rate, generator)


class Conditioner:
    """Every embedder of a model, applied in order; their cond entries are merged into one dict."""

    def __init__(self, embedders: Sequence[TextEmbedder]) -> None:
        if not embedders:
            raise ConfigError("conditioner: expected at least one embedder")
        self.embedders = list(embedders)

    @property
    def text(self) -> TextEmbedder:
        """The first text embedder (the one whose encoder serves prompts in single-encoder families)."""
        return self.embedders[0]

    def __call__(
        self, batch: dict[str, Any], generator: torch.Generator, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """A training batch -> cond, each embedder's entries dropped at its own rate."""
        cond: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            cond |= embedder.drop(embedder.encode_batch(batch, device), generator)
        return cond

    def prompts(self, prompts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """cond of prompts, without dropout."""
        cond: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            cond |= embedder.encode_prompts(prompts, device)
        return cond

    def unconditional(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The null conditioning of every embedder, shaped like `like`."""
        cond: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            cond |= embedder.null_like(like)
        return cond

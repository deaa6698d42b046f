"""The conditioner: what a training batch (or a list of prompts) becomes for the backbone, with classifier-free
guidance's dropout as one step at a rate per embedder.

An embedder reads one input of the batch and writes entries of the cond dict that the denoiser passes to the
backbone:

- `TextEmbedder` (input `captions`): captions through a frozen text encoder, or embeddings precached by `t2i
  precache` (`batch["captions_encoded"]`, keys from `precached_keys(i)`), -> `context` (B, T, D)
  [+ `context_mask` (B, T) bool] [+ `y` (B, P): the pooled output, with `pooled=True` (SDXL's bigG)].
- `SizeEmbedder` (inputs `original_size_as_tuple`, `crop_coords_top_left`, `target_size_as_tuple`,
  `aesthetic_score`): numbers (B, N) embedded like timesteps -> `y` (B, N * outdim) (sgm's
  ConcatTimestepEmbedderND).
- `ContextPooledEmbedder` (a flow transformer's text, Flux): one encoder's tokens -> `context` [+ `context_mask`]
  and a pooled vector -> `pooled` (a second encoder's, FLUX.1's CLIP, or the first one's own), dropped together
  to the encodings of "".

A dropped sample gets the embedder's null conditioning: for text the encoding of "" (`null="empty_prompt"`, the
SD family: what diffusers samples the unconditional branch with) or zeros (`null="zeros"`: Imagen, SDXL, whose
pipeline then uses zeros for an absent negative prompt, diffusers' `force_zeros_for_empty_prompt`); sizes drop to
zeros. Random draws come from the generator, one per embedder with a rate > 0, in order.

The `Conditioner` merges the embedders' entries in order: `context` and `y` are concatenated along their last
dimension (SDXL: context = [CLIP-L 768 | bigG 1280], y = [bigG pooled 1280 | sizes 3 x 512]); any other entry may
come from one embedder only. SD 1/2 have a single text embedder, so their cond is that embedder's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from t2i.errors import ConfigError, DataError

NullKind = Literal["empty_prompt", "zeros"]
CONCAT_KEYS = ("context", "y")  # entries concatenated along the last dimension across embedders
TEXT_INPUT = "captions"


def fit_tokens(embeddings: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (zeros, mask False) or trim (B, T, D) / (B, T) to T = length."""
    tokens = embeddings.shape[1]
    if tokens > length:
        return embeddings[:, :length], mask[:, :length]
    if tokens < length:
        embeddings = F.pad(embeddings, (0, 0, 0, length - tokens))
        mask = F.pad(mask, (0, length - tokens), value=False)
    return embeddings, mask


def precached_keys(index: int) -> dict[str, str]:
    """Names of text embedder `index`'s tensors inside a precached batch's `captions_encoded` (and in
    `uncond.safetensors`): `embeddings` (T, D), `mask` (T,), `pooled` (P,) for the first text embedder;
    `embeddings_1`, `mask_1`, `pooled_1` for the second (SDXL's bigG), and so on."""
    suffix = f"_{index}" if index else ""
    return {"embeddings": f"embeddings{suffix}", "mask": f"mask{suffix}", "pooled": f"pooled{suffix}"}


def text_encoder_names(pooled: Sequence[bool]) -> list[str]:
    """The diffusers component (and LoRA prefix) of each text encoder, given whether each one is pooled:
    `text_encoder`, `text_encoder_2`, ...; a lone pooled encoder (the SDXL refiner's bigG) is `text_encoder_2`, as
    diffusers names it."""
    if len(pooled) == 1 and pooled[0]:
        return ["text_encoder_2"]
    return ["text_encoder" if i == 0 else f"text_encoder_{i + 1}" for i in range(len(pooled))]


class Dropout:
    """Classifier-free guidance's dropout, shared by the embedders: `drop_rate` and `null_like` come from them."""

    drop_rate: float

    def null_like(self, entries: dict[str, torch.Tensor], null: NullKind | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def drop(self, entries: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Replace each sample's entries (all of them together) by the null conditioning with probability
        `drop_rate`; one draw per sample from `generator`."""
        if self.drop_rate <= 0:
            return entries
        first = next(iter(entries.values()))
        keep = torch.rand(first.shape[0], generator=generator, device=generator.device) >= self.drop_rate
        keep = keep.to(first.device)
        null = self.null_like(entries)
        return {k: torch.where(keep.view(-1, *([1] * (v.ndim - 1))), v, null[k]) for k, v in entries.items()}


@dataclass
class TextEmbedder(Dropout):
    """Text conditioning of one encoder.

    Args:
        encoder: returns the frozen `TextEncoder` (called on first use, so precached runs never build it).
        drop_rate: probability that a training sample gets the null conditioning.
        null: `empty_prompt` (the encoding of "") or `zeros`.
        masked: also emit `context_mask` (Imagen's backbones mask padding tokens; SD's attend to all).
        precached_key: the embeddings' name inside a precached batch's `captions_encoded` (the first text
            embedder of a model: `embeddings`; see `precached_keys`).
        token_length: pad or trim the tokens to this length (None: as the encoder gives them).
        empty: returns the encoding of "": a tensor (1, T, D), or a dict with `embeddings` (1, T, D) and, for a
            pooled embedder, `pooled` (1, P), e.g. read from a precached folder's `uncond.safetensors` (None:
            encode "" with the encoder).
        dim: the width the backbone expects (checked against the embeddings; None: unchecked).
        pooled: also emit `y` (B, P), the encoder's pooled output (NeMo's `always_return_pooled`).
        precached_mask_key / precached_pooled_key: the mask's and the pooled vector's names in `captions_encoded`.
    """

    encoder: Callable[[], Any]
    drop_rate: float = 0.0
    null: NullKind = "empty_prompt"
    masked: bool = False
    precached_key: str = "embeddings"
    token_length: int | None = None
    empty: Callable[[], torch.Tensor | dict[str, torch.Tensor]] | None = None
    dim: int | None = None
    dim_key: str = "model.cond_stage_config"
    pooled: bool = False
    precached_mask_key: str = "mask"
    precached_pooled_key: str = "pooled"

    input_key = TEXT_INPUT

    def __post_init__(self) -> None:
        self._empty: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------ encoding

    def encode_prompts(self, prompts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """prompts -> cond entries on `device`; with gradients when the encoder carries trainable weights."""
        encoder = self.encoder()
        if any(p.requires_grad for p in encoder.parameters()):
            encoding = encoder.forward_tokens(*encoder.tokenize(list(prompts)))
        else:
            encoding = encoder.encode(list(prompts))
        return self.entries(encoding.embeddings, encoding.mask, device, encoding.pooled)

    def encode_batch(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        """A training batch's captions (online) or precached embeddings -> cond entries on `device`."""
        if "captions_encoded" in batch:
            return self.precached_entries(batch["captions_encoded"], device)
        if TEXT_INPUT not in batch:
            raise DataError(f"batch: no {TEXT_INPUT!r} or 'captions_encoded'; the text embedder needs one of them")
        return self.encode_prompts(list(batch[TEXT_INPUT]), device)

    def precached_entries(self, encoded: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        """Entries from precached tensors (`captions_encoded`); a missing mask means every token is real."""
        if self.precached_key in encoded:
            embeddings = encoded[self.precached_key]
        elif not self.precached_key.startswith("embeddings") and "embeddings" in encoded:
            embeddings = encoded["embeddings"]  # a single-encoder family's custom key falls back to the default
        else:
            raise DataError(
                f"captions_encoded: no {self.precached_key!r}; expected shards precached with this config's "
                f"text encoders (found {sorted(encoded)})"
            )
        mask = encoded.get(self.precached_mask_key)
        if mask is None:
            mask = torch.ones(embeddings.shape[:2], dtype=torch.bool)
        pooled = encoded.get(self.precached_pooled_key)
        if self.pooled and pooled is None:
            raise DataError(
                f"captions_encoded: no {self.precached_pooled_key!r}; this embedder conditions on the pooled text "
                "embedding, expected shards precached with it"
            )
        return self.entries(embeddings, mask, device, pooled)

    def entries(
        self, embeddings: torch.Tensor, mask: torch.Tensor, device: Any, pooled: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Encoder output (B, T, D), mask (B, T) [and pooled (B, P)] -> cond entries (checked width, fitted
        length) on `device`."""
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
        if self.pooled:
            entries["y"] = pooled.float().to(device)
        return entries

    # ------------------------------------------------------------------------------------ null conditioning

    def empty_encoding(self) -> dict[str, torch.Tensor]:
        """The encoding of "": `embeddings` (1, T, D) [and `pooled` (1, P)] float32 on the CPU, computed (or read)
        once."""
        if self._empty is None:
            if self.empty is not None:
                stored = self.empty()
                stored = stored if isinstance(stored, dict) else {"embeddings": stored}
            else:
                encoding = self.encoder().encode([""])
                stored = {"embeddings": encoding.embeddings[:1], "pooled": encoding.pooled[:1]}
            self._empty = {k: v.detach().float().cpu() for k, v in stored.items()}
        return self._empty

    def empty_embedding(self) -> torch.Tensor:
        """The encoding of "" (1, T, D) float32 on the CPU."""
        return self.empty_encoding()["embeddings"]

    def null_like(self, entries: dict[str, torch.Tensor], null: NullKind | None = None) -> dict[str, torch.Tensor]:
        """The null conditioning shaped like `entries` (what a dropped sample and CFG's uncond branch get);
        `null` overrides the embedder's own kind (the pipeline's zeros for an absent negative prompt)."""
        if (null or self.null) == "zeros":
            return {k: torch.zeros_like(v) for k, v in entries.items()}
        context = entries["context"]
        empty = self.empty_encoding()
        embeddings = empty["embeddings"].to(context.device, context.dtype)
        if embeddings.shape[1:] != context.shape[1:]:
            raise ConfigError(
                f"uncond.safetensors: the encoding of \"\" has shape {tuple(embeddings.shape[1:])}, the captions "
                f"{tuple(context.shape[1:])}; re-run t2i precache with this config's text encoder"
            )
        out = {"context": embeddings.expand_as(context)}
        if "context_mask" in entries:
            out["context_mask"] = torch.ones_like(entries["context_mask"])
        if "y" in entries:
            if "pooled" not in empty:
                raise ConfigError(
                    "uncond.safetensors: no pooled encoding of \"\"; re-run t2i precache with this config's text "
                    "encoders"
                )
            out["y"] = empty["pooled"].to(entries["y"].device, entries["y"].dtype).expand_as(entries["y"])
        return out

    def zeros(self, count: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Zero entries for `count` samples, shaped from the encoder (without running it)."""
        encoder = self.encoder()
        tokens = self.token_length or encoder.max_length
        out = {"context": torch.zeros(count, tokens, encoder.dim, device=device)}
        if self.masked:
            out["context_mask"] = torch.zeros(count, tokens, dtype=torch.bool, device=device)
        if self.pooled:
            out["y"] = torch.zeros(count, encoder.pooled_dim, device=device)
        return out


@dataclass
class SizeEmbedder(Dropout):
    """SDXL's micro-conditioning: the numbers of `batch[input_key]` ((B, N) or (B,)) embedded one by one like
    timesteps into `outdim` features, cosine half first -> `y` (B, N * outdim); zeros when dropped."""

    input_key: str
    outdim: int = 256
    drop_rate: float = 0.0

    def encode_batch(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        from t2i.models.layers import size_embedding

        if self.input_key not in batch:
            raise DataError(
                f"batch: no {self.input_key!r}; the conditioner's size embedder needs it (B, N) for every sample"
            )
        values = torch.as_tensor(batch[self.input_key], dtype=torch.float32)
        values = values.reshape(values.shape[0], -1) if values.ndim else values.reshape(1, 1)
        return {"y": size_embedding(values.to(device), self.outdim)}

    def null_like(self, entries: dict[str, torch.Tensor], null: NullKind | None = None) -> dict[str, torch.Tensor]:
        return {k: torch.zeros_like(v) for k, v in entries.items()}


@dataclass
class ContextPooledEmbedder(TextEmbedder):
    """Text conditioning of a flow transformer: `context` (B, T, D) [+ `context_mask`] from `encoder`'s tokens and
    `pooled` (B, D_pooled) from `pooled_encoder`'s pooled output (None: `encoder`'s own), one dropout decision per
    sample for both, to the encodings of "" (what FluxPipeline's CFG branch uses). Precached batches
    (`captions_encoded`) hold `embeddings`, `mask` and `pooled`; `empty` then reads "" from `uncond.safetensors`."""

    pooled_encoder: Callable[[], Any] | None = None

    def encode_prompts(self, prompts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """prompts -> {context, pooled[, context_mask]} float32 on `device` (frozen encoders, no gradients)."""
        encoding = self.encoder().encode(list(prompts))
        pooled = encoding.pooled
        if self.pooled_encoder is not None:
            pooled = self.pooled_encoder().encode(list(prompts)).pooled
        entries = self.entries(encoding.embeddings, encoding.mask, device)
        entries["pooled"] = pooled.float().to(device)
        return entries

    def precached_entries(self, encoded: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        missing = [k for k in ("embeddings", "pooled") if k not in encoded]
        if missing:
            raise DataError(f"captions_encoded: no {missing[0]!r}; expected shards precached with this flow "
                            f"config (t2i precache), found {sorted(encoded)}")  # fmt: skip
        embeddings = encoded["embeddings"]
        mask = encoded.get("mask")
        if mask is None:
            mask = torch.ones(embeddings.shape[:2], dtype=torch.bool)
        entries = self.entries(embeddings, mask, device)
        entries["pooled"] = encoded["pooled"].float().to(device)
        return entries

    def empty_encoding(self) -> dict[str, torch.Tensor]:
        """The encodings of "" ({context, pooled[, context_mask]}, batch 1, CPU), read from `empty` (a precached
        folder's `uncond.safetensors`) or computed once."""
        if self._empty is None:
            if self.empty is not None:
                stored = self.empty()
                mask = stored.get("mask", torch.ones(stored["embeddings"].shape[:2], dtype=torch.bool))
                entries = self.entries(stored["embeddings"], mask, "cpu")
                entries["pooled"] = stored["pooled"].float()
            else:
                entries = self.encode_prompts([""], "cpu")
            self._empty = {k: v[:1].detach().cpu() for k, v in entries.items()}
        return self._empty

    def null_like(self, entries: dict[str, torch.Tensor], null: NullKind | None = None) -> dict[str, torch.Tensor]:
        if (null or self.null) == "zeros":
            return {k: torch.zeros_like(v) for k, v in entries.items()}
        empty = self.empty_encoding()
        return {k: empty[k].to(v.device, v.dtype).expand_as(v) for k, v in entries.items()}

    def zeros(self, count: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        out = super().zeros(count, device)
        pooled = self.pooled_encoder() if self.pooled_encoder is not None else self.encoder()
        out["pooled"] = torch.zeros(count, pooled.pooled_dim, device=device)
        return out


Embedder = TextEmbedder | SizeEmbedder


class Conditioner:
    """Every embedder of a model, applied in order; their cond entries are merged into one dict (`context` and
    `y` concatenated along the last dimension).

    `context_dim` / `adm_in_channels` (the UNet's) are checked against the merged widths when given.
    """

    def __init__(
        self,
        embedders: Sequence[Embedder],
        context_dim: int | None = None,
        adm_in_channels: int | None = None,
    ) -> None:
        if not any(isinstance(e, TextEmbedder) for e in embedders):
            raise ConfigError("conditioner: expected at least one text embedder")
        self.embedders = list(embedders)
        self.context_dim = context_dim
        self.adm_in_channels = adm_in_channels
        self._widths: list[dict[str, int]] | None = None

    @property
    def text(self) -> TextEmbedder:
        """The first text embedder (the one whose encoder serves prompts in single-encoder families)."""
        return self.text_embedders[0]

    @property
    def text_embedders(self) -> list[TextEmbedder]:
        return [e for e in self.embedders if isinstance(e, TextEmbedder)]

    def text_encoder_names(self) -> list[str]:
        """The diffusers component (and LoRA prefix) of each text embedder's encoder (`text_encoder_names`)."""
        return text_encoder_names([e.pooled for e in self.text_embedders])

    @property
    def zeros_for_empty_negative(self) -> bool:
        """Whether every text embedder drops to zeros: then sampling without a negative prompt conditions the
        unconditional branch on zeros too (diffusers' `force_zeros_for_empty_prompt`)."""
        return all(e.null == "zeros" for e in self.text_embedders)

    # ------------------------------------------------------------------------------------ encoding

    def embed(self, batch: dict[str, Any], device: torch.device | str) -> list[dict[str, torch.Tensor]]:
        """Each embedder's entries for `batch`, in order, without dropout."""
        return [embedder.encode_batch(batch, device) for embedder in self.embedders]

    def merge(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One cond dict from the embedders' entries: `context` and `y` concatenated along the last dimension."""
        cond: dict[str, torch.Tensor] = {}
        for key in CONCAT_KEYS:
            pieces = [part[key] for part in parts if key in part]
            if pieces:
                cond[key] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        for part in parts:
            for key, value in part.items():
                if key in CONCAT_KEYS:
                    continue
                if key in cond:
                    raise ConfigError(f"conditioner: two embedders give {key!r}; expected one")
                cond[key] = value
        # every part's keys, with the width of its concatenated entries (what `split` undoes)
        self._widths = [{k: int(v.shape[-1]) if k in CONCAT_KEYS else 0 for k, v in part.items()} for part in parts]
        self.check_widths(cond)
        return cond

    def check_widths(self, cond: dict[str, torch.Tensor]) -> None:
        """ConfigError unless the merged context and y are as wide as the UNet expects."""
        widths = self._widths or []
        for key, expected, name in (
            ("context", self.context_dim, "context_dim"),
            ("y", self.adm_in_channels, "adm_in_channels"),
        ):
            if expected is None and key == "context":
                continue
            got = int(cond[key].shape[-1]) if key in cond else None
            if got != expected:
                parts = " + ".join(str(w[key]) for w in widths if key in w) or "nothing"
                raise ConfigError(
                    f"model.unet_config.{name}: {expected}, but the conditioner's embedders give {key} of width "
                    f"{got} ({parts}); expected the embedders the UNet was trained with"
                )

    def __call__(
        self, batch: dict[str, Any], generator: torch.Generator, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """A training batch -> cond, each embedder's entries dropped at its own rate."""
        parts = self.embed(batch, device)
        return self.merge([e.drop(part, generator) for e, part in zip(self.embedders, parts, strict=True)])

    def encode(
        self, batch: dict[str, Any], device: torch.device | str, zero_text: bool = False
    ) -> dict[str, torch.Tensor]:
        """`batch` (captions and the size inputs) -> cond without dropout. `zero_text`: the text embedders give
        zeros (without running their encoders), the unconditional branch of `force_zeros_for_empty_prompt`."""
        count = len(batch[TEXT_INPUT]) if TEXT_INPUT in batch else None
        parts = [
            e.zeros(count, device) if zero_text and isinstance(e, TextEmbedder) else e.encode_batch(batch, device)
            for e in self.embedders
        ]
        return self.merge(parts)

    def prompts(
        self, prompts: Sequence[str], device: torch.device | str, **inputs: Any
    ) -> dict[str, torch.Tensor]:
        """cond of prompts (and the size inputs, e.g. `target_size_as_tuple=(B, 2)`), without dropout."""
        return self.encode({TEXT_INPUT: list(prompts), **inputs}, device)

    def unconditional(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The null conditioning of every embedder, shaped like `like` (a cond this conditioner merged)."""
        return self.merge([e.null_like(part) for e, part in zip(self.embedders, self.split(like), strict=True)])

    def split(self, cond: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The inverse of `merge` for a cond shaped like the last merged one: each embedder's entries."""
        if self._widths is None:
            if len(self.embedders) == 1:
                return [dict(cond)]
            raise ConfigError("conditioner: split before any encoding; encode a batch first")
        parts: list[dict[str, torch.Tensor]] = [{} for _ in self.embedders]
        for key in CONCAT_KEYS:
            if key not in cond:
                continue
            start = 0
            for part, widths in zip(parts, self._widths, strict=True):
                if key in widths:
                    part[key] = cond[key][..., start : start + widths[key]]
                    start += widths[key]
        owners = {k: i for i, widths in enumerate(self._widths) for k in widths if k not in CONCAT_KEYS}
        for key, value in cond.items():
            if key not in CONCAT_KEYS:
                parts[owners.get(key, self.embedders.index(self.text))][key] = value
        return parts


def build_conditioner(
    model_cfg: Any,
    encoders: Sequence[Callable[[], Any]],
    empty: Sequence[Callable[[], Any] | None] | None = None,
) -> Conditioner:
    """The conditioner of a `latent_diffusion` config: one embedder per `model_cfg.embedders()` entry (SD 1/2:
    `cond_stage_config` at `text_drop_rate`, dropped to ""; SDXL: `conditioner_config.emb_models`), checked
    against the UNet's `context_dim` and `adm_in_channels`.

    Args:
        model_cfg: a `LatentDiffusionConfig`.
        encoders: one factory per text embedder, in order, returning its frozen `TextEncoder` (called on first
            use).
        empty: per text embedder, None or a loader of its precached encoding of "" (see `TextEmbedder.empty`).
    """
    configs = model_cfg.embedders()
    texts = [c for c in configs if c.is_text]
    if len(encoders) != len(texts):
        raise ConfigError(f"conditioner: {len(encoders)} text encoders for {len(texts)} text embedders")
    empty = list(empty) if empty is not None else [None] * len(texts)
    embedders: list[Embedder] = []
    for c in configs:
        if not c.is_text:
            embedders.append(SizeEmbedder(c.input_key, c.emb_model.outdim, c.ucg_rate))
            continue
        j = sum(isinstance(e, TextEmbedder) for e in embedders)
        keys = precached_keys(j)
        embedders.append(
            TextEmbedder(
                encoders[j],
                drop_rate=c.ucg_rate,
                null="zeros" if c.legacy_ucg_value is None else "empty_prompt",
                precached_key=keys["embeddings"],
                empty=empty[j],
                pooled=c.emb_model.always_return_pooled,
                precached_mask_key=keys["mask"],
                precached_pooled_key=keys["pooled"],
            )
        )
    unet = model_cfg.unet_config
    adm = unet.adm_in_channels if unet.num_classes is not None else None
    return Conditioner(embedders, context_dim=unet.context_dim, adm_in_channels=adm)

"""How Flux LoRA files name the transformer's modules, and how they map onto ours (BFL module names).

Three namings are read (all under the component prefix `transformer`):

- diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, ... (`FluxPipeline.load_lora_weights`
  and `save_lora_weights`). diffusers splits what BFL fuses: to_q, to_k, to_v are thirds of `img_attn.qkv`, and a
  single block's to_q, to_k, to_v, proj_mlp are the four parts of `linear1`. Such parts are fused exactly: the
  down weights stacked, the up weights block-diagonal (rank = the sum of the parts' ranks; a missing part is zero).
- kohya-ss (sd-scripts, ai-toolkit exports): `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` (BFL names
  with `_`), `.lora_up.weight`, `.alpha`.
- BFL / ComfyUI: the BFL module names themselves, `double_blocks.0.img_attn.qkv.lora_A.weight` (or `lora_down`,
  optionally under `diffusion_model.`); `canonical_keys` moves them under `transformer.`.

Written files use the diffusers naming (split into diffusers' modules, the down weight shared by the parts) or
kohya's; the final layer's modulation swaps its halves as the weights do. LoHa / LoKr / DoRA adapters map one to
one (BFL names, or the diffusers modules that are whole BFL modules); on fused modules they need kohya naming.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from t2i.convert.flux_diffusers import BFL_ROOTS, flux_key_rules
from t2i.errors import LoraError
from t2i.lora.adapters import AdapterWeights, LoraPair

PREFIX = "transformer"
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_BFL_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$"
)
_PART_NAMES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def canonical_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-named LoRA keys (bare or under `diffusion_model.`) as `transformer.<BFL module>.lora_A/B.weight` /
    `.alpha`; every other key unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare = next((key[len(p) :] for p in COMFY_PREFIXES if key.startswith(p)), key)
        match = _BFL_KEY.match(bare)
        if match and bare.startswith(BFL_ROOTS):
            key = f"{PREFIX}.{match['module']}.{_PART_NAMES.get(match['part'], match['part'])}"
        out[key] = value
    return out


@dataclass(frozen=True)
class Part:
    """One diffusers module that is part `index` of our module `ours`, whose output rows split into `sizes` (empty:
    the whole module); `swap_halves`: its rows are ours with the two halves swapped."""

    ours: str
    index: int
    sizes: tuple[int, ...]
    swap_halves: bool


class FluxLoraNaming:
    """The file naming of a Flux transformer component (see the module docstring): `resolve` reads, `split`
    writes."""

    def __init__(self, model: Any) -> None:
        self.parts: dict[str, Part] = {}
        self.theirs: dict[str, list[str]] = {}
        for rule in flux_key_rules(model.flux_config):
            if not rule.ours.endswith(".weight"):
                continue
            ours = rule.ours.removesuffix(".weight")
            names = [t.removesuffix(".weight") for t in rule.theirs]
            self.theirs[ours] = names
            for i, name in enumerate(names):
                self.parts[name] = Part(ours, i, tuple(rule.sizes), rule.swap_halves)
        self.ours = set(self.theirs)
        self.flat = {path.replace(".", "_"): path for path in self.ours}

    # ---------------------------------------------------------------------------------------- reading

    def resolve(self, pairs: dict[tuple[str, bool], AdapterWeights], source: str) -> dict[str, AdapterWeights]:
        """{(file module name, kohya-flat?): adapter} -> {our module path: adapter}; LoraError naming what matches
        no module, a module given twice, or an adapter that cannot be fused."""
        direct: dict[str, AdapterWeights] = {}
        grouped: dict[str, dict[int, AdapterWeights]] = {}
        unmatched: list[str] = []
        for (name, flat), adapter in pairs.items():
            path = self.flat.get(name) if flat else (name if name in self.ours else None)
            part = None if flat or path is not None else self.parts.get(name)
            if path is None and part is None:
                unmatched.append(f"lora_unet_{name}" if flat else f"{PREFIX}.{name}")
                continue
            target = path if path is not None else part.ours
            if target in direct or (path is not None and target in grouped):
                raise LoraError(f"{source}: two LoRA entries for the Flux module {target!r} (diffusers and BFL "
                                "names?)")  # fmt: skip
            if path is not None:
                direct[path] = adapter
            else:
                grouped.setdefault(target, {})[part.index] = adapter
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
            raise LoraError(f"{source}: LoRA keys that match no module of the Flux transformer: {shown}")
        for path, members in grouped.items():
            direct[path] = self._fuse(path, members, source)
        return direct

    def _fuse(self, path: str, members: dict[int, AdapterWeights], source: str) -> AdapterWeights:
        """The adapter on our module `path` equal to its diffusers parts' (alpha folded in)."""
        names = self.theirs[path]
        part = self.parts[names[0]]
        if not part.sizes and not part.swap_halves:  # the same module under its diffusers name
            return members[0]
        for i, adapter in members.items():
            if not _plain_lora(adapter):
                raise LoraError(
                    f"{source}: transformer.{names[i]}: a {adapter.kind} adapter (or DoRA) on a part of the fused "
                    f"Flux module {path!r} cannot be fused; expected a plain LoRA"
                )
        if not part.sizes:
            adapter = members[0]
            return LoraPair(adapter.down, _swap(adapter.up), adapter.alpha, factor=adapter.factor)
        downs = [members[i].down.float() for i in sorted(members)]
        up = torch.zeros(sum(part.sizes), sum(d.shape[0] for d in downs))
        row, col = 0, 0
        for i, size in enumerate(part.sizes):
            if i in members:
                adapter = members[i]
                if adapter.up.shape[0] != size:
                    raise LoraError(f"{source}: transformer.{names[i]}: LoRA up weight has {adapter.up.shape[0]} "
                                    f"rows; the module has {size}")  # fmt: skip
                up[row : row + size, col : col + adapter.rank] = adapter.up.float() * adapter.ratio
                col += adapter.rank
            row += size
        return LoraPair(torch.cat(downs), up)

    # ---------------------------------------------------------------------------------------- writing

    def split(self, path: str, adapter: AdapterWeights) -> list[tuple[str, AdapterWeights]]:
        """Our module's adapter as diffusers' modules: [(name, adapter)], a LoRA's down weight shared by the
        parts (copied) and its up weight (and DoRA magnitude) split by rows."""
        names = self.theirs.get(path)
        if names is None:
            raise LoraError(f"transformer.{path}: no diffusers name for this Flux module")
        part = self.parts[names[0]]
        if not part.sizes and not part.swap_halves:
            return [(names[0], adapter)]
        if not isinstance(adapter, LoraPair) or adapter.mid is not None or adapter.dora_scale is not None:
            raise LoraError(f"transformer.{path}: a {adapter.kind} adapter on this fused Flux module has no "
                            "diffusers spelling; save it with naming='kohya'")  # fmt: skip
        up, magnitude = adapter.up, adapter.magnitude
        if part.swap_halves:
            up, magnitude = _swap(up), None if magnitude is None else _swap(magnitude)
        sizes = list(part.sizes) or [up.shape[0]]
        ups = up.split(sizes)
        magnitudes = magnitude.split(sizes) if magnitude is not None else [None] * len(sizes)
        pieces = zip(names, ups, magnitudes, strict=True)
        kept = {"alpha": adapter.alpha, "factor": adapter.factor}
        return [
            (name, LoraPair(adapter.down.clone(), rows.contiguous(), magnitude=m, **kept)) for name, rows, m in pieces
        ]


def _plain_lora(adapter: AdapterWeights) -> bool:
    return isinstance(adapter, LoraPair) and adapter.mid is None and adapter.decomposition() is None


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)

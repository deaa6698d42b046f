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

Written files use the diffusers naming (split into diffusers' modules, the down weight shared by the parts, alpha
folded into the up weight) or kohya's; the final layer's modulation swaps its halves as the weights do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from t2i.convert.flux_diffusers import BFL_ROOTS, flux_key_rules
from t2i.errors import LoraError

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
    """One diffusers module that is rows `start:stop` of our module `ours` (fused from `count` parts)."""

    ours: str
    index: int
    sizes: tuple[int, ...]
    swap_halves: bool


class FluxLoraNaming:
    """The file naming of a Flux transformer component (see the module docstring); `resolve` reads, `split`
    writes. `pair_type` builds the pairs `resolve` returns (t2i.lora.files.LoraPair)."""

    def __init__(self, model: Any, pair_type: type) -> None:
        self.pair_type = pair_type
        self.parts: dict[str, Part] = {}
        self.theirs: dict[str, list[str]] = {}
        for rule in flux_key_rules(model.flux_config):
            if not rule.ours.endswith(".weight") or rule.ours.endswith(".scale"):
                continue
            ours = rule.ours.removesuffix(".weight")
            names = [t.removesuffix(".weight") for t in rule.theirs]
            self.theirs[ours] = names
            for i, name in enumerate(names):
                self.parts[name] = Part(ours, i, tuple(rule.sizes), rule.swap_halves)
        self.ours = set(self.theirs)
        self.flat = {path.replace(".", "_"): path for path in self.ours}

    # ---------------------------------------------------------------------------------------- reading

    def resolve(self, pairs: dict[tuple[str, bool], Any], source: str) -> dict[str, Any]:
        """{(file module name, kohya-flat?): pair} -> {our module path: pair}; LoraError naming what matches no
        module, or a module given twice."""
        direct: dict[str, Any] = {}
        grouped: dict[str, dict[int, Any]] = {}
        unmatched: list[str] = []
        for (name, flat), pair in pairs.items():
            path = self.flat.get(name) if flat else (name if name in self.ours else None)
            if path is not None:
                self._claim(direct, grouped, path, source)
                direct[path] = pair
            elif not flat and name in self.parts:
                part = self.parts[name]
                if part.ours in direct:
                    self._claim(direct, grouped, part.ours, source)
                grouped.setdefault(part.ours, {})[part.index] = pair
            else:
                unmatched.append(f"lora_unet_{name}" if flat else f"{PREFIX}.{name}")
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
            raise LoraError(f"{source}: LoRA keys that match no module of the Flux transformer: {shown}")
        for path, members in grouped.items():
            direct[path] = self._fuse(path, members)
        return direct

    @staticmethod
    def _claim(direct: dict, grouped: dict, path: str, source: str) -> None:
        if path in direct or path in grouped:
            raise LoraError(f"{source}: two LoRA entries for the Flux module {path!r} (diffusers and BFL names?)")

    def _fuse(self, path: str, members: dict[int, Any]) -> Any:
        """The pair on our module `path` equal to its diffusers parts' pairs (alpha folded in)."""
        first = next(iter(members.values()))
        part = self.parts[self.theirs[path][0]]
        if not part.sizes:
            up = first.up.float() * first.ratio
            return self.pair_type(first.down.float(), _swap(up) if part.swap_halves else up, None)
        downs = [members[i].down.float() for i in sorted(members)]
        up = torch.zeros(sum(part.sizes), sum(d.shape[0] for d in downs))
        row, col = 0, 0
        for i, size in enumerate(part.sizes):
            if i in members:
                pair = members[i]
                if pair.up.shape[0] != size:
                    raise LoraError(
                        f"{self.theirs[path][i]}: LoRA up weight has {pair.up.shape[0]} rows; the module has {size}"
                    )
                up[row : row + size, col : col + pair.rank] = pair.up.float() * pair.ratio
                col += pair.rank
            row += size
        return self.pair_type(torch.cat(downs), up, None)

    # ---------------------------------------------------------------------------------------- writing

    def split(self, path: str, down: torch.Tensor, up: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Our module's LoRA (down (r, in), up (out, r), alpha folded into up) as diffusers' modules: [(name, down,
        up rows)], the down weight shared by the parts."""
        names = self.theirs.get(path)
        if names is None:
            raise LoraError(f"transformer.{path}: no diffusers name for this Flux module")
        part = self.parts[names[0]]
        if part.swap_halves:
            up = _swap(up)
        if not part.sizes:
            return [(names[0], down, up)]
        return [(name, down, rows) for name, rows in zip(names, up.split(list(part.sizes)), strict=True)]


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)

"""One module's adapter weights as a file holds them: LoRA (optionally DoRA), LoHa and LoKr.

`out` and `in` are the module weight's first two sizes; for a conv weight (out, in, k, k) a flattened factor
spans in*k*k ("in_flat"). The update each kind adds to W (alpha None means alpha = r, i.e. factor 1):

- LoRA: down (r, in[, k, k]), up (out, r[, 1, 1]); delta W = alpha / r * up @ down; LyCORIS' Tucker LoCon
  adds a core `mid` (r, r, k, k) between down (r, in, 1, 1) and up: einsum(mid, up, down). DoRA (Liu et al. 2024)
  rescales W + delta W by a learnt magnitude over one axis: peft's `lora_magnitude_vector` (one value per output
  row) or LyCORIS' `dora_scale`, (out, 1[, 1, 1]) on the output axis or (1, in[, 1, 1]) on the input axis.
- LoHa (LyCORIS `hada_`, Hyeon-Woo et al. 2022): delta W = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b) with
  w*_a (out, r), w*_b (r, in_flat); with Tucker cores t1, t2 (r, r, k, k) the factors are w*_a (r, out) and
  w*_b (r, in) instead, and each term is einsum(t, w_b, w_a) -> (out, in, k, k).
- LoKr (`lokr_`): delta W = alpha / r * kron(w1, w2), each factor full or a product w_a @ w_b, w2 possibly a
  Tucker product of t2 (r, r, k, k), w2_a (r, out2), w2_b (r, in2). r is w2_b's (else w1_b's) first size; when
  both factors are full there is no rank and the factor is 1 (LyCORIS ignores alpha then).

`factor` overrides alpha / r where the file's header fixes it (diffusers' `lora_adapter_metadata`: peft
semantics, including rsLoRA's alpha / sqrt(r)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from t2i.errors import LoraError

DECOMPOSITION_PARTS = ("magnitude", "dora_scale")


@dataclass
class AdapterWeights:
    """Common part of every kind: alpha, the DoRA decomposition, the header-fixed factor."""

    kind: ClassVar[str] = ""
    MATRICES: ClassVar[tuple[str, ...]] = ()

    @property
    def rank(self) -> int | None:
        raise NotImplementedError

    @property
    def ratio(self) -> float:
        """The factor in front of the update: `factor` if the header fixed it, else alpha / r (1 without either)."""
        if getattr(self, "factor", None) is not None:
            return float(self.factor)
        alpha, rank = getattr(self, "alpha", None), self.rank
        return 1.0 if alpha is None or rank is None else float(alpha) / rank

    def out_in(self) -> tuple[int, int]:
        """(out, in_flat) of the update this adapter composes."""
        raise NotImplementedError

    def fits(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        return self.out_in() == (int(weight_shape[0]), math.prod(int(s) for s in weight_shape[1:]))

    def matrices(self) -> dict[str, torch.Tensor]:
        """{part name: tensor} of the weights present (no alpha, no decomposition)."""
        return {name: getattr(self, name) for name in self.MATRICES if getattr(self, name) is not None}

    def decomposition(self) -> tuple[str, torch.Tensor] | None:
        """("magnitude" | "dora_scale", tensor) when the adapter is weight-decomposed (DoRA)."""
        for name in DECOMPOSITION_PARTS:
            value = getattr(self, name, None)
            if value is not None:
                return name, value
        return None


@dataclass
class LoraPair(AdapterWeights):
    """down = A (r, in[, k, k]), up = B (out, r[, 1, 1]), alpha (None: = r); a Tucker core `mid`; DoRA
    magnitude or dora_scale."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    factor: float | None = None
    mid: torch.Tensor | None = None

    kind: ClassVar[str] = "lora"
    MATRICES: ClassVar[tuple[str, ...]] = ("down", "up", "mid")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def out_in(self) -> tuple[int, int]:
        kernel = 1 if self.mid is None else math.prod(self.mid.shape[2:])
        return int(self.up.shape[0]), math.prod(self.down.shape[1:]) * kernel

    def check(self, name: str) -> None:
        if self.down is None or self.up is None:
            raise LoraError(f"LoRA modules missing their down/A or up/B weight: {name}")
        ranks = {int(self.up.shape[1]), int(self.down.shape[0])}
        if self.mid is not None:
            ranks |= {int(self.mid.shape[0]), int(self.mid.shape[1])}
        if len(ranks) != 1:
            shapes = {p: tuple(t.shape) for p, t in self.matrices().items()}
            raise LoraError(f"{name}: LoRA weights of inconsistent ranks {shapes}")


@dataclass
class LohaWeights(AdapterWeights):
    """LyCORIS LoHa: two rank-r products multiplied elementwise (Tucker cores t1/t2 for k x k convs)."""

    hada_w1_a: torch.Tensor | None = None
    hada_w1_b: torch.Tensor | None = None
    hada_w2_a: torch.Tensor | None = None
    hada_w2_b: torch.Tensor | None = None
    hada_t1: torch.Tensor | None = None
    hada_t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    factor: float | None = None

    kind: ClassVar[str] = "loha"
    MATRICES: ClassVar[tuple[str, ...]] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    @property
    def tucker(self) -> bool:
        return self.hada_t1 is not None

    @property
    def rank(self) -> int:
        return int(self.hada_w1_b.shape[0])

    def out_in(self) -> tuple[int, int]:
        if self.tucker:
            return int(self.hada_w1_a.shape[1]), int(self.hada_w1_b.shape[1]) * math.prod(self.hada_t1.shape[2:])
        return int(self.hada_w1_a.shape[0]), math.prod(self.hada_w1_b.shape[1:])

    def check(self, name: str) -> None:
        missing = [p for p in self.MATRICES[:4] if getattr(self, p) is None]
        if (self.hada_t1 is None) != (self.hada_t2 is None):
            missing.append("hada_t2" if self.hada_t2 is None else "hada_t1")
        if missing:
            raise LoraError(f"{name}: LoHa weights missing {', '.join(missing)}")
        if self.tucker:
            ranks = {int(t.shape[0]) for t in self.matrices().values()} | {int(self.hada_t1.shape[1])}
        else:
            ranks = {int(self.hada_w1_a.shape[1]), int(self.hada_w2_a.shape[1])}
            ranks |= {int(self.hada_w1_b.shape[0]), int(self.hada_w2_b.shape[0])}
        if len(ranks) != 1:
            shapes = {p: tuple(t.shape) for p, t in self.matrices().items()}
            raise LoraError(f"{name}: LoHa weights of inconsistent ranks {shapes}")


@dataclass
class LokrWeights(AdapterWeights):
    """LyCORIS LoKr: a Kronecker product of two factors, each full or low-rank (w2 possibly Tucker)."""

    lokr_w1: torch.Tensor | None = None
    lokr_w1_a: torch.Tensor | None = None
    lokr_w1_b: torch.Tensor | None = None
    lokr_w2: torch.Tensor | None = None
    lokr_w2_a: torch.Tensor | None = None
    lokr_w2_b: torch.Tensor | None = None
    lokr_t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    factor: float | None = None

    kind: ClassVar[str] = "lokr"
    MATRICES: ClassVar[tuple[str, ...]] = (
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    )  # fmt: skip

    @property
    def rank(self) -> int | None:
        if self.lokr_w2_b is not None:
            return int(self.lokr_w2_b.shape[0])
        return None if self.lokr_w1_b is None else int(self.lokr_w1_b.shape[0])

    def w1_shape(self) -> tuple[int, int]:
        if self.lokr_w1 is not None:
            return int(self.lokr_w1.shape[0]), int(self.lokr_w1.shape[1])
        return int(self.lokr_w1_a.shape[0]), int(self.lokr_w1_b.shape[1])

    def w2_shape(self) -> tuple[int, int]:
        """(out2, in2_flat) of the second factor."""
        if self.lokr_w2 is not None:
            return int(self.lokr_w2.shape[0]), math.prod(self.lokr_w2.shape[1:])
        if self.lokr_t2 is not None:
            return int(self.lokr_w2_a.shape[1]), int(self.lokr_w2_b.shape[1]) * math.prod(self.lokr_t2.shape[2:])
        return int(self.lokr_w2_a.shape[0]), math.prod(self.lokr_w2_b.shape[1:])

    def out_in(self) -> tuple[int, int]:
        (a, b), (c, d) = self.w1_shape(), self.w2_shape()
        return a * c, b * d

    def check(self, name: str) -> None:
        w1 = self.lokr_w1 is not None or (self.lokr_w1_a is not None and self.lokr_w1_b is not None)
        w2 = self.lokr_w2 is not None or (self.lokr_w2_a is not None and self.lokr_w2_b is not None)
        if not (w1 and w2):
            raise LoraError(f"{name}: LoKr weights need lokr_w1 (or lokr_w1_a/_b) and lokr_w2 (or lokr_w2_a/_b)")
        pairs = [("lokr_w1_a", 1, "lokr_w1_b", 0)]
        if self.lokr_t2 is None:
            pairs.append(("lokr_w2_a", 1, "lokr_w2_b", 0))
        else:
            pairs += [("lokr_w2_a", 0, "lokr_t2", 0), ("lokr_w2_b", 0, "lokr_t2", 1)]
        for left, i, right, j in pairs:
            a, b = getattr(self, left), getattr(self, right)
            if a is not None and b is not None and a.shape[i] != b.shape[j]:
                raise LoraError(f"{name}: {left} {tuple(a.shape)} and {right} {tuple(b.shape)} disagree on the rank")


ADAPTER_KINDS: tuple[type[AdapterWeights], ...] = (LoraPair, LohaWeights, LokrWeights)
# canonical part name -> the kind it belongs to (alpha and the decompositions are shared)
PART_KIND = {p: cls for cls in ADAPTER_KINDS for p in cls.MATRICES} | {"magnitude": LoraPair}


def build_adapter(parts: dict[str, torch.Tensor], name: str) -> AdapterWeights:
    """The adapter that a module's file parts ({canonical part: tensor}) describe; LoraError when they mix kinds
    or miss a weight. `alpha` is a scalar tensor."""
    kinds = {PART_KIND[p] for p in parts if p in PART_KIND}
    if len(kinds) > 1:
        names = ", ".join(sorted(k.kind for k in kinds))
        raise LoraError(f"{name}: keys of several adapter kinds ({names}) for one module")
    cls = kinds.pop() if kinds else LoraPair
    if "magnitude" in parts and cls is not LoraPair:
        raise LoraError(f"{name}: lora_magnitude_vector only goes with lora_A/lora_B weights")
    known = {f.name for f in fields(cls)}
    values = {p: t for p, t in parts.items() if p != "alpha" and p in known}
    adapter = cls(**values)
    if "alpha" in parts:
        adapter.alpha = float(parts["alpha"].float().reshape(-1)[0])
    adapter.check(name)
    return adapter

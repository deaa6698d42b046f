"""The sampler registry: names -> sampler functions, filled by the modules of this package as they import."""

from __future__ import annotations

from collections.abc import Callable

from t2i.errors import UnknownSamplerError

SamplerFn = Callable[..., "object"]
SAMPLERS: dict[str, SamplerFn] = {}


def register_sampler(name: str) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator adding a sampler function to `SAMPLERS` under `name`."""

    def add(fn: SamplerFn) -> SamplerFn:
        SAMPLERS[name] = fn
        return fn

    return add


def get_sampler(name: str) -> SamplerFn:
    """The sampler function registered as `name`; raises UnknownSamplerError listing the valid names."""
    if name not in SAMPLERS:
        raise UnknownSamplerError(
            f"sampler: unknown name {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}"
        )
    return SAMPLERS[name]


def available_samplers() -> list[str]:
    """Names of every registered sampler, sorted."""
    return sorted(SAMPLERS)

"""The sampler registry, and the decorator that turns a sampler's core into the public sampler function.

A sampler's core is written against a `SamplerRun` (the step-wise denoiser with its callback and finiteness check,
the generator, the progress flag) and receives sigmas already on x's device in the compute dtype:

    @sampler("euler_ancestral")
    def sample_euler_ancestral(run: SamplerRun, x, sigmas, *, eta=1.0, s_noise=1.0) -> x

`@sampler` registers, and returns, the public function with the signature every sampler shares (k-diffusion's):

    sample_euler_ancestral(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, progress=False,
                           eta=1.0, s_noise=1.0) -> x
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import trange

from t2i.diffusion.samplers.core import Callback, Denoiser, StepDenoiser, prepare_sigmas
from t2i.diffusion.tensors import Generators, noise_like
from t2i.errors import UnknownSamplerError

SamplerFn = Callable[..., torch.Tensor]
SAMPLERS: dict[str, SamplerFn] = {}


@dataclass
class SamplerRun:
    """What a sampler's core needs besides x and sigmas."""

    denoise: StepDenoiser
    generator: Generators
    progress: bool

    def steps(self, sigmas: Any) -> Iterator[tuple[int, Any, Any]]:
        """(i, sigma_i, sigma_{i+1}) for every step, with a tqdm progress bar when `progress`."""
        for i in trange(len(sigmas) - 1, disable=not self.progress):
            yield i, sigmas[i], sigmas[i + 1]

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        return noise_like(x, self.generator)

    def add_noise(self, x: torch.Tensor, std: Any, s_noise: float = 1.0) -> torch.Tensor:
        """x plus fresh Gaussian noise of standard deviation s_noise * std."""
        return x + self.noise_like(x) * s_noise * std


def _public_signature(core: Callable[..., Any]) -> inspect.Signature:
    keyword = inspect.Parameter.KEYWORD_ONLY
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    common = [
        inspect.Parameter("denoiser", positional, annotation=Denoiser),
        inspect.Parameter("x", positional, annotation=torch.Tensor),
        inspect.Parameter("sigmas", positional, annotation=torch.Tensor),
        inspect.Parameter("cond", positional, default=None, annotation=dict | None),
        inspect.Parameter("generator", keyword, default=None, annotation=Generators),
        inspect.Parameter("callback", keyword, default=None, annotation=Callback | None),
        inspect.Parameter("progress", keyword, default=False, annotation=bool),
    ]
    options = [p for p in inspect.signature(core).parameters.values() if p.kind is keyword]
    return inspect.Signature(common + options, return_annotation=torch.Tensor)


def sampler(name: str, prepare: bool = True) -> Callable[[Callable[..., torch.Tensor]], SamplerFn]:
    """Register the sampler whose core is the decorated function (see the module docstring); with `prepare`
    False the core gets the sigmas as given (to take its coefficients in double precision, say). The core stays
    reachable as `.core` for samplers built from another's."""

    def register(core: Callable[..., torch.Tensor]) -> SamplerFn:
        @functools.wraps(core)
        def sample(
            denoiser: Denoiser,
            x: torch.Tensor,
            sigmas: torch.Tensor,
            cond: dict | None = None,
            *,
            generator: Generators = None,
            callback: Callback | None = None,
            progress: bool = False,
            **options: Any,
        ) -> torch.Tensor:
            run = SamplerRun(StepDenoiser(denoiser, cond, callback), generator, progress)
            return core(run, x, prepare_sigmas(x, sigmas) if prepare else sigmas, **options)

        sample.__signature__ = _public_signature(core)
        sample.core = core
        return register_sampler(name)(sample)

    return register


def register_sampler(name: str) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator adding a public sampler function (the full signature) to `SAMPLERS` under `name`."""

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

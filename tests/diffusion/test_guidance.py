"""Classifier-free guidance: one concatenated batch per call, equal to the two-pass formula."""

from __future__ import annotations

import pytest
import torch

from t2i.diffusion.guidance import CFGDenoiser
from t2i.diffusion.plans import make_plan
from t2i.errors import InvalidInputError


class RecordingDenoiser:
    """x0 depends on x, sigma, context, mask and x_low_res, so any mix-up of batch halves shows."""

    sigma_min, sigma_max = 0.03, 14.6

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, sigma, cond):
        self.calls.append({"batch": x.shape[0], **cond})
        out = x * 0.5 / (1 + sigma.reshape(-1, 1, 1, 1))
        if "context" in cond:
            mask = cond.get("context_mask", torch.ones(cond["context"].shape[:2], dtype=torch.bool))
            shift = (cond["context"] * mask.unsqueeze(-1)).sum(dim=(1, 2))
            out = out + shift.reshape(-1, 1, 1, 1)
        if "x_low_res" in cond:
            out = out + cond["x_low_res"].mean(dim=1, keepdim=True)
        return out


def make_cond(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "context": torch.randn(batch, 5, 8, generator=g),
        "uncond_context": torch.randn(batch, 5, 8, generator=g),
        "context_mask": torch.rand(batch, 5, generator=g) > 0.3,
        "x_low_res": torch.randn(batch, 3, 4, 4, generator=g),
    }


def test_guided_output_equals_two_pass_formula_in_one_call():
    inner, reference = RecordingDenoiser(), RecordingDenoiser()
    x, sigma, cond = torch.randn(2, 3, 4, 4), torch.tensor([2.0, 0.5]), make_cond()
    guided = CFGDenoiser(inner, scale=7.5)(x, sigma, cond)

    cond_pass = reference(x, sigma, {k: cond[k] for k in ("context", "context_mask", "x_low_res")})
    uncond_cond = {"context": cond["uncond_context"], "context_mask": torch.ones(2, 5, dtype=torch.bool)}
    uncond_pass = reference(x, sigma, {**uncond_cond, "x_low_res": cond["x_low_res"]})
    torch.testing.assert_close(guided, uncond_pass + 7.5 * (cond_pass - uncond_pass))
    assert len(inner.calls) == 1 and inner.calls[0]["batch"] == 4
    assert "uncond_context" not in inner.calls[0]


def test_one_model_call_per_sampler_step():
    inner = RecordingDenoiser()
    plan = make_plan(
        "dpmpp_2m", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 6
    )
    plan.sample(CFGDenoiser(inner, 5.0), torch.randn(2, 3, 4, 4), make_cond())
    assert len(inner.calls) == 6
    assert all(call["batch"] == 4 for call in inner.calls)


def test_scale_one_skips_the_unconditional_pass():
    inner = RecordingDenoiser()
    x, sigma, cond = torch.randn(2, 3, 4, 4), torch.tensor([2.0, 0.5]), make_cond()
    out = CFGDenoiser(inner, 1.0)(x, sigma, cond)
    assert inner.calls[0]["batch"] == 2 and "uncond_context" not in inner.calls[0]
    torch.testing.assert_close(
        out, RecordingDenoiser()(x, sigma, {k: v for k, v in cond.items() if "uncond" not in k})
    )


def test_missing_uncond_context_means_zeros():
    x, sigma = torch.randn(1, 3, 4, 4), torch.tensor([1.0])
    context = torch.randn(1, 5, 8)
    implicit = CFGDenoiser(RecordingDenoiser(), 3.0)(x, sigma, {"context": context})
    explicit = CFGDenoiser(RecordingDenoiser(), 3.0)(
        x, sigma, {"context": context, "uncond_context": torch.zeros_like(context)}
    )
    torch.testing.assert_close(implicit, explicit)


def test_mismatched_uncond_shape_is_a_user_error():
    cond = {"context": torch.randn(1, 5, 8), "uncond_context": torch.randn(1, 7, 8)}
    with pytest.raises(InvalidInputError, match="uncond_context"):
        CFGDenoiser(RecordingDenoiser(), 3.0)(torch.randn(1, 3, 4, 4), torch.tensor([1.0]), cond)


def test_exposes_inner_sigma_range():
    den = CFGDenoiser(RecordingDenoiser(), 2.0)
    assert (den.sigma_min, den.sigma_max) == (0.03, 14.6)


def test_any_entry_with_an_uncond_twin_is_paired_and_the_rest_repeated():
    """SDXL's pooled vector: `y` with `uncond_y` goes (uncond, cond) into the doubled batch like the context;
    an entry without a twin (a low-res image) is repeated for both branches."""
    seen = {}

    def inner(x, sigma, cond):
        seen.update(cond)
        return x * 0

    x = torch.zeros(2, 1, 2, 2)
    cond = {"context": torch.ones(2, 3, 4), "y": torch.full((2, 5), 2.0), "uncond_y": torch.full((2, 5), -1.0),
            "x_low_res": torch.arange(2.0).view(2, 1)}  # fmt: skip
    CFGDenoiser(inner, 3.0)(x, torch.ones(2), cond)
    assert torch.equal(seen["y"], torch.cat([cond["uncond_y"], cond["y"]]))
    assert torch.equal(seen["context"], torch.cat([torch.zeros(2, 3, 4), cond["context"]]))
    assert torch.equal(seen["x_low_res"], torch.cat([cond["x_low_res"], cond["x_low_res"]]))
    assert not any(k.startswith("uncond_") for k in seen)
    with pytest.raises(InvalidInputError, match="cond.uncond_y: shape"):
        CFGDenoiser(inner, 3.0)(x, torch.ones(2), cond | {"uncond_y": torch.zeros(2, 4)})

"""Exponential moving average of a task's model weights (the weights that are sampled and exported)."""

from __future__ import annotations

import torch


class EMA:
    """Shadow copy of a `model_state_dict()`: `shadow = decay * shadow + (1 - decay) * live` after each step.

    Until `start_step` optimizer steps have been taken the shadow simply tracks the live weights, so an EMA
    started late does not average in the random initialisation. With `warmup`, the n-th averaged step uses
    min(decay, (1 + n) / (10 + n)) (diffusers' EMAModel schedule): without it a run of a few hundred steps at
    decay 0.995 would still carry ~8% of the initial weights. Integer tensors (counters) are copied.
    """

    def __init__(
        self, state: dict[str, torch.Tensor], decay: float, start_step: int = 0, warmup: bool = True
    ):
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.warmup = bool(warmup)
        self.shadow = {name: t.detach().clone() for name, t in state.items()}

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Fold in the live weights after optimizer step number `step` (1-based)."""
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay_at(step)
        for name, live in state.items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.lerp_(live.detach().to(shadow.dtype), weight)
            else:
                shadow.copy_(live)

    def decay_at(self, step: int) -> float:
        """The decay applied by the update after optimizer step `step` (past start_step)."""
        if not self.warmup:
            return self.decay
        averaged = step - self.start_step
        return min(self.decay, (1 + averaged) / (10 + averaged))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            from t2i.errors import WeightsMismatchError

            raise WeightsMismatchError(f"EMA weights: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                shadow.copy_(state[name])

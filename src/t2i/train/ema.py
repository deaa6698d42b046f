"""Exponential moving average of a task's model weights (the weights that are sampled and exported)."""

from __future__ import annotations

import torch


class EMA:
    """Shadow copy of a `model_state_dict()`: `shadow = decay * shadow + (1 - decay) * live` after each step.

    Until `start_step` optimizer steps have been taken the shadow simply tracks the live weights, so an EMA
    started late does not average in the random initialisation. Integer tensors (counters) are copied.
    """

    def __init__(self, state: dict[str, torch.Tensor], decay: float, start_step: int = 0):
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.shadow = {name: t.detach().clone() for name, t in state.items()}

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Fold in the live weights after optimizer step number `step` (1-based)."""
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay
        for name, live in state.items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.lerp_(live.detach().to(shadow.dtype), weight)
            else:
                shadow.copy_(live)

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

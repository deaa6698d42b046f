"""Exponential moving average of a task's model weights (the weights that are sampled and exported)."""

from __future__ import annotations

import torch


class EMA:
    """Shadow copy of a `model_state_dict()`: `shadow = decay * shadow + (1 - decay) * live` after each step.

    Until `start_step` optimizer steps have been taken the shadow simply tracks the live weights, so an EMA
    started late does not average in the random initialisation. With `warmup`, the n-th averaged step uses
    min(decay, (1 + n) / (10 + n)) (diffusers' EMAModel schedule): without it a run of a few hundred steps at
    decay 0.995 would still carry ~8% of the initial weights. Integer tensors (counters) are copied.

    `device` places the shadow (None: beside each live tensor; "cpu": host memory, which frees 4 bytes per
    float32 parameter on the accelerator). `update_every` N folds the live weights in only after steps that are
    multiples of N, with the decay raised to the N-th power so the averaging horizon stays the same; with a CPU
    shadow that amortises the device-to-host copy. N = 1 is the plain per-step EMA.
    """

    def __init__(
        self,
        state: dict[str, torch.Tensor],
        decay: float,
        start_step: int = 0,
        warmup: bool = True,
        device: str | torch.device | None = None,
        update_every: int = 1,
    ):
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.warmup = bool(warmup)
        self.update_every = int(update_every)
        self.device = None if device is None else torch.device(device)
        self.shadow = {name: t.detach().to(device=self.device or t.device, copy=True) for name, t in state.items()}

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Fold in the live weights after optimizer step number `step` (1-based)."""
        if step % self.update_every:
            return
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay_at(step) ** self.update_every
        same_device: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for name, live in state.items():
            shadow, live = self.shadow[name], live.detach()
            if not shadow.is_floating_point():
                shadow.copy_(live)
            elif live.device == shadow.device:
                same_device[0].append(shadow)
                same_device[1].append(live.to(shadow.dtype))
            else:  # one tensor at a time, so a CPU shadow never needs a second full copy of the weights
                shadow.lerp_(live.to(device=shadow.device, dtype=shadow.dtype), weight)
        if same_device[0]:
            torch._foreach_lerp_(same_device[0], same_device[1], weight)

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

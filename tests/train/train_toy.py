"""A tiny DiffusionTask for the trainer tests: an MLP eps-predictor on random vectors, no real model needed."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from t2i.config import build_config
from t2i.train.task import DiffusionTask

DIM = 8


def sample_vector(index: int) -> torch.Tensor:
    """Global data sample `index`: the same vector whatever the rank or batch layout."""
    return torch.randn(DIM, generator=torch.Generator().manual_seed(1000 + index))


def sample_noise(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(50_000 + index)
    return torch.randn(DIM, generator=gen), torch.rand((), generator=gen)


class ToyData:
    """Per-rank batches of a global batch stream; `num_batches` per epoch. Step s of rank r gets global samples
    [s*G + r*b, s*G + (r+1)*b) with G = b * world_size. Optionally stateful (saves its position)."""

    def __init__(self, batch_size: int, rank: int, world_size: int, num_batches: int, stateful: bool):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_batches, self.position = num_batches, 0
        if stateful:
            self.state_dict = lambda: {"position": self.position}
            self.load_state_dict = lambda s: setattr(self, "position", int(s["position"]))

    def __iter__(self):
        while self.position < self.num_batches:
            start = self.position * self.batch_size * self.world_size + self.rank * self.batch_size
            idx = list(range(start, start + self.batch_size))
            self.position += 1
            noise, t = zip(*(sample_noise(i) for i in idx))
            yield {"x": torch.stack([sample_vector(i) for i in idx]), "noise": torch.stack(noise),
                   "t": torch.stack(t), "captions": [f"sample {i}" for i in idx]}
        self.position = 0


class ToyTask(DiffusionTask):
    """x_t = sqrt(1-t) x0 + sqrt(t) eps; loss = |net(x_t, t) - eps|^2. A frozen layer checks freezing."""

    def __init__(self, dropout: float = 0.0, noise_from_batch: bool = False, num_batches: int = 1000,
                 stateful_data: bool = False, fail_at_call: int | None = None):
        super().__init__()
        torch.manual_seed(0)  # the frozen layer is not checkpointed: every instance must build it identically
        self.net = nn.Sequential(nn.Linear(DIM + 1, 32), nn.SiLU(), nn.Dropout(dropout), nn.Linear(32, DIM))
        self.frozen = nn.Linear(DIM, DIM)
        self.frozen.requires_grad_(False)
        self.noise_from_batch, self.num_batches, self.stateful_data = noise_from_batch, num_batches, stateful_data
        self.fail_at_call, self.calls = fail_at_call, 0
        self.exported: list[Path] = []

    def build_dataloader(self, cfg, rank, world_size):
        return ToyData(cfg.data.batch_size, rank, world_size, self.num_batches, self.stateful_data)

    def training_loss(self, batch, generator):
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        device = self.net[0].weight.device
        x0 = batch["x"].to(device)
        if self.noise_from_batch:
            noise, t = batch["noise"].to(device), batch["t"].to(device)
        else:
            noise = torch.randn(x0.shape, generator=generator, device=device)
            t = torch.rand(x0.shape[0], generator=generator, device=device)
        x_t = (1 - t).sqrt()[:, None] * x0 + t.sqrt()[:, None] * noise
        pred = self.net(torch.cat([self.frozen(x_t), t[:, None]], dim=1))
        return (pred.float() - noise).pow(2).mean()

    def sample_images(self, prompts, seed):
        gen = torch.Generator().manual_seed(seed)
        images = []
        for _ in prompts:
            x = torch.randn(1, DIM, generator=gen).to(self.net[0].weight.device)
            value = self.net(torch.cat([x, torch.ones_like(x[:, :1])], 1)).tanh()[0].cpu()
            side = int(math.sqrt(DIM * 2))
            pixels = ((value.repeat(2)[: side * side].reshape(side, side) + 1) * 127.5).byte().numpy()
            images.append(Image.fromarray(pixels, mode="L").resize((16, 16)))
        return images

    def data_stats(self):
        return {"skipped": 0}


def toy_config(tmp_path: Path, optim: dict | None = None, batch_size: int = 4, **trainer) -> object:
    """A RunConfig for the toy task: constant LR unless overridden, no progress bar, writes under tmp_path."""
    base = {"log_every": 2, "sample_every": 0, "checkpoint_every": 0, "max_steps": 4, "grad_clip": None,
            "progress_bar": False, "out_dir": str(tmp_path), "ema": {"enabled": True, "decay": 0.9}}
    base.update(trainer)
    raw = {"name": "toy", "seed": 3, "model": {"kind": "autoencoder", "optim": {"lr": 1e-2, **(optim or {})}},
           "data": {"batch_size": batch_size}, "trainer": base}
    return build_config(raw)

"""Run under torchrun by test_distributed.py: one training step of the toy task, then save this rank's grads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from train_toy import ToyTask, toy_config

from t2i.train.trainer import train

if __name__ == "__main__":
    out_dir, strategy, batch_size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    task = ToyTask(noise_from_batch=True)
    cfg = toy_config(out_dir, max_steps=1, batch_size=batch_size, strategy=strategy, checkpoint_every=1,
                     log_every=1, ema={"enabled": strategy == "ddp", "decay": 0.9})
    result = train(cfg, task)
    grads = {name: p.grad.clone() for name, p in task.named_parameters() if p.grad is not None}
    weights = {name: p.detach().clone() for name, p in task.named_parameters()}
    torch.save({"grads": grads, "weights": weights, "losses": result.losses},
               out_dir / f"rank{os.environ['RANK']}.pt")

"""Run under torchrun by test_bucketed_training.py: a bucketed latent run on this rank's share of the aspect
shapes; saves this rank's losses and the keys and sizes of the batches it trained on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from test_bucketed_training import RecordingTask, bucketed_config

from t2i.train.trainer import train

if __name__ == "__main__":
    root, shards, out_dir, resume = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    cfg = bucketed_config(root, shards, out_dir, max_steps=4, checkpoint_every=2,
                          resume=None if resume == "none" else resume)  # fmt: skip
    task = RecordingTask(cfg)
    result = train(cfg, task)
    torch.save(
        {
            "losses": result.losses,
            "sizes": task.__dict__.get("sizes", []),
            "keys": task.__dict__.get("keys", []),
        },
        out_dir / f"rank{os.environ['RANK']}.pt",
    )

"""Run under torchrun by test_fsdp.py: the toy task (or the tiny flow task) trained with FSDP2 on gloo; each rank
saves the full weights, its losses and the EMA it ends with.

The worker makes the process group itself, so the trainer leaves it alive after `train` returns: gathering the
full weights afterwards is a collective, and one on a destroyed group aborts some runs at exit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from train_toy import ToyTask, toy_config

from t2i.train.distributed import full_params
from t2i.train.trainer import train

if __name__ == "__main__":
    out_dir, options = Path(sys.argv[1]), json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    if "flow_shards" in options:  # the tiny flow transformer, activation checkpointing on
        from test_flow_task import TRANSFORMER, tiny_flow_config

        from t2i.train.task import build_task

        cfg = tiny_flow_config(out_dir, options["flow_shards"],
                               transformer_config={**TRANSFORMER, "use_checkpoint": True})  # fmt: skip
        cfg.trainer.strategy, cfg.trainer.checkpoint_every, cfg.trainer.ema.enabled = "fsdp", 3, True
        cfg.data.batch_size = 2
        task = build_task(cfg)
    else:
        task = ToyTask(noise_from_batch=True, stateful_data=True)
        cfg = toy_config(out_dir, batch_size=options.pop("batch_size"), strategy="fsdp", **options)
    result = train(cfg, task)
    with full_params(task):
        weights = {name: p.detach().clone() for name, p in task.named_parameters()}
    ema = task.ema.state_dict() if task.ema is not None else None
    torch.save({"weights": weights, "losses": result.losses, "ema": ema}, out_dir / f"rank{os.environ['RANK']}.pt")
    dist.destroy_process_group()
    # A resumed FSDP2 run on gloo sometimes aborts in interpreter teardown ("terminate called without an active
    # exception") after everything above is written; leave without the teardown so the test sees the results.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

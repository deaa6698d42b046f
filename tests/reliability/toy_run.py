"""A toy training run in its own process, for the kill -9, lock and orphan tests (also runs under torchrun).

    python toy_run.py OUT --steps 12 --checkpoint-every 2 --keep-last 2 [--kill-at-call N]
                      [--kill-in-save STEP] [--kill-in-prune STEP] [--sleep S]

Kills are real SIGKILLs of this process, sent from inside it at an exact point: at the N-th training step of
this process, while the checkpoint of STEP is being written (after its weights, before state.pt), or while an
older checkpoint is being deleted after STEP was saved (every file of it gone but config.yaml). The hooks patch
`torch.save` and `shutil.rmtree`, which every t2i version calls there, so the test also runs against older code.

Writes OUT/pid-RANK when it starts, OUT/started-RANK at its first step and OUT/result-RANK.json at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import torch
from train_toy import ToyTask, toy_config

from t2i.train.trainer import train

RANK = os.environ.get("RANK", "0")


def run_config(out: Path, steps: int, checkpoint_every: int, keep_last: int, resume: bool):
    return toy_config(out, max_steps=steps, checkpoint_every=checkpoint_every, keep_last=keep_last, log_every=0,
                      resume="auto" if resume else None, ema={"enabled": True, "decay": 0.9})


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Task(ToyTask):
    def __init__(self, out: Path, kill_at_call: int | None, sleep: float):
        super().__init__(stateful_data=True)
        self.out, self.kill_at_call, self.sleep = out, kill_at_call, sleep

    def training_loss(self, batch, generator):
        if self.calls == 0:
            (self.out / f"started-{RANK}").write_text("1")
        if self.kill_at_call is not None and self.calls + 1 == self.kill_at_call:
            die()
        if self.sleep:
            time.sleep(self.sleep)
        return super().training_loss(batch, generator)


def install_kill_hooks(kill_in_save: int | None, kill_in_prune: int | None) -> None:
    saving = {"step": None}
    real_save, real_rmtree = torch.save, shutil.rmtree

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "ranks" in obj and "step" in obj:
            saving["step"] = obj["step"]
            if kill_in_save is not None and obj["step"] == kill_in_save:
                die()
        return real_save(obj, f, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        pruning = kill_in_prune is not None and saving["step"] == kill_in_prune
        if pruning and path.is_dir() and "ckpt-" in path.name and "tmp" not in path.name:
            for file in sorted(path.iterdir()):  # rmtree's order is the directory's; end with config.yaml left
                if file.is_file() and file.name != "config.yaml":
                    file.unlink()
            die()
        return real_rmtree(path, *args, **kwargs)

    torch.save = save
    shutil.rmtree = rmtree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--kill-at-call", type=int)
    parser.add_argument("--kill-in-save", type=int)
    parser.add_argument("--kill-in-prune", type=int)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pid-{RANK}").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    install_kill_hooks(args.kill_in_save, args.kill_in_prune)
    cfg = run_config(args.out, args.steps, args.checkpoint_every, args.keep_last, args.resume)
    result = train(cfg, Task(args.out, args.kill_at_call, args.sleep))
    (args.out / f"result-{RANK}.json").write_text(json.dumps({"step": result.step, "losses": result.losses}))


if __name__ == "__main__":
    main()

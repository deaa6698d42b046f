"""FSDP2 (`trainer.strategy: fsdp`, `t2i.train.sharding`) on the CPU with two gloo processes: the same losses and
weights as one process at the same global batch, exact resume, and a per-block shard plan for the backbones."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from train_toy import ToyTask, toy_config

from t2i.train.sharding import shard_plan
from t2i.train.trainer import train

WORKER = Path(__file__).with_name("fsdp_worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"
GLOBAL_BATCH = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_fsdp(out_dir: Path, **options) -> list[dict]:
    """Train the toy task with FSDP on 2 gloo processes; each rank's saved result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out_dir),
           json.dumps({"batch_size": GLOBAL_BATCH // 2, **options})]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def single_process(out_dir: Path, **options) -> tuple[ToyTask, list[float]]:
    task = ToyTask(noise_from_batch=True, stateful_data=True)
    result = train(toy_config(out_dir, batch_size=GLOBAL_BATCH, **options), task)
    return task, result.losses


def test_fsdp_on_two_processes_trains_as_one_process_and_resumes_exactly(tmp_path):
    options = {"max_steps": 4, "checkpoint_every": 2, "log_every": 1, "grad_clip": 1.0}
    ranks = torchrun_fsdp(tmp_path / "fsdp", **options)
    reference, losses = single_process(tmp_path / "single", **options)
    for name, param in reference.named_parameters():
        for rank in ranks:  # every rank holds the same full weights after unsharding
            torch.testing.assert_close(rank["weights"][name], param.detach(), atol=1e-6, rtol=0, msg=name)
    # each rank's loss is on its half of the global batch; their mean is the one-process loss
    per_step = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    torch.testing.assert_close(torch.tensor(per_step), torch.tensor(losses), atol=1e-6, rtol=0)
    for key, value in reference.ema.state_dict().items():
        torch.testing.assert_close(ranks[0]["ema"][key], value, atol=1e-6, rtol=0, msg=key)
    checkpoint = tmp_path / "fsdp" / "ckpt-000002"
    assert (checkpoint / "model.safetensors").is_file()

    resumed = torchrun_fsdp(tmp_path / "resumed", **options, resume=str(checkpoint))
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(resumed[0]["weights"][name], value), name  # resume is exact
    assert resumed[0]["losses"][-2:] == ranks[0]["losses"][-2:]


def test_the_flow_transformer_trains_sharded_per_block_with_activation_checkpointing(tmp_path):
    from t2i.data.shapes import write_shapes_dataset
    from t2i.train.checkpoint import load_weights

    write_shapes_dataset(tmp_path / "shapes", 8, 16, seed=0, shard_size=8)
    ranks = torchrun_fsdp(tmp_path / "flow", flow_shards=str(tmp_path / "shapes" / "shapes-00000.tar"))
    assert len(ranks[0]["losses"]) == 3 and all(torch.isfinite(torch.tensor(ranks[0]["losses"])))
    saved = load_weights(tmp_path / "flow" / "run" / "ckpt-000003", use_ema=False)
    for name, value in ranks[0]["weights"].items():  # the same full weights on every rank
        assert torch.equal(ranks[1]["weights"][name], value), name
    transformer = {k.removeprefix("transformer."): v for k, v in ranks[0]["weights"].items()
                   if k.startswith("transformer.")}  # fmt: skip
    assert set(saved) >= set(transformer) and any(k.startswith("double_blocks.") for k in saved)
    for name, value in transformer.items():  # and full tensors in the checkpoint
        assert torch.equal(saved[name], value), name


def test_a_ddp_checkpoint_does_not_resume_under_fsdp(tmp_path):
    single_process(tmp_path / "single", max_steps=2, checkpoint_every=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(tmp_path / "fsdp"),
           json.dumps({"batch_size": 2, "max_steps": 4, "resume": str(tmp_path / "single" / "ckpt-000002")})]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "optimizer state was saved with ddp; resume it with trainer.strategy=ddp" in proc.stderr


def test_shard_plan_is_per_block_and_leaves_frozen_parts_whole():
    from t2i.models.flux import FluxTransformer

    class Task(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = FluxTransformer(in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=8,
                                               hidden_size=32, num_heads=2, depth=2, depth_single_blocks=3,
                                               axes_dim=[4, 6, 6])  # fmt: skip
            self.vae = torch.nn.Conv2d(3, 4, 3)
            self.vae.requires_grad_(False)

    task = Task()
    plan = shard_plan(task)
    t = task.transformer
    assert plan == [*t.double_blocks, *t.single_blocks, t]
    assert task.vae not in plan
    toy = ToyTask()
    assert shard_plan(toy) == [toy.net[0], toy.net[3]]

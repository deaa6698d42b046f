"""Two gloo processes under torchrun see the same gradients as one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_toy import ToyTask, toy_config

from t2i.train.trainer import train

WORKER = Path(__file__).with_name("ddp_worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(out_dir: Path, strategy: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out_dir), strategy,
           str(4 // nproc)]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)


def _single_process_reference(tmp_path: Path) -> ToyTask:
    task = ToyTask(noise_from_batch=True)
    task.losses_seen = train(toy_config(tmp_path / "single", max_steps=1, batch_size=4), task).losses
    return task


def test_ddp_gradients_match_single_process(tmp_path):
    proc = _torchrun(tmp_path / "ddp", "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference = _single_process_reference(tmp_path)
    for name, param in reference.named_parameters():
        if not param.requires_grad:
            assert name not in ranks[0]["grads"]
            continue
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name].cpu(), param.grad.cpu(), atol=1e-6, rtol=0, msg=name)
            torch.testing.assert_close(rank["weights"][name].cpu(), param.detach().cpu(), atol=1e-6, rtol=0,
                                       msg=name)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank saw its own half of the batch
    state = torch.load(tmp_path / "ddp" / "ckpt-000001" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"]["generator"], state["ranks"][1]["rng"]["generator"])


@pytest.mark.gpu
def test_fsdp_one_gpu_matches_plain_training(tmp_path):
    proc = _torchrun(tmp_path / "fsdp", "fsdp", nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "fsdp" / "rank0.pt", weights_only=True)
    reference = _single_process_reference(tmp_path)
    assert rank0["losses"][0] == pytest.approx(reference.losses_seen[0], rel=1e-5)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(rank0["weights"][name].cpu(), param.detach().cpu(), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "fsdp" / "ckpt-000001" / "model.safetensors").is_file()

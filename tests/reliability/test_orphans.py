"""A 2-process gloo run under torchrun: a second job on its folder is refused while it runs, and killing the
launcher with kill -9 takes its workers down within 10 s (they used to go on training and writing checkpoints)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("toy_run.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as gone: it trains no more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(condition, timeout: float, what: str) -> None:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


@pytest.mark.hang
@pytest.mark.timeout(240)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_killed_launcher_takes_its_workers_down_and_the_lock_refuses_a_second_job(tmp_path):
    from train_toy import ToyTask, toy_config

    from t2i.errors import T2IError
    from t2i.train.trainer import train

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT), str(out), "--steps", "1000000",
           "--checkpoint-every", "20", "--sleep", "0.02"]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        _wait_for(lambda: all((out / f"started-{r}").exists() for r in (0, 1)) or launcher.poll() is not None,
                  150, "both workers training")
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        workers = [int((out / f"pid-{r}").read_text()) for r in (0, 1)]

        try:  # both halves are checked before asserting, so each failure shows
            train(toy_config(out, max_steps=1), ToyTask())
            refusal = None
        except T2IError as err:
            refusal = err

        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in workers if _alive(pid)]

        problems = [] if refusal is not None else ["a second job trained in the busy folder"]
        if survivors:
            problems.append(f"workers {survivors} still running 10 s after the launcher's kill -9")
        assert not problems, "; ".join(problems)
        assert type(refusal).__name__ == "RunFolderBusyError" and "\n" not in str(refusal)
        assert f"pid {workers[0]} on {socket.gethostname()}" in str(refusal)
        assert "the torchrun launcher" in launcher.stderr.read()

        from t2i.train.runlock import acquire_run_lock

        with acquire_run_lock(out):  # the lock died with its holder: the folder is free again
            pass
    finally:
        for pid in [launcher.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(timeout=10)

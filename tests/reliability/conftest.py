"""Shared pieces of the reliability battery (issue 17): bad inputs must end in a one-line error, a counted skip
or a correct result; never a hang, a traceback or a silent wrong answer.

Each case carries the marker of what the code did before the fix (`hang`, `traceback`, `silent`), so
`pytest tests/reliability -m hang` runs the former hangs; imports of t2i modules that did not exist before the
fix are made inside the tests, so the battery also runs (and fails case by case) against older code.
"""

from __future__ import annotations

import io
import signal
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TRAIN_TESTS = Path(__file__).resolve().parents[1] / "train"
if str(TRAIN_TESTS) not in sys.path:
    sys.path.insert(0, str(TRAIN_TESTS))

# A VAE small enough that `t2i train` builds it in well under a second (16 px, one downsampling).
TINY_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def pytest_configure(config):
    for name, what in (("hang", "spun forever before the fix"), ("traceback", "ended in a traceback before the fix"),
                       ("silent", "gave a silent wrong answer (or a misleading message) before the fix"),
                       ("deadline(seconds)", "fail the test (DeadlineExceeded) once it runs that long")):
        config.addinivalue_line("markers", f"{name}: {what}")


class DeadlineExceeded(BaseException):
    """Raised into a test that outlives its `deadline` marker."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """`@pytest.mark.deadline(S)`: DeadlineExceeded in the test after S seconds, repeated every second until the
    test function returns (the timer is off again before pytest formats the report).

    pytest-timeout's single SIGALRM is lost when it lands in a finalizer (`__del__` swallows exceptions), which
    a loop that spins through generators and files hits often; re-arming the timer makes the deadline hold.
    """
    marker = item.get_closest_marker("deadline")
    if marker is None or threading.current_thread() is not threading.main_thread():
        return (yield)
    seconds = float(marker.args[0])

    def expire(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        raise DeadlineExceeded(f"still running after {seconds:g} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def image_bytes(fmt: str = "PNG", seed: int = 0, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def one_line_error(capsys, argv: list[str], *fragments: str, after_progress: bool = False) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one stderr line `t2i CMD: error: ...` with `fragments`.

    `after_progress`: the error may follow a progress bar (carriage-return-separated tqdm updates).
    """
    from t2i.cli.main import main

    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}, stderr: {err[-2000:]}"
    if after_progress:
        bar, _, err = err.rstrip("\n").rpartition("\n")
        assert "Traceback" not in bar and all("\r" in line or not line for line in bar.split("\n")), bar
        err += "\n"
    assert err.startswith(f"t2i {argv[0]}: error: ") and err.count("\n") == 1, err[-2000:]
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err.strip()


def assert_one_line(err: BaseException, cls: type, *fragments: str) -> str:
    """`err` is a `cls` whose message is one line containing every fragment."""
    assert isinstance(err, cls), f"{type(err).__name__}: {err}"
    message = str(err)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def autoencoder_config(root: Path, data: list[str] | str, **data_options) -> Path:
    """A YAML config training the tiny VAE on `data` (out_dir under `root`)."""
    from omegaconf import OmegaConf

    config = {"name": "rel", "model": {"kind": "autoencoder", "embed_dim": 4, "ddconfig": TINY_DDCONFIG},
              "data": {"train": data if isinstance(data, list) else [data], "resolution": 16, "batch_size": 2,
                       **data_options},
              "trainer": {"max_steps": 2, "log_every": 0, "checkpoint_every": 0, "progress_bar": False,
                          "out_dir": str(root / "run"), "ema": {"enabled": False}}}
    path = root / "rel.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    return path


@pytest.fixture
def single_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

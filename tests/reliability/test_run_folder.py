"""The run folder: one job at a time, checkpoints listed only when complete, leftovers swept, a damaged newest
checkpoint skipped with a reason, pickles refused with a reason, and full disks reported with path and bytes."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from train_toy import ToyTask, toy_config

from conftest import assert_one_line
from t2i.train.trainer import train


def _run(out: Path, steps: int = 6, every: int = 3, **kwargs):
    return train(toy_config(out, max_steps=steps, checkpoint_every=every, keep_last=kwargs.pop("keep_last", 5),
                            **kwargs), ToyTask())


# ------------------------------------------------------------------------------------------- one job per folder


@pytest.mark.silent
def test_second_job_on_a_busy_folder_is_refused_with_the_holder(tmp_path):
    """(The orphan test does the same with the lock held by a torchrun worker in another process.)"""
    from t2i.errors import RunFolderBusyError
    from t2i.train.runlock import acquire_run_lock

    out = tmp_path / "run"
    with acquire_run_lock(out):
        with pytest.raises(RunFolderBusyError) as refused:
            _run(out)
        assert_one_line(refused.value, RunFolderBusyError, f"trainer.out_dir {out}: in use by pid {os.getpid()} on",
                        "t2i.lock", "choose another out_dir")
        assert sorted(p.name for p in out.iterdir()) == ["t2i.lock"]  # the refused job wrote nothing
    assert _run(out, steps=2, every=2).step == 2


def test_stale_lock_file_of_a_dead_job_is_taken_over(tmp_path, caplog):
    (tmp_path / "t2i.lock").write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="t2i.train"):
        assert _run(tmp_path, steps=2, every=2).step == 2
    assert "took over the stale lock of pid 999999 on elsewhere" in caplog.text
    assert not (tmp_path / "t2i.lock").exists()  # released at the end


# ------------------------------------------------------------------------------------------- complete or absent


def _half_deleted(path: Path, keep: tuple[str, ...]) -> None:
    for file in path.iterdir():
        if file.name not in keep:
            file.unlink()


@pytest.mark.silent
def test_checkpoint_missing_its_weights_is_not_listed_and_resume_stays_exact(tmp_path):
    full = _run(tmp_path / "full", steps=9)
    _run(tmp_path / "run", steps=9)
    shutil.rmtree(tmp_path / "run" / "ckpt-000009")
    _half_deleted(tmp_path / "run" / "ckpt-000006", keep=("state.pt", "config.yaml"))  # a prune killed halfway
    resumed = _run(tmp_path / "run", steps=9, resume="auto")
    assert resumed.losses == full.losses  # resumed from ckpt-000003: the half-deleted one was never listed


@pytest.mark.silent
def test_folders_left_by_killed_prunes_and_saves_are_swept(tmp_path, caplog):
    from t2i.train import checkpoint as ckpt_io

    _run(tmp_path, steps=3, every=3)
    leftovers = ["ckpt-000001", "ckpt-000002", "ckpt-000004", "ckpt-000005"]
    for name in leftovers:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("name: x\n")  # all that a killed rmtree may leave
    for name in ("ckpt-000007.tmp", "ckpt-000003.old", ".trash-ckpt-000000-1-0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".loss.png.123.t2i-tmp").write_bytes(b"partial png")
    with caplog.at_level(logging.WARNING, logger="t2i.train"):
        _run(tmp_path, steps=12, every=3, keep_last=3, resume="auto")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("ckpt-", "."))) == [
        "ckpt-000006", "ckpt-000009", "ckpt-000012"]
    assert "removed leftovers of an interrupted run" in caplog.text and "ckpt-000007.tmp" in caplog.text
    assert [ckpt_io.verify_checkpoint(p) for p in ckpt_io.list_checkpoints(tmp_path)] == [None, None, None]


def test_marker_records_every_file_and_legacy_checkpoints_still_resume(tmp_path):
    from t2i.train import checkpoint as ckpt_io

    full = _run(tmp_path / "full", steps=6)
    _run(tmp_path / "run", steps=3, every=3)
    ckpt = tmp_path / "run" / "ckpt-000003"
    marker = json.loads((ckpt / "complete.json").read_text())
    assert marker["step"] == 3
    assert marker["files"] == {p.name: p.stat().st_size for p in ckpt.iterdir() if p.name != "complete.json"}
    (ckpt / "complete.json").unlink()  # as written by t2i before markers existed
    assert ckpt_io.list_checkpoints(tmp_path / "run") == [ckpt] and ckpt_io.verify_checkpoint(ckpt) is None
    assert _run(tmp_path / "run", steps=6, resume="auto").losses == full.losses


# ------------------------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.traceback
@pytest.mark.parametrize("damaged", ["model.safetensors", "ema.safetensors", "state.pt"])
def test_resume_auto_skips_a_truncated_newest_checkpoint(tmp_path, caplog, damaged):
    full = _run(tmp_path / "full", steps=9)
    _run(tmp_path / "run", steps=6)
    _truncate(tmp_path / "run" / "ckpt-000006" / damaged)
    with caplog.at_level(logging.WARNING, logger="t2i.train"):
        resumed = _run(tmp_path / "run", steps=9, resume="auto")
    assert resumed.losses == full.losses  # continued exactly from ckpt-000003
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "ckpt-000006" in skipped[0] and damaged in skipped[0], caplog.text


@pytest.mark.traceback
def test_resume_from_a_named_truncated_checkpoint_is_one_line(tmp_path):
    from t2i.errors import PipelineLoadError

    _run(tmp_path / "run", steps=3)
    _truncate(tmp_path / "run" / "ckpt-000003" / "model.safetensors")
    with pytest.raises(PipelineLoadError) as caught:  # a CheckpointError
        _run(tmp_path / "other", steps=6, resume=str(tmp_path / "run" / "ckpt-000003"))
    assert_one_line(caught.value, PipelineLoadError, "ckpt-000003", "model.safetensors", "truncated")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.traceback
@pytest.mark.parametrize("content", ["pickled_code", "garbage"])
def test_poisoned_or_corrupt_state_pt_is_refused_with_the_reason(tmp_path, content):
    from t2i.errors import PipelineLoadError

    _run(tmp_path / "run", steps=3)
    ckpt = tmp_path / "run" / "ckpt-000003"
    state = ckpt / "state.pt"
    if content == "pickled_code":
        torch.save({"step": 3, "payload": _Payload()}, state)
        expected = (str(state), "refused to load", "GLOBAL", "posix.system" if os.name == "posix" else "system")
    else:
        state.write_bytes(pickle.dumps({"not": "a torch archive"}))
        expected = (str(ckpt), "state.pt is not a complete torch archive")
    (ckpt / "complete.json").unlink(missing_ok=True)  # a legacy checkpoint: nothing records the original size
    with pytest.raises(PipelineLoadError) as caught:
        _run(tmp_path / "other", steps=6, resume=str(ckpt))
    assert_one_line(caught.value, PipelineLoadError, *expected)


# ------------------------------------------------------------------------------------------- full disks


def _full_disk_for(monkeypatch, names: set[str], after: int = 0) -> dict:
    """Writes of files named in `names` go to /dev/full (every write(2) fails with ENOSPC) after `after` of them."""
    from t2i import atomic

    real_open = atomic.open_for_writing
    seen = {"count": 0}

    def open_for_writing(path: Path):
        if Path(path).name in names or any(Path(path).name.startswith(f".{n}.") for n in names):
            seen["count"] += 1
            if seen["count"] > after:
                return open("/dev/full", "wb")
        return real_open(path)

    monkeypatch.setattr(atomic, "open_for_writing", open_for_writing)
    return seen


@pytest.mark.traceback
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("name", ["state.pt", "model.safetensors"])
def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                        name):
    from t2i.errors import DiskFullError
    from t2i.train import checkpoint as ckpt_io

    _full_disk_for(monkeypatch, {name}, after=1)  # ckpt-000003 is written, ckpt-000006 hits the full disk
    with pytest.raises(DiskFullError) as caught:
        _run(tmp_path, steps=6)
    message = assert_one_line(caught.value, DiskFullError, "no space left on device writing",
                              str(tmp_path / "ckpt-000006.tmp" / name), "needs ", " free there")
    assert "basic_ios" not in message
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-")] == ["ckpt-000003"]
    assert ckpt_io.verify_checkpoint(tmp_path / "ckpt-000003") is None


@pytest.mark.traceback
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_while_plotting_keeps_the_old_plot_and_the_run(tmp_path, monkeypatch, capsys):
    _run(tmp_path / "first", steps=2, every=0)
    good_png = (tmp_path / "first" / "loss.png").read_bytes()
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss.png").write_bytes(good_png)
    _full_disk_for(monkeypatch, {"loss.png"})
    result = _run(out, steps=4, every=0)
    assert result.step == 4
    assert (out / "loss.png").read_bytes() == good_png  # not truncated: the old file stands
    assert not [p.name for p in out.iterdir() if p.name.endswith(".t2i-tmp")]
    printed = capsys.readouterr().out
    assert f"no space left on device writing {out / 'loss.png'} (needs " in printed

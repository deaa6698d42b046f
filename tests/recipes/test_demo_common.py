"""The demos' shared plumbing: threads picked per phase from the cores other work leaves idle."""

from __future__ import annotations

import pytest

from t2i.recipes import demo_common


@pytest.mark.parametrize(
    ("busy_percent", "cores", "threads"),
    [(1.0, 2, 2), (30.0, 2, 1), (50.0, 2, 1), (100.0, 2, 1), (10.0, 8, 7), (0.0, 1, 1)],
)
def test_auto_threads_uses_one_thread_per_idle_core(monkeypatch, busy_percent, cores, threads):
    import psutil

    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: busy_percent)
    monkeypatch.setattr(demo_common, "_usable_cores", lambda: cores)
    assert demo_common.auto_threads() == threads


def test_phase_timer_sets_and_records_threads(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(demo_common, "auto_threads", lambda: 1)
    timer = demo_common.PhaseTimer()
    try:
        assert timer.run("a", torch.get_num_threads) == 1
        fixed = demo_common.PhaseTimer(threads=2)
        assert fixed.run("b", torch.get_num_threads) == 2
    finally:
        torch.set_num_threads(before)
    assert timer.threads == {"a": 1} and fixed.threads == {"b": 2} and set(timer.seconds) == {"a"}

"""Checking a state dict against the keys a model expects, with the one-line error every loader raises."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from t2i.errors import WeightsMismatchError


def check_state_keys(state: Mapping[str, Any], expected: Iterable[str], what: str, source: str) -> None:
    """WeightsMismatchError naming the first missing and unexpected keys unless `state` has exactly `expected`."""
    expected = list(expected)
    wanted = set(expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in wanted]
    if missing or unexpected:
        raise WeightsMismatchError(
            f"{source}: {what} weights do not match the config; missing {missing[:3]} ({len(missing)} total), "
            f"unexpected {unexpected[:3]} ({len(unexpected)} total)"
        )

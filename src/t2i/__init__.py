"""t2i: train, fine-tune and run text-to-image diffusion models in plain PyTorch.

Heavy imports (torch, transformers) happen on first use, so `import t2i` and `t2i --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": "t2i.pipelines.loading",
    "load_cascade": "t2i.pipelines.cascade",
    "load_config": "t2i.config",
    "save_single_file": "t2i.pipelines.single_file_save",
    "T2IError": "t2i.errors",
}

__all__ = ["__version__", *sorted(_LAZY)]  # noqa: PLE0604 (the keys are strings)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 't2i' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

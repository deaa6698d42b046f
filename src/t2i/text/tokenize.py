"""Local-folder resolution and tokenization shared by the text encoders. Nothing here touches a hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from t2i.errors import PipelineLoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")


def model_folder(path: str | Path | None, subfolder: str, what: str) -> Path:
    """The folder holding a Hugging Face model: `path` itself, or `path/subfolder` for a pipeline root.

    Raises PipelineLoadError naming the path and `what` was expected when neither has a config.json.
    """
    if path is None:
        raise PipelineLoadError(f"text encoder path: missing; expected {what}")
    folder = Path(path)
    if (folder / subfolder / "config.json").is_file():
        return folder / subfolder
    if (folder / "config.json").is_file():
        return folder
    raise PipelineLoadError(f"{folder}: not found or has no config.json; expected {what}")


def tokenizer_folder(path: str | Path | None, model_dir: Path | None, subfolder: str = "tokenizer") -> Path:
    """Where to read the tokenizer: an explicit `path` (or its `tokenizer/`), else beside the model.

    For a model under `root/text_encoder`, `root/tokenizer` is tried first (the diffusers layout); for
    `root/text_encoder_2` (SDXL), `root/tokenizer_2`, never the first encoder's tokenizer.
    """
    candidates: list[Path] = []
    if path is not None:
        candidates += [Path(path) / subfolder, Path(path)]
    elif model_dir is not None:
        sibling = model_dir.name.replace("text_encoder", "tokenizer", 1)
        if sibling == model_dir.name:
            sibling = subfolder
        candidates += [model_dir.parent / sibling, model_dir]
    for folder in candidates:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    named = path if path is not None else model_dir
    raise PipelineLoadError(
        f"{named}: no tokenizer found; expected a tokenizer folder ({', '.join(TOKENIZER_FILES[:3])}, ...)"
    )


def load_hf_model(cls: Any, folder: Path, what: str, **options: Any) -> Any:
    """`cls.from_pretrained(folder, **options)` offline; a load failure becomes a PipelineLoadError naming the
    folder."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **options)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineLoadError(
            f"{folder}: cannot load ({exc.__class__.__name__}: {exc}); expected {what}"
        ) from exc


def model_options(variant: str | None = None, dtype: Any = None, folder: Path | None = None) -> dict[str, Any]:
    """from_pretrained options for a text model: the weights `variant` (fp16 files; a `folder` without them is
    read from its plain files) and the dtype to hold them in (float32 unless asked: transformers would keep an
    fp16 file in fp16, which the CPU runs slowly and coarsely)."""
    import torch

    from t2i.models.weights import has_variant

    use_variant = variant and (folder is None or has_variant(Path(folder), variant))
    return {"dtype": dtype or torch.float32, **({"variant": variant} if use_variant else {})}


def load_tokenizer(folder: Path) -> Any:
    """AutoTokenizer from a local folder only; a broken folder becomes a PipelineLoadError."""
    from transformers import AutoTokenizer

    return load_hf_model(AutoTokenizer, folder, "HF tokenizer files")


def tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to `max_length` and truncate, as diffusers does, warning once per call when a prompt loses tokens.
    Returns input_ids (B, T) long and mask (B, T) bool."""
    warn_if_truncated(tokenizer, prompts, max_length)
    batch = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"].bool()


_WARNED_TRUNCATION: set[tuple[int, int]] = set()


def warn_if_truncated(tokenizer: Any, prompts: list[str], max_length: int) -> int:
    """Return the tokens the encoder's context drops from `prompts`, and warn the first time a tokenizer drops any
    (once per tokenizer and length per process, so that a training run over long captions warns once, not per
    batch)."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False)["input_ids"]]
    over = [(i, n - max_length) for i, n in enumerate(lengths) if n > max_length]
    key = (id(tokenizer), max_length)
    if over and key not in _WARNED_TRUNCATION:
        import warnings

        _WARNED_TRUNCATION.add(key)
        first, dropped = over[0]
        warnings.warn(
            f"{len(over)} prompt(s) exceed the text encoder's {max_length} tokens and were truncated "
            f"({sum(d for _, d in over)} tokens dropped; prompt {first} lost {dropped}); later truncations by this "
            "tokenizer are not reported", stacklevel=4,
        )  # fmt: skip
    return sum(d for _, d in over)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, D) over the positions where mask (B, T) is True -> (B, D)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

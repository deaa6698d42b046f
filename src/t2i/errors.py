"""Errors a user can cause. Each carries a one-line message; the CLI prints it without a traceback."""

from __future__ import annotations


def _original_message(text: str, class_name: str) -> str:
    """The message of an error re-raised by a DataLoader worker ("Caught X in DataLoader worker ...").

    torch re-raises a worker's exception in the main process as ``X("Caught X in ... Original Traceback ...")``;
    the last line of that traceback is ``module.X: <the one-line message>``.
    """
    where = text.splitlines()[0].removeprefix(f"Caught {class_name} ").rstrip(".")
    for line in reversed(text.splitlines()):
        head, sep, message = line.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == class_name:
            return f"{message} ({where})"
    return text.splitlines()[0]


class T2IError(Exception):
    """Base class for every error a user can cause (bad path, bad config, bad input).

    An error raised in a DataLoader worker process keeps its one-line message when torch re-raises it in
    the main process (the worker's traceback is dropped).
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "\nOriginal Traceback" in args[0]:
            args = (_original_message(args[0], type(self).__name__),)
        super().__init__(*args)


class ConfigError(T2IError):
    """A config key, type or value is invalid. The message names the key and what was expected."""


class PipelineLoadError(T2IError):
    """A path is missing or is not a pipeline, checkpoint or run that t2i can load."""


class WeightsMismatchError(T2IError):
    """A state dict has missing or unexpected keys; the message names the first few."""


class InvalidInputError(T2IError):
    """An argument to generate/sample/reconstruct is invalid (size, prompt list, strength...)."""


class UnknownSamplerError(InvalidInputError):
    """A sampler name that is not registered; the message lists the valid ones."""


class DataError(T2IError):
    """A dataset that cannot be read at all, or yields no usable sample in a whole pass (bad samples are
    skipped and counted, not raised)."""


class LoraError(T2IError):
    """A LoRA file with unknown or unmatched keys, or a bad LoRA config."""


class CheckpointError(PipelineLoadError):
    """A training checkpoint that is incomplete, truncated, or holds something other than inert tensors."""


class RunFolderBusyError(T2IError):
    """Another job holds the lock of a run folder (`trainer.out_dir`); the message names the holder."""


class DiskFullError(T2IError):
    """No space left on the device while writing a file; the message names the path and the bytes needed."""


class SamplingError(T2IError):
    """Sampling produced non-finite values (a NaN/inf guidance scale, LoRA weight or overflowing dtype)."""


def checked_arguments(fn):
    """Decorator: a call with an unknown or missing argument raises a one-line `InvalidInputError` naming it (with
    the closest valid name) instead of Python's TypeError traceback."""
    import difflib
    import functools
    import inspect

    signature = inspect.signature(fn)
    names = [n for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exn:
            unknown = [k for k in kwargs if k not in names]
            if unknown:
                close = difflib.get_close_matches(unknown[0], names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InvalidInputError(
                    f"{fn.__name__}: unknown argument {unknown[0]!r}{hint}; valid: {', '.join(names)}"
                ) from None
            raise InvalidInputError(f"{fn.__name__}: {exn}") from None
        return fn(*args, **kwargs)

    return call

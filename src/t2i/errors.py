"""Errors a user can cause. Each carries a one-line message; the CLI prints it without a traceback."""


class T2IError(Exception):
    """Base class for every error a user can cause (bad path, bad config, bad input)."""


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
    """A dataset path or pattern that cannot be read at all (bad samples are skipped, not raised)."""


class LoraError(T2IError):
    """A LoRA file with unknown or unmatched keys, or a bad LoRA config."""


class SamplingError(T2IError):
    """Sampling produced non-finite values (a NaN/inf guidance scale, LoRA weight or overflowing dtype)."""

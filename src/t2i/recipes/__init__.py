"""Experiments built from the library: the CPU demos of each family and the LoRA personalisation study. They sit
above train/ and pipelines/ (they train, export and sample), below the CLI that runs them."""

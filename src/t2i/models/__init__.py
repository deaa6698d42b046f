"""t2i.models."""

"""t2i.data."""

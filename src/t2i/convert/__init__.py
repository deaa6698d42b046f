"""t2i.convert."""

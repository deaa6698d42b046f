"""t2i.train."""

"""t2i.text."""

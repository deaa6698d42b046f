"""t2i.cli."""

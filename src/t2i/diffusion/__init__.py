"""t2i.diffusion."""

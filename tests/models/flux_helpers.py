"""The tiny Flux configuration shared by the Flux tests: 2 double + 2 single blocks, 4 heads of 16
(RoPE axes 4 + 6 + 6), 16-channel tokens (4 latent channels x 2 x 2), 32-d text, 24-d pooled vector."""

from __future__ import annotations

TINY = {
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 24,
    "context_in_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [4, 6, 6],
    "theta": 10_000,
    "qkv_bias": True,
    "guidance_embed": True,
    "patch_size": 2,
}

"""Flux: the rectified-flow transformer of FLUX.1 (Black Forest Labs, 2024), written as our own code.

The network predicts the flow velocity v of x_t = (1 - t) x0 + t noise. The diffusion side recovers x0 as
x - sigma * v with sigma = t; this file knows nothing about that.

    latents (B, C, H, W) --pack 2x2--> img tokens (B, HW/4, 4C) --img_in--> (B, L, D)
    T5 tokens (B, T, context_in_dim) --txt_in--> (B, T, D)
    vec = time_in(emb(1000 t)) [+ guidance_in(emb(1000 g))] + vector_in(pooled CLIP)          (B, D)
    depth x DoubleStreamBlock: img and txt keep their own weights and attend jointly
    depth_single_blocks x SingleStreamBlock over cat(txt, img): parallel attention + MLP
    final_layer(img | vec) --unpack--> velocity (B, C, H, W)

Every attention rotates queries and keys by a 3-axis RoPE of position ids (B, L, 3): image tokens carry
(0, row, col), text tokens carry zeros.

Constructor keywords are BFL's `FluxParams` names. `in_channels`/`out_channels` count the channels of a packed
token (BFL: 64 = 16 latent channels x 2 x 2); `patch_size` (2) is the side of the latent patch packed into one
token, so the latent tensor has in_channels / patch_size**2 channels. Parameter names are the BFL single-file
names (`double_blocks.0.img_attn.qkv.weight`, ...), so `flux1-dev.safetensors` loads as it is;
`t2i.convert.flux_diffusers` maps them to and from diffusers' `FluxTransformer2DModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i.errors import ConfigError, InvalidInputError
from t2i.models.attention import attention, merge_heads
from t2i.models.layers import timestep_embedding

FLUX_DEV: dict[str, Any] = {
    "in_channels": 64,
    "out_channels": 64,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 19,
    "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56],
    "theta": 10_000,
    "qkv_bias": True,
    "guidance_embed": True,
    "patch_size": 2,
}
"""FLUX.1-dev: guidance-distilled (takes a guidance scale), 11,901,408,320 parameters."""

FLUX_SCHNELL: dict[str, Any] = {**FLUX_DEV, "guidance_embed": False}
"""FLUX.1-schnell: timestep-distilled, no guidance embedding, 11,891,178,560 parameters."""

TIME_EMBED_DIM = 256  # sinusoidal width of the timestep and guidance embeddings
TIME_FACTOR = 1000.0  # t in [0, 1] is embedded as 1000 t, the range the sinusoids were tuned for

RoPE = torch.Tensor  # (cos, sin) of every rotation angle: (B, 1, L, head_dim / 2, 2) float32


# ------------------------------------------------------------------------------------ positions


def rope_frequencies(ids: torch.Tensor, axes_dim: list[int], theta: float) -> RoPE:
    """Rotation of each position: ids (B, L, n_axes) -> (cos, sin) pairs, float32 (B, 1, L, head_dim / 2, 2).

    Axis i owns axes_dim[i] channels of every head, i.e. axes_dim[i] / 2 rotation pairs with frequencies
    theta ** (-2j / axes_dim[i]); pair j of a token at position p turns by p * frequency. Angles are computed
    in float64 (float32 where the device has no float64), so bf16 models still see exact rotations.
    """
    wide = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for axis, dim in enumerate(axes_dim):
        exponent = torch.arange(0, dim, 2, dtype=wide, device=ids.device) / dim
        omega = 1.0 / theta**exponent  # (dim / 2,)
        angles.append(ids[..., axis].to(wide)[..., None] * omega)  # (B, L, dim / 2)
    angle = torch.cat(angles, dim=-1)[:, None]  # (B, 1, L, head_dim / 2)
    return torch.stack([angle.cos(), angle.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: RoPE) -> torch.Tensor:
    """Rotate each adjacent channel pair (x[2i], x[2i+1]) of x (B, H, L, head_dim) by its angle, in float32.

    Eager mode reads the pair as the complex number x[2i] + i x[2i+1] times e^(i angle): one complex
    multiply, about 2.5x faster than the real-valued form (forward + backward, measured on CPU). Inductor
    generates no code for complex numbers, so compiled graphs take the real form, which it fuses.
    """
    if torch.compiler.is_compiling():
        return rotate_pairs_real(x, rope)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * torch.view_as_complex(rope)).flatten(-2).to(x.dtype)


def rotate_pairs_real(x: torch.Tensor, rope: RoPE) -> torch.Tensor:
    """`apply_rope` written with real numbers: (a, b) -> (a cos - b sin, a sin + b cos) per pair."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope.unbind(-1)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def image_position_ids(batch: int, rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """Position ids (B, rows*cols, 3) of row-major image tokens: (0, row, col)."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(1, rows * cols, 3).expand(batch, -1, -1)


def pack_latents(x: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p): each p x p patch becomes one token, rows first.

    Channel order inside a token is (c, dy, dx), as BFL's `b c (h ph) (w pw) -> b (h w) (c ph pw)`.
    """
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int = 2) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, (H/p)(W/p), C p p) -> (B, C, H, W) for the given latent H and W."""
    b, _, d = tokens.shape
    p = patch_size
    c = d // (p * p)
    # (B, H/p, W/p, C, p, p) -> (B, C, H/p, p, W/p, p)
    x = tokens.reshape(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


# ------------------------------------------------------------------------------------ layers


class MLPEmbedder(nn.Module):
    """in_layer -> SiLU -> out_layer: embeds a timestep sinusoid or the pooled text vector. (B, in) -> (B, D)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last dim, eps 1e-6, computed in float32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.scale.float()).to(x.dtype)


class QKNorm(nn.Module):
    """RMSNorm of queries and keys per head (`query_norm`, `key_norm`), which keeps attention logits bounded."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q), self.key_norm(k)


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3 H d) laid out (qkv, head, d) -> q, k, v, each (B, H, L, d)."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def rope_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RoPE, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(R(q) R(k)^T / sqrt(d)) v with RoPE R, through SDPA. q, k, v (B, H, L, d) -> (B, L, H d).

    mask: (B, L) bool over keys, True = attend, or None for all keys.
    """
    out = attention(apply_rope(q, rope), apply_rope(k, rope), v, mask=mask, use_sdpa=True)
    return merge_heads(out)


@dataclass
class ModulationOut:
    """One adaptive-norm modulation: y = (1 + scale) * norm(x) + shift, then a residual gated by `gate`.

    Each field is (B, 1, D) so it broadcasts over tokens.
    """

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def modulate(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    """vec (B, D) -> SiLU -> `lin` -> one ModulationOut (single block) or two (double block: attention, MLP)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.count = 2 if double else 1
        self.lin = nn.Linear(dim, 3 * self.count * dim)

    def forward(self, vec: torch.Tensor) -> list[ModulationOut]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.count, dim=-1)
        return [ModulationOut(*chunks[3 * i : 3 * i + 3]) for i in range(self.count)]


class StreamAttention(nn.Module):
    """One stream's attention weights in a double block (BFL `SelfAttention`): `qkv`, `norm`, `proj`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q, k, v each (B, H, L, d), with q and k RMS-normed."""
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


def mlp(hidden_size: int, mlp_ratio: float) -> nn.Sequential:
    """Linear -> tanh-GELU -> Linear (keys `0`, `2`)."""
    hidden = int(hidden_size * mlp_ratio)
    return nn.Sequential(
        nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden_size)
    )


def layer_norm(dim: int) -> nn.LayerNorm:
    """The parameter-free LayerNorm before every modulation (eps 1e-6)."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


# ------------------------------------------------------------------------------------ blocks


class DoubleStreamBlock(nn.Module):
    """MM-DiT block: image and text tokens keep separate modulation, QK norms and MLPs but attend jointly.

    For each stream s in (img, txt), with m1, m2 = s_mod(vec):
        q_s, k_s, v_s = s_attn.qkv(m1.modulate(s_norm1(s)))
        a = attention over cat(txt, img) tokens (RoPE), split back per stream
        s = s + m1.gate * s_attn.proj(a_s)
        s = s + m2.gate * s_mlp(m2.modulate(s_norm2(s)))
    img (B, L, D), txt (B, T, D) -> same shapes.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = layer_norm(hidden_size)
        self.img_attn = StreamAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = layer_norm(hidden_size)
        self.img_mlp = mlp(hidden_size, mlp_ratio)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = layer_norm(hidden_size)
        self.txt_attn = StreamAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = layer_norm(hidden_size)
        self.txt_mlp = mlp(hidden_size, mlp_ratio)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rope: RoPE, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_m1, img_m2 = self.img_mod(vec)
        txt_m1, txt_m2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.heads(img_m1.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.heads(txt_m1.modulate(self.txt_norm1(txt)))
        joint = rope_attention(
            torch.cat([txt_q, img_q], dim=2),
            torch.cat([txt_k, img_k], dim=2),
            torch.cat([txt_v, img_v], dim=2),
            rope,
            mask,
        )
        txt_a, img_a = joint.split([txt.shape[1], img.shape[1]], dim=1)
        img = img + img_m1.gate * self.img_attn.proj(img_a)
        img = img + img_m2.gate * self.img_mlp(img_m2.modulate(self.img_norm2(img)))
        txt = txt + txt_m1.gate * self.txt_attn.proj(txt_a)
        txt = txt + txt_m2.gate * self.txt_mlp(txt_m2.modulate(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence (ViT-22B style), one fused matmul in and one out:

        m = modulation(vec);  h = m.modulate(pre_norm(x))
        qkv, u = split(linear1(h));  a = attention(qkv) (QK-normed, RoPE)
        x = x + m.gate * linear2(cat(a, GELU(u)))
    x (B, T + L, D) -> same shape.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = layer_norm(hidden_size)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(
        self, x: torch.Tensor, vec: torch.Tensor, rope: RoPE, mask: torch.Tensor | None
    ) -> torch.Tensor:
        (m,) = self.modulation(vec)
        qkv, u = self.linear1(m.modulate(self.pre_norm(x))).split(
            [3 * self.hidden_size, self.mlp_hidden_dim], -1
        )
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k)
        a = rope_attention(q, k, v, rope, mask)
        return x + m.gate * self.linear2(torch.cat([a, F.gelu(u, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    """Final AdaLN: shift, scale = adaLN_modulation(vec); linear((1 + scale) * norm(x) + shift). (B, L, D) -> (B, L, out)."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


# ------------------------------------------------------------------------------------ model


def check_flux_config(config: dict[str, Any]) -> None:
    """Raise ConfigError naming the first inconsistent Flux key (heads, RoPE axes, patch channels)."""
    hidden, heads, p = config["hidden_size"], config["num_heads"], config["patch_size"]
    if hidden % heads:
        raise ConfigError(f"flux hidden_size: {hidden} must be divisible by num_heads ({heads})")
    axes = list(config["axes_dim"])
    if sum(axes) != hidden // heads or any(a % 2 for a in axes):
        raise ConfigError(
            f"flux axes_dim: {axes} must be even numbers summing to the head dim hidden_size / num_heads "
            f"= {hidden // heads}"
        )
    for key in ("in_channels", "out_channels"):
        if config[key] % (p * p):
            raise ConfigError(f"flux {key}: {config[key]} must be a multiple of patch_size**2 ({p * p})")


class FluxTransformer(nn.Module):
    """The FLUX.1 transformer (BFL `Flux`); see the module docstring for the data flow and names.

    Two entry points:
    - `forward(x, timesteps, context, pooled, guidance, context_mask)`: unpacked latents in, velocity out,
      both (B, C, H, W) with C = in_channels / patch_size**2 and H, W multiples of patch_size;
    - `forward_tokens(img, img_ids, txt, txt_ids, timesteps, y, guidance, txt_mask)`: BFL's own signature on
      packed tokens.
    `use_checkpoint` recomputes each block's activations in backward. `blocks()` lists the double then the
    single blocks (the units to wrap with FSDP's `fully_shard`).
    """

    def __init__(
        self,
        *,
        in_channels: int = 64,
        out_channels: int | None = None,
        vec_in_dim: int = 768,
        context_in_dim: int = 4096,
        hidden_size: int = 3072,
        mlp_ratio: float = 4.0,
        num_heads: int = 24,
        depth: int = 19,
        depth_single_blocks: int = 38,
        axes_dim: list[int] | tuple[int, ...] = (16, 56, 56),
        theta: float = 10_000,
        qkv_bias: bool = True,
        guidance_embed: bool = True,
        patch_size: int = 2,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.flux_config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "vec_in_dim": vec_in_dim,
            "context_in_dim": context_in_dim,
            "hidden_size": hidden_size,
            "mlp_ratio": float(mlp_ratio),
            "num_heads": num_heads,
            "depth": depth,
            "depth_single_blocks": depth_single_blocks,
            "axes_dim": list(axes_dim),
            "theta": theta,
            "qkv_bias": qkv_bias,
            "guidance_embed": guidance_embed,
            "patch_size": patch_size,
        }
        check_flux_config(self.flux_config)
        self.patch_size = patch_size
        self.guidance_embed = guidance_embed
        self.use_checkpoint = use_checkpoint
        self.img_in = nn.Linear(in_channels, hidden_size)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, hidden_size) if guidance_embed else None
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden_size, out_channels)
        self.initialize_weights()

    # -------------------------------------------------------------------------------- properties

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent that `forward` takes (16 for FLUX.1)."""
        return self.flux_config["in_channels"] // self.patch_size**2

    def blocks(self) -> list[nn.Module]:
        """The double-stream blocks, then the single-stream blocks, in execution order."""
        return [*self.double_blocks, *self.single_blocks]

    def initialize_weights(self) -> None:
        """DiT-style init for training from scratch: Xavier linears, zero biases, and zero modulations and
        final layer (adaLN-Zero), so every block starts as the identity and the output as zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in (self.time_in, self.guidance_in):
            if embedder is not None:
                nn.init.normal_(embedder.in_layer.weight, std=0.02)
                nn.init.normal_(embedder.out_layer.weight, std=0.02)
        zero = [m.lin for m in self.modules() if isinstance(m, Modulation)]
        zero += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # -------------------------------------------------------------------------------- forward

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        guidance: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity at unpacked latents. x (B, C, H, W); timesteps (B,) = sigma in [0, 1]; context (B, T,
        context_in_dim) T5 tokens; pooled (B, vec_in_dim) CLIP vector; guidance (B,) the distilled guidance
        scale (required when guidance_embed, ignored otherwise); context_mask (B, T) bool, True = real token
        (None = attend to all, as FLUX.1 was trained). Returns (B, out_channels / patch_size**2, H, W)."""
        self.check_latents(x)
        b, _, h, w = x.shape
        p = self.patch_size
        img = pack_latents(x, p)
        img_ids = image_position_ids(b, h // p, w // p, x.device)
        txt_ids = torch.zeros(b, context.shape[1], 3, device=x.device)
        out = self.forward_tokens(img, img_ids, context, txt_ids, timesteps, pooled, guidance, context_mask)
        return unpack_latents(out, h, w, p)

    def forward_tokens(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        txt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """BFL's `Flux.forward` on packed tokens. img (B, L, in_channels), img_ids (B, L, 3), txt (B, T,
        context_in_dim), txt_ids (B, T, 3), timesteps (B,) in [0, 1], y (B, vec_in_dim), guidance (B,) | None,
        txt_mask (B, T) bool | None. Returns (B, L, out_channels)."""
        dtype = self.img_in.weight.dtype
        vec = self.conditioning_vector(timesteps, y, guidance)
        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        rope = rope_frequencies(
            torch.cat([txt_ids, img_ids], dim=1), self.flux_config["axes_dim"], self.flux_config["theta"]
        )
        mask = None
        if txt_mask is not None:
            image_keys = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
            mask = torch.cat([txt_mask.to(img.device, torch.bool), image_keys], dim=1)  # (B, T + L)
        for block in self.double_blocks:
            img, txt = self.run_block(block, img, txt, vec, rope, mask)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = self.run_block(block, x, vec, rope, mask)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    def conditioning_vector(
        self, timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        """vec = time_in(emb(1000 t)) + guidance_in(emb(1000 g)) + vector_in(y), (B, hidden_size).

        The sinusoids are computed in float32 (a bf16 t would round 1000 t to a coarse grid)."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(TIME_FACTOR * timesteps.float(), TIME_EMBED_DIM).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise InvalidInputError(
                    "flux guidance: this model is guidance-distilled (guidance_embed: true); pass a guidance "
                    "scale per sample, e.g. 3.5"
                )
            vec = vec + self.guidance_in(
                timestep_embedding(TIME_FACTOR * guidance.float(), TIME_EMBED_DIM).to(dtype)
            )
        return vec + self.vector_in(y.to(dtype))

    def run_block(self, block: Callable[..., Any], *args: Any) -> Any:
        """Call `block(*args)`, recomputing its activations in backward when use_checkpoint is on."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def check_latents(self, x: torch.Tensor) -> None:
        """InvalidInputError unless x is (B, latent_channels, H, W) with H and W multiples of patch_size."""
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.latent_channels:
            raise InvalidInputError(
                f"flux latents: shape {tuple(x.shape)}; expected (B, {self.latent_channels}, H, W)"
            )
        if x.shape[2] % p or x.shape[3] % p:
            raise InvalidInputError(
                f"flux latents: height and width {tuple(x.shape[2:])} must be multiples of {p} "
                f"(image size a multiple of {p} x the VAE factor)"
            )

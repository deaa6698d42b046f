"""AutoencoderKL: the first-stage VAE of latent diffusion (Rombach et al. 2022, "ldm/models/autoencoder.py").

Parameter names follow CompVis (`encoder.down.0.block.0.conv1.weight`, `encoder.mid.attn_1.q.weight`,
`quant_conv.weight`, ...), so the `first_stage_model.*` part of an SD single file loads after stripping the prefix.
`from_pretrained` reads t2i's own folders; `t2i.convert.vae_diffusers.load_vae` reads diffusers folders too.

Options beyond the SD VAE, for the FLUX.1 VAE (16 latent channels) and diffusers' tiny test VAEs:
`use_quant_conv` / `use_post_quant_conv` (false: no 1x1 convs around the latent, embed_dim = z_channels),
`ddconfig.norm_num_groups` (GroupNorm groups, 32 when absent) and `shift_factor` next to `scale_factor`
(diffusion latents = (z - shift_factor) * scale_factor).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i.errors import ConfigError, PipelineLoadError, WeightsMismatchError

T2I_CONFIG_NAME = "config.json"
T2I_WEIGHTS_NAME = "model.safetensors"

DDCONFIG_KEYS = (
    "double_z",
    "z_channels",
    "resolution",
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
    "norm_num_groups",
)
OPTIONAL_DDCONFIG_KEYS = ("dropout", "attn_resolutions", "norm_num_groups")
DEFAULT_NORM_GROUPS = 32

FLUX_VAE: dict[str, Any] = {
    "embed_dim": 16,
    "ddconfig": {
        "double_z": True,
        "z_channels": 16,
        "resolution": 1024,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}
"""The FLUX.1 VAE (`AutoencoderKL.from_config(FLUX_VAE)`): BFL's `ae.safetensors` loads into it as it is."""


def vae_norm(channels: int, groups: int = DEFAULT_NORM_GROUPS) -> nn.GroupNorm:
    """The VAE's norm: GroupNorm with eps 1e-6 (CompVis `Normalize`, 32 groups unless configured)."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3, twice, plus a (1x1 `nin_shortcut` when channels change) skip.

    (B, in_channels, H, W) -> (B, out_channels, H, W). The VAE has no timestep embedding.
    """

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = DEFAULT_NORM_GROUPS
    ):
        super().__init__()
        self.norm1 = vae_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vae_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections `q`, `k`, `v`, `proj_out`, residual.

    (B, C, H, W) -> (B, C, H, W); attention runs over the H*W positions with scale 1/sqrt(C).
    """

    def __init__(self, channels: int, groups: int = DEFAULT_NORM_GROUPS):
        super().__init__()
        self.norm = vae_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head spanning all channels
        q, k, v = (proj(n).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (CompVis asymmetric padding).

    (B, C, H, W) -> (B, C, H/2, W/2).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv. (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution; the shape is unchanged."""

    def __init__(
        self, channels: int, dropout: float, use_attention: bool = True, groups: int = DEFAULT_NORM_GROUPS
    ):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups) if use_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks, possibly none) and an optional resampler.

    The resampler is registered as `downsample` (encoder) or `upsample` (decoder) to match CompVis names.
    """

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = run_maybe_checkpointed(block, x, use_checkpoint)
            if len(self.attn) > 0:
                x = run_maybe_checkpointed(self.attn[i], x, use_checkpoint)
        return x


def run_maybe_checkpointed(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Call `module(x)`, recomputing activations in backward when checkpointing is on and grads are needed."""
    if use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """Pixels (B, in_channels, H, W) -> moments (B, 2*z_channels or z_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm_num_groups: int = DEFAULT_NORM_GROUPS,
        **_: Any,
    ):
        super().__init__()
        self.use_checkpoint = False
        groups = norm_num_groups
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[i], ch * mult
            blocks = [
                ResnetBlock(block_in if j == 0 else block_out, block_out, dropout, groups)
                for j in range(num_res_blocks)
            ]
            attns = [AttnBlock(block_out, groups) for _ in blocks] if curr_res in attn_resolutions else []
            level = Level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_out)
                curr_res //= 2
            self.down.append(level)
        block_in = ch * ch_mult[-1]
        self.mid = MidBlock(block_in, dropout, mid_attention, groups)
        self.norm_out = vae_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h, self.use_checkpoint)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = run_maybe_checkpointed(self.mid, h, self.use_checkpoint)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> pixels (B, out_ch, h*f, w*f). `up[i]` is level i (0 = full resolution)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        attn_resolutions: list[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm_num_groups: int = DEFAULT_NORM_GROUPS,
        **_: Any,
    ):
        super().__init__()
        self.use_checkpoint = False
        groups = norm_num_groups
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout, mid_attention, groups)
        levels: list[Level] = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            blocks = [
                ResnetBlock(block_in if j == 0 else block_out, block_out, dropout, groups)
                for j in range(num_res_blocks + 1)
            ]
            attns = [AttnBlock(block_out, groups) for _ in blocks] if curr_res in attn_resolutions else []
            level = Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_out)
                curr_res *= 2
            levels.insert(0, level)
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = vae_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_maybe_checkpointed(self.mid, self.conv_in(z), self.use_checkpoint)
        for level in reversed(self.up):
            h = level.run_blocks(h, self.use_checkpoint)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class DiagonalGaussian:
    """A diagonal Gaussian posterior q(z|x) from the encoder's moments, each (B, C, h, w).

    logvar is clamped to [-30, 20] as CompVis `DiagonalGaussianDistribution` does.
    """

    mean: torch.Tensor
    logvar: torch.Tensor

    def __post_init__(self) -> None:
        self.logvar = self.logvar.clamp(-30.0, 20.0)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """Split (B, 2C, h, w) moments along channels into mean and logvar."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps with eps ~ N(0, I) drawn from `generator` (reproducible by seed)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over C, h, w: 0.5 * sum(mean^2 + var - 1 - logvar). Returns (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def check_ddconfig(ddconfig: dict[str, Any]) -> dict[str, Any]:
    """Return a plain dict copy of `ddconfig`, raising ConfigError for a missing or unknown key.

    `norm_num_groups` is kept only when it is not the default 32, so SD configs stay as NeMo writes them.
    """
    ddconfig = dict(ddconfig)
    missing = [k for k in DDCONFIG_KEYS if k not in ddconfig and k not in OPTIONAL_DDCONFIG_KEYS]
    if missing:
        raise ConfigError(
            f"first_stage_config.ddconfig.{missing[0]}: missing; expected keys {list(DDCONFIG_KEYS)}"
        )
    unknown = [k for k in ddconfig if k not in DDCONFIG_KEYS]
    if unknown:
        raise ConfigError(
            f"first_stage_config.ddconfig.{unknown[0]}: unknown key; valid keys: {list(DDCONFIG_KEYS)}"
        )
    ddconfig.setdefault("dropout", 0.0)
    ddconfig.setdefault("attn_resolutions", [])
    ddconfig["ch_mult"] = list(ddconfig["ch_mult"])
    ddconfig["attn_resolutions"] = list(ddconfig["attn_resolutions"])
    groups = int(ddconfig.pop("norm_num_groups", DEFAULT_NORM_GROUPS))
    widths = sorted({ddconfig["ch"] * m for m in ddconfig["ch_mult"]})
    if groups < 1 or any(w % groups for w in widths):
        raise ConfigError(
            f"first_stage_config.ddconfig.norm_num_groups: {groups} must divide every level width {widths}"
        )
    if groups != DEFAULT_NORM_GROUPS:
        ddconfig["norm_num_groups"] = groups
    return ddconfig


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`.

    embed_dim: latent channels seen by the diffusion model; ddconfig: the NeMo/CompVis encoder-decoder knobs.
    Images (B, in_channels, H, W) in [-1, 1] map to latents (B, embed_dim, H/f, W/f), f = 2**(len(ch_mult)-1).
    """

    def __init__(
        self,
        embed_dim: int,
        ddconfig: dict[str, Any],
        *,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_attention: bool = True,
        gradient_checkpointing: bool = False,
        scale_factor: float | None = None,
        shift_factor: float | None = None,
    ):
        super().__init__()
        ddconfig = check_ddconfig(ddconfig)
        if not ddconfig["double_z"]:
            raise ConfigError("first_stage_config.ddconfig.double_z: must be true for a KL autoencoder")
        for name, used in (("use_quant_conv", use_quant_conv), ("use_post_quant_conv", use_post_quant_conv)):
            if not used and embed_dim != ddconfig["z_channels"]:
                raise ConfigError(
                    f"first_stage_config.embed_dim: {embed_dim} must equal ddconfig.z_channels "
                    f"({ddconfig['z_channels']}) when {name} is false"
                )
        self.embed_dim = embed_dim
        self.ddconfig = ddconfig
        self.extra_config = {
            "use_quant_conv": use_quant_conv,
            "use_post_quant_conv": use_post_quant_conv,
            "mid_attention": mid_attention,
        }
        self.scale_factor = scale_factor
        self.shift_factor = shift_factor
        self.encoder = Encoder(**ddconfig, mid_attention=mid_attention)
        self.decoder = Decoder(**ddconfig, mid_attention=mid_attention)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1) if use_post_quant_conv else None
        self.set_gradient_checkpointing(gradient_checkpointing)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute encoder/decoder block activations in backward to save memory."""
        self.encoder.use_checkpoint = enabled
        self.decoder.use_checkpoint = enabled

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w) unscaled latent -> (B, out_ch, h*f, w*f), roughly in [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a sampled (or mode) latent. Returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def config_dict(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-able dict (the t2i `config.json`)."""
        config = {"embed_dim": self.embed_dim, "ddconfig": dict(self.ddconfig), **self.extra_config}
        if self.scale_factor is not None:
            config["scale_factor"] = self.scale_factor
        if self.shift_factor is not None:
            config["shift_factor"] = self.shift_factor
        return config

    def save_pretrained(self, path: str | Path) -> None:
        """Write a t2i VAE folder: `config.json` + `model.safetensors` (CompVis key names)."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / T2I_CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / T2I_WEIGHTS_NAME))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AutoencoderKL:
        """Build from a t2i config dict ({embed_dim, ddconfig, ...}); unknown top-level keys are ignored."""
        known = (
            "use_quant_conv",
            "use_post_quant_conv",
            "mid_attention",
            "gradient_checkpointing",
            "scale_factor",
            "shift_factor",
        )
        kwargs = {k: config[k] for k in known if k in config}
        return cls(config["embed_dim"], config["ddconfig"], **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> AutoencoderKL:
        """Load a t2i VAE folder (config.json + model.safetensors, CompVis names), or a pipeline root's `vae/`.

        Extra kwargs (e.g. gradient_checkpointing) override the stored config. Diffusers folders are read by
        `t2i.convert.vae_diffusers.load_vae`, which accepts both formats.
        """
        folder = resolve_vae_folder(Path(path))
        config = json.loads((folder / T2I_CONFIG_NAME).read_text())
        if is_diffusers_vae_config(config):
            raise PipelineLoadError(
                f"{folder}: a diffusers VAE folder; load it with t2i.convert.vae_diffusers.load_vae"
            )
        model = cls.from_config({**config, **kwargs})
        load_state_dict_strict(model, read_safetensors(folder / T2I_WEIGHTS_NAME), str(folder))
        return model


def is_diffusers_vae_config(config: dict[str, Any]) -> bool:
    """True for a diffusers AutoencoderKL config.json (t2i's own has `embed_dim` + `ddconfig` instead)."""
    return "_class_name" in config or "block_out_channels" in config


def resolve_vae_folder(path: Path) -> Path:
    """Return the folder holding the VAE's config.json, looking into `path/vae` for a pipeline root."""
    if (path / T2I_CONFIG_NAME).is_file() and not (path / "vae").is_dir():
        return path
    if (path / "vae" / T2I_CONFIG_NAME).is_file():
        return path / "vae"
    raise PipelineLoadError(f"{path}: not a VAE folder; expected config.json (+ weights) or a vae/ subfolder")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file on CPU, raising PipelineLoadError when it is absent."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise PipelineLoadError(f"{path}: weights file not found; expected a safetensors file")
    return load_file(str(path))


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, raising WeightsMismatchError naming the first missing/unexpected keys."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsMismatchError(
            f"{source}: VAE weights do not match the config; missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


def count_parameters(module: nn.Module) -> int:
    """Total number of parameter elements (works on the meta device)."""
    return sum(math.prod(p.shape) for p in module.parameters())

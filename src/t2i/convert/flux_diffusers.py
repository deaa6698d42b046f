"""Flux transformer weights: our (BFL single-file) names <-> diffusers `FluxTransformer2DModel`, both ways.

Key correspondence (ours = BFL <-> diffusers), per double block i (`double_blocks.i` <-> `transformer_blocks.i`):
  img_mod.lin / txt_mod.lin                  <-> norm1.linear / norm1_context.linear
  img_attn.qkv  = cat(q, k, v) on dim 0      <-> attn.to_q, attn.to_k, attn.to_v
  txt_attn.qkv                               <-> attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
  img_attn.norm.{query,key}_norm.scale       <-> attn.norm_{q,k}.weight
  txt_attn.norm.{query,key}_norm.scale       <-> attn.norm_added_{q,k}.weight
  img_attn.proj / txt_attn.proj              <-> attn.to_out.0 / attn.to_add_out
  img_mlp.{0,2} / txt_mlp.{0,2}              <-> ff.net.{0.proj,2} / ff_context.net.{0.proj,2}
per single block i (`single_blocks.i` <-> `single_transformer_blocks.i`):
  modulation.lin                             <-> norm.linear
  linear1 = cat(q, k, v, mlp_in) on dim 0    <-> attn.to_q, attn.to_k, attn.to_v, proj_mlp
  norm.{query,key}_norm.scale                <-> attn.norm_{q,k}.weight
  linear2                                    <-> proj_out
and img_in <-> x_embedder, txt_in <-> context_embedder, {time,vector,guidance}_in.{in,out}_layer <->
time_text_embed.{timestep,text,guidance}_embedder.linear_{1,2}, final_layer.linear <-> proj_out, and
final_layer.adaLN_modulation.1 <-> norm_out.linear with its two halves swapped (BFL: shift, scale; diffusers:
scale, shift).

Config: diffusers packs 2x2 patches in its pipeline and sets `patch_size: 1`; ours packs inside the model
(`patch_size: 2`). Both count `in_channels` per packed token (64 for FLUX.1).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from t2i.errors import ConfigError, PipelineLoadError, WeightsMismatchError
from t2i.models.flux import FluxTransformer
from t2i.models.weights import check_state_keys, read_diffusers_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_CLASS = "FluxTransformer2DModel"
DIFFUSERS_VERSION = "0.30.0"  # the first diffusers release with FluxTransformer2DModel

# diffusers' FluxTransformer2DModel constructor defaults (FLUX.1-schnell without the guidance embedding).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
# What diffusers hard-codes; our config must hold these values to be written in the diffusers format.
DIFFUSERS_FIXED: dict[str, Any] = {"mlp_ratio": 4.0, "theta": 10_000, "qkv_bias": True, "patch_size": 2}

# Prefixes of the transformer inside single files: ComfyUI checkpoints and some trainers' exports.
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
BFL_ROOTS = (
    "img_in.",
    "txt_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "double_blocks.",
    "single_blocks.",
    "final_layer.",
)


# ---------------------------------------------------------------------------------------- config


def flux_config_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers FluxTransformer2DModel config.json dict -> our FluxTransformer keyword arguments."""
    name = config.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise ConfigError(f"transformer config _class_name: {name!r}; expected {DIFFUSERS_CLASS!r}")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if c["patch_size"] != 1:
        raise ConfigError(
            f"transformer config patch_size: {c['patch_size']}; expected 1 (FLUX.1 packs 2x2 outside)"
        )
    return {
        "in_channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"] or c["in_channels"]),
        "vec_in_dim": int(c["pooled_projection_dim"]),
        "context_in_dim": int(c["joint_attention_dim"]),
        "hidden_size": int(c["num_attention_heads"] * c["attention_head_dim"]),
        "mlp_ratio": DIFFUSERS_FIXED["mlp_ratio"],
        "num_heads": int(c["num_attention_heads"]),
        "depth": int(c["num_layers"]),
        "depth_single_blocks": int(c["num_single_layers"]),
        "axes_dim": [int(a) for a in c["axes_dims_rope"]],
        "theta": DIFFUSERS_FIXED["theta"],
        "qkv_bias": DIFFUSERS_FIXED["qkv_bias"],
        "guidance_embed": bool(c["guidance_embeds"]),
        "patch_size": DIFFUSERS_FIXED["patch_size"],
    }


def flux_config_to_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """Our FluxTransformer keyword arguments -> a diffusers FluxTransformer2DModel config.json dict."""
    for key, value in DIFFUSERS_FIXED.items():
        if config.get(key, value) != value:
            raise ConfigError(f"flux {key}: {config[key]}; the diffusers format holds only {key} = {value}")
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "patch_size": 1,
        "in_channels": config["in_channels"],
        "out_channels": config.get("out_channels") or config["in_channels"],
        "num_layers": config["depth"],
        "num_single_layers": config["depth_single_blocks"],
        "attention_head_dim": config["hidden_size"] // config["num_heads"],
        "num_attention_heads": config["num_heads"],
        "joint_attention_dim": config["context_in_dim"],
        "pooled_projection_dim": config["vec_in_dim"],
        "guidance_embeds": config["guidance_embed"],
        "axes_dims_rope": list(config["axes_dim"]),
    }


def flux_config_from_state_dict(
    state: dict[str, torch.Tensor], axes_dim: list[int] | None = None, theta: float = 10_000
) -> dict[str, Any]:
    """Infer our FluxTransformer kwargs from BFL-named weights (shapes and which keys exist).

    Everything but the RoPE split is in the shapes; `axes_dim` defaults to FLUX.1's [16, 56, 56] when the head
    dim is 128 and must be given otherwise.
    """

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise WeightsMismatchError(
                f"flux weights: missing {key!r}; expected a BFL-named Flux transformer"
            )
        return state[key].shape

    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if axes_dim is None:
        if head_dim != 128:
            raise ConfigError(
                f"flux axes_dim: required for a head dim of {head_dim} (FLUX.1's [16, 56, 56] sums to 128)"
            )
        axes_dim = [16, 56, 56]
    return {
        "in_channels": in_channels,
        "out_channels": shape("final_layer.linear.weight")[0],
        "vec_in_dim": shape("vector_in.in_layer.weight")[1],
        "context_in_dim": shape("txt_in.weight")[1],
        "hidden_size": hidden,
        "mlp_ratio": shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
        "num_heads": hidden // head_dim,
        "depth": block_count(state, "double_blocks."),
        "depth_single_blocks": block_count(state, "single_blocks."),
        "axes_dim": list(axes_dim),
        "theta": theta,
        "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in state,
        "guidance_embed": "guidance_in.in_layer.weight" in state,
        "patch_size": 2,
    }


def block_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """1 + the largest block index among keys `prefix{i}.*` (0 when there are none)."""
    indices = [int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)]
    return max(indices) + 1 if indices else 0


# ---------------------------------------------------------------------------------------- key rules


@dataclass(frozen=True)
class KeyRule:
    """One of our tensors and the diffusers tensors that make it.

    ours == cat(theirs, dim=0) with `sizes` the row count of each part; `swap_halves` means ours is
    cat(second half, first half) of the single diffusers tensor.
    """

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    swap_halves: bool = False


def linear_rules(
    ours: str,
    theirs: str | tuple[str, ...],
    sizes: tuple[int, ...] = (),
    bias: bool = True,
    swap_halves: bool = False,
) -> list[KeyRule]:
    """Rules for the weight (and bias) of one Linear; `theirs` names the diffusers module(s)."""
    parts = (theirs,) if isinstance(theirs, str) else theirs
    suffixes = ("weight", "bias") if bias else ("weight",)
    return [KeyRule(f"{ours}.{s}", tuple(f"{p}.{s}" for p in parts), sizes, swap_halves) for s in suffixes]


def norm_rule(ours: str, theirs: str) -> KeyRule:
    return KeyRule(f"{ours}.scale", (f"{theirs}.weight",))


def double_block_rules(i: int, hidden: int, qkv_bias: bool) -> list[KeyRule]:
    o, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    thirds = (hidden,) * 3
    rules = linear_rules(o + "img_mod.lin", t + "norm1.linear")
    rules += linear_rules(o + "txt_mod.lin", t + "norm1_context.linear")
    rules += linear_rules(
        o + "img_attn.qkv", (t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"), thirds, qkv_bias
    )
    rules += linear_rules(
        o + "txt_attn.qkv",
        (t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"),
        thirds,
        qkv_bias,
    )
    rules += [
        norm_rule(o + "img_attn.norm.query_norm", t + "attn.norm_q"),
        norm_rule(o + "img_attn.norm.key_norm", t + "attn.norm_k"),
        norm_rule(o + "txt_attn.norm.query_norm", t + "attn.norm_added_q"),
        norm_rule(o + "txt_attn.norm.key_norm", t + "attn.norm_added_k"),
    ]
    rules += linear_rules(o + "img_attn.proj", t + "attn.to_out.0")
    rules += linear_rules(o + "txt_attn.proj", t + "attn.to_add_out")
    for ours, theirs in (("img_mlp", "ff"), ("txt_mlp", "ff_context")):
        rules += linear_rules(f"{o}{ours}.0", f"{t}{theirs}.net.0.proj")
        rules += linear_rules(f"{o}{ours}.2", f"{t}{theirs}.net.2")
    return rules


def single_block_rules(i: int, hidden: int, mlp_hidden: int) -> list[KeyRule]:
    o, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    parts = (t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp")
    rules = linear_rules(o + "modulation.lin", t + "norm.linear")
    rules += linear_rules(o + "linear1", parts, (hidden, hidden, hidden, mlp_hidden))
    rules += [
        norm_rule(o + "norm.query_norm", t + "attn.norm_q"),
        norm_rule(o + "norm.key_norm", t + "attn.norm_k"),
    ]
    rules += linear_rules(o + "linear2", t + "proj_out")
    return rules


def flux_key_rules(config: dict[str, Any]) -> list[KeyRule]:
    """Every tensor of a FluxTransformer built from `config` (our kwargs) with its diffusers counterpart(s)."""
    hidden = config["hidden_size"]
    embed = "time_text_embed."
    rules = linear_rules("img_in", "x_embedder") + linear_rules("txt_in", "context_embedder")
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if config["guidance_embed"]:
        embedders.append(("guidance_in", "guidance_embedder"))
    for ours, theirs in embedders:
        rules += linear_rules(f"{ours}.in_layer", f"{embed}{theirs}.linear_1")
        rules += linear_rules(f"{ours}.out_layer", f"{embed}{theirs}.linear_2")
    for i in range(config["depth"]):
        rules += double_block_rules(i, hidden, config.get("qkv_bias", True))
    for i in range(config["depth_single_blocks"]):
        rules += single_block_rules(i, hidden, int(hidden * config.get("mlp_ratio", 4.0)))
    rules += linear_rules("final_layer.linear", "proj_out")
    rules += linear_rules("final_layer.adaLN_modulation.1", "norm_out.linear", swap_halves=True)
    return rules


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def check_keys(state: dict[str, torch.Tensor], expected: list[str], source: str) -> None:
    """WeightsMismatchError naming the first missing and unexpected keys unless `state` has exactly `expected`."""
    check_state_keys(state, expected, "Flux", source)


def flux_state_dict_to_diffusers(
    state: dict[str, torch.Tensor], config: dict[str, Any], source: str = "t2i"
) -> dict[str, torch.Tensor]:
    """Our (BFL-named) Flux weights -> diffusers FluxTransformer2DModel weights (fused tensors split)."""
    rules = flux_key_rules(config)
    check_keys(state, [r.ours for r in rules], source)
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        value = state[rule.ours]
        if rule.swap_halves:
            value = swap_halves(value)
        parts = value.split(list(rule.sizes), dim=0) if rule.sizes else (value,)
        out.update(zip(rule.theirs, parts, strict=True))
    return out


def flux_state_dict_from_diffusers(
    state: dict[str, torch.Tensor], config: dict[str, Any], source: str = "diffusers"
) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel weights -> our (BFL-named) Flux weights (split tensors fused)."""
    rules = flux_key_rules(config)
    check_keys(state, [k for r in rules for k in r.theirs], source)
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        value = (
            torch.cat([state[k] for k in rule.theirs], dim=0)
            if len(rule.theirs) > 1
            else state[rule.theirs[0]]
        )
        out[rule.ours] = swap_halves(value) if rule.swap_halves else value
    return out


def strip_single_file_prefix(
    state: dict[str, torch.Tensor], source: str = "single file"
) -> dict[str, torch.Tensor]:
    """The transformer's tensors of a single file, BFL-named without a prefix.

    ComfyUI and some trainers store the transformer under `model.diffusion_model.` (or a shorter prefix) next
    to the VAE and text encoders; the prefix is read from the `img_in.weight` key and everything outside it is
    dropped. A file without a prefix is returned unchanged.
    """
    anchor = [k for k in state if k.endswith("img_in.weight")]
    if not anchor:
        raise WeightsMismatchError(f"{source}: no img_in.weight; expected a BFL-named Flux transformer")
    prefix = anchor[0][: -len("img_in.weight")]
    if prefix and prefix not in SINGLE_FILE_PREFIXES:
        raise WeightsMismatchError(
            f"{source}: Flux keys under an unknown prefix {prefix!r}; expected none or one of {list(SINGLE_FILE_PREFIXES)}"
        )
    if not prefix:
        return state
    return {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and k[len(prefix) :].startswith(BFL_ROOTS)
    }


# ---------------------------------------------------------------------------------------- files


def transformer_folder(path: Path) -> Path:
    """The folder holding the transformer's config.json: `path` itself or a pipeline root's `transformer/`."""
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "transformer" / CONFIG_NAME).is_file():
        return path / "transformer"
    raise PipelineLoadError(
        f"{path}: no {CONFIG_NAME}; expected a diffusers Flux transformer folder, a pipeline folder with "
        "transformer/, or a .safetensors single file"
    )


def build_loaded(
    config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype | None, use_checkpoint: bool
) -> FluxTransformer:
    """A FluxTransformer holding `state` (BFL names, already checked), built on meta so no memory is wasted."""
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = FluxTransformer(**config, use_checkpoint=use_checkpoint)
    model.load_state_dict(state, assign=True)
    return model.eval()


def load_flux_transformer(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    use_checkpoint: bool = False,
    config: dict[str, Any] | None = None,
    variant: str | None = None,
) -> FluxTransformer:
    """Load a Flux transformer from a diffusers folder (`t2i.models.weights.read_diffusers_weights`: safetensors
    or .bin, single or sharded, `variant` files), a diffusers pipeline
    root (its `transformer/`), or a BFL/ComfyUI `.safetensors` single file.

    `config` (our kwargs) is used for single files only; by default it is read from the tensor shapes.
    Weights keep the file's dtype unless `dtype` is given. Mismatched keys raise WeightsMismatchError.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise PipelineLoadError(f"{path}: expected a .safetensors file")
        state = strip_single_file_prefix(load_file(path), str(path))
        config = config or flux_config_from_state_dict(state)
        check_keys(state, [r.ours for r in flux_key_rules(config)], str(path))
        return build_loaded(config, state, dtype, use_checkpoint)
    if not path.exists():
        raise PipelineLoadError(f"{path}: not found; expected a Flux transformer folder or .safetensors file")
    folder = transformer_folder(path)
    ours = flux_config_from_diffusers(json.loads((folder / CONFIG_NAME).read_text()))
    state = flux_state_dict_from_diffusers(read_diffusers_weights(folder, variant), ours, str(folder))
    return build_loaded(ours, state, dtype, use_checkpoint)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file to a temporary name, then rename into place (a crash never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_state_dict(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split `state` in key order into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def save_flux_transformer_as_diffusers(
    model: FluxTransformer, path: str | Path, max_shard_bytes: int | None = None
) -> Path:
    """Write `model` as a diffusers FluxTransformer2DModel folder that `from_pretrained` loads.

    With `max_shard_bytes` the weights are split into `diffusion_pytorch_model-0000i-of-0000n.safetensors`
    shards plus the index JSON, as diffusers writes large models. Each file is written atomically.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.flux_config
    state = flux_state_dict_to_diffusers(model.state_dict(), config)
    shards = [state] if max_shard_bytes is None else shard_state_dict(state, max_shard_bytes)
    if len(shards) == 1:
        atomic_save_file(state, folder / WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_save_file(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(json.dumps(index, indent=2), folder / WEIGHTS_INDEX_NAME)
    atomic_write_text(json.dumps(flux_config_to_diffusers(config), indent=2), folder / CONFIG_NAME)
    return folder


def save_flux_single_file(model: FluxTransformer, path: str | Path) -> Path:
    """Write `model`'s weights as a BFL single file (the names of `flux1-dev.safetensors`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file(model.state_dict(), path)
    return path

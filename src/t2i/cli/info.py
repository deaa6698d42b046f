"""`t2i info CONFIG_OR_PATH`: one line per component with its class and parameter count.

    $ t2i info sd15
    unet: UNetModel 859,520,964
    vae: AutoencoderKL 83,653,863
    text_encoder: CLIPTextModel 123,060,480

Works for a config name or YAML (`sd15`, `sd2`, `sd21-v`, `sdxl`, `sdxl-refiner`, imagen and flux configs), a
pipeline folder (diffusers or t2i: SD, SDXL or Flux) and a single-file checkpoint (CompVis, NeMo or sgm key names).
Modules are built on the meta device and checkpoints are read for their shapes only, so nothing is allocated and
no weights are loaded.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

CONFIG_SUFFIXES = (".yaml", ".yml")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show the components of a config or pipeline and their parameter counts",
        description="Print each component's class and parameter count (built on the meta device).",
    )
    parser.add_argument(
        "target", metavar="CONFIG_OR_PATH", help="config name/YAML, pipeline folder or checkpoint"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    parser.set_defaults(func=run)


def describe(target: str, overrides: list[str] | None = None) -> dict[str, tuple[str, int]]:
    """{component: (class name, parameter count)} for a config, a pipeline folder or a single file."""
    from t2i.pipelines.single_file import SINGLE_FILE_SUFFIXES

    path = Path(target)
    if path.is_dir():
        from t2i.pipelines import flux_folder

        if flux_folder.is_flux_folder(path):
            return _count_modules(flux_folder.folder_components_on_meta(path))
        return _count_modules(folder_components_on_meta(path))
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return single_file_counts(path)
    if path.is_file() and path.suffix not in CONFIG_SUFFIXES:
        from t2i.errors import PipelineLoadError

        raise PipelineLoadError(
            f"{target}: not a config or checkpoint file; expected a config name or {'/'.join(CONFIG_SUFFIXES)} "
            f"file, a pipeline folder, or a checkpoint ({'/'.join(SINGLE_FILE_SUFFIXES)})"
        )
    if not path.exists() and (
        path.is_absolute() or target.startswith(".") or path.suffix in SINGLE_FILE_SUFFIXES
    ):
        from t2i.errors import PipelineLoadError

        raise PipelineLoadError(
            f"{target}: no such file or folder; expected a config name or YAML, a pipeline "
            "folder or a checkpoint file"
        )
    from t2i.config import load_config
    from t2i.pipelines.build import build_components
    from t2i.pipelines.flux_folder import build_flow_components

    model = load_config(target, overrides or []).model
    build = build_flow_components if model.kind == "flow" else build_components
    return _count_modules(build(model, device="meta"))


def _count_modules(modules: dict[str, Any]) -> dict[str, tuple[str, int]]:
    from t2i.pipelines.build import count_parameters

    return {name: (type(module).__name__, count_parameters(module)) for name, module in modules.items()}


def folder_components_on_meta(root: Path) -> dict[str, Any]:
    """UNet, VAE and text encoder of a pipeline folder, built on meta from the folder's config files."""
    import torch
    import transformers

    from t2i.convert.unet_diffusers import diffusers_to_unet_config
    from t2i.convert.vae_diffusers import config_from_diffusers
    from t2i.models.autoencoder import AutoencoderKL
    from t2i.models.unet import UNetModel
    from t2i.pipelines.build import read_json
    from t2i.pipelines.sd_folder import read_model_index
    from t2i.pipelines.sdxl_folder import TEXT_NAMES, is_sdxl_folder, read_sdxl_index

    index = read_sdxl_index(root) if is_sdxl_folder(root) else read_model_index(root)
    names = [n for n in TEXT_NAMES if isinstance(index.get(n), list) and index[n][0] is not None]
    with torch.device("meta"):
        modules = {
            "unet": UNetModel(**diffusers_to_unet_config(read_json(root / "unet" / "config.json"))),
            "vae": AutoencoderKL.from_config(config_from_diffusers(read_json(root / "vae" / "config.json"))),
        }
        for name in names:
            text_config = transformers.AutoConfig.from_pretrained(str(root / name), local_files_only=True)
            text_class = getattr(transformers, index[name][1], transformers.AutoModel)
            modules[name] = (
                text_class(text_config)
                if text_class is not transformers.AutoModel
                else transformers.AutoModel.from_config(text_config)
            )
        return modules


def _shapes_as_meta(path: Path) -> dict[str, Any]:
    """Every tensor of a checkpoint as an empty meta tensor of the same shape (no data read)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        from t2i.errors import PipelineLoadError

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exn:
            reason = str(exn).splitlines()[0][:160] if str(exn) else type(exn).__name__
            raise PipelineLoadError(f"{path}: not a readable safetensors file ({reason})") from None
    from t2i.pipelines.single_file import read_checkpoint

    return read_checkpoint(path)


def single_file_counts(path: Path) -> dict[str, tuple[str, int]]:
    """Parameter counts of the components of a single-file checkpoint, from tensor shapes."""
    from t2i.pipelines.single_file import split_checkpoint

    parts = split_checkpoint(_shapes_as_meta(path), str(path))

    def total(state: dict[str, Any]) -> int:
        skip = ("position_ids", "attn_mask", "logit_scale")
        return sum(math.prod(v.shape) for k, v in state.items() if not k.endswith(skip))

    counts = {"unet": ("UNetModel", total(parts.unet)), "vae": ("AutoencoderKL", total(parts.vae))}
    if parts.text:
        sd1 = any(k.startswith("transformer.") for k in parts.text)
        counts["text_encoder"] = ("CLIPTextModel" if sd1 else "OpenCLIPTextTower", total(parts.text))
    if parts.sgm:  # sgm (SDXL): OpenCLIP towers carry the pooled projection, named as diffusers does
        from t2i.convert.sgm_keys import embedder_prefix
        from t2i.convert.text_keys import strip_prefix
        from t2i.pipelines.single_file import sgm_towers
        from t2i.text.conditioner import text_encoder_names

        towers = sgm_towers(parts.sgm)
        for name, (index, kind) in zip(text_encoder_names([k == "openclip" for _, k in towers]), towers, strict=True):
            tower = strip_prefix(parts.sgm, embedder_prefix(index, kind))
            counts[name] = ("CLIPTextModel" if kind == "clip" else "OpenCLIPTextTower", total(tower))
    return counts


def run(args: argparse.Namespace) -> int:
    for name, (class_name, count) in describe(args.target, args.overrides).items():
        print(f"{name}: {class_name} {count:,}")
    return 0

"""LoRA fine-tuning and inference on t2i backbones (through `peft`), with files in diffusers and kohya-ss naming.

See docs/LORA.md. Public API:
- `apply_lora(model, rank, alpha, dropout, target_modules, kind="lora"|"loha"|"lokr", dora=False)`: trainable
  adapters on a backbone;
- `save_lora_file(target, path)` / `load_lora(pipe, path, scale, name)`: LoRA/DoRA files in PEFT (diffusers)
  naming with diffusers' adapter-metadata header, LoHa/LoKr in LyCORIS' kohya naming; loading kohya-ss and
  LyCORIS files (LoCon, LoHa, LoKr, dora_scale) too;
- `fuse_lora(pipe)` / `unfuse_lora(pipe)` / `set_lora_scale` / `unload_lora`.
"""

from t2i.lora.files import components_of, lora_state_dict, parse_lora_state_dict, save_lora_file
from t2i.lora.inference import fuse_lora, load_lora, loaded_loras, set_lora_scale, unfuse_lora, unload_lora
from t2i.lora.peft_lora import apply_lora, default_targets, lora_parameters, resolve_targets

__all__ = [
    "apply_lora",
    "components_of",
    "default_targets",
    "fuse_lora",
    "load_lora",
    "loaded_loras",
    "lora_parameters",
    "lora_state_dict",
    "parse_lora_state_dict",
    "resolve_targets",
    "save_lora_file",
    "set_lora_scale",
    "unfuse_lora",
    "unload_lora",
]

"""Shared pieces of the LoRA tests: a tiny random t2i UNet, its output, random LoRA weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from t2i.lora.peft_lora import lora_layers
from t2i.models.unet import UNetModel

TOL = 2 / 255
TINY_UNET = dict(  # noqa: C408 (keyword form reads like the YAML)
    in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
    channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=16, legacy=False,
)  # fmt: skip
# Hand-written diffusers names of two attention projections of TINY_UNET (attention at level 1 and the middle).
KOHYA_MODULES = {
    "input_blocks.3.1.transformer_blocks.0.attn2.to_k": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    "middle_block.1.transformer_blocks.0.attn1.to_out.0": "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0",
}


def randomize_lora_b(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """lora_B starts at zero (no effect); give it random values so the LoRA changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * std)


def tiny_unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(**TINY_UNET).eval()
    with torch.no_grad():  # zero-initialised outputs would hide most of the network
        for p in unet.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    return unet


def unet_output(unet: UNetModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), ctx)


def kohya_file(path, seed: int, rank: int, alpha: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write a kohya-ss LoRA for KOHYA_MODULES; returns {our path: (down, up)}."""
    unet = tiny_unet()
    gen = torch.Generator().manual_seed(seed)
    state, weights = {}, {}
    for ours, flat in KOHYA_MODULES.items():
        w = unet.get_submodule(ours).weight
        down = torch.randn(rank, w.shape[1], generator=gen)
        up = torch.randn(w.shape[0], rank, generator=gen)
        state |= {
            f"{flat}.lora_down.weight": down,
            f"{flat}.lora_up.weight": up,
            f"{flat}.alpha": torch.tensor(alpha),
        }
        weights[ours] = (down, up)
    save_file(state, str(path))
    return weights


def lora_train_yaml(tmp_path: Path, base: Path, lora: str, lr: float = 1e-3, steps: int = 2) -> Path:
    """A `t2i lora train` config on `base` with `model.lora: {lora}`, training on 4 teal-shape images."""
    from t2i.recipes.personalize import write_concept_folder

    data = write_concept_folder(tmp_path / "data", "teal", 4, 32, seed=0)
    path = tmp_path / "lora.yaml"
    path.write_text(f"""
seed: 0
model:
  kind: latent_diffusion
  unet_config: {{from_pretrained: {base}}}
  lora: {{{lora}}}
  optim: {{lr: {lr}}}
data: {{train: [{data}], resolution: 32, batch_size: 2, shuffle_buffer: 4}}
trainer: {{max_steps: {steps}, log_every: 1, sample_every: 0, checkpoint_every: {steps}, out_dir: {tmp_path / "run"},
          ema: {{enabled: false}}}}
""")
    return path

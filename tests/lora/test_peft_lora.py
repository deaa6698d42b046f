"""LoRA on an Imagen UNet through peft: only the adapters train, and the file round trip in PEFT naming."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from t2i.lora import apply_lora, load_lora, lora_parameters, save_lora_file
from t2i.lora.peft_lora import is_lora_parameter
from t2i.models.imagen_unet import ImagenUNet

IMAGEN = dict(  # noqa: C408 (keyword form reads like the YAML)
    embed_dim=16, image_size=8, channels=3, text_embed_dim=12, num_res_blocks=[1, 1], channel_mult=[1, 2],
    per_head_channels=8, cond_dim=16, attention_type="fused", learned_sinu_pos_emb_dim=0,
    attention_resolutions=[8, 4],
)  # fmt: skip


def tiny_imagen(seed: int = 0) -> ImagenUNet:
    torch.manual_seed(seed)
    model = ImagenUNet(**IMAGEN)
    with torch.no_grad():  # zero-initialised output projections would hide the attention blocks
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.1)
    return model


def frozen_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if not is_lora_parameter(n)}


def assert_only_lora_changed(module, before, lora_before):
    after = {n: p for n, p in module.named_parameters() if not is_lora_parameter(n)}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a base weight moved"
    lora_after = {n: p for n, p in module.named_parameters() if is_lora_parameter(n)}
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before), "no LoRA weight moved"


def imagen_inputs(seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 3, 8, 8, generator=gen),
        "time_cond": torch.rand(2, generator=gen),
        "text_embed": torch.randn(2, 5, 12, generator=gen),
        "text_mask": torch.ones(2, 5, dtype=torch.bool),
    }


def test_imagen_unet_lora_trains_only_lora_and_round_trips_in_peft_naming(tmp_path):
    unet = tiny_imagen()
    targets = apply_lora(unet, rank=2, alpha=4.0)
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    assert leaves == {"q", "kv_self", "kv_context", "proj_out"}
    assert all(type(unet.get_submodule(t).get_base_layer()) is torch.nn.Linear for t in targets)
    before = frozen_snapshot(unet)
    lora_before = {n: p.detach().clone() for n, p in unet.named_parameters() if is_lora_parameter(n)}
    optimizer = torch.optim.AdamW(lora_parameters(unet), lr=1e-2)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(unet)}
    target = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(unet(**imagen_inputs()), target).backward()
        optimizer.step()
    assert_only_lora_changed(unet, before, lora_before)

    path = save_lora_file(unet, tmp_path / "imagen.safetensors")
    keys = load_file(str(path))
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    with torch.no_grad():
        expected = unet(**imagen_inputs(3))
        fresh = tiny_imagen()
        base = fresh(**imagen_inputs(3))
        load_lora(fresh, path)
        torch.testing.assert_close(fresh(**imagen_inputs(3)), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3

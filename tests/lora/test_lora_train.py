"""LoRA training: only the adapters train (SD pipeline task and a tiny Imagen UNet); Imagen file round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import t2i
from t2i.config import build_config
from t2i.errors import ConfigError
from t2i.lora import apply_lora, load_lora, lora_parameters, save_lora_file
from t2i.lora.peft_lora import is_lora_parameter
from t2i.models.imagen_unet import ImagenUNet
from t2i.train.tasks.lora import LoraTask, PriorPreservation

IMAGEN = dict(  # noqa: C408 (keyword form reads like the YAML)
    embed_dim=16, image_size=8, channels=3, text_embed_dim=12, num_res_blocks=[1, 1], channel_mult=[1, 2],
    per_head_channels=8, cond_dim=16, attention_type="fused", learned_sinu_pos_emb_dim=0,
    attention_resolutions=[8, 4],
)  # fmt: skip


def lora_config(**lora):
    return build_config({
        "model": {"kind": "latent_diffusion", "lora": {"rank": 4, "alpha": 4.0, **lora}},
        "data": {"resolution": 32, "batch_size": 2},
    })  # fmt: skip


def frozen_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if not is_lora_parameter(n)}


def assert_only_lora_changed(module, before, lora_before):
    after = {n: p for n, p in module.named_parameters() if not is_lora_parameter(n)}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a base weight moved"
    lora_after = {n: p for n, p in module.named_parameters() if is_lora_parameter(n)}
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before), "no LoRA weight moved"


def test_sd_lora_task_trains_only_lora_parameters_with_prior_preservation(sd1_lora_dir):
    pipe = t2i.load_pipeline(sd1_lora_dir)
    prior = PriorPreservation(["a circle"], num_images=2, steps=2, guidance_scale=1.0)
    task = LoraTask(lora_config(target_modules=["attention", "ff"]), pipe, prior=prior)
    task.make_class_images()
    assert task.class_latents.shape == (2, 4, 16, 16)
    before = frozen_snapshot(task)
    lora_before = {n: p.detach().clone() for n, p in task.named_parameters() if is_lora_parameter(n)}
    params = task.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    lora_ids = {id(p) for p in lora_parameters(task)}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == lora_ids and len(held) == 2 * len(task.targets)
    assert {id(p) for p in task.parameters() if p.requires_grad} == lora_ids
    assert any(".ff.net.2" in t for t in task.targets) and any(".attn2.to_k" in t for t in task.targets)

    gen = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, "captions": ["a red circle", "red"]}
    task.train()
    for _ in range(2):
        optimizer.zero_grad()
        task(batch, gen).backward()
        optimizer.step()
    assert_only_lora_changed(task, before, lora_before)


def test_distill_prior_loss_is_the_distance_to_an_independent_copy_of_the_base(sd1_lora_dir):
    pipe = t2i.load_pipeline(sd1_lora_dir)
    prior = PriorPreservation(["a circle", "a red square"], num_images=2, steps=2, guidance_scale=1.0,
                              loss="distill")  # fmt: skip
    task = LoraTask(lora_config(target_modules=["attention", "ff", "conv"]), pipe, prior=prior)
    task.make_class_images()
    with torch.no_grad():  # lora_B starts at zero: the LoRA model is the base, so there is nothing to preserve
        assert task.prior_loss(3, torch.Generator().manual_seed(0)).item() == 0.0
        for p in task.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)

        reference_unet = t2i.load_pipeline(sd1_lora_dir).unet
        gen = torch.Generator().manual_seed(1)
        index = torch.randint(len(task.class_latents), (3,), generator=gen)
        noised = task.objective.prepare(task.class_latents[index], gen)
        context = task.class_context[index]
        expected = torch.nn.functional.mse_loss(
            task.unet(noised.x_t, noised.t, context=context), reference_unet(noised.x_t, noised.t, context=context)
        )
        loss = task.prior_loss(3, torch.Generator().manual_seed(1))

        task.prior.unconditional_share = 0.7  # 2 of 3: the first two samples take the empty prompt
        unconditional = task.text_encoder.encode(["", "a circle", "a red square"]).embeddings[:1].float()
        assert not torch.equal(unconditional[0], context[0])
        context = torch.cat([unconditional.expand(2, -1, -1), context[2:]])
        expected_unconditional = torch.nn.functional.mse_loss(
            task.unet(noised.x_t, noised.t, context=context), reference_unet(noised.x_t, noised.t, context=context)
        )
        loss_unconditional = task.prior_loss(3, torch.Generator().manual_seed(1))
        task.prior.unconditional_share = 0.0
    assert expected.item() > 1e-6
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(loss_unconditional, expected_unconditional, rtol=1e-4, atol=1e-7)
    assert abs(loss_unconditional.item() - loss.item()) > 1e-4 * loss.item()

    optimizer = torch.optim.Adam(task.trainable_parameters(), lr=0.02)
    start = task.prior_loss(4, torch.Generator().manual_seed(2)).item()
    for _ in range(10):  # the loss pulls the LoRA back towards the base on the class images
        optimizer.zero_grad()
        task.prior_loss(4, torch.Generator().manual_seed(2)).backward()
        optimizer.step()
    assert task.prior_loss(4, torch.Generator().manual_seed(2)).item() < 0.5 * start


def test_prior_loss_names_the_choices():
    with pytest.raises(ConfigError, match="'l2' is not one of diffusion, distill"):
        PriorPreservation(["a circle"], loss="l2")


def tiny_imagen(seed: int = 0) -> ImagenUNet:
    torch.manual_seed(seed)
    model = ImagenUNet(**IMAGEN)
    with torch.no_grad():  # zero-initialised output projections would hide the attention blocks
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.1)
    return model


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


def test_lora_task_starts_from_a_single_file_or_a_run_folder(sd1_lora_dir, tmp_path):
    import shutil

    from sd_helpers import single_file_from_diffusers, tiny_sd1_yaml

    from t2i.config import load_config
    from t2i.train.tasks.lora import build_lora_task, resolve_base

    unet_config = single_file_from_diffusers(sd1_lora_dir, tmp_path / "tiny.safetensors")
    tiny_sd1_yaml(sd1_lora_dir, unet_config, tmp_path / "tiny.yaml")
    shutil.copytree(sd1_lora_dir, tmp_path / "run" / "export")  # a t2i run folder with its exported pipeline
    assert resolve_base(tmp_path / "run") == tmp_path / "run" / "export"

    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        expected = t2i.load_pipeline(sd1_lora_dir).unet(x, t, context=context)
    for base in (tmp_path / "tiny.safetensors", tmp_path / "run"):
        overrides = [f"model.unet_config.from_pretrained={base}", "model.lora.rank=2", "model.lora.alpha=2.0",
                     "data.resolution=32"]  # fmt: skip
        task = build_lora_task(load_config(str(tmp_path / "tiny.yaml"), overrides))
        assert task.targets and all(p.requires_grad for p in task.trainable_parameters())
        with torch.no_grad():  # lora_B = 0: the adapted UNet is the base, whichever form it was read from
            torch.testing.assert_close(task.unet(x, t, context=context), expected, rtol=1e-5, atol=1e-5)

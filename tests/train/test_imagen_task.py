"""ImagenTask: config validation, the EDM / DDPM losses against closed-form recomputation, CFG dropout, the SR
stage's low-res conditioning (NeMo's noise augmentation), training-optimisation flags, precache + train + export."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from t2i.config import build_config
from t2i.errors import ConfigError
from t2i.train.task import build_task
from t2i.train.tasks.imagen import ImagenTask

TEXT_DIM = 8


def tiny_model(unet_type: str = "base", **changes) -> dict:
    unet = {
        "embed_dim": 8,
        "image_size": 8,
        "text_embed_dim": TEXT_DIM,
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_attn_heads": 1,
        "per_head_channels": 8,
        "cond_dim": 8,
        "attention_type": "fused",
        "feature_pooling_type": "mean",
        "learned_sinu_pos_emb_dim": 0,
        "attention_resolutions": [4],
        "flash_attention": False,
    }
    if unet_type != "base":
        unet |= {"noise_cond_aug": True}
    model = {
        "kind": "imagen",
        "unet_type": unet_type,
        "unet": unet,
        "preconditioning_type": "EDM",
        "preconditioning": {"loss_type": "l2", "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2},
        "conditioning": {
            "embed_dim": TEXT_DIM,
            "token_length": 6,
            "drop_rate": 0.0,
            "precached_key": "embeddings",
            "online_encoding": False,
            "low_res_size": 4,
        },
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            model[section] = dict(model[section]) | {name: value}
        else:
            model[section] = value
    return model


def make_task(unet_type: str = "base", trainer: dict | None = None, **changes) -> ImagenTask:
    cfg = build_config({"model": tiny_model(unet_type, **changes), "trainer": trainer or {}})
    task = ImagenTask(cfg)
    with torch.no_grad():  # the zero-initialised output conv would make every loss trivial
        for p in task.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return task


def fixed_batch(size: int = 8, batch: int = 3, tokens: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 2:] = False
    return {
        "image_encoded": {"mean": torch.rand(batch, 3, size, size, generator=g) * 2 - 1},
        "captions_encoded": {"embeddings": torch.randn(batch, tokens, TEXT_DIM, generator=g), "mask": mask},
    }


def padded_text(batch: dict, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    emb, mask = batch["captions_encoded"]["embeddings"], batch["captions_encoded"]["mask"]
    return F.pad(emb, (0, 0, 0, length - emb.shape[1])), F.pad(mask, (0, length - mask.shape[1]), value=False)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"conditioning.bogus": 1}, "model.conditioning.bogus: unknown key"),
        (
            {"conditioning.embed_dim": 16},
            "model.conditioning.embed_dim: 16 must equal model.unet.text_embed_dim",
        ),
        ({"preconditioning.loss_type": "l3"}, "model.preconditioning.loss_type: 'l3' is not one of"),
        ({"noise_cond_aug": True}, "model.noise_aug: only super-resolution stages"),
        ({"conditioning.online_encoding": False, "conditioning.precached_key": None}, "precached_key: null"),
    ],
)
def test_invalid_configs_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ImagenTask(build_config({"model": tiny_model(**changes)}))


def test_edm_loss_matches_closed_form():
    task = make_task()
    batch = fixed_batch()
    loss = task.training_loss(batch, torch.Generator().manual_seed(7))
    # Recompute: ln(sigma) ~ N(-1.2, 1.2^2), then noise; D = c_skip x + c_out F(c_in x, ln(sigma)/4).
    g = torch.Generator().manual_seed(7)
    x0 = batch["image_encoded"]["mean"]
    sigma = (torch.randn(3, generator=g) * 1.2 - 1.2).exp()
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    s, sd = sigma.view(-1, 1, 1, 1), 0.5
    emb, mask = padded_text(batch)
    out = task.unet(x / (s**2 + sd**2).sqrt(), sigma.log() / 4, emb, mask)
    denoised = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * out
    weight = (s**2 + sd**2) / (s * sd) ** 2
    expected = (weight * (denoised - x0) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_ddpm_x_start_loss_matches_closed_form():
    task = make_task(
        preconditioning_type="DDPM",
        preconditioning={"pred_objective": "x_start", "noise_schedule": "linear", "loss_type": "l1"},
    )
    batch = fixed_batch()
    loss = task.training_loss(batch, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x0 = batch["image_encoded"]["mean"]
    t = torch.rand(3, generator=g)
    logsnr = -torch.log(torch.expm1(1e-4 + 10 * t**2))  # NeMo's continuous linear schedule
    alpha, sigma = logsnr.sigmoid().sqrt().view(-1, 1, 1, 1), (-logsnr).sigmoid().sqrt().view(-1, 1, 1, 1)
    z = alpha * x0 + sigma * torch.randn(x0.shape, generator=g)
    emb, mask = padded_text(batch)
    expected = (task.unet(z, logsnr, emb, mask) - x0).abs().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_text_dropout_zeroes_embedding_and_mask():
    task = make_task(**{"conditioning.drop_rate": 1.0})
    emb, mask = padded_text(fixed_batch())
    cond = task.conditioner.text.drop({"context": emb, "context_mask": mask}, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(cond["context"]) == 0 and not cond["context_mask"].any()
    kept = make_task(**{"conditioning.drop_rate": 0.0}).conditioner.text.drop(
        {"context": emb, "context_mask": mask}, torch.Generator()
    )
    assert torch.equal(kept["context"], emb) and torch.equal(kept["context_mask"], mask)


@pytest.mark.parametrize("per_sample", [True, False])
def test_sr_low_res_is_area_downsampled_and_noise_augmented(per_sample):
    task = make_task("sr-unet", noise_aug={"per_sample": per_sample})
    images = fixed_batch()["image_encoded"]["mean"]
    cond = task.low_res_training_cond(images, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    draws = torch.randn(3 if per_sample else 1, generator=g)
    sigma = (draws * 1.2 - 1.2).exp().expand(3)
    low = images.reshape(3, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 8 -> 4 px area filter
    s = sigma.view(-1, 1, 1, 1)
    expected = (low + s * torch.randn(low.shape, generator=g)) / (s**2 + 0.25).sqrt()
    torch.testing.assert_close(cond["x_low_res"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["aug_cond"], sigma.log() / 4)
    assert per_sample or bool((cond["aug_cond"] == cond["aug_cond"][0]).all())


def test_sr_stage_without_augmentation_samples_on_the_low_res_it_trained_on():
    # Regression: sampling once applied c_in(0.002) ~ 2 to the low-res input of a stage trained on plain
    # low-res images, which left the demo's SR output covered in speckle.
    unet = dict(tiny_model("sr-unet")["unet"]) | {"noise_cond_aug": False}
    task = make_task("sr-unet", unet=unet, noise_aug=False)
    images = fixed_batch()["image_encoded"]["mean"].clamp(-1, 1)
    trained_on = task.low_res_training_cond(images, torch.Generator().manual_seed(0))
    low = images.reshape(3, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    for level in (None, 0.002, 0.5):
        sampled_on = task.stage.low_res_cond(low, level, torch.Generator().manual_seed(1))
        assert sampled_on.keys() == trained_on.keys() == {"x_low_res"}
        torch.testing.assert_close(sampled_on["x_low_res"], trained_on["x_low_res"])


def test_sr_stage_with_augmentation_samples_with_c_in_scaled_low_res():
    task = make_task("sr-unet")
    low = fixed_batch()["image_encoded"]["mean"].reshape(3, 3, 4, 2, 4, 2).mean(dim=(3, 5)).clamp(-1, 1)
    cond = task.stage.low_res_cond(low, 0.002, torch.Generator().manual_seed(1))
    noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(1))
    expected = (low + 0.002 * noise) / (0.002**2 + 0.25) ** 0.5
    torch.testing.assert_close(cond["x_low_res"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["aug_cond"], torch.full((3,), float(torch.tensor(0.002).log()) / 4))


def _loss_and_grads(task: ImagenTask, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    task.zero_grad()
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        loss = task.training_loss(fixed_batch(), torch.Generator().manual_seed(11))
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.flatten() for p in task.trainable_parameters()])


@pytest.mark.parametrize("flag", ["gradient_checkpointing", "flash_attention", "channels_last", "bf16"])
def test_optimisation_flags_keep_loss_and_gradients(flag):
    reference = make_task("sr-unet")
    ref_loss, ref_grads = _loss_and_grads(reference)
    torch.manual_seed(0)
    if flag in ("gradient_checkpointing", "flash_attention"):
        task = make_task("sr-unet", **{f"unet.{flag}": True})
    else:
        task = make_task("sr-unet", **({"channels_last": True} if flag == "channels_last" else {}))
    task.load_model_state_dict(reference.model_state_dict())
    if flag == "channels_last":
        task.prepare_for_training(task.cfg, torch.device("cpu"))
    loss, grads = _loss_and_grads(task, "bf16" if flag == "bf16" else None)
    tol = 5e-2 if flag == "bf16" else 1e-4
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    assert float((grads - ref_grads).norm() / ref_grads.norm()) < (0.1 if flag == "bf16" else 1e-4)


def test_inductor_compiles_the_backbone_without_changing_the_loss(monkeypatch):
    # The flag path (prepare_for_training -> module.compile()) with the aot_eager backend: it traces forward and
    # backward like inductor does but skips C++ code generation, which takes minutes on a shared 2-core CPU.
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend="aot_eager"))
    reference = make_task()
    ref_loss, _ = _loss_and_grads(reference)
    task = make_task(inductor=True)
    task.load_model_state_dict(reference.model_state_dict())
    task.prepare_for_training(task.cfg, torch.device("cpu"))
    loss, _ = _loss_and_grads(task)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    assert set(task.model_state_dict()) == set(reference.model_state_dict())


def test_precache_train_export_roundtrip(tmp_path):
    from t2i.data.shapes import write_shapes_dataset
    from t2i.pipelines.imagen_stage import load_stage
    from t2i.train.precache import precache_imagen
    from t2i.train.trainer import train

    write_shapes_dataset(tmp_path / "data", 12, 16, seed=0, shard_size=100)
    model = tiny_model(
        "sr",
        conditioning={
            "embed_dim": 384,
            "token_length": 8,
            "precached_key": "embeddings",
            "online_encoding": False,
            "low_res_size": 8,
        },
    )
    model["unet"] = {
        "embed_dim": 8,
        "image_size": 16,
        "text_embed_dim": 384,
        "channel_mult": [1, 2],
        "num_attn_heads": 1,
        "per_head_channels": 8,
        "atnn_enabled_at": [0, 1],
        "num_resblocks": [1, 1],
        "feature_pooling_type": "mean",
        "learned_sinu_pos_emb_dim": 0,
        "noise_cond_aug": True,
    }
    cfg = build_config(
        {
            "model": model,
            "data": {
                "train": [str(tmp_path / "data")],
                "resolution": 16,
                "batch_size": 4,
                "shuffle_buffer": 4,
            },
            "trainer": {
                "max_steps": 3,
                "log_every": 1,
                "sample_every": 0,
                "checkpoint_every": 3,
                "out_dir": str(tmp_path / "run"),
            },
        }
    )
    stats = precache_imagen(cfg, tmp_path / "pre", batch_size=8)
    assert stats["num_samples"] == 12 and stats["resolution"] == 16
    cfg.data.train = [str(tmp_path / "pre")]
    task = ImagenTask(cfg)
    result = train(cfg, task)
    assert result.step == 3 and all(math.isfinite(v) for v in result.losses)
    previews = task.sample_images(["a red circle in the top left", "a blue cross"], seed=0, steps=2)
    assert [im.size for im in previews] == [(16, 16), (16, 16)]
    folder = task.export(tmp_path / "stage")
    stage, defaults = load_stage(folder)
    assert defaults.sampler == "heun"
    # folders written before the samplers were unified name EDM's Heun `edm_heun`, and a model-level
    # `noise_cond_aug`: both still load
    meta = json.loads((folder / "stage.json").read_text())
    (folder / "stage.json").write_text(json.dumps({**meta, "sampling": {**meta["sampling"], "sampler": "edm_heun"}}))
    old_config = yaml.safe_load((folder / "config.yaml").read_text())
    old_config["model"]["noise_cond_aug"] = old_config["model"].pop("noise_aug")["enabled"]
    (folder / "config.yaml").write_text(yaml.safe_dump(old_config))
    _, old_defaults = load_stage(folder)
    assert old_defaults.sampler == "heun"
    with task.ema_weights(True):
        for name, value in task.model_state_dict().items():
            torch.testing.assert_close(stage.unet.state_dict()[name], value.float())


def test_build_task_initialises_the_same_weights_from_the_same_seed():
    from t2i.train.task import build_task

    cfg = build_config({"model": tiny_model(), "seed": 3})
    torch.manual_seed(123)  # whatever the global generator held before
    first = build_task(cfg).unet.state_dict()
    torch.rand(5)
    second = build_task(cfg).unet.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_task(build_config({"model": tiny_model(), "seed": 4})).unet.state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def lora_stage_config(base: str, **lora) -> dict:
    return build_config({
        "model": tiny_model() | {"from_pretrained": base,
                                 "lora": {"rank": 2, "alpha": 2.0, "target_modules": ["attention", "ff", "conv"]}
                                 | lora},
        "trainer": {"ema": {"enabled": False}},
    })  # fmt: skip


def unet_inputs(seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 3, 8, 8, generator=g), "time_cond": torch.rand(2, generator=g),
            "text_embed": torch.randn(2, 6, TEXT_DIM, generator=g), "text_mask": torch.ones(2, 6, dtype=torch.bool)}  # fmt: skip


def test_lora_on_a_pretrained_stage_trains_only_adapters_and_lands_on_its_cascade_stage(tmp_path):
    from safetensors.torch import load_file

    from t2i.lora import load_lora, loaded_loras
    from t2i.pipelines.cascade import CascadePipeline
    from t2i.pipelines.imagen_stage import load_stage

    base_dir = make_task().export(tmp_path / "base")
    sr_dir = make_task("sr-unet").export(tmp_path / "sr")
    base_weights = load_file(str(base_dir / "model.safetensors"))
    task = build_task(lora_stage_config(str(base_dir)))
    state = task.model_state_dict()
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    unet = task.family.unet
    assert {id(p) for p in task.trainable_parameters()} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert len(task.trainable_parameters()) == len(state)

    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        task(fixed_batch(), torch.Generator().manual_seed(step)).backward()
        optimizer.step()
    frozen = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    assert frozen.keys() == base_weights.keys()
    assert all(torch.equal(frozen[k], base_weights[k]) for k in base_weights), "a base weight moved"
    task.load_model_state_dict(task.model_state_dict())  # a checkpoint holds the adapters alone

    lora_file = task.export(tmp_path / "lora")
    assert lora_file.name == "lora.safetensors"
    stages = [load_stage(base_dir), load_stage(sr_dir)]
    cascade = CascadePipeline([s for s, _ in stages], [d for _, d in stages], [torch.nn.Identity()] * 2)
    task.eval()
    with torch.no_grad():
        before = cascade.stages[0].unet(**unet_inputs())
        load_lora(cascade, lora_file)  # fits the base stage only
        after = cascade.stages[0].unet(**unet_inputs())
        torch.testing.assert_close(after, unet(**unet_inputs()), rtol=1e-5, atol=1e-6)
    assert (after - before).abs().max() > 1e-4
    from t2i.errors import LoraError

    with pytest.raises(LoraError, match="is not a stage of this cascade; expected 0 to 1"):
        load_lora(cascade, lora_file, name="again", stage=2)
    # the tiny SR stage shares the base's module shapes: only the stage recorded in the file tells them apart
    from t2i.lora import save_lora_file

    anonymous = save_lora_file({"unet": unet}, tmp_path / "anonymous.safetensors")
    with pytest.raises(LoraError, match=r"fits stages \[0, 1\] of the cascade alike; pass stage=N"):
        load_lora(cascade, anonymous)
    load_lora(cascade, anonymous, stage=1)
    assert set(loaded_loras(cascade)) == {"lora", "anonymous"}


@pytest.mark.parametrize(
    ("source", "lora", "message"),
    [
        (None, {}, "model.from_pretrained: missing; LoRA training needs the base stage"),
        ("empty", {}, "has no model.safetensors"),
        ("base", {"train_text_encoder": True}, "model.lora.train_text_encoder: the SD family only"),
    ],
)
def test_imagen_lora_config_errors_name_the_key(tmp_path, source, lora, message):
    (tmp_path / "empty").mkdir()
    if source == "base":
        make_task().export(tmp_path / "base")
    cfg = lora_stage_config(str(tmp_path / source) if source else None, **lora)
    with pytest.raises(ConfigError, match=message):
        build_task(cfg)


def test_from_pretrained_with_another_architecture_names_the_keys(tmp_path):
    from t2i.errors import WeightsMismatchError

    base = make_task().export(tmp_path / "base")
    cfg = build_config({"model": tiny_model(**{"unet.embed_dim": 16}) | {"from_pretrained": str(base)}})
    with pytest.raises(WeightsMismatchError, match="model.from_pretrained"):
        ImagenTask(cfg)


class WordEncoder(torch.nn.Module):
    """Deterministic per-prompt embeddings (B, 4, TEXT_DIM) for tiny stages (no real text encoder needed)."""

    dim = TEXT_DIM

    def encode(self, prompts):
        from t2i.text.encoders import TextEncoding

        emb = torch.stack([torch.randn(4, TEXT_DIM, generator=torch.Generator().manual_seed(len(p))) for p in prompts])
        return TextEncoding(emb, torch.ones(len(prompts), 4, dtype=torch.bool), emb.mean(1))


def test_imagen_distill_prior_is_the_distance_to_an_independent_copy_of_the_stage(tmp_path):
    from t2i.diffusion.losses import sample_lognormal_sigmas
    from t2i.diffusion.tensors import append_dims, noise_like
    from t2i.pipelines.imagen_stage import load_stage

    base_dir = make_task().export(tmp_path / "base")
    prior = {"class_prompts": ["a red circle", "a blue square"], "num_images": 2, "loss": "distill", "steps": 2}
    task = build_task(lora_stage_config(str(base_dir), prior=prior))
    task.family._lazy["text_encoder"] = WordEncoder()
    task.make_class_samples()
    assert task.class_x0.shape == (4, 3, 8, 8) and task.class_x0.abs().max() <= 1
    with torch.no_grad():  # lora_B starts at zero: nothing to preserve yet
        assert task.prior_loss(3, torch.Generator().manual_seed(0)).item() == 0.0
        for p in task.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        reference, _ = load_stage(base_dir)
        gen = torch.Generator().manual_seed(1)
        index = torch.randint(4, (3,), generator=gen)
        x0, cond = task.class_x0[index], {k: v[index] for k, v in task.class_cond.items()}
        sigma = sample_lognormal_sigmas(3, -1.2, 1.2, gen, x0.device)
        x_noisy = x0 + append_dims(sigma, 4) * noise_like(x0, gen)
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        gap = task.family.stage.denoiser()(x_noisy, sigma, cond) - reference.denoiser()(x_noisy, sigma, cond)
        expected = (append_dims(weight, 4) * gap**2).mean()
        loss = task.prior_loss(3, torch.Generator().manual_seed(1))

        task.prior.unconditional_share = 1.0  # CFG's branch: all-zero text and mask
        blank = {"context": torch.zeros_like(cond["context"]), "context_mask": torch.zeros_like(cond["context_mask"])}
        gap = task.family.stage.denoiser()(x_noisy, sigma, blank) - reference.denoiser()(x_noisy, sigma, blank)
        expected_blank = (append_dims(weight, 4) * gap**2).mean()
        loss_blank = task.prior_loss(3, torch.Generator().manual_seed(1))
        task.prior.unconditional_share = 0.0
    assert expected.item() > 1e-6
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(loss_blank, expected_blank, rtol=1e-5, atol=0.0)
    assert abs(loss_blank.item() - loss.item()) > 1e-4 * loss.item()
    total = task(fixed_batch(), torch.Generator().manual_seed(2))  # the training loss carries the prior term
    assert total.requires_grad and total.item() > 0


def test_imagen_prior_on_an_sr_stage_names_the_key(tmp_path):
    model = tiny_model("sr-unet")
    stage = ImagenTask(build_config({"model": model})).export(tmp_path / "stage")
    prior = {"class_prompts": ["a red circle"], "num_images": 1, "loss": "distill"}
    model |= {"from_pretrained": str(stage), "lora": {"rank": 2, "alpha": 2.0, "prior": prior}}
    with pytest.raises(ConfigError, match="model.lora.prior: base stages only"):
        build_task(build_config({"model": model}))


def test_imagen_distill_prior_works_under_continuous_ddpm(tmp_path):
    """The distill prior is the family's loss with the frozen base as teacher, so it needs no EDM."""
    model = tiny_model(preconditioning_type="DDPM", preconditioning={})
    stage = make_task(preconditioning_type="DDPM", preconditioning={}).export(tmp_path / "stage")
    prior = {"class_prompts": ["a red circle"], "num_images": 2, "loss": "distill", "steps": 2}
    model |= {"from_pretrained": str(stage), "lora": {"rank": 2, "alpha": 2.0, "prior": prior}}
    task = build_task(build_config({"model": model}))
    task.family._lazy["text_encoder"] = WordEncoder()
    task.make_class_samples()
    with torch.no_grad():
        assert task.prior_loss(2, torch.Generator().manual_seed(0)).item() == 0.0
        for p in task.trainable_parameters():
            p.add_(0.05)
        assert task.prior_loss(2, torch.Generator().manual_seed(0)).item() > 0.0

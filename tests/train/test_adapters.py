"""LoRA and prior preservation as task wrappers (`t2i.train.tasks.adapters`): only the adapters train, the distill
prior equals the distance to an independently loaded copy of the base, and a base can be any pipeline form."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import t2i
from t2i.config import LoraPriorConfig, build_config
from t2i.diffusion.losses import DiscreteDiffusionLoss
from t2i.errors import ConfigError
from t2i.lora import lora_parameters
from t2i.lora.peft_lora import is_lora_parameter
from t2i.train.tasks.adapters import LoraTask, PriorPreservationTask
from t2i.train.tasks.latent import LatentDiffusionTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))


@pytest.fixture(scope="module")
def sd1_lora_dir(tmp_path_factory) -> Path:
    from sd_helpers import tiny_diffusers_pipeline

    folder = tmp_path_factory.mktemp("sd1_lora_base")
    tiny_diffusers_pipeline("sd1").save_pretrained(folder)
    return folder


def lora_config(**lora):
    return build_config({
        "model": {"kind": "latent_diffusion", "lora": {"rank": 4, "alpha": 4.0, **lora}},
        "data": {"resolution": 32, "batch_size": 2},
    })  # fmt: skip


def lora_task(folder: Path, prior: LoraPriorConfig | None = None, **lora) -> LoraTask | PriorPreservationTask:
    cfg = lora_config(**lora)
    task = LoraTask(LatentDiffusionTask(cfg, pipe=t2i.load_pipeline(folder)), cfg.model.lora)
    return PriorPreservationTask(task, prior) if prior is not None else task


def frozen_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if not is_lora_parameter(n)}


def assert_only_lora_changed(module, before, lora_before):
    after = {n: p for n, p in module.named_parameters() if not is_lora_parameter(n)}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a base weight moved"
    lora_after = {n: p for n, p in module.named_parameters() if is_lora_parameter(n)}
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before), "no LoRA weight moved"


def test_sd_lora_task_trains_only_lora_parameters_with_prior_preservation(sd1_lora_dir):
    prior = LoraPriorConfig(["a circle"], num_images=2, steps=2, guidance_scale=1.0)
    task = lora_task(sd1_lora_dir, prior, target_modules=["attention", "ff"])
    task.make_class_samples()
    assert task.class_x0.shape == (2, 4, 16, 16)
    before = frozen_snapshot(task)
    lora_before = {n: p.detach().clone() for n, p in task.named_parameters() if is_lora_parameter(n)}
    params = task.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    lora_ids = {id(p) for p in lora_parameters(task)}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    targets = task.inner.targets
    assert held == lora_ids and len(held) == 2 * len(targets)
    assert {id(p) for p in task.parameters() if p.requires_grad} == lora_ids
    assert any(".ff.net.2" in t for t in targets) and any(".attn2.to_k" in t for t in targets)
    assert set(task.model_state_dict()) == {f"unet.{n}" for n, _ in task.family.unet.named_parameters()
                                            if is_lora_parameter(n)}  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, "captions": ["a red circle", "red"]}
    task.train()
    for _ in range(2):
        optimizer.zero_grad()
        task(batch, gen).backward()
        optimizer.step()
    assert_only_lora_changed(task, before, lora_before)


def test_distill_prior_loss_is_the_distance_to_an_independent_copy_of_the_base(sd1_lora_dir):
    prior = LoraPriorConfig(["a circle", "a red square"], num_images=2, steps=2, guidance_scale=1.0, loss="distill")
    task = lora_task(sd1_lora_dir, prior, target_modules=["attention", "ff", "conv"])
    task.make_class_samples()
    family = task.family
    with torch.no_grad():  # lora_B starts at zero: the LoRA model is the base, so there is nothing to preserve
        assert task.prior_loss(3, torch.Generator().manual_seed(0)).item() == 0.0
        for p in task.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)

        reference_unet = t2i.load_pipeline(sd1_lora_dir).unet
        gen = torch.Generator().manual_seed(1)
        index = torch.randint(len(task.class_x0), (3,), generator=gen)
        noised = DiscreteDiffusionLoss().prepare(family.denoiser(), task.class_x0[index], gen)
        context = task.class_cond["context"][index]
        expected = torch.nn.functional.mse_loss(
            family.unet(noised.x_t, noised.t, context=context), reference_unet(noised.x_t, noised.t, context=context)
        )
        loss = task.prior_loss(3, torch.Generator().manual_seed(1))

        task.prior.unconditional_share = 0.7  # 2 of 3: the first two samples take the empty prompt
        unconditional = family.text_encoder.encode([""]).embeddings.float()
        assert not torch.equal(unconditional[0], context[0])
        context = torch.cat([unconditional.expand(2, -1, -1), context[2:]])
        expected_unconditional = torch.nn.functional.mse_loss(
            family.unet(noised.x_t, noised.t, context=context), reference_unet(noised.x_t, noised.t, context=context)
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
    with pytest.raises(ConfigError, match="model.lora.prior.loss: 'l2' is not one of diffusion, distill"):
        build_config({"model": {"lora": {"prior": {"class_prompts": ["a circle"], "loss": "l2"}}}})


def test_lora_task_starts_from_a_single_file_or_a_run_folder(sd1_lora_dir, tmp_path):
    import shutil

    from sd_helpers import single_file_from_diffusers, tiny_sd1_yaml

    from t2i.config import load_config
    from t2i.train.task import build_task
    from t2i.train.tasks.adapters import resolve_base

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
        task = build_task(load_config(str(tmp_path / "tiny.yaml"), overrides))
        assert task.targets and all(p.requires_grad for p in task.trainable_parameters())
        with torch.no_grad():  # lora_B = 0: the adapted UNet is the base, whichever form it was read from
            torch.testing.assert_close(task.family.unet(x, t, context=context), expected, rtol=1e-5, atol=1e-5)

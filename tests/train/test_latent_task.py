"""LatentDiffusionTask: precached and online data paths agree, CFG drops text to the "" encoding, VAE task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from t2i.config import build_config
from t2i.train.tasks.latent import LatentDiffusionTask

TINY_DD = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
           "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
TINY_UNET = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
             "num_res_blocks": 1, "channel_mult": [1], "num_heads": 2, "use_spatial_transformer": True,
             "context_dim": 384, "legacy": False, "image_size": 8}


def tiny_ldm_config(tmp: Path, vae_dir: Path, data: str, precached: bool, **trainer) -> object:
    model = {"kind": "latent_diffusion", "unet_config": TINY_UNET, "scale_factor": 0.5, "text_drop_rate": 0.25,
             "first_stage_config": {"embed_dim": 4, "from_pretrained": str(vae_dir), "ddconfig": TINY_DD},
             "cond_stage_config": {"kind": "minilm", "max_length": 12},
             "optim": {"lr": 1e-3}}
    if precached:
        model |= {"first_stage_key": "image_encoded", "cond_stage_key": "captions_encoded"}
    raw = {"model": model, "data": {"train": [data], "resolution": 16, "batch_size": 4, "shuffle_buffer": 8},
           "trainer": {"max_steps": 3, "log_every": 0, "checkpoint_every": 0, "progress_bar": False,
                       "out_dir": str(tmp / ("pre" if precached else "online")), **trainer}}
    return build_config(raw)


@pytest.fixture(scope="module")
def shapes_and_vae(tmp_path_factory):
    from t2i.data.shapes import write_shapes_dataset
    from t2i.models.autoencoder import AutoencoderKL

    root = tmp_path_factory.mktemp("ldm")
    write_shapes_dataset(root / "shapes", 12, 16, seed=0, shard_size=6)
    torch.manual_seed(0)
    vae_dir = root / "vae"
    AutoencoderKL(4, TINY_DD).save_pretrained(vae_dir)
    return root, vae_dir, str(root / "shapes" / "shapes-{00000..00001}.tar")


@pytest.fixture(scope="module")
def precached_dir(shapes_and_vae):
    from t2i.train.precache import precache

    root, vae_dir, shards = shapes_and_vae
    cfg = tiny_ldm_config(root, vae_dir, shards, precached=False)
    stats = precache(cfg, root / "latents", batch_size=5, shard_size=6)
    assert stats["num_samples"] == 12 and stats["num_shards"] == 2
    return root / "latents"


def test_precached_and_online_training_give_the_same_losses(shapes_and_vae, precached_dir, tmp_path):
    from t2i.train.trainer import train

    _, vae_dir, shards = shapes_and_vae
    losses = {}
    for precached, data in ((False, shards), (True, str(precached_dir / "precached-{00000..00001}.tar"))):
        cfg = tiny_ldm_config(tmp_path, vae_dir, data, precached, ema={"enabled": False})
        torch.manual_seed(0)
        task = LatentDiffusionTask(cfg)
        assert hasattr(task, "text_encoder") != precached  # precached runs never build the encoders
        losses[precached] = train(cfg, task).losses
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-5)


def test_text_dropout_and_sampling_use_the_empty_prompt_encoding(shapes_and_vae, precached_dir, tmp_path):
    from safetensors.torch import load_file

    from t2i.text.encoders import build_text_encoder

    _, vae_dir, _ = shapes_and_vae
    cfg = tiny_ldm_config(tmp_path, vae_dir, str(precached_dir), precached=True)
    task = LatentDiffusionTask(cfg)
    with torch.no_grad():
        empty = build_text_encoder("minilm", max_length=12).encode([""]).embeddings  # (1, 12, 384)
    stored = load_file(str(precached_dir / "uncond.safetensors"))["embeddings"]
    torch.testing.assert_close(stored, empty[0], rtol=1e-4, atol=1e-5)

    context = torch.randn(400, 12, 384)
    dropped = task.conditioner.text.drop({"context": context}, torch.Generator().manual_seed(0))["context"]
    is_empty = torch.isclose(dropped, empty, atol=1e-5).flatten(1).all(dim=1)
    assert 0.18 < is_empty.float().mean() < 0.32  # text_drop_rate 0.25
    assert torch.equal(dropped[~is_empty], context[~is_empty])

    # Sampling's unconditional branch is the same "" encoding that LatentPipeline.generate uses.
    seen = []
    original = task.unet.forward
    task.unet.forward = lambda x, t, context=None, context_mask=None: seen.append(context) or original(x, t, context)
    task.eval()
    images = task.sample_images(["a red circle in the center"], seed=3, guidance_scale=3.0, steps=2)
    assert len(images) == 1 and images[0].size == (16, 16)
    assert seen and all(c.shape[0] == 2 for c in seen)
    for c in seen:
        torch.testing.assert_close(c[0], empty[0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(c[1], empty[0], atol=1e-3)


def test_precached_task_without_vae_path_cannot_sample(precached_dir, tmp_path):
    from t2i.errors import ConfigError

    cfg = tiny_ldm_config(tmp_path, Path("unused"), str(precached_dir), precached=True)
    cfg.model.first_stage_config.from_pretrained = None
    task = LatentDiffusionTask(cfg)
    with pytest.raises(ConfigError, match="from_pretrained"):
        task.sample_images(["a red circle in the center"], seed=0)


def test_mismatched_keys_raise(tmp_path):
    from t2i.errors import ConfigError

    cfg = build_config({"model": {"kind": "latent_diffusion", "first_stage_key": "image_encoded"}})
    with pytest.raises(ConfigError, match="first_stage_key"):
        LatentDiffusionTask(cfg)


def test_autoencoder_task_loss_matches_closed_form_and_learns(shapes_and_vae, tmp_path):
    from t2i.train.task import build_task
    from t2i.train.trainer import train

    _, _, shards = shapes_and_vae
    raw = {"model": {"kind": "autoencoder", "embed_dim": 4, "ddconfig": TINY_DD,
                     "loss": {"pixel_loss": "l2", "kl_weight": 0.5}, "optim": {"lr": 2e-3, "weight_decay": 0.0}},
           "data": {"train": [shards], "resolution": 16, "batch_size": 4},
           "trainer": {"max_steps": 12, "log_every": 0, "checkpoint_every": 0, "progress_bar": False,
                       "out_dir": str(tmp_path / "vae"), "ema": {"enabled": False}}}
    cfg = build_config(raw)
    task = build_task(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = task.training_loss({"images": x}, torch.Generator().manual_seed(5))
    rec, post = task.vae(x, generator=torch.Generator().manual_seed(5))
    expected = ((rec - x) ** 2).mean() + 0.5 * post.kl().mean() / x[0].numel()
    torch.testing.assert_close(loss, expected)
    losses = train(cfg, task).losses
    assert sum(losses[-3:]) < sum(losses[:3])


def test_eval_every_logs_the_judge_curve(shapes_and_vae, precached_dir, tmp_path):
    """trainer.eval_every scores the held-out prompts with the EMA weights and writes eval.json, eval.png and a
    TensorBoard scalar per metric at every evaluation (here steps 2 and 3, the last)."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from t2i.train.trainer import train

    _, vae_dir, _ = shapes_and_vae
    cfg = tiny_ldm_config(tmp_path, vae_dir, str(precached_dir), precached=True, eval_every=2,
                          eval={"seeds": [0], "fid": True, "reference_per_prompt": 1},
                          sample={"steps": 2, "guidance_scale": 2.0})  # fmt: skip
    train(cfg, LatentDiffusionTask(cfg))
    out = tmp_path / "pre"
    history = json.loads((out / "eval.json").read_text())
    assert history["steps"] == [2, 3]
    assert {"eval/colour", "eval/shape", "eval/position", "eval/fid_judge"} <= set(history["values"])
    assert all(len(v) == 2 for v in history["values"].values())
    assert (out / "eval.png").stat().st_size > 0
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert {"eval/colour", "eval/shape", "eval/position"} <= set(events.Tags()["scalars"])

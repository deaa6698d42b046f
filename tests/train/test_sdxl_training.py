"""SDXL training: a tiny SDXL-shaped model (two CLIP text encoders, pooled text + size embeddings in y) trains on
captioned shapes of mixed aspect ratios in single-bucket batches whose recorded crops reach the UNet, samples at a
non-square bucket, precaches both embeddings + pooled + micro-conditioning (and then trains exactly as online),
drops each text embedder at its own rate, and takes LoRA on an SDXL folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from t2i.config import build_config
from t2i.models.layers import size_embedding
from t2i.train.tasks.latent import LatentDiffusionTask
from t2i.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))

from sdxl_helpers import POOLED_DIM as POOLED
from sdxl_helpers import (
    TEXT_DIM,
    TEXT_DIM_2,
    TIME_DIM,
)

SIZES = [(48, 24), (24, 48), (36, 36), (40, 38)]
UNET = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [2],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": -1, "num_head_channels": 8,
        "use_spatial_transformer": True, "use_linear_in_transformer": True, "transformer_depth": [0, 1],
        "context_dim": TEXT_DIM + TEXT_DIM_2, "num_classes": "sequential", "adm_in_channels": POOLED + 6 * TIME_DIM,
        "legacy": False}  # fmt: skip
DD = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
      "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


@pytest.fixture(scope="module")
def sdxl_parts(tmp_path_factory):
    """A tiny diffusers SDXL folder (its text encoders, tokenizers and VAE serve the run) and aspect shapes."""
    from sdxl_helpers import tiny_sdxl_pipeline

    from t2i.data.shapes_aspect import write_aspect_shapes_dataset

    root = tmp_path_factory.mktemp("sdxl_train")
    tiny_sdxl_pipeline().save_pretrained(root / "base")
    write_aspect_shapes_dataset(root / "shapes", 24, SIZES, seed=0, shard_size=12)
    return root, str(root / "shapes" / "shapes-{00000..00001}.tar")


def sdxl_config(
    root: Path, data: str, out: Path, *, buckets: bool = True, precached: bool = False, **trainer
):
    text = {"layer": "penultimate_hidden", "max_length": 16, "kind": "clip"}
    emb_models = [
        {"input_key": "captions", "ucg_rate": 0.2, "emb_model": text | {"path": str(root / "base" / "text_encoder")}},
        {"input_key": "captions", "ucg_rate": 0.3,
         "emb_model": text | {"path": str(root / "base" / "text_encoder_2"), "always_return_pooled": True}},
    ] + [{"input_key": key, "emb_model": {"kind": "size", "outdim": TIME_DIM}} for key in SIZE_KEYS]  # fmt: skip
    model = {"kind": "latent_diffusion", "unet_config": UNET, "scale_factor": 0.13025,
             "first_stage_config": {"embed_dim": 4, "from_pretrained": str(root / "base" / "vae"), "ddconfig": DD},
             "conditioner_config": {"emb_models": emb_models}, "optim": {"lr": 1e-3}}  # fmt: skip
    if precached:
        model |= {"first_stage_key": "image_encoded", "cond_stage_key": "captions_encoded"}
    data_cfg = {"train": [data], "resolution": 24, "batch_size": 3, "shuffle_buffer": 6, "center_crop": False,
                "buckets": {"step": 8, "min_size": 16, "max_size": 32} if buckets else None}  # fmt: skip
    trainer_cfg = {"max_steps": 4, "log_every": 0, "checkpoint_every": 0, "progress_bar": False,
                   "out_dir": str(out), "ema": {"enabled": False}} | trainer  # fmt: skip
    return build_config({"model": model, "data": data_cfg, "trainer": trainer_cfg})


class Recorder:
    """Wraps a UNet's forward to keep what it was called with."""

    def __init__(self, unet):
        self.calls, self.forward = [], unet.forward
        unet.forward = self

    def __call__(self, x, t, context=None, context_mask=None, y=None):
        self.calls.append({"x": x.shape, "context": context.shape, "y": y.detach().clone()})
        return self.forward(x, t, context, context_mask, y)


def test_sdxl_trains_on_mixed_aspects_and_samples_a_non_square_bucket(sdxl_parts, tmp_path):
    root, shards = sdxl_parts
    cfg = sdxl_config(root, shards, tmp_path / "run", sample={"height": 16, "width": 32, "steps": 2})
    task = LatentDiffusionTask(cfg)
    assert task.text_names == ["text_encoder", "text_encoder_2"] and task.micro_conditioning
    batches = []
    encode = task.encode_batch
    task.encode_batch = lambda batch, gen: batches.append(batch) or encode(batch, gen)
    recorder = Recorder(task.unet)
    result = train(cfg, task)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len({tuple(b["images"].shape[-2:]) for b in batches}) >= 2  # several buckets, one per batch
    for batch, call in zip(batches, recorder.calls, strict=True):
        height, width = batch["images"].shape[-2:]
        assert call["x"][-2:] == (height // 2, width // 2) and call["context"][-1] == TEXT_DIM + TEXT_DIM_2
        sizes = torch.cat([batch[k] for k in SIZE_KEYS], dim=1).float()  # (B, 6): h, w, top, left, h, w
        assert sizes[:, 4:].tolist() == [[height, width]] * len(sizes)
        # y = [bigG pooled (dropped rows: zeros) | size embeddings of the recorded original size, crop, target]
        torch.testing.assert_close(call["y"][:, POOLED:], size_embedding(sizes, TIME_DIM))
    assert any(b["crop_coords_top_left"].any() for b in batches)  # random crops are recorded, not all (0, 0)
    task.eval()
    recorder.calls.clear()
    image = task.sample_images(["a red circle in the top left"], seed=0)[0]
    assert image.size == (32, 16)
    target = torch.tensor([[16.0, 32.0]])
    expected = size_embedding(torch.cat([target, torch.zeros(1, 2), target], dim=1), TIME_DIM)
    torch.testing.assert_close(recorder.calls[0]["y"][:, POOLED:], expected.expand(2, -1))  # CFG: 2 rows


def test_each_text_embedder_drops_at_its_configured_rate(sdxl_parts, tmp_path):
    root, shards = sdxl_parts
    task = LatentDiffusionTask(sdxl_config(root, shards, tmp_path / "run", precached=True))
    n, tokens = 4000, 16
    encoded = {"embeddings": torch.ones(n, tokens, TEXT_DIM), "mask": torch.ones(n, tokens, dtype=torch.bool),
               "embeddings_1": torch.ones(n, tokens, TEXT_DIM_2), "mask_1": torch.ones(n, tokens, dtype=torch.bool),
               "pooled_1": torch.ones(n, POOLED)}  # fmt: skip
    batch = {"captions_encoded": encoded} | {k: torch.full((n, 2), 24) for k in SIZE_KEYS}
    cond = task.conditioner(batch, torch.Generator().manual_seed(0), "cpu")
    first = cond["context"][:, 0, :TEXT_DIM].eq(0).all(dim=1)
    second = cond["context"][:, 0, TEXT_DIM:].eq(0).all(dim=1)
    assert 0.18 < first.float().mean() < 0.22 and 0.27 < second.float().mean() < 0.33
    assert torch.equal(cond["y"][:, :POOLED].eq(0).all(dim=1), second)  # bigG's pooled drops with its tokens
    assert 0.04 < (first & second).float().mean() < 0.08  # independent draws: 0.2 x 0.3


def test_sdxl_precache_stores_both_encoders_and_trains_like_online(sdxl_parts, tmp_path):
    import webdataset as wds
    from safetensors.torch import load as load_tensors

    from t2i.train.precache import precache

    root, shards = sdxl_parts
    online_cfg = sdxl_config(root, shards, tmp_path / "online", buckets=False)
    stats = precache(online_cfg, tmp_path / "latents", batch_size=5, shard_size=12)
    assert stats["num_samples"] == 24 and stats["buckets"] == {"24x24": 24}
    stored = next(iter(wds.WebDataset(str(tmp_path / "latents" / "precached-00000.tar"), shardshuffle=False)))
    text = load_tensors(stored["captions_encoded"])
    assert sorted(text) == ["embeddings", "embeddings_1", "mask", "mask_1", "pooled_1"]
    task = LatentDiffusionTask(online_cfg)
    with torch.no_grad():
        bigg = task.text_encoder_2.encode([stored["txt"].decode()])
    torch.testing.assert_close(text["embeddings_1"], bigg.embeddings[0])
    torch.testing.assert_close(text["pooled_1"], bigg.pooled[0])
    moments = load_tensors(stored["image_encoded"])
    assert moments["target_size_as_tuple"].tolist() == [24, 24] and "original_size_as_tuple" in moments

    losses = {}
    for precached, data in (
        (False, shards),
        (True, str(tmp_path / "latents" / "precached-{00000..00001}.tar")),
    ):
        cfg = sdxl_config(root, data, tmp_path / f"run{precached}", buckets=False, precached=precached)
        torch.manual_seed(0)
        losses[precached] = train(cfg, LatentDiffusionTask(cfg)).losses
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-5)


def test_sdxl_lora_on_an_sdxl_folder(sdxl_parts, tmp_path):
    from t2i.train.task import build_task

    root, shards = sdxl_parts
    cfg = sdxl_config(root, shards, tmp_path / "lora", max_steps=2)
    cfg.model.unet_config.from_pretrained = str(root / "base")
    cfg.model.lora = build_config({"model": {"lora": {"rank": 2}}}).model.lora
    task = build_task(cfg)
    before = {k: v.clone() for k, v in task.family.unet.state_dict().items() if "lora" not in k}
    train(cfg, task)
    after = {k: v for k, v in task.family.unet.state_dict().items() if "lora" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # only the adapters train
    lora_file = task.export(tmp_path / "export")
    # diffusers' StableDiffusionXLPipeline reads the file; its UNet then predicts what the trained t2i UNet does
    import diffusers

    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(str(root / "base"))
    reference.load_lora_weights(str(lora_file))
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 16, generator=gen), torch.tensor([500])
    context, pooled = torch.randn(1, 16, TEXT_DIM + TEXT_DIM_2, generator=gen), torch.randn(1, POOLED, generator=gen)
    time_ids = torch.tensor([[16.0, 32.0, 0.0, 0.0, 16.0, 32.0]])
    with torch.no_grad():
        theirs = reference.unet(
            x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        )
        y = torch.cat([pooled, size_embedding(time_ids, TIME_DIM)], dim=1)
        ours = task.family.unet(x, t, context=context, y=y)
        from t2i.lora.peft_lora import adapters_disabled

        with adapters_disabled(task.family.unet):
            base = task.family.unet(x, t, context=context, y=y)
    torch.testing.assert_close(theirs.sample, ours, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, base, atol=1e-6)

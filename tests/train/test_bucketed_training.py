"""Aspect-ratio bucketing in the latent task: a resumed bucketed run's losses equal an uninterrupted one's, bucketed
precache stores per-bucket latents with their micro-conditioning, the census is printed, and previews sample at a
non-square bucket size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_latent_task import TINY_DD, TINY_UNET

from t2i.config import build_config
from t2i.errors import ConfigError
from t2i.train.tasks.latent import LatentDiffusionTask
from t2i.train.trainer import train

SIZES = [(48, 24), (24, 48), (36, 36), (40, 38)]
BUCKETS = {"step": 8, "min_size": 16, "max_size": 32}  # max_area 24^2: 16x32, 24x24, 32x16


@pytest.fixture(scope="module")
def aspect_data(tmp_path_factory):
    from t2i.data.shapes_aspect import write_aspect_shapes_dataset
    from t2i.models.autoencoder import AutoencoderKL

    root = tmp_path_factory.mktemp("bucketed")
    write_aspect_shapes_dataset(root / "shapes", 24, SIZES, seed=0, shard_size=12)
    torch.manual_seed(0)
    AutoencoderKL(4, TINY_DD).save_pretrained(root / "vae")
    return root, str(root / "shapes" / "shapes-{00000..00001}.tar")


def bucketed_config(root: Path, data: str, out: Path, precached: bool = False, **trainer):
    model = {
        "kind": "latent_diffusion",
        "unet_config": TINY_UNET,
        "scale_factor": 0.5,
        "text_drop_rate": 0.25,
        "first_stage_config": {"embed_dim": 4, "from_pretrained": str(root / "vae"), "ddconfig": TINY_DD},
        "cond_stage_config": {"kind": "minilm", "max_length": 12},
        "optim": {"lr": 1e-3},
    }
    if precached:
        model |= {"first_stage_key": "image_encoded", "cond_stage_key": "captions_encoded"}
    data_cfg = {
        "train": [data],
        "resolution": 24,
        "batch_size": 3,
        "shuffle_buffer": 6,
        "center_crop": False,
        "random_flip": True,
        "buckets": BUCKETS,
    }
    trainer_cfg = {
        "max_steps": 6,
        "log_every": 0,
        "checkpoint_every": 3,
        "keep_last": 5,
        "progress_bar": False,
        "out_dir": str(out),
        "ema": {"decay": 0.9},
    } | trainer
    return build_config({"model": model, "data": data_cfg, "trainer": trainer_cfg})


class RecordingTask(LatentDiffusionTask):
    """Records the spatial size of every batch it trains on."""

    def training_loss(self, batch, generator):
        self.__dict__.setdefault("sizes", []).append(tuple(batch["images"].shape[-2:]))
        self.__dict__.setdefault("keys", []).append(list(batch["__key__"]))
        return super().training_loss(batch, generator)


def test_resumed_bucketed_run_has_the_losses_of_an_uninterrupted_one(aspect_data, tmp_path, capsys):
    root, shards = aspect_data
    full_task = RecordingTask(bucketed_config(root, shards, tmp_path / "full"))
    full = train(full_task.cfg, full_task)
    census = capsys.readouterr().out
    assert "buckets: 24 samples in 3 buckets" in census and "16x32" in census and "32x16" in census
    assert len(set(full_task.sizes)) >= 2  # batches of several buckets, each batch one bucket
    state = torch.load(tmp_path / "full" / "ckpt-000003" / "state.pt", weights_only=True)
    assert "pending" in state["ranks"][0]["data"]
    resumed_task = RecordingTask(bucketed_config(root, shards, tmp_path / "resumed",
                                                 resume=str(tmp_path / "full" / "ckpt-000003")))  # fmt: skip
    resumed = train(resumed_task.cfg, resumed_task)
    assert resumed.losses == full.losses and len(full.losses) == 6
    assert resumed_task.sizes == full_task.sizes[3:]
    for key, value in full_task.ema.shadow.items():
        assert torch.equal(resumed_task.ema.shadow[key], value), key


def test_bucketed_precache_and_training_on_it(aspect_data, tmp_path):
    from safetensors.torch import load as load_tensors

    from t2i.data.buckets import BucketTransform
    from t2i.data.readers import build_dataset
    from t2i.train.precache import precache

    root, shards = aspect_data
    cfg = bucketed_config(root, shards, tmp_path / "unused")
    stats = precache(cfg, tmp_path / "latents", batch_size=4, shard_size=10)
    assert stats["num_samples"] == 24 and sum(stats["buckets"].values()) == 24
    assert set(stats["buckets"]) <= {"16x32", "24x24", "32x16"} and len(stats["buckets"]) == 3

    # each stored latent is the VAE mean of the image in its bucket, with its micro-conditioning
    import webdataset as wds

    task = LatentDiffusionTask(cfg)
    images = {s["__key__"]: s for s in build_dataset(shards, 24, shuffle=False, transform=BucketTransform(
        ((16, 32), (24, 24), (32, 16)), center_crop=False))}  # fmt: skip
    stored = list(
        wds.WebDataset(str(tmp_path / "latents" / "precached-{00000..00002}.tar"), shardshuffle=False)
    )
    assert len(stored) == 24
    for sample in stored[::5]:
        blob = load_tensors(sample["image_encoded"])
        image = images[sample["__key__"]]
        with torch.no_grad():
            mean, _ = task.first_stage.encode_moments(image["images"][None])
        torch.testing.assert_close(blob["mean"], mean[0], rtol=1e-4, atol=1e-5)
        for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
            assert torch.equal(blob[key], image[key]), key

    pre_cfg = bucketed_config(root, str(tmp_path / "latents"), tmp_path / "pre", precached=True, max_steps=4)
    shapes = []
    pre_task = LatentDiffusionTask(pre_cfg)
    original = pre_task.encode_batch
    pre_task.encode_batch = lambda batch, gen: (
        shapes.append(batch["original_size_as_tuple"].shape) or original(batch, gen)
    )
    result = train(pre_cfg, pre_task)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert shapes == [(3, 2)] * 4  # micro-conditioning reaches the task from precached shards too


def test_previews_sample_at_a_non_square_bucket(aspect_data, tmp_path):
    root, shards = aspect_data
    cfg = bucketed_config(root, shards, tmp_path / "run", max_steps=1, checkpoint_every=0,
                          sample_prompts=["a red circle in the top left"], sample_every=1,
                          sample={"height": 16, "width": 32, "steps": 2})  # fmt: skip
    task = LatentDiffusionTask(cfg)
    train(cfg, task)
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "samples" / "step_000001.png")
    assert grid.width >= 32
    task.eval()
    assert task.sample_images(["a blue square on the left"], seed=0)[0].size == (32, 16)


def test_bucket_step_must_fit_the_model_factor(aspect_data, tmp_path):
    root, shards = aspect_data
    cfg = bucketed_config(root, shards, tmp_path / "x")
    cfg.data.buckets.step = 5
    cfg.data.buckets.min_size = 15
    with pytest.raises(ConfigError, match="data.buckets.step: 5 is not a multiple of 2"):
        LatentDiffusionTask(cfg)


def test_stats_json_census_is_used_for_precached_runs(tmp_path):
    from t2i.train.bucketing import stored_census

    (tmp_path / "stats.json").write_text(json.dumps({"buckets": {"16x32": 5, "32x16": 2}}))
    assert stored_census([str(tmp_path / "precached-{00000..00001}.tar")]) == {(16, 32): 5, (32, 16): 2}
    assert stored_census([str(tmp_path / "missing" / "x.tar")]) is None


def _torchrun(root: Path, shards: str, out: Path, resume: str = "none") -> list[dict]:
    import os
    import subprocess
    import sys

    from test_distributed import SRC, _free_port

    worker = Path(__file__).with_name("bucket_ddp_worker.py")
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker), str(root), shards, str(out),
           resume]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ddp_ranks_bucket_their_own_shares_and_resume_exactly(aspect_data, tmp_path):
    root, shards = aspect_data
    full = _torchrun(root, shards, tmp_path / "full")
    first_epoch = [k for rank in full for keys in rank["keys"][:2] for k in keys]
    assert len(first_epoch) == len(set(first_epoch)) == 12  # ranks read disjoint shards (one each)
    for rank in full:
        assert all(len(set(keys)) <= 3 for keys in rank["keys"]) and len(rank["losses"]) == 4
    resumed = _torchrun(root, shards, tmp_path / "resumed", str(tmp_path / "full" / "ckpt-000002"))
    assert resumed[0]["losses"] == full[0]["losses"]  # the checkpoint's history is rank 0's
    for before, after in zip(full, resumed, strict=True):
        assert after["losses"][2:] == before["losses"][2:]
        assert after["sizes"] == before["sizes"][2:] and after["keys"] == before["keys"][2:]

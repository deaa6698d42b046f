"""`t2i precache` writes what the frozen encoders produce; `t2i export` gives a folder t2i and diffusers load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from t2i.cli.main import main

TINY_DD = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
           "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
TINY_UNET = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
             "num_res_blocks": 1, "channel_mult": [1], "num_heads": 2, "use_spatial_transformer": True,
             "context_dim": 384, "legacy": False, "image_size": 8}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from omegaconf import OmegaConf

    from t2i.data.shapes import write_shapes_dataset
    from t2i.models.autoencoder import AutoencoderKL

    root = tmp_path_factory.mktemp("pe")
    write_shapes_dataset(root / "shapes", 6, 16, seed=1, shard_size=6)
    torch.manual_seed(0)
    AutoencoderKL(4, TINY_DD).save_pretrained(root / "vae")
    config = {"model": {"kind": "latent_diffusion", "unet_config": TINY_UNET, "scale_factor": 0.7,
                        "first_stage_config": {"embed_dim": 4, "from_pretrained": str(root / "vae"),
                                               "ddconfig": TINY_DD},
                        "cond_stage_config": {"kind": "minilm", "max_length": 12}},
              "data": {"resolution": 16, "batch_size": 3},
              "trainer": {"max_steps": 2, "log_every": 0, "checkpoint_every": 2, "progress_bar": False,
                          "ema": {"enabled": True, "decay": 0.5}}}
    (root / "tiny.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    return root


def test_precache_cli_stores_encoder_outputs(workspace):
    from t2i.data.precached import build_precached_dataset
    from t2i.data.readers import build_dataset
    from t2i.models.autoencoder import AutoencoderKL
    from t2i.text.encoders import build_text_encoder

    out = workspace / "latents"
    rc = main(["precache", str(workspace / "tiny.yaml"), f"data={workspace / 'shapes'}", f"out={out}",
               "--batch-size", "4"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_samples"] == 6 and stats["scale_factor"] == pytest.approx(1 / stats["latent_std"])
    cached = list(build_precached_dataset(str(out), shuffle=False, rank=0, world_size=1))
    images = list(build_dataset(str(workspace / "shapes"), 16, shuffle=False, rank=0, world_size=1))
    assert [c["__key__"] for c in cached] == [i["__key__"] for i in images]
    vae = AutoencoderKL.from_pretrained(workspace / "vae")
    text = build_text_encoder("minilm", max_length=12)
    with torch.no_grad():
        posterior = vae.encode(torch.stack([i["images"] for i in images]))
        encoding = text.encode([i["captions"] for i in images])
    torch.testing.assert_close(torch.stack([c["image_encoded"]["mean"] for c in cached]), posterior.mean,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack([c["image_encoded"]["logvar"] for c in cached]), posterior.logvar,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack([c["captions_encoded"]["embeddings"] for c in cached]),
                               encoding.embeddings, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.stack([c["captions_encoded"]["mask"] for c in cached]), encoding.mask)
    assert [c["captions"] for c in cached] == [i["captions"] for i in images]
    from safetensors.torch import load_file

    uncond = load_file(str(out / "uncond.safetensors"))["embeddings"]
    with torch.no_grad():
        torch.testing.assert_close(uncond, text.encode([""]).embeddings[0], rtol=1e-4, atol=1e-5)


def test_precache_requires_out(workspace, capsys):
    assert main(["precache", str(workspace / "tiny.yaml")]) == 2
    assert "out=DIR" in capsys.readouterr().err


def test_export_loads_in_t2i_and_diffusers(workspace):
    from diffusers import StableDiffusionPipeline

    import t2i

    run = workspace / "run"
    assert main(["train", str(workspace / "tiny.yaml"), f"data.train={workspace / 'shapes'}",
                 f"trainer.out_dir={run}"]) == 0
    out = workspace / "pipe"
    assert main(["export", str(run), "--out", str(out)]) == 0

    ours = t2i.load_pipeline(out)
    # The exported UNet holds the EMA weights of the checkpoint.
    from t2i.train.checkpoint import latest_checkpoint, load_weights

    ema = load_weights(latest_checkpoint(run), use_ema=True)
    for key, value in ours.unet.state_dict().items():
        torch.testing.assert_close(value, ema[key])

    theirs = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    assert theirs.text_encoder.config.use_attention_mask
    prompt = "a blue square at the top"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mine = ours.generate(prompt, height=16, width=16, steps=4, guidance_scale=3.0, latents=latents.clone(),
                         progress=False).images[0]
    ref = theirs(prompt, height=16, width=16, num_inference_steps=4, guidance_scale=3.0, latents=latents.clone(),
                 output_type="pil").images[0]
    diff = np.abs(np.asarray(mine, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    assert diff.max() <= 2


def test_export_of_missing_run_is_a_clean_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err

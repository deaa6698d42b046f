"""FlowTask: a tiny Flux-shaped config (MiniLM text, 16-channel VAE) trains a few steps through the generic loop,
exports a FluxPipeline folder that `t2i.load_pipeline` reads back with the trained weights, and drops text to
the encodings of "" for classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

import t2i
from t2i.config import build_config
from t2i.train.task import build_task
from t2i.train.tasks.flow import FlowTask

TRANSFORMER = {"in_channels": 64, "out_channels": 64, "vec_in_dim": 384, "context_in_dim": 384, "hidden_size": 32,
               "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 6, 6],
               "guidance_embed": False}  # fmt: skip
DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 16,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "norm_num_groups": 8}  # fmt: skip


def tiny_flow_config(tmp, shards: str, **model):
    raw = {
        "model": {"kind": "flow", "transformer_config": TRANSFORMER, "scale_factor": 1.0, "shift_factor": 0.0,
                  "first_stage_config": {"embed_dim": 16, "ddconfig": DDCONFIG},
                  "context_encoder": {"kind": "minilm", "max_length": 8}, "pooled_encoder": None,
                  "mask_text_tokens": True, "text_drop_rate": 0.25, "optim": {"lr": 1e-3}, **model},
        "data": {"train": [shards], "resolution": 16, "batch_size": 4, "shuffle_buffer": 8},
        "trainer": {"max_steps": 3, "log_every": 0, "checkpoint_every": 0, "progress_bar": False,
                    "out_dir": str(tmp / "run"), "ema": {"enabled": False}, "sample": {"steps": 2}},
    }  # fmt: skip
    return build_config(raw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from t2i.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("flow-shapes")
    write_shapes_dataset(root, 8, 16, seed=0, shard_size=8)
    return str(root / "shapes-00000.tar")


def test_a_tiny_flow_model_trains_and_exports_a_loadable_pipeline(shards, tmp_path):
    from t2i.train.trainer import train

    cfg = tiny_flow_config(tmp_path, shards)
    task = build_task(cfg)
    assert isinstance(task, FlowTask)
    before = {k: v.clone() for k, v in task.transformer.state_dict().items()}
    result = train(cfg, task)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    changed = [k for k, v in task.transformer.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(p.requires_grad for p in task.transformer.parameters())
    exported = task.export(tmp_path / "export", use_ema=False)
    pipe = t2i.load_pipeline(exported)
    for key, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, task.transformer.state_dict()[key].cpu(), rtol=0, atol=0)
    assert pipe.pooled_encoder is None and pipe.mask_text_tokens
    prompts = ["a red circle", "a blue square"]  # the MiniLM tokenizer comes back with it (tokenizer_2/)
    torch.testing.assert_close(pipe.context_encoder.encode(prompts).embeddings,
                               task.context_encoder.encode(prompts).embeddings, rtol=0, atol=0)  # fmt: skip
    out = pipe.generate("a red circle", height=16, width=16, steps=2, guidance_scale=3.0, seed=0, progress=False)
    assert out.images[0].size == (16, 16)
    previews = task.sample_images(["a blue square"], seed=0)
    assert previews[0].size == (16, 16)


def test_text_dropout_uses_the_empty_prompt_and_distilled_models_get_guidance(shards, tmp_path):
    cfg = tiny_flow_config(tmp_path, shards, text_drop_rate=1.0, guidance_scale=2.5,
                           transformer_config={**TRANSFORMER, "guidance_embed": True})  # fmt: skip
    task = build_task(cfg)
    batch = {"images": torch.zeros(2, 3, 16, 16), "captions": ["a red circle", "a blue square"]}
    z, cond = task.encode_batch(batch, torch.Generator().manual_seed(0))
    assert z.shape == (2, 16, 8, 8)
    empty = task.conditioner.prompts([""], "cpu")
    for key in ("context", "pooled", "context_mask"):
        torch.testing.assert_close(cond[key], empty[key].expand_as(cond[key]))
    torch.testing.assert_close(cond["guidance"], torch.full((2,), 2.5))
    loss = task.training_loss(batch, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)


@pytest.fixture(scope="module")
def flow_base(shards, tmp_path_factory):
    """A trained (3 steps) tiny flow model exported as a FluxPipeline folder: the base a LoRA trains on."""
    from t2i.train.trainer import train

    tmp = tmp_path_factory.mktemp("flow-base")
    cfg = tiny_flow_config(tmp, shards)
    task = build_task(cfg)
    train(cfg, task)
    return task.export(tmp / "export", use_ema=False)


def test_flow_lora_trains_only_adapters_and_its_file_reproduces_the_previews(shards, flow_base, tmp_path):
    from safetensors import safe_open

    from t2i.lora.peft_lora import adapters_disabled
    from t2i.train.tasks.adapters import LoraTask
    from t2i.train.trainer import train

    cfg = tiny_flow_config(
        tmp_path, shards, lora={"rank": 4, "alpha": 8.0},
        transformer_config={**TRANSFORMER, "from_pretrained": str(flow_base)},
        first_stage_config={"embed_dim": 16, "ddconfig": DDCONFIG, "from_pretrained": str(flow_base / "vae")},
    )  # fmt: skip
    cfg.model.optim.lr = 5e-2  # a few steps must move the adapters visibly
    task = build_task(cfg)
    assert isinstance(task, LoraTask)
    base = {k: v.clone() for k, v in task.family.transformer.state_dict().items() if "lora_" not in k}
    train(cfg, task)
    after = task.family.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base is frozen
    path = task.export(tmp_path / "lora", use_ema=False)
    with safe_open(str(path), "pt") as file:
        keys = list(file.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".attn.to_q.lora_A.weight" in k for k in keys)  # diffusers' Flux naming (split qkv)
    task.eval()
    settings = {"height": 16, "width": 16, "seed": 3, "progress": False, **task.family.sample_settings()}
    previews = task.family.generate(["a red circle"], seed=3).pixels
    pipe = t2i.load_pipeline(flow_base)
    pipe.load_lora(path)
    torch.testing.assert_close(pipe.generate("a red circle", **settings).pixels, previews, rtol=0, atol=1e-6)
    x, t, context, pooled = torch.randn(1, 16, 8, 8), torch.tensor([0.7]), torch.randn(1, 8, 384), torch.randn(1, 384)
    with torch.no_grad():
        trained = task.family.transformer.eval()(x, t, context, pooled)
        loaded = pipe.transformer(x, t, context, pooled)
        with adapters_disabled(pipe.transformer):
            base_out = pipe.transformer(x, t, context, pooled)
    effect, mismatch = (loaded - base_out).abs().max(), (trained - loaded).abs().max()
    assert effect > 1e-5 and mismatch < 1e-3 * effect  # the file holds what trained, and it moves the model


def test_flow_lora_without_a_base_is_a_one_line_config_error(shards, tmp_path):
    from t2i.errors import ConfigError

    with pytest.raises(ConfigError, match="transformer_config.from_pretrained: missing; LoRA training needs"):
        build_task(tiny_flow_config(tmp_path, shards, lora={"rank": 2}))


def test_precached_and_online_flow_training_give_the_same_losses(shards, flow_base, tmp_path):
    """`t2i precache` on a flow config writes the VAE's moments and the context tokens, mask and pooled vector;
    training on them is training on the images and captions, loss for loss."""
    from safetensors.torch import load_file

    from t2i.text.encoders import build_minilm
    from t2i.train.precache import precache
    from t2i.train.trainer import train

    vae = {"embed_dim": 16, "ddconfig": DDCONFIG, "from_pretrained": str(flow_base / "vae")}
    stats = precache(tiny_flow_config(tmp_path, shards, first_stage_config=vae), tmp_path / "latents", batch_size=3)
    assert stats["num_samples"] == 8
    stored = load_file(str(tmp_path / "latents" / "uncond.safetensors"))
    empty = build_minilm(max_length=8).encode([""])
    torch.testing.assert_close(stored["embeddings"], empty.embeddings[0])
    assert torch.equal(stored["mask"], empty.mask[0]) and stored["pooled"].shape == (384,)
    losses = {}
    for precached, data in ((False, shards), (True, str(tmp_path / "latents"))):
        keys = {"first_stage_key": "image_encoded", "cond_stage_key": "captions_encoded"} if precached else {}
        cfg = tiny_flow_config(tmp_path / str(precached), data, first_stage_config=vae, **keys)
        task = build_task(cfg)
        assert task.precached == precached
        losses[precached] = train(cfg, task).losses
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-5)


def test_precached_flow_shards_without_pooled_vectors_are_named(tmp_path):
    from t2i.errors import DataError
    from t2i.text.conditioner import ContextPooledEmbedder

    embedder = ContextPooledEmbedder(lambda: None, 0.0, masked=True)
    with pytest.raises(DataError, match="captions_encoded: no 'pooled'; expected shards precached with this flow"):
        embedder.encode_batch({"captions_encoded": {"embeddings": torch.zeros(2, 8, 384)}}, "cpu")


def test_bucketed_flow_training_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path):
    """Aspect-ratio buckets: each batch is one bucket's size, and a run resumed mid-way has the same losses."""
    from t2i.data.shapes_aspect import write_aspect_shapes_dataset
    from t2i.train.trainer import train

    write_aspect_shapes_dataset(tmp_path / "shapes", 24, [(32, 16), (16, 32), (24, 24)], seed=0, shard_size=12)
    data = str(tmp_path / "shapes" / "shapes-{00000..00001}.tar")
    sizes = []

    def run(out, **trainer):
        cfg = tiny_flow_config(out, data)
        cfg.data.buckets = build_config({"data": {"buckets": {"step": 8, "min_size": 16, "max_size": 32}}}).data.buckets
        cfg.data.resolution, cfg.data.batch_size, cfg.data.center_crop = 24, 3, False
        cfg.trainer.max_steps, cfg.trainer.checkpoint_every, cfg.trainer.keep_last = 6, 3, 5
        for key, value in trainer.items():
            setattr(cfg.trainer, key, value)
        task = build_task(cfg)
        original = task.encode_batch
        task.encode_batch = lambda batch, gen: (sizes.append(tuple(batch["images"].shape[-2:])), original(batch, gen))[1]
        return train(cfg, task)

    full = run(tmp_path / "full")
    assert len(set(sizes)) > 1  # several buckets, not one square size
    first = run(tmp_path / "resumed", max_steps=3)
    resumed = run(tmp_path / "resumed", resume=str(first.last_checkpoint))
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses), rtol=0, atol=0)

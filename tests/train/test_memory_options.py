"""Memory options of full fine-tuning: EMA kept on the CPU or updated every N steps (`trainer.ema.device`,
`update_every`), the AdamW implementation (`model.optim.fused` / `foreach`), and activation checkpointing of the
SDXL-shaped UNet (`model.unet_config.use_checkpoint`)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from train_toy import ToyTask, toy_config

from t2i.config import OptimConfig, build_config
from t2i.errors import ConfigError
from t2i.train.ema import EMA
from t2i.train.optim import build_optimizer
from t2i.train.trainer import train


def test_ema_update_every_matches_closed_form():
    ema = EMA({"w": torch.zeros(2), "n": torch.tensor(0)}, decay=0.9, warmup=False, update_every=3)
    shadow = 0.0
    for step in range(1, 8):
        ema.update({"w": torch.full((2,), float(step)), "n": torch.tensor(step)}, step)
        if step % 3 == 0:  # folds in only after steps 3 and 6, with decay 0.9^3
            shadow = 0.9**3 * shadow + (1 - 0.9**3) * step
        torch.testing.assert_close(ema.shadow["w"], torch.full((2,), shadow), atol=1e-6, rtol=0)
    assert ema.shadow["n"].item() == 6


def test_ema_shadow_lives_where_configured_and_trains_like_the_default(tmp_path):
    default, on_cpu = ToyTask(), ToyTask()
    train(toy_config(tmp_path / "a", max_steps=4, ema={"decay": 0.5}), default)
    train(toy_config(tmp_path / "b", max_steps=4, ema={"decay": 0.5, "device": "cpu"}), on_cpu)
    assert on_cpu.ema.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in on_cpu.ema.shadow.values())
    for key, value in default.ema.shadow.items():
        assert torch.equal(on_cpu.ema.shadow[key], value), key


def test_ema_update_every_resumes_exactly(tmp_path):
    settings = {
        "max_steps": 6,
        "checkpoint_every": 3,
        "keep_last": 5,
        "ema": {"decay": 0.8, "update_every": 2},
    }
    full = ToyTask(num_batches=5)
    train(toy_config(tmp_path / "full", **settings), full)
    resumed = ToyTask(num_batches=5)
    train(
        toy_config(tmp_path / "resumed", resume=str(tmp_path / "full" / "ckpt-000003"), **settings), resumed
    )
    for key, value in full.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[key], value), key


@pytest.mark.gpu
def test_cpu_shadow_of_cuda_weights_matches_a_cuda_shadow():
    live = {"w": torch.randn(1000, device="cuda"), "b": torch.randn(10, device="cuda").half()}
    on_gpu = EMA(live, decay=0.99)
    on_cpu = EMA(live, decay=0.99, device="cpu")
    for step in range(1, 20):
        state = {k: v + step * 0.01 for k, v in live.items()}
        on_gpu.update(state, step)
        on_cpu.update(state, step)
    assert on_cpu.shadow["w"].device.type == "cpu"
    for key, value in on_gpu.shadow.items():
        torch.testing.assert_close(on_cpu.shadow[key], value.cpu(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("implementation", [{"fused": True}, {"foreach": True}, {"foreach": False}])
def test_adamw_implementations_give_the_same_update(implementation):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(17, 5)), torch.nn.Parameter(torch.randn(5))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = build_optimizer(params, OptimConfig(lr=1e-2, weight_decay=0.1))
    chosen = build_optimizer(copies, OptimConfig(lr=1e-2, weight_decay=0.1, **implementation))
    for key, value in implementation.items():
        assert chosen.defaults[key] is value
    for step in range(5):
        grads = [torch.randn_like(p, generator=torch.Generator().manual_seed(step * 10 + i))
                 for i, p in enumerate(params)]  # fmt: skip
        for group, grad in ((params, grads), (copies, grads)):
            for p, g in zip(group, grad):
                p.grad = g.clone()
        reference.step()
        chosen.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-6)


def test_fused_and_foreach_together_is_a_config_error():
    with pytest.raises(ConfigError, match="model.optim.fused"):
        build_config({}, ["model.optim.fused=true", "model.optim.foreach=true"])


SDXL_TINY = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [2],
             "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": -1, "num_head_channels": 8,
             "use_spatial_transformer": True, "use_linear_in_transformer": True, "transformer_depth": [0, 2],
             "context_dim": 32, "num_classes": "sequential", "adm_in_channels": 24, "legacy": False}  # fmt: skip


def test_activation_checkpointing_covers_every_block_of_the_sdxl_unet(monkeypatch):
    from t2i.models import unet as unet_module
    from t2i.models.unet import BasicTransformerBlock, ResBlock, UNetModel

    torch.manual_seed(0)
    plain = UNetModel(**SDXL_TINY).train()
    checkpointed = UNetModel(**(SDXL_TINY | {"use_checkpoint": True})).train()
    for p in plain.parameters():  # zero-initialised output convs would hide most gradients
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    checkpointed.load_state_dict(plain.state_dict())
    calls: list[str] = []
    real_checkpoint = unet_module.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(type(fn.__self__).__name__)
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting)
    gen = torch.Generator().manual_seed(1)
    x, ctx, y = (
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.randn(2, 5, 32, generator=gen),
        torch.randn(2, 24),
    )
    t = torch.tensor([10, 500])
    grads = []
    for model in (plain, checkpointed):
        model.zero_grad()
        model(x, t, context=ctx, y=y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    blocks = Counter(
        type(m).__name__ for m in checkpointed.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))
    )
    assert (
        blocks["ResBlock"] == 8 and blocks["BasicTransformerBlock"] == 8
    )  # 2 + 2 + 4 of each (in, mid, out)
    assert Counter(calls) == blocks  # every block recomputes in backward, each once per forward
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_use_checkpoint_key_reaches_every_block_of_the_task_unet():
    from t2i.train.tasks.latent import load_unet

    cfg = build_config({"model": {"unet_config": SDXL_TINY}}, ["model.unet_config.use_checkpoint=true"])
    unet = load_unet(cfg.model)
    blocks = [m for m in unet.modules() if hasattr(m, "use_checkpoint") and m is not unet]
    assert len(blocks) == 16 and all(m.use_checkpoint for m in blocks)

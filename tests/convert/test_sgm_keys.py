"""sgm (SDXL) single-file key layout: UNet under model.diffusion_model., CLIP-L under
conditioner.embedders.0.transformer., OpenCLIP bigG under conditioner.embedders.{1|0}.model. (open_clip names)."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from t2i.convert.sgm_keys import (
    SgmParts,
    SgmTextEncoder,
    join_sgm_checkpoint,
    sgm_unet_to_t2i,
    split_sgm_checkpoint,
    t2i_unet_to_sgm,
)
from t2i.convert.text_keys import with_text_model_prefix
from t2i.models.unet import UNetModel

TEXT = {"vocab_size": 60, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 8, "projection_dim": 12,
        "bos_token_id": 0, "eos_token_id": 59}  # fmt: skip
UNET = {"model_channels": 16, "channel_mult": [1, 2], "attention_resolutions": [2], "num_res_blocks": 1,
        "num_heads": -1, "num_head_channels": 8, "transformer_depth": [0, 1], "context_dim": 16,
        "num_classes": "sequential", "adm_in_channels": 20, "norm_num_groups": 8}  # fmt: skip


def tiny_parts(seed: int = 0):
    torch.manual_seed(seed)
    unet = UNetModel(**UNET).state_dict()
    clip_l = with_text_model_prefix(CLIPTextModel(CLIPTextConfig(**TEXT)).state_dict())
    bigg = with_text_model_prefix(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)).state_dict())
    vae = {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3), "decoder.conv_out.bias": torch.randn(3)}
    return unet, vae, clip_l, bigg


def test_sdxl_base_file_splits_into_components_and_joins_back():
    unet, vae, clip_l, bigg = tiny_parts()
    parts = SgmParts(unet=unet, vae=vae, text_encoders=[SgmTextEncoder(0, "clip", clip_l),
                                                        SgmTextEncoder(1, "openclip", bigg)])  # fmt: skip
    state = join_sgm_checkpoint(parts)
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight" in state
    p = "conditioner.embedders.1.model."
    fused = state[p + "transformer.resblocks.0.attn.in_proj_weight"]
    names = [f"text_model.encoder.layers.0.self_attn.{n}_proj.weight" for n in "qkv"]
    assert torch.equal(fused, torch.cat([bigg[n] for n in names]))
    assert torch.equal(state[p + "text_projection"], bigg["text_projection.weight"].t())
    assert p + "ln_final.weight" in state and p + "positional_embedding" in state

    state["denoiser.sigmas"] = torch.ones(3)
    back = split_sgm_checkpoint(state)
    assert back.other == ["denoiser.sigmas"]
    assert back.unet.keys() == unet.keys() and all(torch.equal(back.unet[k], unet[k]) for k in unet)
    assert back.vae.keys() == vae.keys()
    assert [(e.index, e.kind) for e in back.text_encoders] == [(0, "clip"), (1, "openclip")]
    for got, expected in zip(back.text_encoders, (clip_l, bigg), strict=True):
        assert got.state.keys() == expected.keys()
        assert all(torch.equal(got.state[k], expected[k]) for k in expected)
    loaded = UNetModel(**UNET)
    loaded.load_state_dict(sgm_unet_to_t2i(state))  # strict: the sgm names are the model's names


def test_refiner_file_has_bigg_at_embedder_0():
    unet, _vae, _clip_l, bigg = tiny_parts(1)
    state = {
        **t2i_unet_to_sgm(unet),
        **join_sgm_checkpoint(SgmParts(text_encoders=[SgmTextEncoder(0, "openclip", bigg)])),
    }
    parts = split_sgm_checkpoint(state)
    assert [(e.index, e.kind) for e in parts.text_encoders] == [(0, "openclip")]
    assert parts.text_encoders[0].state.keys() == bigg.keys()
    assert any(k.startswith("conditioner.embedders.0.model.transformer.resblocks.1.") for k in state)

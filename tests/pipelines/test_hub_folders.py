"""Folders as the hub stores them: `.bin` weights only, `variant="fp16"` files, sharded components with an index
JSON, and fp16 text encoders held in float32 on the CPU. Each folder is written by diffusers' own save_pretrained
from the same random pipeline, and its images are held against the plain safetensors folder's."""

from __future__ import annotations

import pytest
import torch
from sd_helpers import SIZE, initial_latents, t2i_images, tiny_diffusers_pipeline

import t2i
from t2i.cli.main import main
from t2i.errors import PipelineLoadError


@pytest.fixture(scope="module")
def reference(sd1_dir):
    return t2i_images(t2i.load_pipeline(sd1_dir), "a red circle", initial_latents(), steps=2)


def saved(tmp_path, name: str, **options):
    folder = tmp_path / name
    tiny_diffusers_pipeline("sd1").save_pretrained(folder, **options)
    return folder


def text_encoder_as_bin(folder) -> None:
    """transformers 5 writes safetensors only; older folders hold `pytorch_model.bin`, as torch.save wrote it."""
    from safetensors.torch import load_file

    weights = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), folder / "text_encoder" / "pytorch_model.bin")
    weights.unlink()


def test_bin_only_folder_loads(tmp_path, reference):
    folder = saved(tmp_path, "bin", safe_serialization=False)
    text_encoder_as_bin(folder)
    assert not list(folder.rglob("*.safetensors")) and (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    images = t2i_images(t2i.load_pipeline(folder), "a red circle", initial_latents(), steps=2)
    assert (images == reference).all()


def test_sharded_components_load(tmp_path, reference):
    folder = saved(tmp_path, "sharded", max_shard_size="40KB")
    for sub in ("unet", "vae"):
        assert (folder / sub / "diffusion_pytorch_model.safetensors.index.json").is_file()
        assert len(list((folder / sub).glob("*-of-*.safetensors"))) > 2
    images = t2i_images(t2i.load_pipeline(folder), "a red circle", initial_latents(), steps=2)
    assert (images == reference).all()


def test_sharded_bin_with_a_missing_shard_is_named(tmp_path):
    folder = saved(tmp_path, "sharded_bin", max_shard_size="40KB", safe_serialization=False)
    shard = sorted((folder / "unet").glob("*-of-*.bin"))[1]
    shard.unlink()
    with pytest.raises(PipelineLoadError, match=f"{shard.name}: shard named by .* not found"):
        t2i.load_pipeline(folder)


def test_fp16_variant_is_chosen_with_variant(tmp_path, reference):
    folder = tmp_path / "variant"
    pipe = tiny_diffusers_pipeline("sd1")
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (folder / "text_encoder" / "model.fp16.safetensors").is_file()
    with pytest.raises(PipelineLoadError) as caught:
        t2i.load_pipeline(folder)
    assert "variant fp16: load it with variant='fp16'" in str(caught.value) and "\n" not in str(caught.value)
    loaded = t2i.load_pipeline(folder, variant="fp16")
    assert next(loaded.text_encoder.parameters()).dtype == torch.float32  # precision as asked, not as stored
    assert next(loaded.unet.parameters()).dtype == torch.float32
    images = t2i_images(loaded, "a red circle", initial_latents(), steps=2)
    assert abs(images - reference).max() < 0.02  # the weights were rounded to fp16 once
    with pytest.raises(PipelineLoadError, match="no diffusion_pytorch_model.bf16.safetensors .*has variant fp16"):
        t2i.load_pipeline(folder, variant="bf16")


def test_a_component_without_the_variant_falls_back_to_its_plain_weights(tmp_path, reference):
    """Hub folders often have fp16 files for some components only (diffusers then reads the plain ones)."""
    folder = saved(tmp_path, "partial")
    half = tiny_diffusers_pipeline("sd1").to(torch.float16)
    half.unet.save_pretrained(folder / "unet", variant="fp16")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    images = t2i_images(t2i.load_pipeline(folder, variant="fp16"), "a red circle", initial_latents(), steps=2)
    assert 0 < abs(images - reference).max() < 0.02


def test_fp16_text_encoder_is_cast_to_the_asked_precision(tmp_path):
    import diffusers

    folder = tmp_path / "half"
    tiny_diffusers_pipeline("sd1").to(torch.float16).save_pretrained(folder)
    ours = t2i.load_pipeline(folder, dtype=torch.float32)
    assert {p.dtype for p in ours.text_encoder.parameters()} == {torch.float32}
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    ids = ref.tokenizer(["a red circle"], padding="max_length", max_length=ref.tokenizer.model_max_length,
                        return_tensors="pt").input_ids  # fmt: skip
    expected = ref.text_encoder(ids)[0]
    got = ours.text_encoder.encode(["a red circle"]).embeddings
    assert torch.allclose(got, expected, atol=1e-5)


def test_bin_holding_code_is_refused_in_one_line(tmp_path, capsys):
    folder = saved(tmp_path, "evil", safe_serialization=False)
    text_encoder_as_bin(folder)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"weight": Payload()}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PipelineLoadError, match="refused to load: it holds pickled objects or code"):
        t2i.load_pipeline(folder)
    capsys.readouterr()
    code = main(["sample", "--model", str(folder), "--prompt", "a", "--out", str(tmp_path / "x.png"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "diffusion_pytorch_model.bin" in err and err.count("\n") == 1 and "pwned" not in err


def test_cli_variant_flag(tmp_path):
    folder = tmp_path / "variant_cli"
    tiny_diffusers_pipeline("sd1").to(torch.float16).save_pretrained(folder, variant="fp16")
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(folder), "--variant", "fp16", "--prompt", "a", "--out", str(out),
                 "--steps", "1", "--height", str(SIZE), "--width", str(SIZE)]) == 0  # fmt: skip
    assert out.is_file()

"""`t2i info` and `t2i sample` end to end (through `t2i.cli.main.main` and one real subprocess).

Parameter counts are checked against diffusers/transformers models on the same configs (the independent
reference) and against the published SD 1.5 sizes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from sd_helpers import SIZE, single_file_from_diffusers, tiny_diffusers_pipeline

import t2i
from t2i.cli.main import main


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_sd1")
    tiny_diffusers_pipeline("sd1").save_pretrained(folder)
    return folder


def info_lines(capsys, target: str) -> list[str]:
    assert main(["info", target]) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_info_sd15_prints_published_sizes(capsys):
    assert info_lines(capsys, "sd15") == [
        "unet: UNetModel 859,520,964",
        "vae: AutoencoderKL 83,653,863",
        "text_encoder: CLIPTextModel 123,060,480",
    ]


def test_info_sd2_and_imagen_configs(capsys):
    lines = info_lines(capsys, "sd21-v")
    assert [line.split(":")[0] for line in lines] == ["unet", "vae", "text_encoder"]
    assert lines[0] == "unet: UNetModel 865,910,724"
    imagen = info_lines(capsys, "imagen/base64-500m")
    assert len(imagen) == 1 and imagen[0].startswith("unet: ImagenUNet ")


def test_info_sdxl_and_refiner_print_exact_counts(capsys):
    """UNet, VAE, CLIP ViT-L/14 and bigG/14 with its projection (diffusers' CLIPTextModelWithProjection); the
    refiner has bigG alone, as text_encoder_2."""
    assert info_lines(capsys, "sdxl") == [
        "unet: UNetModel 2,567,463,684",
        "vae: AutoencoderKL 83,653,863",
        "text_encoder: CLIPTextModel 123,060,480",
        "text_encoder_2: CLIPTextModelWithProjection 694,659,840",
    ]
    assert info_lines(capsys, "sdxl-refiner") == [
        "unet: UNetModel 2,259,526,660",
        "vae: AutoencoderKL 83,653,863",
        "text_encoder_2: CLIPTextModelWithProjection 694,659,840",
    ]


def test_info_sdxl_folder_matches_diffusers(capsys, tmp_path):
    import diffusers
    from sdxl_helpers import tiny_sdxl_pipeline

    for refiner in (False, True):
        folder = tmp_path / f"sdxl_{refiner}"
        reference = tiny_sdxl_pipeline(refiner)
        reference.save_pretrained(folder)
        expected = {name: sum(p.numel() for p in module.parameters())
                    for name, module in reference.components.items() if isinstance(module, diffusers.ModelMixin)
                    or name.startswith("text_encoder") and module is not None}  # fmt: skip
        assert parse_counts(info_lines(capsys, str(folder))) == expected


def diffusers_counts(folder: Path) -> dict[str, int]:
    import diffusers
    import transformers

    def count(model):
        return sum(p.numel() for p in model.parameters())

    return {
        "unet": count(diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")),
        "vae": count(diffusers.AutoencoderKL.from_pretrained(folder / "vae")),
        "text_encoder": count(transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")),
    }


def parse_counts(lines: list[str]) -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[-1].replace(",", "")) for line in lines}


def test_info_folder_and_single_file_match_diffusers(capsys, tmp_path, sd1_folder):
    expected = diffusers_counts(sd1_folder)
    assert parse_counts(info_lines(capsys, str(sd1_folder))) == expected
    single_file_from_diffusers(sd1_folder, tmp_path / "tiny.safetensors")
    assert parse_counts(info_lines(capsys, str(tmp_path / "tiny.safetensors"))) == expected


def test_info_unknown_target_is_one_line(capsys, tmp_path):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("t2i info: error: ") and err.count("\n") == 1
    assert main(["info", "no-such-config"]) == 2
    assert "no-such-config" in capsys.readouterr().err


def sample_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--model", str(folder), "--prompt", "a red circle", "--out", str(out), "--steps", "2",
            "--height", str(SIZE), "--width", str(SIZE), "--seed", "3", "--device", "cpu", *extra]  # fmt: skip


def test_sample_writes_the_seeded_image(capsys, tmp_path, sd1_folder):
    out = tmp_path / "out.png"
    assert main(sample_args(sd1_folder, out, "--sampler", "euler", "--guidance", "5")) == 0
    assert capsys.readouterr().out.strip() == str(out)
    pipe = t2i.load_pipeline(sd1_folder)
    expected = pipe.generate(
        "a red circle",
        height=SIZE,
        width=SIZE,
        steps=2,
        sampler="euler",
        guidance_scale=5,
        seed=3,
        progress=False,
    )
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))


def test_sample_batch_img2img_and_karras(capsys, tmp_path, sd1_folder):
    out = tmp_path / "batch.png"
    argv = sample_args(
        sd1_folder, out, "--num-images", "2", "--prompt", "circle", "--karras", "--sampler", "dpmpp_2m"
    )
    assert main(argv) == 0
    written = [tmp_path / f"batch-{i}.png" for i in range(4)]
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    images = [np.asarray(Image.open(p)) for p in written]
    assert not np.array_equal(images[0], images[1]), "two samples of one prompt must differ"
    edited = tmp_path / "edit.png"
    assert main(sample_args(sd1_folder, edited, "--init-image", str(written[0]), "--strength", "0.5")) == 0
    assert Image.open(edited).size == (SIZE, SIZE)


def test_cli_entry_point_runs_in_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "t2i.cli.main", "info", "sd15"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "unet: UNetModel 859,520,964"


def test_sdxl_sample_takes_micro_conditioning_and_diffusers_default_guidance(capsys, tmp_path):
    from sdxl_helpers import tiny_sdxl_pipeline

    folder = tmp_path / "sdxl"
    tiny_sdxl_pipeline(False).save_pretrained(folder)
    pipe = t2i.load_pipeline(folder)
    assert pipe.default_guidance == 5.0  # diffusers' StableDiffusionXLPipeline default
    out = tmp_path / "micro.png"
    argv = sample_args(folder, out, "--sampler", "euler", "--original-size", "64", "96", "--crops", "8", "0")
    assert main(argv) == 0
    capsys.readouterr()
    common = {"height": SIZE, "width": SIZE, "steps": 2, "sampler": "euler", "seed": 3, "progress": False}
    expected = pipe.generate("a red circle", guidance_scale=5.0, original_size=(64, 96),
                             crops_coords_top_left=(8, 0), **common).images[0]  # fmt: skip
    plain = pipe.generate("a red circle", **common).images[0]
    written = np.asarray(Image.open(out))
    assert np.array_equal(written, np.asarray(expected))
    assert not np.array_equal(written, np.asarray(plain))  # the flags reached the size embedders
    # the base reads no aesthetic score (the refiner does): one line naming the input, exit 2
    assert main(sample_args(folder, tmp_path / "x.png", "--aesthetic-score", "7")) == 2
    err = capsys.readouterr().err
    assert "aesthetic_score: this model is not conditioned on it" in err and err.count("\n") == 1


def test_micro_conditioning_on_an_sd1_pipeline_is_one_line(capsys, tmp_path, sd1_folder):
    assert main(sample_args(sd1_folder, tmp_path / "x.png", "--target-size", "64", "64")) == 2
    err = capsys.readouterr().err
    assert "target_size: this model is not conditioned on it" in err and err.count("\n") == 1

"""Inpainting (9-channel UNets) and InstructPix2Pix editing (8-channel UNets) against diffusers'
StableDiffusionInpaintPipeline and StableDiffusionInstructPix2PixPipeline on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sd_helpers import SIZE, tiny_diffusers_pipeline

import t2i
from t2i.cli.main import main
from t2i.errors import InvalidInputError

TOL = 1e-5


def folder_with_unet_channels(root, in_channels: int):
    """A tiny diffusers SD1 folder whose UNet takes `in_channels` (random weights, seeded)."""
    from diffusers import UNet2DConditionModel

    pipe = tiny_diffusers_pipeline("sd1")
    torch.manual_seed(in_channels)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": in_channels})
    folder = root / f"unet{in_channels}"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    return folder_with_unet_channels(tmp_path_factory.mktemp("inpaint"), 9)


@pytest.fixture(scope="module")
def pix2pix_dir(tmp_path_factory):
    return folder_with_unet_channels(tmp_path_factory.mktemp("pix2pix"), 8)


def source_image(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def square_mask():
    """White (repaint) in the right half, with a soft edge that the 0.5 threshold must cut."""
    from PIL import Image

    values = np.zeros((SIZE, SIZE), dtype=np.uint8)
    values[:, SIZE // 2 :] = 255
    values[:, SIZE // 2 - 1] = 100
    return Image.fromarray(values, mode="L")


def reference(pipeline_class, folder, scheduler_class: str | None, **kwargs):
    import diffusers

    ref = getattr(diffusers, pipeline_class).from_pretrained(str(folder), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    if scheduler_class is not None:
        ref.scheduler = getattr(diffusers, scheduler_class).from_config(ref.scheduler.config)
    return ref(output_type="np", **kwargs).images


def ours(out) -> np.ndarray:
    return out.pixels.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    ("scheduler_class", "sampler", "strength", "guidance"),
    [
        (None, None, 1.0, 7.5),  # the folder's PNDM, from noise
        ("DDIMScheduler", "ddim", 0.6, 5.0),  # from the noised image: the image, then noise, then masked latents
        ("EulerAncestralDiscreteScheduler", "euler_ancestral", 1.0, 1.0),  # no guidance; noise each step
    ],
)
def test_inpaint_matches_diffusers(inpaint_dir, scheduler_class, sampler, strength, guidance):
    kwargs = {"strength": strength, "guidance_scale": guidance, "height": SIZE, "width": SIZE}
    ref = reference(
        "StableDiffusionInpaintPipeline", inpaint_dir, scheduler_class, prompt=["a red circle"],
        image=source_image(), mask_image=square_mask(), num_inference_steps=4,
        generator=torch.Generator().manual_seed(3), **kwargs,
    )  # fmt: skip
    pipe = t2i.load_pipeline(inpaint_dir)
    out = pipe.inpaint(
        "a red circle", source_image(), square_mask(), steps=4, sampler=sampler, progress=False,
        generator=torch.Generator().manual_seed(3), **kwargs,
    )  # fmt: skip
    assert np.abs(ours(out) - ref).max() <= TOL
    other = pipe.inpaint("a red circle", source_image(), square_mask(), steps=4, sampler=sampler, progress=False,
                         seed=3, **{**kwargs, "strength": 1.0 if strength < 1 else 0.5})  # fmt: skip
    assert np.abs(other.pixels - out.pixels).max() > 1e-2


def test_inpaint_mask_is_binarised_and_reaches_the_unet(inpaint_dir):
    """A mask differing only below the 0.5 threshold gives the same image; moving the mask changes it."""
    pipe = t2i.load_pipeline(inpaint_dir)
    mask = torch.zeros(SIZE, SIZE)
    mask[:, SIZE // 2 :] = 1.0
    faint = mask.clone()
    faint[:4, :4] = 0.3
    run = lambda m: pipe.inpaint("a", source_image(), m, steps=2, seed=1, progress=False).pixels
    assert torch.equal(run(mask), run(faint))
    assert (run(mask) - run(1 - mask)).abs().max() > 1e-2


def test_edit_matches_diffusers(pix2pix_dir):
    for scales in ((7.5, 1.5), (3.0, 1.0), (1.0, 1.2)):  # both guidances; text only; none (one pass)
        ref = reference(
            "StableDiffusionInstructPix2PixPipeline", pix2pix_dir, "EulerAncestralDiscreteScheduler",
            prompt="make it red", image=source_image(1), num_inference_steps=4, guidance_scale=scales[0],
            image_guidance_scale=scales[1], generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        pipe = t2i.load_pipeline(pix2pix_dir)
        out = pipe.edit(
            "make it red", source_image(1), guidance_scale=scales[0], image_guidance_scale=scales[1], steps=4,
            sampler="euler_ancestral", generator=torch.Generator().manual_seed(5), progress=False,
        )  # fmt: skip
        assert np.abs(ours(out) - ref).max() <= TOL, scales
    stronger = pipe.edit("make it red", source_image(1), image_guidance_scale=3.0, steps=4, seed=5, progress=False)
    weaker = pipe.edit("make it red", source_image(1), image_guidance_scale=1.5, steps=4, seed=5, progress=False)
    assert (stronger.pixels - weaker.pixels).abs().max() > 1e-2


def test_each_unet_takes_only_its_own_method(inpaint_dir, pix2pix_dir, sd1_dir):
    inpainting, pix2pix, text = (t2i.load_pipeline(d) for d in (inpaint_dir, pix2pix_dir, sd1_dir))
    cases = [
        (lambda: inpainting.generate("a", steps=1, progress=False), "generate(): this pipeline's UNet takes 9"),
        (lambda: inpainting.edit("a", source_image(), steps=1, progress=False), "edit(): this pipeline's UNet takes 9"),
        (lambda: pix2pix.reconstruct("a", source_image(), steps=2, progress=False), "takes 8 input channels"),
        (lambda: text.inpaint("a", source_image(), square_mask(), steps=1, progress=False), "inpaint() needs 9"),
        (lambda: inpainting.inpaint("a", source_image(), "mask.png", steps=1), "mask: expected a PIL image"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidInputError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cli_mask_and_edit(tmp_path, capsys, inpaint_dir, pix2pix_dir):
    source_image().save(tmp_path / "in.png")
    square_mask().save(tmp_path / "mask.png")
    common = ["--steps", "2", "--seed", "1", "--device", "cpu"]
    assert main(["sample", "--model", str(inpaint_dir), "--prompt", "a", "--init-image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "inpainted.png"), *common]) == 0  # fmt: skip
    assert main(["sample", "--model", str(pix2pix_dir), "--prompt", "make it red", "--edit",
                 "--init-image", str(tmp_path / "in.png"), "--image-guidance", "2",
                 "--out", str(tmp_path / "edited.png"), *common]) == 0  # fmt: skip
    pipe = t2i.load_pipeline(pix2pix_dir)
    expected = pipe.edit("make it red", source_image(), image_guidance_scale=2.0, steps=2, seed=1, progress=False)
    from PIL import Image

    with Image.open(tmp_path / "edited.png") as saved:
        assert np.array_equal(np.asarray(saved), np.asarray(expected.images[0]))
    assert Image.open(tmp_path / "inpainted.png").size == (SIZE, SIZE)
    capsys.readouterr()
    code = main(["sample", "--model", str(inpaint_dir), "--prompt", "a", "--mask", str(tmp_path / "mask.png"),
                 "--out", str(tmp_path / "x.png"), *common])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--mask: needs --init-image" in err and err.count("\n") == 1
    code = main(["sample", "--model", str(inpaint_dir), "--prompt", "a", "--init-image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--aesthetic-score", "6", "--out", str(tmp_path / "y.png"),
                 *common])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--aesthetic-score: SDXL micro-conditioning applies to" in err and err.count("\n") == 1

"""Inpainting and InstructPix2Pix models behind `t2i serve`: `/v1/images/edits` with a mask inpaints (OpenAI's
images.edit: transparent pixels of the mask are repainted), an InstructPix2Pix model follows the prompt as an
instruction, and each refuses the requests it cannot serve with a 400 naming the field."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from helpers import ServerProcess, close_images, decode
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))

SIZE = 32


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from test_editing import folder_with_unet_channels

    root = tmp_path_factory.mktemp("editing_models")
    return {"inpaint": folder_with_unet_channels(root, 9), "pix2pix": folder_with_unet_channels(root, 8)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, folders):
    log = tmp_path_factory.mktemp("editing_logs") / "server.log"
    proc = ServerProcess(["--model", f"inpaint={folders['inpaint']}", "--model", f"pix2pix={folders['pix2pix']}",
                          "--max-steps", "20"], log)  # fmt: skip
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def source() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def openai_mask() -> Image.Image:
    """Opaque on the left, transparent (repaint) on the right."""
    mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (SIZE // 2, 0, SIZE, SIZE))
    return mask


def test_openai_client_inpaints_where_the_mask_is_transparent(client, folders):
    import t2i

    result = client.images.edit(model="inpaint", image=("in.png", png(source()), "image/png"),
                                mask=("mask.png", png(openai_mask()), "image/png"), prompt="a red circle",
                                size=f"{SIZE}x{SIZE}", response_format="b64_json", extra_body={"steps": 3, "seed": 7})  # fmt: skip
    ours = decode(result.data[0].b64_json)
    white_right = torch.zeros(1, 1, SIZE, SIZE)
    white_right[..., SIZE // 2 :] = 1.0
    pipe = t2i.load_pipeline(folders["inpaint"])
    expected = pipe.inpaint(["a red circle"], [source()], white_right, steps=3, height=SIZE, width=SIZE,
                            generator=[torch.Generator().manual_seed(7)], progress=False).images[0]  # fmt: skip
    assert close_images(ours, expected)


def test_openai_client_edits_by_instruction(client, folders):
    import t2i

    result = client.images.edit(model="pix2pix", image=("in.png", png(source()), "image/png"),
                                prompt="make it red", response_format="b64_json",
                                extra_body={"steps": 3, "seed": 2})  # fmt: skip
    pipe = t2i.load_pipeline(folders["pix2pix"])
    expected = pipe.edit(["make it red"], [source()], steps=3, generator=[torch.Generator().manual_seed(2)],
                         progress=False).images[0]  # fmt: skip
    assert close_images(decode(result.data[0].b64_json), expected)


@pytest.mark.parametrize(("route", "model", "files", "fields", "param", "message"), [
    ("generations", "inpaint", None, {}, "model", "is an inpainting model: use /v1/images/edits"),
    ("generations", "pix2pix", None, {}, "model", "is an InstructPix2Pix model"),
    ("edits", "inpaint", "image", {}, "mask", "missing; model inpaint is an inpainting model"),
    ("edits", "pix2pix", "image+mask", {}, "mask", "not used by model pix2pix"),
    ("edits", "pix2pix", "image", {"strength": "0.5"}, "strength", "not used by model pix2pix"),
    ("edits", "inpaint", "image+small-mask", {}, "mask", "expected the image's size 32x32"),
])  # fmt: skip
def test_requests_a_model_cannot_serve_get_400(server, route, model, files, fields, param, message):
    uploads = {"image": ("in.png", png(source()), "image/png")}
    if files and "mask" in files:
        size = 8 if "small" in files else SIZE
        uploads["mask"] = ("m.png", png(openai_mask().resize((size, size))), "image/png")
    if route == "generations":
        response = httpx.post(server.url + "/v1/images/generations", json={"model": model, "prompt": "x"}, timeout=30)
    else:
        response = httpx.post(server.url + "/v1/images/edits", files=uploads, data={"model": model, "prompt": "x",
                              **fields}, timeout=30)  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error

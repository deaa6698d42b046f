"""An Imagen cascade behind the server (in-process app, FastAPI's TestClient): each request is its own batch,
so its images equal `cascade.generate(seed=..., num_images=n)` exactly."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import decode, pixels
from PIL import Image

from t2i.serve.adapters import CascadeAdapter, make_adapter
from t2i.serve.app import create_app
from t2i.serve.settings import ModelSpec, ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from test_cascade import make_stage

from t2i.pipelines.cascade import CascadePipeline
from t2i.pipelines.imagen_stage import StageDefaults
from t2i.text.encoders import build_text_encoder


@pytest.fixture(scope="module")
def cascade():
    encoder = build_text_encoder("minilm", max_length=6)
    defaults = [StageDefaults("heun", 3, 3.0), StageDefaults("heun", 2, 1.5, aug_level=0.002)]
    return CascadePipeline([make_stage("base", 0), make_stage("sr", 1)], defaults, [encoder, encoder])


@pytest.fixture(scope="module")
def client(cascade):
    adapter = make_adapter("cascade", cascade)
    assert isinstance(adapter, CascadeAdapter)
    settings = ServerSettings(models=[ModelSpec("cascade", Path("unused"))], max_batch=8)
    with TestClient(create_app(settings, {"cascade": adapter})) as client:
        yield client


def generate(client, **body):
    return client.post("/v1/images/generations", json={"response_format": "b64_json", **body})


def test_cascade_images_equal_the_pipelines_own(client, cascade):
    response = generate(client, prompt="a red circle", n=2, seed=7)
    assert response.status_code == 200, response.text
    images = [decode(item["b64_json"]) for item in response.json()["data"]]
    expected = cascade.generate("a red circle", seed=7, num_images=2).images
    assert [im.size for im in images] == [(16, 16)] * 2
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(images, expected))


def test_cascade_steps_and_guidance_reach_every_stage(client, cascade):
    response = generate(client, prompt="a blue square", seed=2, steps=1, guidance_scale=1.0)
    expected = cascade.generate("a blue square", seed=2, steps=1, guidance_scale=1.0).images[0]
    assert np.array_equal(pixels(decode(response.json()["data"][0]["b64_json"])), pixels(expected))


def test_cascade_models_entry_and_refusals(client):
    info = client.get("/v1/models").json()["data"][0]["t2i"]
    assert info["kind"] == "imagen_cascade" and info["default_size"] == "16x16" and not info["batches_requests"]
    assert generate(client, prompt="x", size="8x8").json()["error"]["param"] == "size"
    assert generate(client, prompt="x", sampler="euler").json()["error"]["param"] == "sampler"
    assert generate(client, prompt="a b c d e f g h").json()["error"]["code"] == "prompt_too_long"
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, format="PNG")
    edit = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", png.getvalue(), "image/png")})
    assert edit.status_code == 400 and edit.json()["error"]["param"] == "model"

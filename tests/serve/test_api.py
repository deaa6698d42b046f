"""The official `openai` client and plain HTTP against a real `t2i serve` process on the tiny model."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import openai
import pytest
import torch
from helpers import API_KEY, close_images, decode, metric_values, pixels
from PIL import Image


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, body, **kwargs):
    return httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers, timeout=120, **kwargs)


def reference(pipe, prompt: str, seeds: list[int], steps: int, **kwargs):
    """What t2i's own pipeline makes for these seeds (one generator per image, as the server promises)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe.generate([prompt] * len(seeds), height=16, width=16, steps=steps, generator=generators,
                         progress=False, **kwargs).images


def test_openai_client_b64_json_two_images(client, tiny_pipeline):
    result = client.images.generate(model="tiny", prompt="a red circle", n=2, size="16x16",
                                    response_format="b64_json", extra_body={"steps": 3, "seed": 5})
    images = [decode(item.b64_json) for item in result.data]
    assert [im.size for im in images] == [(16, 16), (16, 16)] and images[0].format == "PNG"
    assert [item.model_extra["seed"] for item in result.data] == [5, 6]
    expected = reference(tiny_pipeline, "a red circle", [5, 6], steps=3)
    assert all(close_images(ours, ref) for ours, ref in zip(images, expected))
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() > 20  # two seeds, two images


def test_openai_client_url_two_images(client, server):
    result = client.images.generate(model="tiny", prompt="a blue square", n=2, size="16x16",
                                    response_format="url", extra_body={"steps": 2})
    urls = [item.url for item in result.data]
    assert len(set(urls)) == 2
    for url in urls:
        assert url.startswith(server.url + "/v1/images/files/")
        response = httpx.get(url, timeout=30)  # no Authorization: the random token is the capability
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == (16, 16)


def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    info = models[0].model_extra["t2i"]
    assert info["kind"] == "latent_diffusion" and info["size_multiple"] == 4 and info["default_size"] == "16x16"
    assert "euler_ancestral" in info["samplers"] and info["loras"] == ["style", "wide"]
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(server.url + "/healthz", timeout=10)  # the one route that needs no key
    assert health.status_code == 200 and health.json() == {"status": "ok", "auth": True}


@pytest.mark.parametrize("path", ["/v1/models", "/v1/images/generations", "/v1/images/edits", "/metrics"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_every_route_but_health_needs_the_key(server, path, headers):
    method = "GET" if path in ("/v1/models", "/metrics") else "POST"
    response = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x"}, timeout=10)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_wrong_key_with_the_openai_client(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


LONG = "red " * 40  # > 16 MiniLM tokens
BAD_REQUESTS = [
    # (body, status, param, code)
    ({"n": 1}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": ""}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": "   "}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": 12}, 400, "prompt", None),
    ({"prompt": "x", "n": 0}, 400, "n", None),
    ({"prompt": "x", "n": 11}, 400, "n", None),
    ({"prompt": "x", "n": 2.5}, 400, "n", None),
    ({"prompt": "x", "n": "2"}, 400, "n", None),
    ({"prompt": "x", "n": True}, 400, "n", None),
    ({"prompt": "x", "size": "15x16"}, 400, "size", None),
    ({"prompt": "x", "size": "16*16"}, 400, "size", None),
    ({"prompt": "x", "size": "0x16"}, 400, "size", None),
    ({"prompt": "x", "size": "4096x16"}, 400, "size", None),
    ({"prompt": "x", "steps": 0}, 400, "steps", None),
    ({"prompt": "x", "steps": 51}, 400, "steps", None),
    ({"prompt": "x", "steps": "3"}, 400, "steps", None),
    ({"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale", None),
    ({"prompt": "x", "guidance_scale": 31}, 400, "guidance_scale", None),
    ({"prompt": "x", "guidance_scale": "7"}, 400, "guidance_scale", None),
    ({"prompt": "x", "seed": -1}, 400, "seed", None),
    ({"prompt": "x", "seed": 2**64}, 400, "seed", None),
    ({"prompt": "x", "model": "nope"}, 404, "model", "model_not_found"),
    ({"prompt": "x", "sampler": "nope"}, 400, "sampler", "unknown_sampler"),
    ({"prompt": "x", "loras": [{"name": "nope"}]}, 400, "loras[0].name", "lora_not_found"),
    ({"prompt": "x", "loras": [{"name": "style", "scale": 100}]}, 400, "loras[0].scale", None),
    ({"prompt": "x", "loras": [{"name": "style"}, {"name": "style"}]}, 400, "loras[1].name", None),
    ({"prompt": "x", "loras": "style"}, 400, "loras", None),
    ({"prompt": LONG}, 400, "prompt", "prompt_too_long"),
    ({"prompt": "x" * 4001}, 400, "prompt", "string_above_max_length"),
    ({"prompt": "x", "negative_prompt": LONG}, 400, "negative_prompt", "prompt_too_long"),
    ({"prompt": "x", "response_format": "jpeg"}, 400, "response_format", None),
    ({"prompt": "x", "output_format": "jpeg"}, 400, "output_format", None),
    ({"prompt": "x", "guidance": 7}, 400, "guidance", "unknown_parameter"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", None),
    ({"prompt": "x", "user": 5}, 400, "user", None),
]


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_REQUESTS)
def test_bad_generation_requests_get_4xx_error_objects(server, body, status, param, code):
    assert_error(post(server, body), status, param, code)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"prompt": "x", "guidance_scale": NaN}',
                                 b'{"prompt": "x", "guidance_scale": 1e999}', b"\xff\xfe", b""])
def test_bad_json_bodies_get_400(server, raw):
    response = httpx.post(server.url + "/v1/images/generations", content=raw, timeout=30,
                          headers={**server.headers, "Content-Type": "application/json"})
    error = assert_error(response, 400)
    assert error["code"] in ("invalid_json", "invalid_value")


def test_unknown_routes_and_methods_answer_error_objects(server):
    assert_error(httpx.get(server.url + "/v1/images/generations", headers=server.headers, timeout=10), 405)
    assert_error(httpx.get(server.url + "/v1/nothing", headers=server.headers, timeout=10), 404)


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "../../etc/passwd.png", "AAAAAAAAAAAAAAAAAAAAAA.png",
                                  "%2Fetc%2Fpasswd", "x.png%00"])
def test_file_urls_name_only_stored_images(server, name):
    response = httpx.get(server.url + "/v1/images/files/" + name, timeout=10)
    # 404 for a token the store did not write; 401 where the client resolved `..` to a path outside the files
    assert response.status_code in (401, 404) and "error" in response.json()


def test_a_lora_that_does_not_fit_is_a_400_naming_it(server):
    first = post(server, {"prompt": "x", "steps": 2, "loras": [{"name": "wide"}]})
    assert "wide" in assert_error(first, 400)["message"]
    second = post(server, {"prompt": "x", "steps": 2, "loras": [{"name": "wide"}]})  # now refused up front
    assert "wide" in assert_error(second, 400, "loras[0].name")["message"]
    assert post(server, {"prompt": "x", "steps": 2}).status_code == 200  # the model is unharmed


def test_loras_change_the_image_and_scale_zero_does_not(server):
    def image(loras):
        body = {"prompt": "a red circle", "steps": 3, "seed": 9, "response_format": "b64_json"}
        response = post(server, {**body, **({"loras": loras} if loras is not None else {})})
        assert response.status_code == 200, response.text
        return decode(response.json()["data"][0]["b64_json"])

    base = image(None)
    assert np.abs(pixels(image([{"name": "style", "scale": 1.0}])) - pixels(base)).max() > 5
    assert close_images(image([{"name": "style", "scale": 0.0}]), base)
    assert close_images(image(None), base)  # unloaded again


def png_upload(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_client_edits(client, tiny_pipeline):
    init = tiny_pipeline.generate("a red circle", height=16, width=16, steps=2, seed=1, progress=False).images[0]
    result = client.images.edit(image=("in.png", png_upload(init), "image/png"), prompt="a blue circle", n=2,
                                size="16x16", response_format="b64_json",
                                extra_body={"strength": 0.5, "steps": 4, "seed": 3})
    images = [decode(item.b64_json) for item in result.data]
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected = tiny_pipeline.reconstruct(["a blue circle"] * 2, [init, init], strength=0.5, steps=4,
                                         generator=generators, progress=False).images
    assert all(close_images(ours, ref) for ours, ref in zip(images, expected))


@pytest.mark.parametrize(("files", "data", "param"), [
    ({}, {"prompt": "x"}, "image"),
    ({"image": ("a.png", b"not an image", "image/png")}, {"prompt": "x"}, "image"),
    ("init", {"prompt": "x", "strength": "0"}, "strength"),
    ("init", {"prompt": "x", "strength": "1.5"}, "strength"),
    ("init", {"prompt": "x", "strength": "nan"}, "strength"),
    ("init", {"prompt": "x", "strength": "0.01", "steps": "4"}, "strength"),  # 0.01 x 4 steps: no step left
    ("init", {"prompt": ""}, "prompt"),
    ("init", {"prompt": "x", "n": "many"}, "n"),
    ("mask", {"prompt": "x"}, "mask"),
])
def test_bad_edit_requests_get_4xx(server, tiny_pipeline, files, data, param):
    init = png_upload(Image.new("RGB", (16, 16), (200, 30, 30)))
    if files == "init":
        files = {"image": ("in.png", init, "image/png")}
    elif files == "mask":
        files = {"image": ("in.png", init, "image/png"), "mask": ("m.png", init, "image/png")}
    response = httpx.post(server.url + "/v1/images/edits", files=files or None, data=data,
                          headers=server.headers, timeout=30)
    assert_error(response, 400, param)


def test_edit_needs_a_multipart_body(server):
    response = httpx.post(server.url + "/v1/images/edits", json={"prompt": "x"}, headers=server.headers, timeout=30)
    assert_error(response, 400)


def read_events(response) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


def test_streamed_request_reports_every_step_then_the_images(server):
    body = {"prompt": "a green triangle", "steps": 4, "n": 2, "stream": True, "response_format": "b64_json"}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, headers=server.headers,
                      timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done"
    assert [d["step"] for k, d in events if k == "progress"] == [1, 2, 3, 4]
    images = [d for k, d in events if k == "image_generation.completed"]
    assert [d["index"] for d in images] == [0, 1] and all(decode(d["b64_json"]).size == (16, 16) for d in images)


def test_metrics_count_requests_images_batches_and_errors(server):
    before = metric_values(server)
    assert post(server, {"prompt": "x", "n": 3, "steps": 2}).status_code == 200
    assert post(server, {"prompt": "x", "n": 0}).status_code == 400
    after = metric_values(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("t2i_serve_images_total", model="tiny") == 3
    assert delta("t2i_serve_requests_total", endpoint="generations", status="200") == 1
    assert delta("t2i_serve_requests_total", endpoint="generations", status="400") == 1
    assert delta("t2i_serve_errors_total", code="invalid_value") == 1
    assert delta("t2i_serve_batch_images_sum") == 3 and delta("t2i_serve_batch_images_count") == 1
    assert delta("t2i_serve_request_seconds_count", endpoint="generations") == 2
    assert after[("t2i_serve_queue_requests", ())] == 0


def test_one_log_line_per_request(server):
    response = post(server, {"prompt": "x", "n": 2, "steps": 2})
    request_id = response.headers["x-request-id"]
    lines = [line for line in server.read_log().splitlines() if request_id in line]
    assert len(lines) == 1
    for part in ("generations", "model=tiny", "size=16x16", "n=2", "queue=", "run=", "status=200"):
        assert part in lines[0]

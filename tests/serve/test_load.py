"""A burst of 200 concurrent requests: only 200s and 429s, no 5xx, and the images are batch-invariant."""

from __future__ import annotations

import asyncio

import httpx
from helpers import close_images, decode, metric_values, pixels

BURST = 200
PROMPTS = ["a red circle", "a blue square in the top left", "a green triangle", "a yellow star"]


def body(i: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i, "steps": 2, "size": "16x16",
            "negative_prompt": "blurry" if i % 3 == 0 else "", "response_format": "b64_json"}


async def burst(server) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, limits=limits, timeout=300) as client:
        return await asyncio.gather(*(client.post("/v1/images/generations", json=body(i)) for i in range(BURST)))


def test_burst_of_200_gives_only_200_or_429_and_batch_invariant_images(server):
    before = metric_values(server)
    responses = asyncio.run(burst(server))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    ok = [i for i, s in enumerate(statuses) if s == 200]
    assert len(ok) >= 32  # the queue holds 32 requests, plus those the worker already took
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    after = metric_values(server)
    batches = after[("t2i_serve_batch_images_count", ())] - before[("t2i_serve_batch_images_count", ())]
    rows = after[("t2i_serve_batch_images_sum", ())] - before[("t2i_serve_batch_images_sum", ())]
    assert rows == len(ok) and rows / batches > 2  # the burst really ran in shared batches (max 4)

    # each image equals the same request sent alone afterwards (a batch of one on an idle server)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        for i in ok[:: max(1, len(ok) // 12)]:
            alone = client.post("/v1/images/generations", json=body(i))
            assert alone.status_code == 200
            burst_image = decode(responses[i].json()["data"][0]["b64_json"])
            assert close_images(burst_image, decode(alone.json()["data"][0]["b64_json"])), i
    distinct = {pixels(decode(responses[i].json()["data"][0]["b64_json"])).tobytes() for i in ok}
    assert len(distinct) == len(ok)  # every seed made its own image

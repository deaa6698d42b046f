"""An image is the same whether its request ran alone or batched with others (the real tiny pipeline).

Not bit-identical on CPU: oneDNN convolutions and MKL GEMMs pick kernels by batch size, so batched rows differ
from single rows by float rounding (measured up to 1.6e-6 on [0, 1] pixels with guidance 5, under 7e-7 without
guidance). The tests allow 1e-5; a row drawn from the wrong generator differs by ~0.5. A row run alone is
bit-identical to the plain `pipe.generate(seed=...)` call, so the server reproduces `t2i sample --seed`.
"""

from __future__ import annotations

import pytest
import torch

from t2i.serve.adapters import BatchKey, LatentAdapter, Row

TOL = 1e-5
ROWS = [
    Row("a red circle in the top left", "", 3),
    Row("a blue square on the left", "blurry", 11),
    Row("a green triangle", "", 12),
    Row("a red circle in the top left", "dark", 4),  # the first row's prompt with another seed and negative
]


@pytest.fixture(scope="module")
def adapter(tiny_pipeline):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LatentAdapter("tiny", tiny_pipeline)
    torch.set_num_threads(threads)


def batch_key(sampler: str, guidance: float = 5.0, task: str = "generate", strength=None) -> BatchKey:
    return BatchKey("tiny", task, 16, 16, 4, sampler, guidance, strength=strength)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "ddpm", "dpmpp_2m_sde", "heun"])
def test_rows_match_alone_and_batched(adapter, sampler):
    key = batch_key(sampler)
    batched = adapter.sample(key, ROWS).pixels
    for i, row in enumerate(ROWS):
        alone = adapter.sample(key, [row]).pixels
        assert (alone[0] - batched[i]).abs().max() <= TOL, (sampler, i)
    # the rows really differ (prompt, seed, negative prompt each change the image)
    for i in range(1, len(ROWS)):
        assert (batched[0] - batched[i]).abs().max() > 0.05


def test_row_alone_is_the_plain_seeded_generate(adapter, tiny_pipeline):
    row = ROWS[1]
    for sampler in ("ddim", "euler_ancestral", "dpmpp_2m_sde"):
        ours = adapter.sample(batch_key(sampler), [row]).pixels
        plain = tiny_pipeline.generate(row.prompt, negative_prompt=row.negative_prompt, height=16, width=16,
                                       steps=4, guidance_scale=5.0, sampler=sampler, seed=row.seed,
                                       progress=False).pixels
        assert torch.equal(ours, plain), sampler


def test_edit_rows_match_alone_and_batched(adapter, tiny_pipeline):
    inits = tiny_pipeline.generate(["a red circle", "a blue square"], height=16, width=16, steps=2,
                                   seed=5, progress=False).images
    rows = [Row("a blue circle", "", 7, inits[0]), Row("a red square", "noisy", 8, inits[1]),
            Row("a blue circle", "", 9, inits[0])]
    key = batch_key("euler_ancestral", task="edit", strength=0.75)
    batched = adapter.sample(key, rows).pixels
    for i, row in enumerate(rows):
        assert (adapter.sample(key, [row]).pixels[0] - batched[i]).abs().max() <= TOL, i
    assert (batched[0] - batched[2]).abs().max() > 0.05  # same prompt and image, another seed


def test_without_guidance_rows_match_alone_and_batched(adapter):
    key = batch_key("euler_ancestral", guidance=1.0)
    batched = adapter.sample(key, ROWS).pixels
    for i, row in enumerate(ROWS):
        assert (adapter.sample(key, [row]).pixels[0] - batched[i]).abs().max() <= TOL

"""`t2i eval shapes | metrics | fid | kid | clip-score` with stand-in pipelines, a real tiny pipeline, a random
FID Inception saved to a local file and a tiny random CLIP folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import t2i.cli.eval as eval_cli
from t2i.cli.main import main
from t2i.data.shapes import BACKGROUND, HELDOUT_COMBOS, caption_for, draw_shape, parse_caption
from t2i.metrics.features import ModuleFeatures, extract_features
from t2i.metrics.stats import frechet_distance, kernel_inception_distance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "metrics"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from test_clip_score import save_tiny_clip


class PerfectPipeline:
    """Draws exactly what the prompt asks for; records the keyword arguments it was called with."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, prompts, steps=None, sampler=None, guidance_scale=None, seed=None):
        self.calls.append({"n": len(prompts), "steps": steps, "sampler": sampler, "guidance": guidance_scale,
                           "seed": seed})  # fmt: skip
        rng = np.random.default_rng(seed)
        return [draw_shape(*parse_caption(p), size=32, rng=rng) for p in prompts]


class BlankPipeline:
    def generate(self, prompts, **kwargs):
        return [Image.new("RGB", (32, 32), (255, 255, 255)) for _ in prompts]


class NoisePipeline:
    """Random 24 px images whose brightness depends on the seed; accepts `progress` like the real pipelines."""

    def __init__(self) -> None:
        self.progress: list = []

    def generate(self, prompts, seed=0, progress=True, **kwargs):
        self.progress.append(progress)
        rng = np.random.default_rng(seed)
        return [Image.fromarray(rng.integers(0, 200, (24, 24, 3), dtype=np.uint8)) for _ in prompts]


def use_pipeline(monkeypatch, pipe) -> None:
    monkeypatch.setattr(eval_cli, "load_model", lambda path, device=None: pipe)


def one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.split("\r")[-1].strip()  # after any progress bar
    assert err.startswith("t2i eval: error:") and "\n" not in err and expected in err, err


def test_evaluate_shapes_scores_a_perfect_and_a_blank_model() -> None:
    prompts = eval_cli.split_prompts("heldout", 30)
    assert len(prompts) == 30 and parse_caption(prompts[0]) == HELDOUT_COMBOS[0]
    pipe = PerfectPipeline()
    scores, images = eval_cli.evaluate_shapes(pipe, prompts, steps=7, guidance=3.0, seed=10, batch_size=16)
    assert scores == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0, "n": 30.0}
    assert len(images) == 30
    assert pipe.calls == [
        {"n": 16, "steps": 7, "sampler": None, "guidance": 3.0, "seed": 10},
        {"n": 14, "steps": 7, "sampler": None, "guidance": 3.0, "seed": 11},
    ]
    blank, _ = eval_cli.evaluate_shapes(BlankPipeline(), prompts)
    assert blank["all"] == 0.0


def test_eval_shapes_cli_prints_and_writes_grid(tmp_path: Path, monkeypatch, capsys) -> None:
    use_pipeline(monkeypatch, PerfectPipeline())
    grid = tmp_path / "grid.png"
    argv = ["eval", "shapes", "--model", "unused", "--num", "5", "--split", "train", "--out", str(grid)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "all      1.000" in out and "5 prompts" in out
    assert Image.open(grid).width >= 5 * 96


def judge_fid(out: str) -> float:
    return float(next(line for line in out.splitlines() if "judge FID" in line).split()[2])


def test_eval_shapes_fid_in_the_judge_feature_space(tmp_path: Path, monkeypatch, capsys) -> None:
    use_pipeline(monkeypatch, PerfectPipeline())
    assert main(["eval", "shapes", "--model", "m", "--fid", "--num", "44"]) == 0
    good = capsys.readouterr().out
    use_pipeline(monkeypatch, BlankPipeline())
    assert main(["eval", "shapes", "--model", "m", "--fid", "--num", "44"]) == 0
    bad = capsys.readouterr().out
    assert judge_fid(good) < 0.05 and judge_fid(bad) > 1.0
    assert "judge KID" in good and "vs 88 dataset renderings" in good


def test_eval_shapes_on_a_folder_of_images(tmp_path: Path, capsys) -> None:
    for i, combo in enumerate(HELDOUT_COMBOS[:6]):
        draw_shape(*combo, size=32, rng=np.random.default_rng(i)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption_for(*combo))
    Image.new("RGB", (32, 32), BACKGROUND).save(tmp_path / "9.png")
    (tmp_path / "9.txt").write_text(caption_for(*HELDOUT_COMBOS[0]))
    assert main(["eval", "shapes", "--images", str(tmp_path), "--fid"]) == 0
    out = capsys.readouterr().out
    assert "7 prompts" in out and f"all      {6 / 7:.3f}" in out and "judge FID" in out


class TinyNet(torch.nn.Module):
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float() / 32).mean(dim=(2, 3))


@pytest.fixture
def reference_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "reference"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(40, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"caption {i}")
    return folder


def test_metrics_command_fid_kid_with_a_feature_net_cache_json_and_saved_images(
    tmp_path: Path, reference_dir: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr("t2i.metrics.inception.load_fid_inception", lambda path, device="cpu": TinyNet())
    pipe = NoisePipeline()
    use_pipeline(monkeypatch, pipe)
    cache, saved, results = tmp_path / "ref.npz", tmp_path / "generated", tmp_path / "results.json"
    argv = ["eval", "metrics", "--fid", "--kid", "--model", "m", "--inception", "w.pth", "--batch-size", "5",
            "--kid-subsets", "4", "--seed", "3"]  # fmt: skip
    extra = [
        "--reference",
        str(reference_dir),
        "--reference-features",
        str(cache),
        "--save-images",
        str(saved),
    ]
    assert main(argv + extra + ["--json", str(results)]) == 0
    out = capsys.readouterr().out
    got = json.loads(results.read_text())
    assert (
        got["n"] == 12 and got["kid_subset_size"] == 12 and pipe.progress == [False] * 3
    )  # 12 prompts, batches of 5
    assert "metrics over 12 images (reference: 12 images)" in out and f"FID        {got['fid']:.4f}" in out

    # The same numbers from the library, on the saved images and the reference folder.
    extractor = ModuleFeatures(TinyNet(), "inception-v3-fid-2048")
    real = extract_features(
        extractor, [Image.open(p) for p in sorted(reference_dir.glob("*.png"))], progress=False
    )
    fake = extract_features(extractor, [Image.open(p) for p in sorted(saved.glob("*.png"))], progress=False)
    assert sorted(p.read_text().strip() for p in saved.glob("*.txt")) == sorted(
        f"caption {i}" for i in range(12)
    )
    assert got["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-9)
    assert got["kid_mean"] == pytest.approx(kernel_inception_distance(real, fake, 4, 12, seed=3)[0], rel=1e-9)

    # The cached reference features are reused: the reference folder is no longer needed.
    for path in reference_dir.iterdir():
        path.unlink()
    (tmp_path / "prompts.txt").write_text("\n".join(f"caption {i}" for i in range(12)))
    again = ["--reference-features", str(cache), "--prompts", str(tmp_path / "prompts.txt")]
    assert main(argv + again) == 0
    assert f"FID        {got['fid']:.4f}" in capsys.readouterr().out
    assert main(["eval", "kid", *argv[4:], *again]) == 0  # `kid` is `metrics --kid`
    out = capsys.readouterr().out
    assert f"KID        {got['kid_mean']:.6f}" in out and "FID" not in out


def test_fid_and_kid_with_an_inception_file_on_given_images(
    tmp_path: Path, reference_dir: Path, capsys
) -> None:
    from inception_reference import deterministic_state

    from t2i.metrics.inception import InceptionV3FID

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in InceptionV3FID().state_dict().items()}
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(deterministic_state(shapes), weights)
    generated = tmp_path / "generated"
    generated.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 60, 100, 200 - i * 40)).save(generated / f"{i}.png")
    argv = ["eval", "metrics", "--fid", "--kid", "--images", str(generated), "--reference", str(reference_dir),
            "--inception", str(weights), "--max-reference", "3", "--device", "cpu", "--kid-subsets", "5"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    fid = float(out.split("FID")[1].split()[0])
    kid = float(out.split("KID")[1].split()[0])
    assert "metrics over 3 images (reference: 3 images)" in out and fid > 1.0 and kid > 0.0


def test_clip_score_command_on_a_real_pipeline_and_on_given_images(tmp_path: Path, capsys) -> None:
    from sd_helpers import tiny_diffusers_pipeline

    from t2i.metrics.clip_score import ClipScorer, clip_score

    clip = save_tiny_clip(tmp_path / "clip", aligned=True)
    pipeline = tmp_path / "sd1"
    tiny_diffusers_pipeline("sd1").save_pretrained(pipeline)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ncircle red\nred\n")
    saved = tmp_path / "saved"
    argv = ["eval", "clip-score", "--model", str(pipeline), "--clip", str(clip), "--prompts", str(prompts),
            "--num", "5", "--steps", "2", "--batch-size", "2", "--device", "cpu", "--save-images", str(saved)]  # fmt: skip
    assert main(argv) == 0
    score = float(capsys.readouterr().out.split("CLIP score")[1].split()[0])
    images = [Image.open(p).convert("RGB") for p in sorted(saved.glob("*.png"))]
    captions = [p.read_text().strip() for p in sorted(saved.glob("*.txt"))]
    assert len(images) == 5 and captions == [
        "a red circle",
        "circle red",
        "red",
        "a red circle",
        "circle red",
    ]
    expected, _ = clip_score(ClipScorer.load(clip), images, captions, progress=False)
    assert score == pytest.approx(expected, abs=1e-3) and score > 10
    for source in ([], ["--prompts", str(prompts)]):  # captions beside the images, or --prompts in order
        assert main(["eval", "clip-score", "--images", str(saved), "--clip", str(clip), *source]) == 0
        printed = float(capsys.readouterr().out.split("CLIP score")[1].split()[0])
        assert printed == pytest.approx(expected, abs=1e-3)


def test_bad_options_are_one_line_errors(tmp_path: Path, reference_dir: Path, monkeypatch, capsys) -> None:
    use_pipeline(monkeypatch, NoisePipeline())
    ref = ["--reference", str(reference_dir)]
    cases = [
        (["metrics", "--model", "m"], "choose at least one of --fid"),
        (["fid", "--model", "m", *ref], "--inception: required"),
        (["fid", "--model", "m", "--inception", "w.pth"], "--reference: required"),
        (["fid", "--model", "m", "--inception", str(tmp_path / "none.pth"), *ref], "none.pth"),
        (["clip-score", "--model", "m", "--prompts", "p.txt"], "--clip: required"),
        (["clip-score", "--model", "m", "--clip", str(tmp_path), "--prompts", "p.txt"], "config.json"),
        (["kid", "--model", "m", "--num", "0", *ref], "--num: expected an integer >= 1"),
        (["shapes", "--model", "m", "--reference-per-prompt", "0"], "--reference-per-prompt"),
        (["shapes", "--images", str(tmp_path / "missing")], "missing"),
    ]
    for argv, expected in cases:
        one_line_error(capsys, ["eval", *argv], expected)
    monkeypatch.setattr("t2i.metrics.inception.load_fid_inception", lambda path, device="cpu": TinyNet())
    cache = tmp_path / "judge.npz"
    from t2i.metrics.stats import FeatureSet

    FeatureSet(torch.zeros(3, 16), "shapes-judge-v1").save(cache)
    argv = ["eval", "fid", "--model", "m", "--inception", "w.pth", "--reference-features", str(cache)]
    one_line_error(capsys, argv, "extract them again")
    empty = tmp_path / "empty_reference"
    empty.mkdir()
    Image.new("RGB", (8, 8)).save(empty / "x.png")  # no captions and no --prompts: nothing to generate from
    one_line_error(
        capsys, ["eval", "fid", "--model", "m", "--inception", "w", "--reference", str(empty)], "--prompts"
    )

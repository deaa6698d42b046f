"""The FID Inception-v3: torch-fidelity's key names and outputs, loading a local file offline, bad files."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from inception_reference import REFERENCE_FILE, deterministic_state, reference_images
from PIL import Image

from t2i.errors import InvalidInputError, PipelineLoadError, T2IError, WeightsMismatchError
from t2i.metrics.inception import InceptionV3FID, load_fid_inception, resize_bilinear_tf1


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE_FILE) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, reference) -> Path:
    """Deterministic weights with torch-fidelity's keys, saved like the real file (a plain state dict)."""
    keys, shape_texts = reference["keys"].tolist(), reference["shapes"].tolist()
    shapes = {k: tuple(int(n) for n in s.split(",") if n) for k, s in zip(keys, shape_texts)}
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(deterministic_state(shapes), path)
    return path


@pytest.fixture(scope="module")
def state(weights_file) -> dict[str, torch.Tensor]:
    return torch.load(weights_file, weights_only=True)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every way to download fails loudly; TORCH_HOME / HF_HOME point at empty folders that must stay empty."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    for name in ("TORCH_HOME", "HF_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield tmp_path
    assert not any((tmp_path / name).exists() for name in ("TORCH_HOME", "HF_HOME"))


def test_key_names_and_shapes_are_torch_fidelitys(reference) -> None:
    with torch.device("meta"):
        model = InceptionV3FID()
    ours = {k: ",".join(map(str, v.shape)) for k, v in model.state_dict().items()}
    assert ours == dict(zip(reference["keys"].tolist(), reference["shapes"].tolist()))
    assert len(ours) == 566 and ours["fc.weight"] == "1008,2048" and ours["Mixed_7c.branch_pool.conv.weight"]


def test_features_equal_torch_fidelity_on_the_same_weights(weights_file, reference, no_network) -> None:
    model = load_fid_inception(weights_file)
    assert not model.training
    with torch.no_grad():
        features = model(reference_images())
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    expected = torch.from_numpy(reference["features"])
    assert expected.abs().mean() > 0.1  # the recorded features are not degenerate
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    model.train()
    assert not model.training  # BatchNorm statistics must never update


def test_legacy_format_file_without_batchnorm_counters_loads(state, tmp_path) -> None:
    """The 2019 release files: torch's pre-1.6 (non-zip) format, possibly without BatchNorm step counters."""
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(trimmed) < len(state)
    torch.save(trimmed, tmp_path / "trimmed.pth", _use_new_zipfile_serialization=False)
    loaded = load_fid_inception(tmp_path / "trimmed.pth")
    assert torch.equal(
        loaded.Mixed_6e.branch7x7dbl_5.conv.weight, state["Mixed_6e.branch7x7dbl_5.conv.weight"]
    )


def test_safetensors_file_loads(state, tmp_path) -> None:
    from safetensors.torch import save_file

    save_file(state, tmp_path / "inception.safetensors")
    loaded = load_fid_inception(tmp_path / "inception.safetensors")
    assert torch.equal(loaded.fc.bias, state["fc.bias"])


def _bad_files(tmp_path: Path, state: dict[str, torch.Tensor]) -> dict[str, tuple[Path, type]]:
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint")
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pth")
    wrong_shape = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    torch.save(wrong_shape, tmp_path / "wrong_shape.pth")
    torch.save(dict(state, **{"AuxLogits.fc.weight": torch.zeros(2)}), tmp_path / "extra.pth")
    return {
        "missing": (tmp_path / "nope.pth", PipelineLoadError),
        "garbage": (tmp_path / "garbage.pth", PipelineLoadError),
        "other network": (tmp_path / "linear.pth", WeightsMismatchError),
        "wrong shape": (tmp_path / "wrong_shape.pth", WeightsMismatchError),
        "extra key": (tmp_path / "extra.pth", WeightsMismatchError),
    }


def test_missing_or_wrong_files_are_one_line_errors(state, tmp_path) -> None:
    for what, (path, error) in _bad_files(tmp_path, state).items():
        with pytest.raises(error) as info:
            load_fid_inception(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message, what
    with pytest.raises(T2IError, match="pt_inception-2015-12-05"):
        load_fid_inception(tmp_path / "nope.pth")


def test_input_must_be_uint8_rgb() -> None:
    model = InceptionV3FID()
    with pytest.raises(InvalidInputError, match="uint8"):
        model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(InvalidInputError, match="uint8"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_tf1_resize_rule() -> None:
    x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    assert torch.equal(resize_bilinear_tf1(x, 4), x)  # same size: the identity
    # 4 -> 8: source coordinate i / 2, no half-pixel offset; the last pixels clamp to the border.
    expected = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0])
    assert torch.equal(resize_bilinear_tf1(x, 8)[0, 0, 0], expected)
    # 4 -> 2: picks pixels 0 and 2 exactly (no antialiasing).
    assert torch.equal(resize_bilinear_tf1(x, 2)[0, 0, 0], torch.tensor([0.0, 2.0]))


@pytest.mark.gpu
def test_cuda_features_match_cpu(weights_file) -> None:
    from t2i.metrics.features import ModuleFeatures

    images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in reference_images()]
    cpu = ModuleFeatures(load_fid_inception(weights_file), "fid")(images)
    cuda = ModuleFeatures(load_fid_inception(weights_file, device="cuda"), "fid", device="cuda")(images)
    assert cuda.device.type == "cpu"  # rows come back on the CPU
    torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=1e-3)

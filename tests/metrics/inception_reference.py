"""Deterministic FID Inception weights and inputs, and the torch-fidelity reference recorded on them.

torch-fidelity cannot be installed here (it requires torchvision, whose PyPI build does not import beside the
CPU torch), so its FeatureExtractorInceptionV3 was run once on these weights and inputs and its outputs were
stored in ``data/inception_reference.npz`` together with its state-dict key names and shapes. To re-record:

    pip download --no-deps torch-fidelity==0.4.0 -d /tmp/tf && unzip /tmp/tf/*.whl -d /tmp/tf/pkg
    PYTHONPATH=src:/tmp/tf/pkg python tests/metrics/inception_reference.py

The weights come from numpy's PCG64 generator (stable across numpy versions), He-scaled so that activations
neither vanish nor explode through the 94 layers.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch

REFERENCE_FILE = Path(__file__).parent / "data" / "inception_reference.npz"


def deterministic_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A state dict with the given key shapes: He-normal convs, BN with random affine and running stats."""
    rng = np.random.default_rng(2015)
    state = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
            continue
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        else:  # bn.bias, running_mean, fc.bias
            value = 0.1 * rng.standard_normal(shape)
        state[key] = torch.from_numpy(value.astype(np.float32))
    return state


def reference_images() -> torch.Tensor:
    """Two uint8 images (2, 3, 61, 47): odd, non-square sizes exercise the resize."""
    rng = np.random.default_rng(7)
    return torch.from_numpy(rng.integers(0, 256, size=(2, 3, 61, 47), dtype=np.uint8))


def _torch_fidelity_inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3 without running its package __init__ (needs torchvision)."""
    import importlib.util

    root = Path(importlib.util.find_spec("torch_fidelity").submodule_search_locations[0])
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(root)]
    sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def record(tmp: Path) -> None:
    """Run torch-fidelity on the deterministic weights and write REFERENCE_FILE."""
    from t2i.metrics.inception import InceptionV3FID

    cls = _torch_fidelity_inception_class()
    shapes = {k: tuple(v.shape) for k, v in InceptionV3FID().state_dict().items()}
    path = tmp / "weights.pth"
    torch.save(deterministic_state(shapes), path)
    reference = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    with torch.no_grad():
        (features,) = reference(reference_images())
    keys = sorted(ref_shapes)
    np.savez_compressed(
        REFERENCE_FILE,
        keys=np.array(keys),
        shapes=np.array([",".join(map(str, ref_shapes[k])) for k in keys]),
        features=features.numpy(),
    )
    print(f"wrote {REFERENCE_FILE}: {len(keys)} keys, features {tuple(features.shape)}")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record(Path(tmp))

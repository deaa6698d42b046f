"""`benchmarks/sdxl_memory.py --smoke`: the simulated allocator over fake tensors gives the bookkeeping that the
options imply (AdamW state = 2 x weights, no device EMA when it lives on the CPU, fewer saved activations with
bf16 and with checkpointing, no parameter-sized temporary in the fused AdamW step)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def results():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import sdxl_memory

        names = "fp32-nockpt-foreach-ema_device,bf16-nockpt-foreach-ema_device,bf16-ckpt-fused-ema_cpu"
        return sdxl_memory.main(["--smoke", "--options", names])
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_resident_parts_follow_the_options(results):
    fp32 = results["fp32-nockpt-foreach-ema_device"]
    lean = results["bf16-ckpt-fused-ema_cpu"]
    assert fp32["adam"] == pytest.approx(2 * fp32["weights"], rel=1e-6)  # exp_avg + exp_avg_sq, float32
    assert fp32["ema"] == fp32["weights"] and lean["ema"] == 0
    assert lean["peak"] < fp32["peak"] - fp32["weights"]


def test_saved_activations_shrink_with_bf16_and_checkpointing(results):
    fp32, bf16 = results["fp32-nockpt-foreach-ema_device"], results["bf16-nockpt-foreach-ema_device"]
    lean = results["bf16-ckpt-fused-ema_cpu"]
    # autocast keeps a bf16 copy of every weight for backward (2 bytes per parameter); the activations shrink
    assert bf16["saved"] - bf16["weights"] / 2 < 0.75 * fp32["saved"]
    assert lean["saved"] < 0.5 * bf16["saved"]


def test_foreach_step_needs_a_parameter_sized_temporary_and_fused_does_not(results):
    foreach, fused = results["fp32-nockpt-foreach-ema_device"], results["bf16-ckpt-fused-ema_cpu"]
    grads = foreach["weights"]  # the step starts with every float32 gradient live
    assert foreach["optim_step"] >= 2 * grads * 0.99
    assert fused["optim_step"] <= grads * 1.05


def test_simulated_activations_match_the_saved_tensors_of_a_real_forward(results):
    """Independent count: the unique storages autograd saves for backward in a real (not fake) fp32 forward."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import sdxl_memory
    finally:
        sys.path.remove(str(BENCHMARKS))
    torch.manual_seed(0)
    trainee = sdxl_memory.Trainee(sdxl_memory.OPTIONS[0], smoke=True, batch=1, side=64, device="cpu")
    inputs = [trainee.x, trainee.noise, trainee.t, trainee.context, trainee.y]  # made before the count starts
    params = {p.untyped_storage().data_ptr() for p in [*trainee.unet.parameters(), *inputs]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainee.forward()
    simulated = results["fp32-nockpt-foreach-ema_device"]["saved"] * 1024**3
    assert sum(saved.values()) == pytest.approx(simulated, rel=0.005)

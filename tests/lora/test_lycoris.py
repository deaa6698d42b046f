"""LyCORIS files (kohya naming, as sd-scripts + LyCORIS write them): LoHa, LoKr and DoRA's `dora_scale`.

Each file is built from a hand-written key map of the tiny UNet's modules; the reference is the merged weight
computed here from the formulas (not from t2i or peft):
    LoHa  dW = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)       (Tucker: einsum of the cores with w_a, w_b)
    LoKr  dW = alpha / r * w1 (x) w2, r from w2_b (else w1_b); both factors full: no factor
    LoCon with a Tucker core (`lora_mid`): the 1x1 down, k x k mid and 1x1 up convolutions run in a row
    DoRA  W' = dora_scale * (W + dW) / ||W + dW||, the norm per output row for dora_scale (out, 1, ...) and per
          input column for (1, in, ...); at scale s the update is s * (W' - W) (A1111 / ComfyUI strength)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import tiny_unet, unet_output
from safetensors.torch import save_file

from t2i.errors import LoraError
from t2i.lora import fuse_lora, load_lora, save_lora_file, set_lora_scale, unfuse_lora, unload_lora

# our module path -> kohya name (diffusers path with _), written by hand for TINY_UNET
MODULES = {
    "linear": ("input_blocks.3.1.transformer_blocks.0.attn2.to_k",
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"),  # (64, 16)
    "square": ("input_blocks.3.1.transformer_blocks.0.attn1.to_out.0",
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"),  # (64, 64)
    "conv3": ("input_blocks.3.0.in_layers.2", "lora_unet_down_blocks_1_resnets_0_conv1"),  # (64, 32, 3, 3)
    "conv1": ("input_blocks.3.1.proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in"),  # (64, 64, 1, 1)
}  # fmt: skip


def rand(gen, *shape, std=0.3):
    return torch.randn(*shape, generator=gen) * std


def tucker(core, w_a, w_b):
    """W[o, i, k, l] = sum_ab core[a, b, k, l] w_a[a, o] w_b[b, i]."""
    return torch.einsum("abkl,ao,bi->oikl", core, w_a, w_b)


def kron(a, b):
    """Kronecker product of a (m, n) with b (p, q, ...): out[i p + x, j q + y, ...] = a[i, j] b[x, y, ...]."""
    out = torch.einsum("ij,xy...->ixjy...", a, b)
    return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:])


def loha(gen, shape, rank, alpha, cp=False):
    """(file parts, reference dW) of a LoHa for a weight of `shape`."""
    out, inp, *kernel = shape
    if cp:
        parts = {f"hada_{n}": v for n, v in {
            "t1": rand(gen, rank, rank, *kernel), "w1_a": rand(gen, rank, out), "w1_b": rand(gen, rank, inp),
            "t2": rand(gen, rank, rank, *kernel), "w2_a": rand(gen, rank, out), "w2_b": rand(gen, rank, inp)}.items()}  # fmt: skip
        delta = tucker(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"]) * tucker(
            parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"]
        )
    else:
        flat = inp * (kernel[0] * kernel[1] if kernel else 1)
        parts = {"hada_w1_a": rand(gen, out, rank), "hada_w1_b": rand(gen, rank, flat),
                 "hada_w2_a": rand(gen, out, rank), "hada_w2_b": rand(gen, rank, flat)}  # fmt: skip
        delta = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    return parts | {"alpha": torch.tensor(alpha)}, alpha / rank * delta.reshape(shape)


def lokr(gen, shape, rank, alpha, w1_shape, variant):
    """(file parts, reference dW) of a LoKr: `variant` picks how each factor is stored."""
    out, inp, *kernel = shape
    (a, b), (c, d) = w1_shape, (out // w1_shape[0], inp // w1_shape[1])
    parts = {}
    if variant == "both-decomposed":
        parts |= {"lokr_w1_a": rand(gen, a, rank), "lokr_w1_b": rand(gen, rank, b)}
        w1 = parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    else:
        w1 = parts.setdefault("lokr_w1", rand(gen, a, b))
    if variant == "full":
        w2 = parts.setdefault("lokr_w2", rand(gen, c, d, *kernel))
    elif variant == "tucker":
        parts |= {"lokr_t2": rand(gen, rank, rank, *kernel), "lokr_w2_a": rand(gen, rank, c),
                  "lokr_w2_b": rand(gen, rank, d)}  # fmt: skip
        w2 = tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:  # low-rank w2, flat over (in, k, k) for convs as LyCORIS' module stores it
        flat = d * (kernel[0] * kernel[1] if kernel else 1)
        parts |= {"lokr_w2_a": rand(gen, c, rank), "lokr_w2_b": rand(gen, rank, flat)}
        w2 = (parts["lokr_w2_a"] @ parts["lokr_w2_b"]).reshape(c, d, *kernel)
    factor = 1.0 if variant == "full" else alpha / rank
    return parts | {"alpha": torch.tensor(alpha)}, factor * kron(w1, w2)


def lora(gen, shape, rank, alpha):
    out, inp, *kernel = shape
    down, up = rand(gen, rank, inp, *kernel), rand(gen, out, rank, *[1] * len(kernel))
    delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)}, alpha / rank * delta


def locon_tucker(gen, shape, rank, alpha):
    """LyCORIS' Tucker LoCon: down (r, in, 1, 1), mid (r, r, k, k), up (out, r, 1, 1) applied one after another."""
    out, inp, *kernel = shape
    down, mid, up = rand(gen, rank, inp, 1, 1), rand(gen, rank, rank, *kernel), rand(gen, out, rank, 1, 1)
    delta = torch.einsum("oa,abkl,bi->oikl", up.flatten(1), mid, down.flatten(1))
    parts = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up, "alpha": torch.tensor(alpha)}
    return parts, alpha / rank * delta


def dora_scale(gen, weight, axis):
    """A LyCORIS dora_scale near the norm of `weight` over the other axes: (out, 1, ...) or (1, in, ...)."""
    dims = tuple(d for d in range(weight.ndim) if d != axis)
    return weight.square().sum(dim=dims, keepdim=True).sqrt() * (0.5 + torch.rand(1, generator=gen))


def decomposed(weight, delta, scale):
    """dora_scale * (W + dW) / ||W + dW||, the norm over every axis dora_scale has size 1 in."""
    merged = weight + delta
    dims = tuple(d for d in range(weight.ndim) if scale.shape[d] == 1)
    return scale * merged / merged.square().sum(dim=dims, keepdim=True).sqrt()


def write(path, modules: dict[str, dict[str, torch.Tensor]]) -> None:
    save_file({f"{flat}.{part}": t.contiguous() for flat, parts in modules.items() for part, t in parts.items()},
              str(path))  # fmt: skip


def layer_output(unet, path, seed=0):
    """(output of the module at `path` on a random input, the same input) for linear and conv modules."""
    base = unet.get_submodule(path).get_base_layer()
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 3, base.in_features) if isinstance(base, torch.nn.Linear) else (2, base.in_channels, 6, 6)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        return unet.get_submodule(path)(x), x


def reference_output(unet, path, weight, x):
    base = unet.get_submodule(path).get_base_layer()
    if isinstance(base, torch.nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, stride=base.stride, padding=base.padding)


def assert_module_weight(unet, path, expected):
    """The (unfused) module computes with `expected` as its weight."""
    out, x = layer_output(unet, path)
    torch.testing.assert_close(out, reference_output(unet, path, expected, x), rtol=1e-4, atol=1e-5)


CASES = {
    "loha-linear": ("linear", lambda g, s: loha(g, s, 4, 2.0)),
    "loha-conv3": ("conv3", lambda g, s: loha(g, s, 3, 6.0)),
    "loha-conv3-tucker": ("conv3", lambda g, s: loha(g, s, 2, 1.0, cp=True)),
    "loha-conv1": ("conv1", lambda g, s: loha(g, s, 4, 4.0)),
    "lokr-linear": ("linear", lambda g, s: lokr(g, s, 2, 1.0, (8, 4), "w2-decomposed")),
    "lokr-linear-both": ("square", lambda g, s: lokr(g, s, 3, 6.0, (8, 8), "both-decomposed")),
    "lokr-linear-full": ("linear", lambda g, s: lokr(g, s, 2, 5.0, (4, 2), "full")),  # alpha ignored
    "lokr-conv3": ("conv3", lambda g, s: lokr(g, s, 3, 2.0, (8, 4), "w2-decomposed")),
    "lokr-conv3-tucker": ("conv3", lambda g, s: lokr(g, s, 2, 3.0, (4, 4), "tucker")),
    "lokr-conv3-full": ("conv3", lambda g, s: lokr(g, s, 4, 1.0, (2, 2), "full")),
    "locon-tucker-conv3": ("conv3", lambda g, s: locon_tucker(g, s, 3, 1.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_file_gives_the_hand_merged_weight(tmp_path, case):
    module, make = CASES[case]
    path, flat = MODULES[module]
    unet = tiny_unet()
    weight = unet.get_submodule(path).weight.detach().clone()
    parts, delta = make(torch.Generator().manual_seed(len(case)), weight.shape)
    write(tmp_path / "f.safetensors", {flat: parts})
    load_lora(unet, tmp_path / "f.safetensors", scale=0.7)
    assert_module_weight(unet, path, weight + 0.7 * delta)
    fuse_lora(unet)
    torch.testing.assert_close(unet.get_submodule(path).get_base_layer().weight, weight + 0.7 * delta)
    unfuse_lora(unet)
    assert torch.equal(unet.get_submodule(path).get_base_layer().weight, weight)


DORA_CASES = {
    "lora-linear-in": ("linear", lambda g, s: lora(g, s, 4, 2.0), 1),
    "lora-linear-out": ("square", lambda g, s: lora(g, s, 4, 8.0), 0),
    "lora-conv3-in": ("conv3", lambda g, s: lora(g, s, 2, 1.0), 1),
    "lora-conv1-out": ("conv1", lambda g, s: lora(g, s, 2, 2.0), 0),
    "loha-conv3-in": ("conv3", lambda g, s: loha(g, s, 3, 6.0), 1),
    "lokr-linear-out": ("linear", lambda g, s: lokr(g, s, 2, 1.0, (8, 4), "w2-decomposed"), 0),
    "locon-tucker-out": ("conv3", lambda g, s: locon_tucker(g, s, 2, 4.0), 0),
}


@pytest.mark.parametrize("case", list(DORA_CASES))
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_lycoris_dora_scale_gives_the_decomposed_weight(tmp_path, case, scale):
    module, make, axis = DORA_CASES[case]
    path, flat = MODULES[module]
    unet = tiny_unet()
    weight = unet.get_submodule(path).weight.detach().clone()
    gen = torch.Generator().manual_seed(len(case))
    parts, delta = make(gen, weight.shape)
    magnitude = dora_scale(gen, weight, axis)
    assert magnitude.shape[1 - axis] == 1 and magnitude.shape[axis] == weight.shape[axis]
    write(tmp_path / "f.safetensors", {flat: parts | {"dora_scale": magnitude.reshape(magnitude.shape[:2])
                                                      if weight.ndim == 2 else magnitude}})  # fmt: skip
    load_lora(unet, tmp_path / "f.safetensors", scale=scale)
    expected = weight + scale * (decomposed(weight, delta, magnitude) - weight)
    assert_module_weight(unet, path, expected)
    fuse_lora(unet)
    torch.testing.assert_close(unet.get_submodule(path).get_base_layer().weight, expected, rtol=1e-4, atol=1e-5)


def test_every_kind_on_one_module_adds_up_fuses_and_rescales(tmp_path):
    """A LoHa, a LoKr, a DoRA (peft naming: lora_magnitude_vector) and a kohya DoRA on the same module."""
    path, flat = MODULES["square"]
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    unet = tiny_unet()
    weight = unet.get_submodule(path).weight.detach().clone()
    gen = torch.Generator().manual_seed(11)
    loha_parts, loha_delta = loha(gen, weight.shape, 3, 1.5)
    lokr_parts, lokr_delta = lokr(gen, weight.shape, 2, 2.0, (4, 8), "w2-decomposed")
    kohya_parts, kohya_delta = lora(gen, weight.shape, 2, 2.0)
    kohya_scale = dora_scale(gen, weight, 1)
    down, up = rand(gen, 4, 64), rand(gen, 64, 4)
    magnitude = dora_scale(gen, weight, 0).reshape(64) * 1.2
    write(tmp_path / "loha.safetensors", {flat: loha_parts})
    write(tmp_path / "lokr.safetensors", {flat: lokr_parts})
    write(tmp_path / "kdora.safetensors", {flat: kohya_parts | {"dora_scale": kohya_scale}})
    save_file({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up,
               f"unet.{name}.lora_magnitude_vector": magnitude}, str(tmp_path / "pdora.safetensors"))  # fmt: skip
    scales = {"loha": 0.8, "lokr": -0.5, "kdora": 0.6, "pdora": 0.9}
    for which, scale in scales.items():  # the LyCORIS layers go first, so the DoRA LoRA must slide in under them
        load_lora(unet, tmp_path / f"{which}.safetensors", scale=scale)

    def expected(s):
        merged = weight + s["pdora"] * up @ down  # peft's DoRA: the magnitude rescales W + s B A, row by row
        peft_dora = magnitude[:, None] * merged / merged.norm(dim=1, keepdim=True)
        kohya = decomposed(weight, kohya_delta, kohya_scale) - weight
        return peft_dora + s["loha"] * loha_delta + s["lokr"] * lokr_delta + s["kdora"] * kohya

    assert_module_weight(unet, path, expected(scales))
    output = unet_output(unet)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    fuse_lora(unet)
    torch.testing.assert_close(unet.get_submodule(path).get_base_layer().weight, expected(scales))
    torch.testing.assert_close(unet_output(unet), output, rtol=1e-4, atol=1e-5)
    unfuse_lora(unet)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in state.items())
    set_lora_scale(unet, "lokr", 0.25)
    set_lora_scale(unet, "pdora", 0.5)
    assert_module_weight(unet, path, expected(scales | {"lokr": 0.25, "pdora": 0.5}))
    unload_lora(unet, "kdora")
    assert_module_weight(unet, path, expected(scales | {"lokr": 0.25, "pdora": 0.5, "kdora": 0.0}))
    unload_lora(unet)
    assert_module_weight(unet, path, weight)


@pytest.mark.parametrize(
    "case", ["loha-conv3-tucker", "lokr-linear-both", "lokr-linear-full", "lokr-conv3", "locon-tucker-conv3"]
)
def test_lycoris_files_written_by_t2i_load_back_to_the_same_weights(tmp_path, case):
    module, make = CASES[case]
    path, flat = MODULES[module]
    unet = tiny_unet()
    weight = unet.get_submodule(path).weight.detach().clone()
    parts, _ = make(torch.Generator().manual_seed(3), weight.shape)
    write(tmp_path / "f.safetensors", {flat: parts | {"dora_scale": dora_scale(torch.Generator(), weight, 0)}})
    load_lora(unet, tmp_path / "f.safetensors", name="x")
    expected, _ = layer_output(unet, path)
    saved = save_lora_file(unet, tmp_path / "again.safetensors", adapter_name="x")
    again = tiny_unet()
    load_lora(again, saved)
    torch.testing.assert_close(layer_output(again, path)[0], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"hada_w1_a": (64, 2), "hada_w1_b": (2, 16), "hada_w2_a": (64, 2)}, "LoHa weights missing hada_w2_b"),
        ({"hada_w1_a": (64, 2), "hada_w1_b": (2, 16), "hada_w2_a": (64, 3), "hada_w2_b": (3, 16)},
         "LoHa weights of inconsistent ranks"),
        ({"lokr_w1": (8, 4), "lora_down.weight": (2, 16)}, "keys of several adapter kinds (lokr, lora)"),
        ({"lokr_w2_a": (8, 2), "lokr_w2_b": (2, 4)}, "LoKr weights need lokr_w1"),
        ({"lokr_w1": (8, 4), "lokr_w2": (8, 5)}, "does not fit the module's weight (64, 16)"),
        ({"lora_down.weight": (2, 16), "lora_up.weight": (64, 2), "dora_scale": (1, 64)},
         "dora_scale of shape (1, 64): expected (64, 1, ...) or (1, 16, ...)"),
    ],
)  # fmt: skip
def test_broken_lycoris_files_name_the_module_and_the_problem(tmp_path, parts, message):
    _, flat = MODULES["linear"]
    write(tmp_path / "bad.safetensors", {flat: {p: torch.ones(s) for p, s in parts.items()}})
    with pytest.raises(LoraError) as info:
        load_lora(tiny_unet(), tmp_path / "bad.safetensors")
    assert message in str(info.value)
    assert "attn2" in str(info.value) or "dora_scale" in message


def test_lycoris_algorithms_t2i_does_not_read_are_named(tmp_path):
    _, flat = MODULES["square"]
    write(tmp_path / "oft.safetensors", {flat: {"oft_blocks": torch.zeros(4, 16, 16), "alpha": torch.tensor(1.0)}})
    with pytest.raises(LoraError, match=f"unknown LoRA keys .*{flat}.oft_blocks"):
        load_lora(tiny_unet(), tmp_path / "oft.safetensors")


@pytest.mark.gpu
def test_lycoris_kinds_run_on_cuda_in_float16_as_on_the_cpu(tmp_path):
    """Factors and dora_scale follow the module's device and dtype, loaded there or moved there afterwards."""
    gen = torch.Generator().manual_seed(5)
    files = {}
    for module, make in (("conv3", lambda g, s: loha(g, s, 3, 6.0)), ("square", lambda g, s: lora(g, s, 2, 2.0)),
                         ("linear", lambda g, s: lokr(g, s, 2, 1.0, (8, 4), "w2-decomposed"))):  # fmt: skip
        path, flat = MODULES[module]
        weight = tiny_unet().get_submodule(path).weight.detach()
        parts, _ = make(gen, weight.shape)
        files[module] = tmp_path / f"{module}.safetensors"
        write(files[module], {flat: parts | {"dora_scale": dora_scale(gen, weight, 1 if module == "square" else 0)}})

    def outputs(unet, device, dtype):
        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
        with torch.no_grad():
            out = unet(x.to(device, dtype), torch.tensor([10, 500], device=device), ctx.to(device, dtype))
        return out.float().cpu()

    cpu = tiny_unet()
    for i, path in enumerate(files.values()):
        load_lora(cpu, path, scale=0.5 + 0.25 * i)
    expected = outputs(cpu, "cpu", torch.float32)
    loaded_there = tiny_unet().to("cuda", torch.float16)
    for i, path in enumerate(files.values()):
        load_lora(loaded_there, path, scale=0.5 + 0.25 * i)
    moved = cpu.to("cuda", torch.float16)
    for unet in (loaded_there, moved):
        torch.testing.assert_close(outputs(unet, "cuda", torch.float16), expected, rtol=2e-2, atol=2e-2)
        fuse_lora(unet)
        torch.testing.assert_close(outputs(unet, "cuda", torch.float16), expected, rtol=2e-2, atol=2e-2)
        unfuse_lora(unet)

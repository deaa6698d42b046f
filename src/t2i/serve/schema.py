"""OpenAI image request fields -> a validated `JobSpec`. Every bad field is an `APIError` (400) naming it.

Fields of `POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart form, where every value
arrives as a string and `loras` as JSON text):

    OpenAI:     model, prompt, n (1-10), size ("WxH" | "auto"), response_format (url | b64_json), user
    extensions: negative_prompt, steps, guidance_scale, seed, sampler, loras [{name, scale}], stream
    edits:      image (the file), strength (0-1]

OpenAI fields that do not apply here (quality, style, background, moderation, output_compression,
partial_images) are accepted and ignored; `output_format` must be png; any other field is an error, so a typo
such as `guidance` for `guidance_scale` is not silently dropped.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from t2i.errors import T2IError
from t2i.serve.adapters import BatchKey, ModelAdapter, Row
from t2i.serve.errors import APIError
from t2i.serve.settings import ServerSettings

MAX_IMAGES = 10
MAX_PROMPT_CHARS = 4000  # OpenAI's limit for dall-e-3 prompts; the token limit below is usually tighter
MAX_USER_CHARS = 256
MAX_LORAS = 8
MAX_LORA_SCALE = 10.0
MAX_SEED = 2**63 - 1 - MAX_IMAGES  # image j of a request gets seed + j
RESPONSE_FORMATS = ("url", "b64_json")
IGNORED_OPENAI_FIELDS = ("quality", "style", "background", "moderation", "output_compression", "partial_images")
COMMON_FIELDS = (
    "model", "prompt", "n", "size", "response_format", "user", "output_format", "negative_prompt", "steps",
    "guidance_scale", "seed", "sampler", "loras", "stream", *IGNORED_OPENAI_FIELDS,
)
EDIT_FIELDS = ("image", "image[]", "mask", "strength")
SIZE_PATTERN = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


@dataclass
class JobSpec:
    """A validated image request: the batch key its rows share and one row per output image."""

    model: str
    key: BatchKey
    rows: list[Row]
    response_format: str
    stream: bool = False

    @property
    def size(self) -> str:
        return f"{self.key.width}x{self.key.height}"


def bad(param: str, message: str, code: str | None = "invalid_value", status: int = 400) -> APIError:
    return APIError(f"{param}: {message}", status=status, param=param, code=code)


class Fields:
    """Typed reads of request fields. `form=True`: values are strings (multipart) and are parsed."""

    def __init__(self, values: Mapping[str, Any], form: bool = False, prefix: str = "") -> None:
        self.values, self.form, self.prefix = values, form, prefix  # prefix: where nested fields sit, "loras[0]."

    def raw(self, name: str) -> Any:
        value = self.values.get(name)
        return None if self.form and value == "" and name not in ("prompt", "negative_prompt") else value

    def string(self, name: str, required: bool = False, max_chars: int = MAX_PROMPT_CHARS) -> str | None:
        value = self.raw(name)
        if value is None:
            if required:
                raise bad(self.prefix + name, "missing; expected a non-empty string", code="missing_required_parameter")
            return None
        if not isinstance(value, str):
            raise bad(self.prefix + name, f"expected a string, got {type(value).__name__}")
        if len(value) > max_chars:
            raise bad(self.prefix + name, f"{len(value)} characters; expected at most {max_chars}", code="string_above_max_length")
        return value

    def integer(self, name: str, low: int, high: int) -> int | None:
        value = self.raw(name)
        if value is None:
            return None
        if self.form and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad(self.prefix + name, f"{value!r} is not an integer") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(self.prefix + name, f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise bad(self.prefix + name, f"{value} is out of range; expected {low} to {high}")
        return value

    def number(self, name: str, low: float, high: float, low_open: bool = False) -> float | None:
        value = self.raw(name)
        if value is None:
            return None
        if self.form and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad(self.prefix + name, f"{value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(self.prefix + name, f"expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise bad(self.prefix + name, f"{value} is not a finite number")
        if value > high or value < low or (low_open and value == low):
            interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise bad(self.prefix + name, f"{value} is out of range; expected a number in {interval}")
        return value

    def boolean(self, name: str) -> bool:
        value = self.raw(name)
        if value is None:
            return False
        if self.form and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise bad(self.prefix + name, f"expected true or false, got {value!r}")
        return value


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; NaN/Infinity literals (which Python's json accepts) are refused."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(body, parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(f"request body: not valid JSON ({err})", param=None, code="invalid_json") from None
    if not isinstance(value, dict):
        raise APIError(f"request body: expected a JSON object, got {type(value).__name__}", code="invalid_json")
    return value


def check_fields(values: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise bad(unknown[0], f"unknown field; expected one of {', '.join(sorted(allowed))}", code="unknown_parameter")


def pick_model(fields: Fields, adapters: Mapping[str, ModelAdapter]) -> ModelAdapter:
    name = fields.string("model", max_chars=256)
    if name is None:
        return next(iter(adapters.values()))
    if name not in adapters:
        raise bad("model", f"unknown model {name!r}; served: {', '.join(adapters)}", code="model_not_found", status=404)
    return adapters[name]


def parse_size(fields: Fields, adapter: ModelAdapter, settings: ServerSettings, default: tuple[int, int]) -> tuple[int, int]:
    """'WxH' (or 'auto' / absent: `default`) -> (width, height), within [1, max_size] and a size the model makes."""
    value = fields.string("size", max_chars=32)
    if value is None or value == "auto":
        width, height = default
    else:
        match = SIZE_PATTERN.match(value)
        if not match:
            raise bad("size", f"{value!r}; expected 'WIDTHxHEIGHT', e.g. '{default[0]}x{default[1]}'")
        width, height = int(match.group(1)), int(match.group(2))
    if not (1 <= width <= settings.max_size and 1 <= height <= settings.max_size):
        raise bad("size", f"{width}x{height}: each side must be 1 to {settings.max_size} pixels")
    why = adapter.check_size(width, height)
    if why:
        raise bad("size", why)
    return width, height


def parse_loras(fields: Fields, adapter: ModelAdapter) -> tuple[tuple[str, float], ...]:
    value = fields.raw("loras")
    if value is None:
        return ()
    if fields.form and isinstance(value, str):
        try:
            value = json.loads(value, parse_constant=lambda c: float("nan"))
        except ValueError:
            raise bad("loras", "not valid JSON; expected a list of {name, scale} objects") from None
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        raise bad("loras", f"expected a list of at most {MAX_LORAS} {{name, scale}} objects")
    chosen: dict[str, float] = {}
    for i, item in enumerate(value):
        param = f"loras[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "scale"}:
            raise bad(param, "expected an object with `name` and optional `scale`")
        item_fields = Fields(item, prefix=f"{param}.")
        name = item_fields.string("name", required=True, max_chars=256)
        if name not in adapter.loras:
            known = ", ".join(sorted(adapter.loras)) or "none (start the server with --lora-dir)"
            raise bad(f"{param}.name", f"unknown LoRA {name!r}; available: {known}", code="lora_not_found")
        if name in adapter.unfit_loras:
            raise bad(f"{param}.name", f"LoRA {name!r} does not fit model {adapter.id}")
        if name in chosen:
            raise bad(f"{param}.name", f"LoRA {name!r} is listed twice")
        scale = item_fields.number("scale", -MAX_LORA_SCALE, MAX_LORA_SCALE)
        chosen[name] = 1.0 if scale is None else scale
    return tuple(sorted(chosen.items()))


def check_prompt(adapter: ModelAdapter, name: str, prompt: str) -> None:
    tokens = adapter.prompt_tokens(prompt)
    if tokens > adapter.max_prompt_tokens:
        raise bad(
            name,
            f"{tokens} tokens; model {adapter.id} reads at most {adapter.max_prompt_tokens} (the rest would be cut)",
            code="prompt_too_long",
        )


def parse_job(
    values: Mapping[str, Any],
    adapters: Mapping[str, ModelAdapter],
    settings: ServerSettings,
    edit_image: Any = None,
    edit_mask: Any = None,
) -> JobSpec:
    """Validate a generation (or, with `edit_image`, an edit; with `edit_mask` too, inpainting) request against
    the model it names."""
    form = edit_image is not None
    check_fields(values, COMMON_FIELDS + (EDIT_FIELDS if form else ()))
    fields = Fields(values, form=form)
    adapter = pick_model(fields, adapters)
    if form and not adapter.supports_edits:
        raise bad("model", f"model {adapter.id} ({adapter.kind}) does not do image edits")
    if form and fields.raw("mask") is not None:
        raise bad("mask", "expected a file upload (a PNG: transparent or white where to repaint)")
    task = edit_task(adapter, form, edit_mask is not None)
    prompt = fields.string("prompt", required=True)
    if not prompt.strip():
        raise bad("prompt", "empty; expected a non-empty string", code="missing_required_parameter")
    negative = fields.string("negative_prompt") or ""
    n = fields.integer("n", 1, MAX_IMAGES) or 1
    response_format = fields.string("response_format", max_chars=32) or "url"
    if response_format not in RESPONSE_FORMATS:
        raise bad("response_format", f"{response_format!r}; expected one of {', '.join(RESPONSE_FORMATS)}")
    output_format = fields.string("output_format", max_chars=32)
    if output_format not in (None, "png"):
        raise bad("output_format", f"{output_format!r}; this server writes png only")
    fields.string("user", max_chars=MAX_USER_CHARS)  # OpenAI's end-user id: checked, not used
    default_size = adapter.default_size if edit_image is None else edit_size(adapter, edit_image)
    width, height = parse_size(fields, adapter, settings, default_size)
    steps = fields.integer("steps", 1, settings.max_steps)
    guidance = fields.number("guidance_scale", 0.0, settings.max_guidance)
    seed = fields.integer("seed", 0, MAX_SEED)
    seed = secrets.randbelow(2**32) if seed is None else seed
    sampler = fields.string("sampler", max_chars=64)
    if sampler is not None and sampler not in adapter.samplers:
        raise bad("sampler", f"unknown sampler {sampler!r} for model {adapter.id}; expected one of "
                  f"{', '.join(adapter.samplers) or '(none: leave sampler out)'}", code="unknown_sampler")
    strength = None
    if task == "instruct" and fields.raw("strength") is not None:
        raise bad("strength", f"not used by model {adapter.id} (InstructPix2Pix edits always start from noise)")
    if task in ("edit", "inpaint"):
        strength = fields.number("strength", 0.0, 1.0, low_open=True)
        strength = (1.0 if task == "inpaint" else 0.6) if strength is None else strength
    loras = parse_loras(fields, adapter)
    check_prompt(adapter, "prompt", prompt)
    if negative:
        check_prompt(adapter, "negative_prompt", negative)
    try:
        adapter.check_sampling(sampler, steps, strength)
    except T2IError as err:
        raise bad(_param_of(err), str(err)) from None
    key = BatchKey(
        model=adapter.id,
        task=task,
        width=width,
        height=height,
        steps=steps if steps is not None else adapter.default_steps,
        sampler=sampler if sampler is not None else adapter.default_sampler,
        guidance=guidance if guidance is not None else adapter.default_guidance,
        loras=loras,
        strength=strength,
    )
    rows = [Row(prompt, negative, seed + j, edit_image, edit_mask) for j in range(n)]
    return JobSpec(adapter.id, key, rows, response_format, fields.boolean("stream"))


def edit_task(adapter: ModelAdapter, form: bool, masked: bool) -> str:
    """The batch task of a request: what the route and the mask ask for, checked against what the model's UNet
    can do (an inpainting UNet needs image and mask, an InstructPix2Pix UNet an image and no mask)."""
    kind = adapter.unet_task
    if kind == "generate":
        if masked:
            raise bad("mask", f"model {adapter.id} re-draws the whole image (see `strength`); inpainting needs an "
                      "inpainting model (a 9-channel UNet)")  # fmt: skip
        return "edit" if form else "generate"
    route = "an `image` and a `mask`" if kind == "inpaint" else "an `image` and an instruction as the prompt"
    if not form:
        raise bad("model", f"model {adapter.id} is an {'inpainting' if kind == 'inpaint' else 'InstructPix2Pix'} "
                  f"model: use /v1/images/edits with {route}")  # fmt: skip
    if kind == "inpaint" and not masked:
        raise bad("mask", f"missing; model {adapter.id} is an inpainting model and repaints where the mask says",
                  code="missing_required_parameter")  # fmt: skip
    if kind == "instruct" and masked:
        raise bad("mask", f"not used by model {adapter.id} (InstructPix2Pix edits the whole image)")
    return kind


def edit_size(adapter: ModelAdapter, image: Any) -> tuple[int, int]:
    """The default output size of an edit: the uploaded image's, rounded down to the model's multiple."""
    m = adapter.size_multiple
    return max(m, image.width // m * m), max(m, image.height // m * m)


def _param_of(err: Exception) -> str:
    """The field a pipeline error names first (`steps: ...` -> steps)."""
    head = str(err).split(":", 1)[0].strip()
    return head if head in COMMON_FIELDS + EDIT_FIELDS else "sampler"

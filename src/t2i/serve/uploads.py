"""Request bodies read with limits: JSON bodies and the multipart form of `/v1/images/edits` (the image decoded
off the event loop, its size checked before its pixels are decoded)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

from fastapi import Request

from t2i.serve.errors import APIError
from t2i.serve.settings import ServerSettings


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(f"request body: {declared} bytes; expected at most {limit}", 413, code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"request body: more than {limit} bytes", 413, code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_edit_form(request: Request, settings: ServerSettings) -> tuple[dict[str, str], Any, Any]:
    """The edit form's text fields, its decoded `image` (PIL, RGB) and `mask` (PIL, L: white = repaint; None
    when absent)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise APIError("request body: expected multipart/form-data with an `image` file", code="invalid_content_type")
    try:
        form = await request.form(max_files=2, max_fields=64, max_part_size=settings.max_upload_bytes)
    except Exception as err:  # noqa: BLE001 - starlette and python-multipart raise several types for bad bodies
        raise APIError(f"request body: malformed multipart form ({err})", code="invalid_form") from None
    values: dict[str, str] = {}
    upload = mask_upload = None
    for name, value in form.multi_items():
        is_file = hasattr(value, "read")
        if name == "mask" and is_file:
            if mask_upload is not None:
                raise APIError("mask: given twice", param="mask", code="invalid_value")
            mask_upload = value
        elif name in ("image", "image[]"):
            if upload is not None:
                raise APIError("image: expected one image; this server edits one image per request", param="image")
            if not is_file:
                raise APIError("image: expected a file upload", param="image", code="invalid_value")
            upload = value
        elif name in values:
            raise APIError(f"{name}: given twice", param=name, code="invalid_value")
        else:
            values[name] = "(file)" if is_file else str(value)
    if upload is None:
        raise APIError("image: missing; expected an image file", param="image", code="missing_required_parameter")
    data = await upload.read()
    mask_data = await mask_upload.read() if mask_upload is not None else None
    await form.close()
    image = await asyncio.to_thread(decode_image, data, settings.max_size * 4)
    mask = None if mask_data is None else await asyncio.to_thread(decode_mask, mask_data, image.size)
    return values, image, mask


def decode_mask(data: bytes, size: tuple[int, int]) -> Any:
    """A mask upload -> PIL L, white = repaint. With an alpha channel, transparent pixels are the ones to repaint
    (OpenAI's images.edit); without one, white ones (diffusers, A1111). It must be the image's size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as mask:
            if mask.size != size:
                raise APIError(f"mask: {mask.width}x{mask.height}; expected the image's size {size[0]}x{size[1]}",
                               param="mask", code="invalid_value")  # fmt: skip
            has_alpha = mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info
            if has_alpha:
                return mask.convert("RGBA").getchannel("A").point(lambda a: 255 - a)
            return mask.convert("L")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as err:
        raise APIError(f"mask: cannot read it as an image ({type(err).__name__})", param="mask",
                       code="invalid_image") from None


def decode_image(data: bytes, max_side: int) -> Any:
    """PNG/JPEG/WebP bytes -> PIL RGB; 400 for anything unreadable or larger than max_side on a side."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) > max_side:
                raise APIError(f"image: {image.width}x{image.height}; expected at most {max_side} px a side",
                               param="image", code="image_too_large")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as err:
        raise APIError(f"image: cannot read it as an image ({type(err).__name__})", param="image",
                       code="invalid_image") from None

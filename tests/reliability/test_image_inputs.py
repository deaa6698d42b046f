"""Images and image folders: 16-bit scaling, a pixel limit checked before decoding, reduced JPEG decoding, and
metadata.jsonl lines that are malformed, leave the folder, or are not UTF-8 (all skipped and counted)."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes, write_tar


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand: IHDR, one IDAT (raw scanlines, or a few junk bytes when `rows` is None), IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows) if rows is not None else b"\x78\x9c\x00"
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _png16_grey(values: np.ndarray) -> bytes:
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    return _png(values.shape[1], values.shape[0], 16, 0, rows)


@pytest.mark.silent
def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    from t2i.data.transforms import decode_image

    values = np.linspace(0, 65535, 64, dtype=np.float64).reshape(8, 8).astype(np.uint16)
    image = decode_image(_png16_grey(values))
    expected = np.rint(values / 257.0).astype(np.uint8)  # hand-computed: 65535 -> 255, 257 -> 1
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.repeat(expected[:, :, None], 3, axis=2))


@pytest.mark.silent
def test_sixteen_bit_big_endian_tiff_is_scaled():
    from t2i.data.transforms import decode_image

    values = np.full((4, 4), 30000, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values.astype(">u2")).save(buffer, format="TIFF")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I;16")
    assert np.asarray(decode_image(buffer.getvalue()))[0, 0].tolist() == [117, 117, 117]  # 30000 / 257


def test_sixteen_bit_rgb_png_keeps_its_colours():
    from t2i.data.transforms import decode_image

    rgb = np.zeros((4, 4, 3), dtype=np.uint16)
    rgb[..., 0], rgb[..., 2] = 40000, 65535
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    assert np.asarray(decode_image(_png(4, 4, 16, 2, rows)))[0, 0].tolist() == [156, 0, 255]


@pytest.mark.silent
@pytest.mark.parametrize("side", [12000, 20000])  # PIL: a warning at 12000^2, its own error at 20000^2
def test_huge_image_is_skipped_before_decoding(tmp_path, side):
    from t2i.data.readers import build_dataset

    # The header claims side x side pixels but no pixel data follows: decoding it would fail, so a
    # `too_large` count (not `undecodable`) shows that the limit is checked before any pixel is read.
    source = write_tar(tmp_path / "s.tar", [("big.png", _png(side, side, 8, 2, None)), ("big.txt", b"huge"),
                                            ("ok.png", image_bytes()), ("ok.txt", b"fine")])
    dataset = build_dataset(str(source), 16, shuffle=False)
    assert [s["captions"] for s in dataset] == ["fine"]
    assert dataset.stats.counts["too_large"] == 1 and dataset.stats.counts["undecodable"] == 0


@pytest.mark.silent
def test_pixel_limit_is_a_config_key(tmp_path):
    from t2i.config import build_config
    from t2i.data.readers import build_dataset

    limit = build_config({}, ["data.max_image_pixels=1000"]).data.max_image_pixels
    source = write_tar(tmp_path / "s.tar", [("a.png", image_bytes(size=40)), ("a.txt", b"1600 pixels"),
                                            ("b.png", image_bytes(size=30)), ("b.txt", b"900 pixels")])
    dataset = build_dataset(str(source), 16, shuffle=False, max_image_pixels=limit)
    assert [s["captions"] for s in dataset] == ["900 pixels"]
    assert dataset.stats.counts["too_large"] == 1


@pytest.mark.silent
def test_large_jpeg_is_decoded_at_reduced_scale():
    from t2i.data.transforms import ImageTransform, decode_image

    y, x = np.mgrid[0:1024, 0:1280]
    smooth = np.stack([x * 255 // 1279, y * 255 // 1023, (x + y) * 255 // 2302], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    reduced = decode_image(buffer.getvalue(), min_side=64)
    assert reduced.size == (160, 128)  # libjpeg's 1/8 scale: the shorter side stays >= 2 x 64
    full = decode_image(buffer.getvalue())
    assert full.size == (1280, 1024)
    transform = ImageTransform(64)
    rng = np.random.default_rng(0)
    difference = (transform(reduced, rng) - transform(full, rng)).abs().mean().item() * 127.5
    assert difference < 0.5  # measured 0.20: mean absolute difference in 0..255 units after the same resize and crop


def test_small_jpeg_is_decoded_in_full():
    from t2i.data.transforms import decode_image

    assert decode_image(image_bytes("JPEG", size=200), min_side=64).size == (200, 200)  # < 4x: no draft


# ------------------------------------------------------------------------------------------- image folders


def _folder_dataset(tmp_path, entries: list, raw_lines: list[bytes] = ()):
    from t2i.data.readers import build_dataset

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)  # so that sub/../../outside.png resolves
    (folder / "good.png").write_bytes(image_bytes(seed=1))
    (tmp_path / "outside.png").write_bytes(image_bytes(seed=2))
    lines = [json.dumps({"file_name": "good.png", "text": "inside"}).encode()]
    lines += [json.dumps(entry).encode() for entry in entries] + list(raw_lines)
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    dataset = build_dataset(str(folder), 16, shuffle=False)
    return [s["captions"] for s in dataset], dataset.stats.counts


@pytest.mark.traceback
def test_metadata_file_name_that_is_not_a_string_is_counted(tmp_path):
    captions, counts = _folder_dataset(tmp_path, [{"file_name": 7, "text": "seven"}, {"file_name": None}])
    assert captions == ["inside"] and counts["corrupt_member"] == 2


@pytest.mark.silent
@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_metadata_file_name_outside_the_folder_is_rejected(tmp_path, name):
    name = str(tmp_path / "outside.png") if name == "ABSOLUTE" else name
    captions, counts = _folder_dataset(tmp_path, [{"file_name": name, "text": "escaped"}])
    assert captions == ["inside"]
    assert counts["unsafe_path"] == 1


def test_metadata_file_name_in_a_subfolder_is_fine(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "sub").mkdir()
    (tmp_path / "folder" / "sub" / "x.png").write_bytes(image_bytes(seed=3))
    from t2i.data.readers import build_dataset

    (tmp_path / "folder" / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/./x.png", "text": "deep"}))
    assert [s["captions"] for s in build_dataset(str(tmp_path / "folder"), 16)] == ["deep"]


@pytest.mark.silent
def test_non_utf8_caption_is_rejected_in_folders_as_in_shards(tmp_path):
    """Both readers skip and count it (corrupt_member): decoding with replacement characters would train on
    text the user never wrote, and guessing another encoding is a silent guess."""
    from t2i.data.readers import build_dataset

    latin1 = b'{"file_name": "good.png", "text": "caf\xe9"}'
    captions, counts = _folder_dataset(tmp_path, [], [latin1])
    assert captions == ["inside"] and counts["corrupt_member"] == 1
    shard = write_tar(tmp_path / "s.tar", [("a.png", image_bytes()), ("a.txt", "caf\xe9".encode("latin-1"))])
    dataset = build_dataset(str(shard), 16)
    assert list(dataset) == [] and dataset.stats.counts["corrupt_member"] == 1


@pytest.mark.silent
def test_folder_samples_are_decoded_like_shards(tmp_path):
    captions, counts = _folder_dataset(tmp_path, [{"file_name": "good.png", "caption": "by caption column"}])
    assert captions == ["inside", "by caption column"] and sum(counts.values()) == 0

"""Fuzzing the image decoders (mllama_tpu.images, mllama_tpu.serve.image_url): every PIL mode in
every format PIL writes it, sizes from 1x1 past the pixel limits, animated GIFs, truncated and
bit-flipped files, arbitrary data URLs. An image decodes to 8-bit RGB of its own size, or the
user gets one line naming it; never a PIL exception, a MemoryError or a hang.
"""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from PIL import Image

from fuzzing import assert_clear, bounded, floats
from mllama_tpu.errors import UserError
from mllama_tpu.images import decode_image, load_image
from mllama_tpu.serve.errors import ApiError
from mllama_tpu.serve.image_url import image_from_url

WHERE = "image upload.png"
MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "I;16", "I;16B", "I;16L", "F"]
FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "TGA", "PCX", "SGI", "IM", "QOI", "SPIDER",
           "JPEG2000", "ICO", "PDF", "XBM", "MSP", "DDS"]


def _savable() -> list[tuple[str, str]]:
    """(mode, format) pairs PIL can write: what a user's tool may have produced."""
    pairs = []
    for mode in MODES:
        im = Image.new(mode, (4, 3))
        for fmt in FORMATS:
            try:
                im.save(io.BytesIO(), fmt)
            except Exception:  # noqa: BLE001 - PIL says "cannot write mode X as Y" in many ways
                continue
            pairs.append((mode, fmt))
    return pairs


SAVABLE = _savable()


def encoded(mode: str, fmt: str, width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        im = Image.fromarray((rng.integers(0, 65536, (height, width))).astype(np.int32), "I").convert(mode)
    elif mode != "RGB":
        im = im.convert(mode) if mode not in ("La", "RGBa", "PA", "LAB", "HSV") else _via(im, mode)
    buf = io.BytesIO()
    try:
        im.save(buf, fmt)
    except (OSError, ValueError):  # ICO writes some modes only at some sizes
        assume(False)
    return buf.getvalue()


def _via(im: Image.Image, mode: str) -> Image.Image:
    # Modes PIL's convert() does not reach from RGB: build them from bands.
    if mode == "PA":
        return im.convert("P").convert("PA")
    if mode in ("La", "RGBa"):
        return im.convert(mode[:-1] + "A").convert(mode)
    return Image.merge(mode, im.split())


def decodes_or_refuses(data: bytes, where: str = WHERE):
    try:
        image = decode_image(data, where)
    except UserError as e:
        assert_clear(e, where)
        return None
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    return image


def test_every_mode_and_format_is_covered():
    # The pairs PIL writes, so the test below cannot silently shrink to nothing.
    assert len({m for m, _ in SAVABLE}) == len(MODES) and len({f for _, f in SAVABLE}) >= 12


@bounded(150)
@given(pair=st.sampled_from(SAVABLE), width=st.integers(1, 70), height=st.integers(1, 70), seed=st.integers(0, 99))
def test_every_pil_mode_decodes_to_rgb_of_its_size(pair, width, height, seed):
    mode, fmt = pair
    data = encoded(mode, fmt, width, height, seed)
    image = decodes_or_refuses(data)
    # The formats users send must decode; PIL writes YCbCr TIFFs it cannot read back itself
    # ("truncated"): refused in one line, like any damaged file.
    if fmt in ("PNG", "TIFF", "WEBP", "BMP", "JPEG", "GIF", "PPM") and (mode, fmt) != ("YCbCr", "TIFF"):
        assert image is not None, f"{mode} {fmt} refused"
    if image is not None and fmt not in ("ICO", "PDF"):  # these two resize or reframe on save
        assert image.size == (width, height)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_grey_is_scaled_not_clipped(mode):
    ramp = (np.arange(256, dtype=np.int32).reshape(16, 16) * 257)
    buf = io.BytesIO()
    Image.fromarray(ramp, "I").convert(mode).save(buf, "TIFF")
    grey = np.asarray(decode_image(buf.getvalue(), WHERE))[..., 0].astype(int)
    assert np.abs(grey - np.arange(256).reshape(16, 16)).max() <= 1  # 0..65535 -> 0..255, not all 255


def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    im = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), "RGB")
    out = {}
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {}), ("GIF", {}), ("BMP", {}),
                    ("TIFF", {}), ("JPEG", {"progressive": True})):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out[fmt + ("-progressive" if kw.get("progressive") else "")] = buf.getvalue()
    return out


SEEDS = _seed_files()


@bounded(200)
@given(name=st.sampled_from(sorted(SEEDS)), cut=floats(0, 1, exclude_max=True))
@example(name="PNG", cut=0.5).via("the truncated PNG of test_pipeline")
def test_truncated_file_is_refused_in_one_line(name, cut):
    data = SEEDS[name]
    decodes_or_refuses(data[: int(len(data) * cut)])


@bounded(300)
@given(name=st.sampled_from(sorted(SEEDS)), flips=st.lists(st.tuples(floats(0, 1, exclude_max=True),
                                                                     st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped_file_decodes_or_is_refused(name, flips):
    data = bytearray(SEEDS[name])
    for where, bit in flips:
        data[int(len(data) * where)] ^= 1 << bit
    decodes_or_refuses(bytes(data))


@bounded(100)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(data):
    decodes_or_refuses(data)


def png_header_only(width: int, height: int, mode_byte: int = 2) -> bytes:
    """A PNG that declares width x height (8-bit, colour type `mode_byte`) over a few bytes of data:
    a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@bounded(20, deadline_ms=10000)
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
@example(width=10000, height=10000)  # 1e8 pixels: over PIL's 89 M, under twice that (PIL only warns)
@example(width=200000, height=200000)  # far past PIL's bomb limit
def test_pixel_bomb_is_refused_before_decoding(width, height):
    data = png_header_only(width, height)
    if width * height <= Image.MAX_IMAGE_PIXELS:
        return  # a real size: the tiny IDAT makes it a truncated file, covered above
    with pytest.raises(UserError) as e:
        decode_image(data, WHERE)
    assert "too large" in assert_clear(e.value, WHERE)


def test_animated_gif_is_its_first_frame():
    frames = [Image.new("RGB", (9, 6), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = decode_image(buf.getvalue(), WHERE)
    assert image.size == (9, 6) and image.getpixel((4, 3)) == (255, 0, 0)


def test_eps_without_ghostscript_says_so():
    import shutil

    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "EPS")
    if shutil.which("gs"):
        assert decode_image(buf.getvalue(), WHERE).size == (8, 8)
    else:  # it said "damaged or truncated ([Errno 2] No such file or directory: 'gs')"
        with pytest.raises(UserError) as e:
            decode_image(buf.getvalue(), WHERE)
        assert "needs gs to decode" in assert_clear(e.value, WHERE)


def test_load_image_names_the_file(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(SEEDS["JPEG"][:100])
    with pytest.raises(UserError) as e:
        load_image(path)
    assert_clear(e.value, str(path))
    with pytest.raises(UserError) as e:
        load_image(tmp_path / "missing.png")
    assert_clear(e.value, "missing.png")


# ---------------------------------------------------------------------------------------------
# the server's image_url: data URLs only, bounded in pixels
# ---------------------------------------------------------------------------------------------

URL_WHERE = "messages[0].content[1].image_url"


def from_url_or_400(url: str, max_pixels: int = 4096 * 4096):
    try:
        return image_from_url(url, URL_WHERE, max_pixels)
    except ApiError as e:
        assert e.status == 400 and e.param == URL_WHERE
        assert_clear(e, URL_WHERE)
        return None


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@bounded(150)
@given(url=st.one_of(st.text(max_size=80),
                     st.builds(lambda a, b: a + b, st.sampled_from(["data:", "data:image/png", "data:image/png;base64,",
                                                                    "DATA:image/jpeg;base64,", "data:;base64,",
                                                                    "http://", "file:///etc/", "data:image/png,"]),
                               st.text(max_size=60))))
def test_arbitrary_image_url_is_an_image_or_a_400(url):
    from_url_or_400(url)


@bounded(100)
@given(name=st.sampled_from(sorted(SEEDS)), cut=floats(0, 1), flip=st.integers(0, 2**20),
       mime=st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/gif", "image/x-anything"]))
def test_damaged_data_url_image_is_a_400(name, cut, flip, mime):
    data = bytearray(SEEDS[name][: max(1, int(len(SEEDS[name]) * cut))])
    data[flip % len(data)] ^= 1 << (flip % 8)
    from_url_or_400(data_url(bytes(data), mime))


@bounded(40)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), max_pixels=st.integers(1, 4_000_000))
def test_pixel_limit_is_checked_on_the_header(width, height, max_pixels):
    url = data_url(png_header_only(width, height, 0))
    try:
        image_from_url(url, URL_WHERE, max_pixels)
    except ApiError as e:
        assert_clear(e, URL_WHERE)
        if width * height > max_pixels:
            assert e.code == "image_too_large" and f"{width}x{height}" in e.message
        else:
            assert e.code == "invalid_image"  # the header is real, the data truncated
    else:
        raise AssertionError("a PNG without its pixels decoded")

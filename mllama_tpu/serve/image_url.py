"""An `image_url` part -> the conversation's image: data: URLs only, bounded in pixels.

The server never opens a local path and never fetches a remote URL: either would let any
client make the server read its files or reach other hosts. The pixel limit is checked on the
header, before the image is decoded, so a small file that unpacks into a huge image (a
"decompression bomb") costs nothing.
"""
from __future__ import annotations

import base64
import binascii
import io
import re

from mllama_tpu.errors import UserError
from mllama_tpu.images import decode_image
from mllama_tpu.serve.errors import ApiError

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.S)
SEND_DATA_URL = "send the image inline as a data URL (data:image/png;base64,...)"


def image_from_url(url: str, where: str, max_pixels: int):
    """The RGB image of a data: URL, or ApiError(400) saying what is wrong with it."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise ApiError(400, f"{where} is a remote URL: this server fetches no URLs; {SEND_DATA_URL}",
                       where, "image_url_not_supported")
    if scheme != "data":
        raise ApiError(400, f"{where} is not a data URL ({url[:40]!r}): this server reads no files; {SEND_DATA_URL}",
                       where, "image_url_not_supported")
    m = _DATA_URL.fullmatch(url.strip())
    if m is None:
        raise ApiError(400, f"{where} is a malformed data URL: {SEND_DATA_URL}", where, "invalid_image")
    mime = m["mime"].strip().lower()
    if not mime.startswith("image/"):
        raise ApiError(400, f"{where} has media type {mime or 'text/plain'!r}, not an image: {SEND_DATA_URL}",
                       where, "invalid_image")
    if "base64" not in [p.strip().lower() for p in m["params"].split(";")]:
        raise ApiError(400, f"{where} is not base64-encoded: {SEND_DATA_URL}", where, "invalid_image")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", m["data"]), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where} holds invalid base64 data: {SEND_DATA_URL}", where, "invalid_image") from None
    check_pixels(data, where, max_pixels)
    try:
        return decode_image(data, where)
    except UserError as e:
        raise ApiError(400, str(e), where, "invalid_image") from None


def check_pixels(data: bytes, where: str, max_pixels: int) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:  # PIL's own limit, far above ours: refuse as well
        raise ApiError(400, f"{where} is too large ({e}): send a smaller image", where, "image_too_large") from None
    except Exception:  # not an image at all: decode_image says so in its own words
        return
    if width * height > max_pixels:
        raise ApiError(400, f"{where} is {width}x{height} = {width * height} pixels, over this server's limit "
                       f"of {max_pixels}: send a smaller image", where, "image_too_large")

"""An image, from a file or bytes, as the model sees it: 8-bit RGB, then tiled once.

Any PIL mode is accepted: 16-bit and 32-bit grey are scaled to 8 bits (PIL's own convert would
clip them), transparency is put on white (what a viewer shows). The processor tiles an image
once (`prepare_image`); every prompt about it reuses those tiles.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from mllama_tpu.errors import UserError


def load_image(path: str | Path) -> Any:
    """An image file as 8-bit RGB; a missing or broken file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} not found: check the path")
    return decode_image(path.read_bytes(), f"image {path}", "pass an image file")


def decode_image(data: bytes, where: str, remedy: str = "send a complete PNG, JPEG or WebP image") -> Any:
    """Encoded image bytes as 8-bit RGB; `where` names the source in the one-line UserError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            # PIL only warns between its limit and twice it, and would then decode (hundreds of MB).
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise UserError(f"{where} is too large to decode ({im.width}x{im.height} pixels, over "
                                f"{Image.MAX_IMAGE_PIXELS}): {remedy}")
            # PIL widens 16-bit grey PNGs to mode "I"; the raw mode still tells the bit depth.
            sixteen_bit = any("16" in str(tile[3]) for tile in (im.tile or []))
            im.load()  # decode now: a truncated file fails here, not inside the processor
            image = im.copy()
    except FileNotFoundError as e:  # EPS needs Ghostscript: the file is fine, the tool is missing
        raise UserError(f"{where} needs {e.filename or 'an external program'} to decode, which is not installed: "
                        f"{remedy}") from None
    except UnidentifiedImageError:
        raise UserError(f"{where} is not an image PIL can read (PNG, JPEG, WebP, BMP, ...): {remedy}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UserError(f"{where} is damaged or truncated ({e}): {remedy}") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{where} is too large to decode ({e}): {remedy}") from None
    if image.width < 1 or image.height < 1:
        raise UserError(f"{where} is empty ({image.width}x{image.height}): {remedy}")
    return _to_rgb(image, sixteen_bit)


def _to_rgb(image: Any, sixteen_bit: bool) -> Any:
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if sixteen_bit or mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    return image.convert("RGB")

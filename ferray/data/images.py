"""Safe image decoding: size guards before pixels are touched, named failure reasons."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ferray.config import ImageLimits
from ferray.data.schema import status

# PIL's own bomb guard warns or raises at a fixed size; ferray checks its configured limit itself.
Image.MAX_IMAGE_PIXELS = None

# Leading bytes of the formats ferray meets (PNG, JPEG, GIF, BMP, TIFF both orders); WebP is checked apart.
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
# FacesSettings.color → the PIL mode of the pixels handed on.
_MODES = {"gray": "L", "rgb": "RGB"}


def _has_image_signature(data: bytes) -> bool:
    # RIFF alone also starts AVI and WAV files: only a RIFF/WEBP header says "image".
    return data.startswith(_MAGIC) or (data.startswith(b"RIFF") and data[8:12] == b"WEBP")


class DecodeError(ValueError):
    """An image could not be decoded; `reason` is the status suffix (`truncated`, `not_image` …)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def status(self) -> str:
        return status("decode", self.reason)


def open_checked(data: bytes, limits: ImageLimits, color: str | None = None) -> Image.Image:
    """Open and fully load an image, refusing empty, oversized, non-image and truncated input.

    With `color` (the one to_array will give), a JPEG is decoded straight into it: for `gray`, libjpeg
    decodes the luma channel alone and skips the chroma planes and the colour conversion (half the
    decode time of a colour JPEG), and that luma is the BT.601 grey `convert("L")` would compute."""
    max_bytes, max_pixels = limits.max_file_bytes, limits.max_image_pixels
    if not data:
        raise DecodeError("empty", "zero-byte file")
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"{len(data)} bytes > limit {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError("too_large", f"{width}x{height} pixels > limit {max_pixels}")
            if color is not None and image.format == "JPEG":
                image.draft(_MODES[color], image.size)
            image.load()
    except DecodeError:
        raise
    except UnidentifiedImageError:
        if _has_image_signature(data):
            # An image signature PIL cannot parse: a damaged or cut-off header, not a stray file.
            raise DecodeError("corrupt", "image header is damaged or cut short") from None
        raise DecodeError("not_image", "not a recognised image format") from None
    except OSError as error:
        text = str(error)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
        raise DecodeError(reason, text[:200]) from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DecodeError("corrupt", str(error)[:200]) from None
    if width == 0 or height == 0:
        raise DecodeError("corrupt", "image has no pixels")
    return image


def decode(data: bytes, limits: ImageLimits, color: str) -> np.ndarray:
    """An encoded image as uint8 pixels in `color` (`gray` or `rgb`), upright: open_checked, then to_array."""
    return to_array(open_checked(data, limits, color), color)


def to_array(image: Image.Image, color: str) -> np.ndarray:
    """Normalise any mode (L, RGBA, P, I;16, CMYK …) and EXIF orientation to uint8 `L` or `RGB`."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit and 32-bit integer greys: scale to 8 bits instead of clipping to white.
        values = np.asarray(image, dtype=np.float64)
        top = values.max() if values.size else 0.0
        scaled = (values * (255.0 / top)) if top > 255 else values
        image = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels go on white, as a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert(_MODES[color]), dtype=np.uint8)

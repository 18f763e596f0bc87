"""Images and masks from files and PIL: EXIF orientation applied, modes converted or refused, size bounded.

Every image and mask the package opens from a path goes through :func:`open_image` / :func:`open_mask`:

* EXIF orientation is applied (``ImageOps.exif_transpose``), so regions drawn on the photo as a viewer shows
  it land on the same pixels;
* the pixel count is checked from the header, before decoding (:func:`max_pixels`);
* 16-bit images (modes ``I;16``, ``I``) are scaled to 8 bits, not clipped (clipping makes them white);
* a mask is one channel: its alpha channel when that varies (a cut-out PNG), else its grey values;
  colour masks (RGB, or RGBA with constant alpha) are refused.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

MAX_PIXELS_ENV = "ALPHACLIP_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000  # ~10000 x 10000; PIL itself refuses 179M (decompression-bomb guard)

Source = Union[str, os.PathLike, bytes]


class ImageError(ValueError):
    """An image or mask that cannot be used: unreadable, truncated, too large, or of an unusable mode."""


def max_pixels(override: Optional[int] = None) -> int:
    """The largest image (``width * height``) accepted: ``override``, else ``$ALPHACLIP_MAX_PIXELS``, else 100M."""
    if override is not None:
        value: Any = override
    else:
        value = os.environ.get(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ImageError(f"max_pixels / ${MAX_PIXELS_ENV} must be a whole number of pixels; got {value!r}") from None
    if value < 1:
        raise ImageError(f"max_pixels / ${MAX_PIXELS_ENV} must be positive; got {value}")
    return value


def check_pixels(height: int, width: int, limit: Optional[int] = None, what: str = "image") -> None:
    """Refuse an image of more than :func:`max_pixels` pixels before anything of its size is allocated."""
    cap = max_pixels(limit)
    if height * width > cap:
        raise ImageError(
            f"{what} is {width}x{height} = {height * width:,} pixels, above the limit of {cap:,}; downscale it, "
            f"or raise the limit (RegionProcessor(max_pixels=...) or ${MAX_PIXELS_ENV})"
        )


def _open(source: Source, what: str, limit: Optional[int]) -> Any:
    """A fully decoded, EXIF-transposed PIL image."""
    from PIL import Image, ImageOps

    if isinstance(source, bytes):
        name, fp = what, io.BytesIO(source)
    else:
        path = Path(source)
        name = f"{what} {path}"
        if path.is_dir():
            raise ImageError(f"{name} is a directory, not an image file")
        if not path.exists():
            raise FileNotFoundError(f"{name} does not exist")
        fp = path  # type: ignore[assignment]
    try:
        with Image.open(fp) as im:
            check_pixels(im.height, im.width, limit, name)
            im.load()  # decode now: truncated files fail here, not later
            return ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError ... for bad bytes
        raise ImageError(f"cannot read {name}: {type(e).__name__}: {e}") from None


def _wide_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """A 16-bit (or 32-bit integer holding 16-bit) grey image -> uint8, scaled (65535 -> 255)."""
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ImageError(f"{what} has integer values in [{arr.min()}, {arr.max()}]; expected 8- or 16-bit pixels")
    return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)


def pil_to_rgb(im: Any, what: str = "image") -> Any:
    """A PIL image -> RGB. 16-bit grey is scaled to 8 bits; transparency is dropped (it is not a region)."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        im = Image.fromarray(_wide_to_uint8(np.asarray(im), what), "L")
    elif im.mode == "F":
        raise ImageError(f"{what} is a 32-bit float image (mode 'F'); save it as 8- or 16-bit, or pass a "
                         f"numpy array in [0, 1]")
    return im if im.mode == "RGB" else im.convert("RGB")


def open_image(source: Source, what: str = "image", limit: Optional[int] = None) -> Any:
    """A file (or its bytes) -> an RGB PIL image, EXIF orientation applied (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ImageError: a directory, an unreadable or truncated file, too many pixels, an unusable mode.
    """
    return pil_to_rgb(_open(source, what, limit), f"{what} {source}" if not isinstance(source, bytes) else what)


def pil_mask(im: Any, what: str = "mask") -> np.ndarray:
    """A PIL mask -> one channel as a numpy array (see :func:`alpha.mask_to_float` for the values allowed).

    The alpha channel is the region when it varies (a cut-out PNG with constant colour); otherwise the grey
    values are. 16-bit masks keep their 16-bit values (``mask_to_float`` scales 65535 to 1).
    """
    if im.mode in ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return np.asarray(im)
    if im.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.size and alpha.min() != alpha.max():
            return alpha  # a cut-out: the region is where it is opaque
        if im.mode in ("LA", "La", "PA"):  # opaque everywhere: the grey values are the region
            return np.asarray(im.getchannel(0))
    raise ImageError(
        f"{what} is a PIL image of mode {im.mode!r} without a varying alpha channel; pass a single-channel mask "
        f"(mode '1' or 'L', e.g. Image.open(path).convert('L')), or a cut-out whose alpha channel is the region"
    )


def open_mask(source: Source, what: str = "mask", limit: Optional[int] = None) -> np.ndarray:
    """A mask file (or its bytes) -> float32 ``[H, W]`` in [0, 1], EXIF orientation applied.

    Raises:
        FileNotFoundError: no such file.
        ImageError: unreadable, too large, a colour image, or values that are not a mask (see ``mask_to_float``).
    """
    from .alpha import mask_to_float

    name = what if isinstance(source, bytes) else f"{what} {source}"
    return mask_to_float(pil_mask(_open(source, what, limit), name), name)

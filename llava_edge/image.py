"""Load and validate images, then turn them into CLIP pixel values exactly as LLaVA-1.5 does.

Runtime code: numpy and Pillow only.

The reference pipeline (LLaVA `image_aspect_ratio: pad`) is
    Image.open(f).convert("RGB") -> expand2square(img, mean*255 as ints) -> CLIPImageProcessor
and CLIPImageProcessor is: resize the shortest side to S (bicubic), centre crop S x S, x/255, (x-mean)/std.
`preprocess` reproduces it to float32 rounding.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_edge.architectures import CLIP_MEAN, CLIP_STD
from llava_edge.errors import ImageError, UserError


ASPECTS = ("pad", "square")

# Errors Pillow raises on a file it recognises but cannot decode.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Read an image file (or its bytes) fully and return it as RGB, upright, first frame only.

    Transparency is dropped the way LLaVA's `Image.open(f).convert("RGB")` drops it (the colour stored under
    a transparent pixel is kept); it is NOT composited on white. 16-bit and 32-bit integer images are scaled to
    8 bits instead of being clipped at 255 as Pillow's convert does.
    """
    name, data = read_image_source(source, name)
    stream = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse both, with a clear message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)
        _check_pixel_count(img, name)
        img.load()  # decode everything now, so a truncated file fails here and not later
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img, name)
    except Image.DecompressionBombError as e:
        # Pillow refuses before the size is known to us; its message carries the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(e))
        detail = f"{found.group(1)} pixels (limit {Image.MAX_IMAGE_PIXELS} pixels)" if found else _one_line(e)
        raise ImageError(f"{name}: image is too large: {detail}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file, or an unsupported image format") from None
    except ImageError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name}: image file is truncated or corrupt ({_one_line(e)})") from None
    finally:
        stream.close()


def max_file_bytes() -> int | None:
    """The largest image file read: the decoded-pixel limit at 8 bytes a pixel (16-bit RGBA, uncompressed) plus
    16 MiB of headers and metadata. None when Pillow's pixel limit is switched off."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit) * 8 + (16 << 20)


def read_image_source(source: str | os.PathLike | bytes, name: str | None = None) -> tuple[str, bytes]:
    """(name for messages, the file's bytes), with one-line errors for what is not a readable file.

    Only regular files are read (a FIFO or /dev/zero would block or never end), and never more than
    max_file_bytes(): the size is checked before reading, and the read itself is bounded.
    """
    limit = max_file_bytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<image bytes>"
        if len(source) == 0:
            raise ImageError(f"{name}: image data is empty (0 bytes)")
        if limit is not None and len(source) > limit:
            raise ImageError(f"{name}: image data is too large ({len(source)} bytes, limit {limit} bytes)")
        return name, bytes(source)
    path = Path(source)
    name = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{name}: image file not found") from None
    except PermissionError:
        raise ImageError(f"{name}: image file is not readable (permission denied)") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read the image file ({_one_line(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name}: is a {_file_kind(st.st_mode)}, not an image file")
    if limit is not None and st.st_size > limit:
        raise ImageError(f"{name}: file is too large for an image ({st.st_size} bytes, limit {limit} bytes)")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1) if limit is not None else f.read()
    except PermissionError:
        raise ImageError(f"{name}: image file is not readable (permission denied)") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read the image file ({_one_line(e)})") from None
    if limit is not None and len(data) > limit:  # the file grew while it was read
        raise ImageError(f"{name}: file is too large for an image (more than {limit} bytes)")
    if not data:
        raise ImageError(f"{name}: image file is empty (0 bytes)")
    return name, data


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _check_pixel_count(img: Image.Image, name: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise ImageError(
            f"{name}: image is too large: {width}×{height} pixels (limit {limit} pixels)"
        )


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit range -> 8 bits, rounding: 65535 -> 255, 257 -> 1. (Mode "I" is taken to hold 16-bit data, as
        # Pillow gives it for 16-bit PNG/TIFF.)
        wide = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
        return Image.fromarray(np.round(wide / 257).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
        return Image.fromarray(np.round(np.clip(values * scale, 0, 255)).astype(np.uint8)).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise ImageError(f"{name}: unsupported image mode {img.mode}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: pad to a square of side max(w, h) with `fill`, the image centred (floor offsets)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new(img.mode, (side, side), fill)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def pad_color(mean: tuple[float, float, float] = CLIP_MEAN) -> tuple[int, int, int]:
    """LLaVA's fill colour: `tuple(int(x * 255) for x in image_mean)` (truncated, not rounded)."""
    return tuple(int(m * 255) for m in mean)


def preprocess(
    img: Image.Image,
    size: int = 336,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    aspect: str = "pad",
) -> np.ndarray:
    """One RGB image -> float32 [3, size, size] pixel values, as LLaVA feeds the CLIP tower.

    aspect "pad": expand2square with the mean colour first (LLaVA-1.5); "square": no padding, the CLIP
    processor's own resize + centre crop only (LLaVA's default `image_aspect_ratio`).
    """
    if aspect not in ASPECTS:
        raise UserError(f"unknown image aspect mode {aspect!r} (expected one of: {', '.join(ASPECTS)})")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if aspect == "pad":
        img = expand2square(img, pad_color(mean))
    img = img.resize(shortest_side_size(img.size, size), resample=Image.Resampling.BICUBIC)
    pixels = center_crop(np.asarray(img), size, size)
    # Same arithmetic as transformers' rescale (float64 multiply, then float32) and normalize (float32).
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalized = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(normalized.transpose(2, 0, 1))


def preprocess_batch(
    images: list[Image.Image],
    size: int = 336,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    aspect: str = "pad",
) -> np.ndarray:
    """Several RGB images -> float32 [B, 3, size, size]."""
    if not images:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    return np.stack([preprocess(img, size, mean, std, aspect) for img in images])


def shortest_side_size(image_size: tuple[int, int], shortest: int) -> tuple[int, int]:
    """(width, height) with the shorter side = `shortest` and the longer side int(shortest * long / short).

    The long side is truncated, as transformers' get_resize_output_image_size(default_to_square=False) does.
    """
    width, height = image_size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (shortest, new_long) if width <= height else (new_long, shortest)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop an [H, W, C] array to height x width, zero-padding where the image is smaller.

    Offsets as transformers' center_crop: top = (H - height) // 2 (floor, also when negative), and a too-small
    image is first placed at ceil((new - old) / 2) inside a zero canvas.
    """
    orig_height, orig_width = pixels.shape[:2]
    top = (orig_height - height) // 2
    left = (orig_width - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + height, left : left + width]

    canvas_height, canvas_width = max(height, orig_height), max(width, orig_width)
    canvas = np.zeros((canvas_height, canvas_width) + pixels.shape[2:], dtype=pixels.dtype)
    top_pad = -(-(canvas_height - orig_height) // 2)
    left_pad = -(-(canvas_width - orig_width) // 2)
    canvas[top_pad : top_pad + orig_height, left_pad : left_pad + orig_width] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(canvas_height, top + height), max(0, left) : min(canvas_width, left + width)]

"""Image loading and CLIP preprocessing vs the reference pipeline (LLaVA expand2square + transformers CLIP)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_edge.errors import ImageError, UserError
from llava_edge.image import (
    CLIP_MEAN,
    CLIP_STD,
    center_crop,
    expand2square,
    load_image,
    pad_color,
    preprocess,
    preprocess_batch,
    shortest_side_size,
)

pytest.importorskip("transformers")
from transformers import CLIPImageProcessorPil  # noqa: E402
from transformers.image_transforms import center_crop as hf_center_crop  # noqa: E402
from transformers.image_transforms import get_resize_output_image_size  # noqa: E402

DATA = Path(__file__).parent / "data"
PHOTOS_8BIT = [
    "astronaut.jpg",  # square
    "astronaut_wide.png",  # 301x157: odd sides, wide
    "coffee.jpg",  # 600x400
    "chelsea_portrait.jpg",  # 199x300 portrait
    "rocket.jpg",  # 320x214
    "camera_gray.png",  # L
    "chelsea_palette.png",  # P
    "astronaut_rgba.png",  # RGBA with transparent pixels
]


def llava_expand2square(pil_img, background_color):
    """LLaVA's train.py / mm_utils.py expand2square, verbatim in behaviour (the oracle)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def clip_processor(size: int) -> CLIPImageProcessorPil:
    """openai/clip-vit-large-patch14-336's preprocessor_config.json, at crop/shortest side `size`."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
        do_convert_rgb=True,
    )


def reference_pixels(img: Image.Image, size: int, aspect: str) -> np.ndarray:
    processor = clip_processor(size)
    if aspect == "pad":
        img = llava_expand2square(img, tuple(int(x * 255) for x in processor.image_mean))
    return processor.preprocess(img, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("size", [336, 28, 56])
@pytest.mark.parametrize("aspect", ["pad", "square"])
@pytest.mark.parametrize("name", PHOTOS_8BIT)
def test_preprocess_matches_llava_and_transformers(name, aspect, size):
    llava_loaded = Image.open(DATA / name).convert("RGB")
    ours_loaded = load_image(DATA / name)
    np.testing.assert_array_equal(np.asarray(ours_loaded), np.asarray(llava_loaded))

    expected = reference_pixels(llava_loaded, size, aspect)
    actual = preprocess(ours_loaded, size=size, aspect=aspect)
    assert actual.shape == (3, size, size) and actual.dtype == np.float32
    assert np.abs(actual - expected).max() <= 1e-5


def test_preprocess_batch_stacks_single_images():
    images = [load_image(DATA / name) for name in ("coffee.jpg", "chelsea_portrait.jpg")]
    batch = preprocess_batch(images, size=56)
    assert batch.shape == (2, 3, 56, 56) and batch.dtype == np.float32
    for img, pixels in zip(images, batch):
        assert np.abs(pixels - reference_pixels(img, 56, "pad")).max() <= 1e-5


def test_pad_is_visible_as_mean_color():
    # A wide image padded to a square: the top row is the fill colour (122, 116, 104) normalized.
    pixels = preprocess(load_image(DATA / "astronaut_wide.png"), size=56, aspect="pad")
    fill = (np.array([122, 116, 104]) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.abs(pixels[:, 0, :] - fill[:, None]).max() < 1e-6


def test_pad_color_is_llavas():
    assert pad_color(CLIP_MEAN) == (122, 116, 104)


def test_expand2square_matches_llava():
    for name in ("astronaut_wide.png", "chelsea_portrait.jpg", "astronaut.jpg"):
        img = Image.open(DATA / name).convert("RGB")
        expected = llava_expand2square(img, (1, 2, 3))
        np.testing.assert_array_equal(np.asarray(expand2square(img, (1, 2, 3))), np.asarray(expected))


def test_unknown_aspect_is_a_user_error():
    with pytest.raises(UserError, match="aspect"):
        preprocess(load_image(DATA / "coffee.jpg"), aspect="anyres")


@pytest.mark.parametrize(
    "width,height", [(301, 157), (157, 301), (600, 400), (400, 600), (199, 300), (336, 336), (1000, 3), (7, 11)]
)
@pytest.mark.parametrize("size", [336, 224, 28, 57])
def test_resize_size_matches_transformers(width, height, size):
    image = np.zeros((height, width, 3), dtype=np.uint8)
    expected_height, expected_width = get_resize_output_image_size(
        image, size=size, default_to_square=False, input_data_format="channels_last"
    )
    assert shortest_side_size((width, height), size) == (expected_width, expected_height)


@pytest.mark.parametrize("shape", [(10, 12), (11, 13), (5, 6), (4, 9), (9, 4), (3, 3)])
@pytest.mark.parametrize("crop", [(4, 4), (5, 7), (8, 8), (7, 6), (12, 3)])
def test_center_crop_matches_transformers(shape, crop):
    pixels = np.random.default_rng(0).integers(1, 255, shape + (3,), dtype=np.uint8)
    expected = hf_center_crop(pixels, crop, input_data_format="channels_last")
    np.testing.assert_array_equal(center_crop(pixels, *crop), expected)


# ---- loading: conversions --------------------------------------------------------------------------------


def test_sixteen_bit_png_is_scaled_not_clipped():
    raw = np.asarray(Image.open(DATA / "camera_16bit.png")).astype(np.float64)
    assert raw.max() > 255  # a real 16-bit image
    img = load_image(DATA / "camera_16bit.png")
    assert img.mode == "RGB" and img.size == (130, 97)
    rgb = np.asarray(img)
    expected = np.round(raw / 257).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert rgb.min() < 50 and rgb.max() == 255


def test_rgba_drops_alpha_like_llava():
    stored = np.asarray(Image.open(DATA / "astronaut_rgba.png"))
    assert (stored[..., 3] == 0).any()
    rgb = np.asarray(load_image(DATA / "astronaut_rgba.png"))
    np.testing.assert_array_equal(rgb, stored[..., :3])  # transparent pixels keep their colour, not white


def test_grayscale_and_palette_become_rgb():
    gray = load_image(DATA / "camera_gray.png")
    assert gray.mode == "RGB" and gray.size == (255, 200)
    g = np.asarray(gray)
    np.testing.assert_array_equal(g[..., 0], np.asarray(Image.open(DATA / "camera_gray.png")))
    np.testing.assert_array_equal(g[..., 0], g[..., 2])
    palette = load_image(DATA / "chelsea_palette.png")
    assert palette.mode == "RGB" and palette.size == (181, 151)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.open(DATA / "rocket.jpg").convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (320, 214)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(path).convert("RGB")))


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    source = Image.open(DATA / "rocket.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90° clockwise
    source.save(path, quality=95, exif=exif.tobytes())
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (214, 320)
    stored = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), np.rot90(stored, k=-1))


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert tuple(np.asarray(img)[15, 20]) == (255, 0, 0)


def test_bytes_are_accepted():
    data = (DATA / "coffee.jpg").read_bytes()
    np.testing.assert_array_equal(np.asarray(load_image(data)), np.asarray(load_image(DATA / "coffee.jpg")))


# ---- loading: bad input -> one-line ImageError -------------------------------------------------------------


def assert_one_line_image_error(source, *words):
    with pytest.raises(ImageError) as info:
        load_image(source)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    for word in words:
        assert word in message, message
    return message


def test_missing_path(tmp_path):
    path = tmp_path / "nope.png"
    assert_one_line_image_error(path, str(path), "not found")


def test_directory(tmp_path):
    assert_one_line_image_error(tmp_path, str(tmp_path), "directory")


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_one_line_image_error(path, str(path), "empty")
    assert_one_line_image_error(b"", "empty")


@pytest.mark.parametrize("name", ["astronaut_wide.png", "coffee.jpg"])
def test_truncated_file(tmp_path, name):
    data = (DATA / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_image_error(path, str(path), "truncated")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\nsecond line\n")
    assert_one_line_image_error(path, str(path), "not an image")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (1-bit grey) but carries no pixel data: cheap to make."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(20000, 20000))  # 400M pixels: over twice Pillow's limit
    assert_one_line_image_error(path, str(path), "too large", "400000000")


def test_image_over_pillow_warning_limit_is_refused(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(10000, 10000))  # 100M pixels: Pillow would only warn
    assert_one_line_image_error(path, str(path), "too large", "10000×10000")

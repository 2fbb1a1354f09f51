"""Image sources in requests -> image bytes: base64 (bare or data: URIs), file:// inside --media-dir, http(s).

Only the bytes are fetched here; whether they are an image (and not a decompression bomb) is the runtime's
check, made when the engine encodes them.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import anyio

from .server_config import ServerConfig
from .api_errors import ApiError

_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)


def decode_base64(text: str, what: str = "image") -> bytes:
    """Strict base64 (whitespace allowed, as wrapped encoders write it); a bad string is a 400, not a crash."""
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, f"{what}: empty base64 data", code="invalid_image")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: not valid base64", code="invalid_image") from None
    if not data:
        raise ApiError(400, f"{what}: empty base64 data", code="invalid_image")
    return data


def decode_data_uri(uri: str) -> bytes:
    found = _DATA_URI.fullmatch(uri.strip())
    if found is None:
        raise ApiError(400, "image_url: a data: URI must be base64 (data:image/png;base64,...)", param="image_url",
                       code="invalid_image")
    mime = found.group("mime") or ""
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise ApiError(400, f"image_url: data URI of type {mime!r} is not an image", param="image_url",
                       code="invalid_image")
    return decode_base64(found.group("data"), "image_url")


def read_media_file(url: str, cfg: ServerConfig) -> bytes:
    """file:// URLs: only files that are, after resolving every symlink, inside --media-dir."""
    if cfg.media_dir is None:
        raise ApiError(403, "image_url: file:// URLs need the server to be started with --media-dir",
                       param="image_url", code="media_dir_forbidden")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ApiError(400, f"image_url: file URL on host {parts.netloc!r}", param="image_url", code="invalid_image")
    root = Path(cfg.media_dir).resolve()
    path = Path(unquote(parts.path)).resolve()  # every existing symlink on the way is followed
    if not path.is_relative_to(root):
        raise ApiError(403, "image_url: file is outside the server's --media-dir", param="image_url",
                       code="media_dir_forbidden")
    if not path.is_file():
        raise ApiError(400, "image_url: no such file in the media dir", param="image_url", code="invalid_image")
    if path.stat().st_size > cfg.max_image_bytes:
        raise ApiError(413, f"image_url: file is larger than {cfg.max_image_bytes} bytes", param="image_url")
    return path.read_bytes()


def fetch_remote(url: str, cfg: ServerConfig) -> bytes:
    """http(s) URLs (only with --allow-remote-images): at most max_image_bytes, within remote_timeout_s per read."""
    request = urllib.request.Request(url, headers={"User-Agent": "llava-edge"})
    try:
        with urllib.request.urlopen(request, timeout=cfg.remote_timeout_s) as response:
            data = response.read(cfg.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"image_url: could not fetch {url}: {getattr(e, 'reason', e)}", param="image_url",
                       code="image_fetch_failed") from None
    if len(data) > cfg.max_image_bytes:
        raise ApiError(413, f"image_url: remote image is larger than {cfg.max_image_bytes} bytes", param="image_url")
    return data


async def load_image_url(url: str, cfg: ServerConfig) -> bytes:
    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url: missing url", param="image_url", code="invalid_image")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url)
    if scheme == "file":
        return await anyio.to_thread.run_sync(read_media_file, url, cfg)
    if scheme in ("http", "https"):
        if not cfg.allow_remote_images:
            raise ApiError(403, "image_url: remote images are off (start the server with --allow-remote-images)",
                           param="image_url", code="remote_images_forbidden")
        return await anyio.to_thread.run_sync(fetch_remote, url, cfg)
    raise ApiError(400, "image_url: expected a data:, file:// or http(s) URL", param="image_url",
                   code="invalid_image")

"""What the HTTP layer needs to know besides the engine: binding, access, media sources, request limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (the URL printed at startup names it)
    model_name: str = "llava-edge"
    api_key: str | None = None  # every endpoint but /health then needs "Authorization: Bearer KEY"
    media_dir: str | None = None  # file:// image URLs must resolve inside it (symlinks followed first)
    allow_remote_images: bool = False  # http(s) image URLs
    max_images: int = 4  # per request
    max_body_bytes: int = 32 << 20  # request bodies larger than this get 413
    max_image_bytes: int = 20 << 20  # one image file or download
    remote_timeout_s: float = 10.0
    shutdown_grace_s: float = 5.0  # on SIGINT/SIGTERM, answers still running after this are cut

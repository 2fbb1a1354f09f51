"""What the HTTP layer needs to know besides the engine: binding, access, media sources, request limits, the
served model's sampling defaults and the request log."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


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
    # The served model's sampling, as an Ollama Modelfile's parameters: what a request that names none gets.
    # Greedy by default, as `llava-edge chat` answers and as LLaVA-1.5 is evaluated.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    request_log: bool = True  # one line per request on stderr (`serve --quiet`: none)

    def __post_init__(self):
        from ..runtime.sampling import SamplingConfig  # numpy: not loaded by the CLI until a command runs

        try:
            SamplingConfig(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        except UserError as e:
            raise UserError(f"--{e}") from None  # "--temperature must be a finite number >= 0 (got -1.0)"

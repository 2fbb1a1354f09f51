"""Request bodies -> validated pydantic models, with the error each API expects for what is wrong."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..errors import UserError
from ..runtime.sampling import SamplingConfig
from .server_config import ServerConfig
from .api_errors import ApiError

Model = TypeVar("Model", bound=BaseModel)


async def parse_body(request: Request, model: type[Model]) -> Model:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(422, f"{where}: {first['msg']}" if where else first["msg"], param=where or None,
                       code="invalid_schema") from None


def sampling_config(cfg: ServerConfig, max_tokens: int, temperature: float | None, top_p: float | None,
                    seed: int | None, stop: str | list[str] | None, ignore_eos: bool = False,
                    **more) -> SamplingConfig:
    """A request's sampling; what it does not name is the served model's default (`serve --temperature`, ...).
    `more`: the other SamplingConfig fields the request set (format, logprobs, top_k, ...)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    try:
        return SamplingConfig(max_tokens=max_tokens, temperature=cfg.temperature if temperature is None else temperature,
                              top_p=cfg.top_p if top_p is None else top_p, seed=cfg.seed if seed is None else seed,
                              stop=tuple(s for s in stops if s), ignore_eos=ignore_eos,
                              **{k: v for k, v in more.items() if v is not None})
    except UserError as e:
        raise ApiError(400, str(e)) from None

"""The runtime's public surface: what the CLI, the server, caption, eval and bench import. No torch.

Names resolve lazily, so that importing one small module of the runtime (the bundle reader, say) does not load
llama.cpp and ONNX Runtime.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Model": ".model",
    "ImageBudget": ".image_budget",
    "Engine": ".engine",
    "EngineBusy": ".scheduler",
    "EngineConfig": ".engine_config",
    "ChatSession": ".session",
    "Message": ".prompt",
    "SamplingConfig": ".sampling",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)

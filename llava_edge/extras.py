"""What each heavy command needs beyond the runtime install, checked before anything is imported.

`pip install llava-edge` is the runtime only (no torch): `info`, `export`, `eval --ckpt`, `train`, `build-demo`
and `bench` need PyTorch and an extra. Without them the command ends with one line saying what to install,
instead of a traceback ending in ModuleNotFoundError.
"""

from __future__ import annotations

import importlib.util

from .errors import UserError

# extra -> the modules it provides (pyproject.toml [project.optional-dependencies])
EXTRA_MODULES = {
    "export": ("safetensors", "sentencepiece", "onnx", "onnxscript", "gguf"),
    "train": ("safetensors", "sentencepiece"),
    "bench": ("safetensors", "sentencepiece", "onnx", "onnxscript", "gguf", "matplotlib"),
    "ray": ("ray",),  # caption --ray; no torch
}
TORCH_CPU = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def require_heavy(command: str, extras: tuple[str, ...]) -> None:
    """UserError (one line, exit 2) naming what to install when torch or an extra's modules are missing."""
    modules = ("torch",) + tuple(m for extra in extras for m in EXTRA_MODULES[extra])
    missing = missing_modules(tuple(dict.fromkeys(modules)))
    if not missing:
        return
    spec = ",".join(extras)
    advice = f"pip install 'llava-edge[{spec}]'"
    if "torch" in missing:
        advice = f"install PyTorch first (CPU build: {TORCH_CPU}), then {advice}"
    raise UserError(f"`llava-edge {command}` needs {', '.join(missing)}, not installed here (the runtime-only "
                    f"install has no torch): {advice} (from a clone: pip install '.[{spec}]')")


def require_extra(command: str, extra: str) -> None:
    """UserError (one line, exit 2) naming the extra to install when its modules are missing (no torch asked)."""
    missing = missing_modules(EXTRA_MODULES[extra])
    if missing:
        raise UserError(f"`llava-edge {command}` needs {', '.join(missing)}, not installed here: "
                        f"pip install 'llava-edge[{extra}]' (from a clone: pip install '.[{extra}]')")

"""Third-party chatter during export and the demo build: dropped, or turned into one line that says what matters.

- ONNX Runtime's quantizer logs "Please consider to run pre-processing before quantization" with a URL on the
  root logger for every model; its shape-inference pre-pass changes nothing for our graphs. Dropped.
- llama.cpp's log levels are NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (ggml.h), but llama-cpp-python's
  log callback still maps them with an older numbering (3 = ERROR), so with verbose=False every llama.cpp
  *warning* is printed: e.g. `n_ctx_seq (512) > n_ctx_train (0)` from the context of a vocab-only model,
  which has no hyperparameters. The callback installed here prints llama.cpp's errors only.
- The quantizer's "falling back to f16" warnings, one per tensor whose rows do not fit the quant's block, are
  summed up in one line by `FallbackTally`.

A leaf: no torch; llama_cpp is imported only when the llama.cpp log is set.
"""

from __future__ import annotations

import ctypes
import logging
import re
import sys

GGML_LOG_WARN, GGML_LOG_ERROR, GGML_LOG_CONT = 3, 4, 5
ORT_PREPROCESS_HINT = "Please consider to run pre-processing before quantization"
_FALLBACK = re.compile(rb"warning: (\S+).*?ncols\s+(\d+) not divisible by (\d+).*falling back to\s+(\w+)")


class _DropOrtHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ORT_PREPROCESS_HINT)


_llama_log = {"callback": None, "last_level": 0}


def _errors_only(level: int, text: bytes | None, user_data) -> None:
    if level == GGML_LOG_CONT:
        level = _llama_log["last_level"]
    _llama_log["last_level"] = level
    if level == GGML_LOG_ERROR and text:
        print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)


def quiet_third_party() -> None:
    """For the rest of this process: no ONNX Runtime pre-processing hint, llama.cpp prints errors only."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropOrtHint) for f in root.filters):
        root.addFilter(_DropOrtHint())
    import llama_cpp

    if _llama_log["callback"] is None:
        _llama_log["callback"] = llama_cpp.llama_log_callback(_errors_only)  # kept alive: C holds the pointer
    restore_llama_log()


def restore_llama_log() -> None:
    """Put back the process's llama.cpp log callback after a temporary one: ours if quiet_third_party ran,
    else llama-cpp-python's."""
    import llama_cpp

    callback = _llama_log["callback"]
    if callback is None:
        from llama_cpp._logger import llama_log_callback as callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class FallbackTally:
    """Collects llama.cpp quantizer lines "... ncols N not divisible by B ... falling back to TYPE"."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, int, int, str]] = []
        self._pending = b""  # llama.cpp logs such a line in several pieces

    def note(self, text: bytes | None) -> None:
        self._pending += text or b""
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            found = _FALLBACK.search(line)
            if found:
                name, cols, block, kind = found.groups()
                self.tensors.append((name.decode(), int(cols), int(block), kind.decode()))

    def line(self, quant: str) -> str | None:
        if not self.tensors:
            return None
        kinds = "/".join(sorted({t[3] for t in self.tensors}))
        rows = " or ".join(sorted({f"{t[1]} values do not split into blocks of {t[2]}" for t in self.tensors}))
        names = [t[0] for t in self.tensors]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"quantize {quant}: {len(names)} tensors kept at {kinds} (rows of {rows}): {shown}"

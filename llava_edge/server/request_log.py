"""One line per request on stderr, as llama.cpp's server and Ollama print them:

    llava-edge serve: 2026-05-01 12:00:00 127.0.0.1 POST /v1/chat/completions 200 1.52s prompt=118 cached=33
        generated=1 tools_ignored=36 attached_files_dropped=1
    llava-edge serve: 2026-05-01 12:00:02 127.0.0.1 POST /api/chat 200 0.91s prompt=384 cached=0 generated=9
        prompt_cut=771
    llava-edge serve: 2026-05-01 12:00:03 127.0.0.1 POST /v1/chat/completions 400 0.04s error="the prompt is ..."

(each on one line).

Token counts come once an answer ran; the notes say what the server did to the request on its own (Open WebUI's
file listings dropped, tools ignored, answer-changing fields not honoured, oldest messages dropped to fit, and the positions of a prompt whose last
message had to be cut); `error` is the message the client got.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from fastapi import Request

from .metrics import Metrics

SCOPE_KEY = "llava_edge.record"
MAX_ERROR_BODY = 1 << 16  # error bodies are small JSON; a larger one is not parsed for its message


@dataclass
class RequestRecord:
    method: str
    path: str
    client: str
    metrics: Metrics
    t_start: float = field(default_factory=time.perf_counter)
    status: int = 500  # until a response starts (an exception that escapes everything is a 500)
    timings: object | None = None  # runtime.answer.Timings once an answer finished
    notes: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    ignored: list[str] = field(default_factory=list)  # answer-changing fields not honoured (named in the line)

    def answered(self, timings) -> None:
        self.timings = timings
        self.metrics.count_answer(timings)

    def attached_files_dropped(self, n: int) -> None:
        self._note("attached_files_dropped", n, self.metrics.attached_files_dropped)

    def tools_ignored(self, n: int) -> None:
        self._note("tools_ignored", n, self.metrics.tools_ignored)

    def fields_ignored(self, names: list[str]) -> None:
        """Request fields that would change the answer and that this server does not honour."""
        if names:
            self.ignored.extend(names)

    def truncated(self, n_dropped: int, cut_from: int) -> None:
        self._note("truncated", n_dropped, self.metrics.truncated_messages)
        if cut_from:
            self.notes["prompt_cut"] = cut_from
            self.metrics.prompts_cut.inc()

    def _note(self, key: str, n: int, counter) -> None:
        if n > 0:
            self.notes[key] = self.notes.get(key, 0) + n
            counter.inc(n)

    def line(self) -> str:
        seconds = time.perf_counter() - self.t_start
        words = [time.strftime("%Y-%m-%d %H:%M:%S"), self.client, self.method, self.path, str(self.status),
                 f"{seconds:.2f}s"]
        if self.timings is not None:
            t = self.timings
            words += [f"prompt={t.n_prompt_tokens}", f"cached={t.n_cached}", f"generated={t.n_generated}"]
        words += [f"{key}={n}" for key, n in self.notes.items()]
        if self.ignored:
            words.append("ignored=" + ",".join(self.ignored))
        if self.error is not None:
            words.append("error=" + json.dumps(self.error))
        return "llava-edge serve: " + " ".join(words)

    def write(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)


def record_of(request: Request) -> RequestRecord:
    return request.scope[SCOPE_KEY]


def error_message(body: bytes) -> str | None:
    """The message of an error body in either API's shape: OpenAI {"error": {"message"}}, Ollama {"error": "..."}."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(err, dict):
        err = err.get("message")
    return err if isinstance(err, str) else None

"""A request's answer format, JSON mode or a JSON schema, as a grammar over the GGUF's tokens (llguidance). No torch.

`FormatCompiler.open(format)` checks the format and compiles it, in the caller's thread (a server request's, never
the engine's) with a time limit, so that a pathological schema stalls nobody. The `Constraint` it returns is one
request's own: the engine masks that request's logits with it, feeds it each token, and asks it for the tokens
the grammar forces next. Limits are checked before llguidance sees a schema (docs/server.md, "Structured answers").
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import numpy as np

from ..errors import UserError

MAX_SCHEMA_BYTES = 64 * 1024  # a schema's JSON text
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays in the schema's JSON
COMPILE_SECONDS = 10.0  # a schema that takes longer to compile is refused
JSON_MODE = {"type": "object"}  # "json" / json_object: any JSON object
# compact JSON: no free whitespace (a weak model could loop on it), and more of the answer is forced
_COMPILE_OPTIONS = {"whitespace_flexible": False, "lenient": False}


def check_format(fmt) -> None:
    """A format is None, "json", or a JSON schema (an object); anything else is one line."""
    if fmt is None or fmt == "json":
        return
    if isinstance(fmt, str):
        raise UserError(f"format must be \"json\" or a JSON schema object (got the string {fmt[:40]!r})")
    if not isinstance(fmt, dict):
        raise UserError(f"format must be \"json\" or a JSON schema object (got {type(fmt).__name__})")
    text = json.dumps(fmt)
    if len(text) > MAX_SCHEMA_BYTES:
        raise UserError(f"the JSON schema is {len(text)} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
    if _depth(fmt) > MAX_SCHEMA_DEPTH:
        raise UserError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if "type" in fmt and not isinstance(fmt["type"], (str, list)):
        raise UserError("the JSON schema's \"type\" must be a string or a list of strings")


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")


def closed_objects(schema):
    """The schema with `additionalProperties: false` on every object that lists its properties and says nothing
    of others (a copy). As llama.cpp's and so Ollama's grammars read a schema: a client's pydantic schema omits
    it, and a model free to add keys can ramble on in one it made up."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = closed_objects(out[key])
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def format_argument(text: str | None) -> str | dict | None:
    """The --format of chat and caption: "json", or the path of a JSON schema file."""
    if text is None or text == "json":
        return text
    try:
        with open(text, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise UserError(f"--format {text}: cannot read the schema file ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--format {text}: not a JSON file ({e})") from None
    check_format(schema)
    return schema


def _depth(value) -> int:
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_SCHEMA_DEPTH:
            break
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def tokenizer_of(tokenizer, eos_id: int):
    """llguidance's view of the GGUF's vocabulary, built by llguidance from llama.cpp's own vocab: each token's
    bytes as llama.cpp renders them, control tokens marked so that they never match text, and llama.cpp's
    tokenizer for the forced bytes."""
    from llguidance.llamacpp import lltokenizer_from_vocab

    return lltokenizer_from_vocab(tokenizer.vocab, n_vocab=tokenizer.n_vocab, eos_token=eos_id)


class FormatCompiler:
    """Formats compiled against one engine's vocabulary, the most recent kept (a client sends its schema again
    and again)."""

    def __init__(self, tokenizer, eos_id: int, keep: int = 32):
        self.vocabulary, self.eos_id, self.keep = tokenizer, eos_id, keep  # the engine's Tokenizer
        self._tokenizer = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, object] = OrderedDict()

    @property
    def tokenizer(self):
        with self._lock:  # built once (about a second for 32k tokens), on the first constrained request
            if self._tokenizer is None:
                self._tokenizer = tokenizer_of(self.vocabulary, self.eos_id)
            return self._tokenizer

    def open(self, fmt) -> Constraint | None:
        """A fresh constraint for one request (None: no format). UserError names what is wrong."""
        check_format(fmt)
        if fmt is None:
            return None
        schema = JSON_MODE if fmt == "json" else closed_objects(fmt)
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            matcher = self._compiled.get(key)
            if matcher is not None:
                self._compiled.move_to_end(key)
        if matcher is None:
            matcher = _compile_in_time(schema, self.tokenizer)
            with self._lock:
                self._compiled[key] = matcher
                while len(self._compiled) > self.keep:
                    self._compiled.popitem(last=False)
        return Constraint(matcher.deep_copy(), self.vocabulary.n_vocab)


def _compile_in_time(schema: dict, tokenizer):
    """Compile on a helper thread (llguidance drops the GIL) and give up after COMPILE_SECONDS; a schema that
    runs on past that costs its thread, not the engine's."""
    import llguidance

    done, result = threading.Event(), {}

    def compile_it():
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPILE_OPTIONS)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
            if is_error:
                result["error"] = messages[0]
            else:
                matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
                probe = matcher.deep_copy()
                probe.compute_bitmask()  # a schema with no finite value (a bare self-reference) fails here
                if probe.is_error():
                    result["error"] = f"it admits no JSON value ({_first_line(probe.get_error())})"
                else:
                    result["matcher"] = matcher
        except (ValueError, TypeError, RuntimeError) as e:
            result["error"] = str(e)
        done.set()

    threading.Thread(target=compile_it, name="llava-edge-format", daemon=True).start()
    if not done.wait(COMPILE_SECONDS):
        raise UserError(f"the JSON schema did not compile within {COMPILE_SECONDS:g} s: simplify it")
    if "error" in result:
        raise UserError(f"the JSON schema is not supported: {_first_line(result['error'])}")
    return result["matcher"]


def _first_line(message: str) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return line[:300]


class FormatError(UserError):
    """The format admits no token where the answer stands (a schema with no finite value, a lexer limit hit)."""


class Constraint:
    """One request's grammar state: which tokens may come next, the tokens it forces, whether it may end."""

    def __init__(self, matcher, n_vocab: int):
        self.matcher, self.n_vocab = matcher, n_vocab

    def allowed(self) -> np.ndarray:
        """A boolean row over the vocabulary: the tokens the grammar admits now (EOS only where it may end)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        if self.matcher.is_error():
            raise FormatError(f"the answer's format admits nothing here: {_first_line(self.matcher.get_error())}")
        return np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar forbids at -inf (a copy)."""
        return np.where(self.allowed(), logits, -np.inf).astype(np.float32, copy=False)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise FormatError(f"the answer's format refused token {token}: {_first_line(self.matcher.get_error())}")

    def forced(self, limit: int) -> list[int]:
        """The tokens the grammar admits as the only continuation from here (at most `limit`), accepted."""
        if limit <= 0 or self.matcher.is_stopped():
            return []
        tokens = self.matcher.compute_ff_tokens()[:limit]
        if tokens and not self.matcher.consume_tokens(tokens):
            raise FormatError(f"the answer's format refused its forced tokens: {_first_line(self.matcher.get_error())}")
        return tokens

    @property
    def finished(self) -> bool:
        """Nothing but the end may follow (the top-level value is closed)."""
        return self.matcher.is_stopped()

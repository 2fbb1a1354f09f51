"""`llava-edge chat`: one answer (--prompt, optionally --json) or an interactive, streamed conversation.
No torch: this is what a laptop user runs."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import ContextOverflow, UserError
from .line_input import line_reader
from .paths import cache_dir
from .runtime import ChatSession, Model, SamplingConfig

HELP = ("commands: /image PATH (a new conversation about another image; quotes and ~ work), /reset (forget the "
        "questions, keep the image), /help, /quit. Keys: arrows edit and recall earlier lines, Ctrl-C clears the "
        "line or stops an answer, Ctrl-D ends the chat.")
DEMO_NOTE = ("llava-edge: note: this is the demo model, trained on a synthetic world of coloured circles, squares and "
             "triangles (examples/*.png); it knows nothing else. For real images export a LLaVA-1.5 checkpoint "
             "(llava-edge export --ckpt liuhaotian/llava-v1.5-7b --out llava-v1.5-7b-edge) and pass "
             "--bundle llava-v1.5-7b-edge.")


def demo_note(model: Model, print_it: bool = True) -> str | None:
    """The one-line warning that the demo model answers (from the manifest's domain); printed on stderr."""
    note = DEMO_NOTE if model.is_demo else None
    if note and print_it:
        print(note, file=sys.stderr)
    return note


def image_argument(text: str) -> Path:
    """The path after /image as a terminal pastes it: quoted ('a b.png', "a b.png"), backslash-escaped, a
    file:// URI, or with ~."""
    text = text.strip()
    try:
        parts = shlex.split(text)
    except ValueError:  # an unbalanced quote: take the text as it is
        parts = [text]
    path = parts[0] if len(parts) == 1 else text
    if path.startswith("file://"):
        path = unquote(urlparse(path).path)
    return Path(path).expanduser()


def answer_json(session: ChatSession, answer, image) -> str:
    out = answer.to_dict()
    out.update(image=str(image), bundle=str(session.bundle.path), vision_provider=session.vision.provider,
               decoder_quant=session.bundle.quant)
    return json.dumps(out)


def answer_once(session: ChatSession, image: Path, prompt: str, sampling: SamplingConfig, as_json: bool) -> None:
    session.set_image(image)
    answer = session.answer(prompt, sampling)
    print(answer_json(session, answer, image) if as_json else answer.text)


def repl(session: ChatSession, image: Path, sampling: SamplingConfig, note: str | None = None,
         read_line: Callable[[str], str] | None = None, as_json: bool = False) -> None:
    """Read questions until /quit or Ctrl-D. Ctrl-C clears the line at the prompt and stops an answer being
    written, never the chat. as_json: each answer is one JSON line on stdout (answer, timings), nothing else is."""
    session.set_image(image)
    print(f"llava-edge chat about {image} — /help lists the commands, /quit or Ctrl-D ends", file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    read_line = read_line or line_reader(cache_dir() / "chat-history")
    # the prompt goes to stdout on a terminal (the line editor's), to stderr when stdout carries JSON lines
    prompt = "" if as_json else "USER: "
    while True:
        try:
            if as_json:
                print("USER: ", end="", file=sys.stderr, flush=True)
            with session.while_typing():  # the image prefix is prefilled meanwhile
                line = read_line(prompt)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: the line is dropped, ask again
            print(file=sys.stderr)
            continue
        except EOFError:  # Ctrl-D or the end of piped input
            print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not command(session, line):
                return
            continue
        if not as_json:
            print("ASSISTANT: ", end="", flush=True)
        try:
            for piece in session.ask(line, sampling):
                if not as_json:
                    print(piece, end="", flush=True)
            print(answer_json(session, session.last, session.image_path) if as_json else "", flush=True)
        except KeyboardInterrupt:
            print(answer_json(session, session.last, session.image_path) if as_json else " [stopped]", flush=True)
        except UserError as e:  # e.g. the conversation no longer fits the context: the chat goes on
            if not as_json:
                print()
            hint = ": /reset forgets the questions (the image stays)" if isinstance(e, ContextOverflow) else ""
            print(f"llava-edge: {e}{hint}", file=sys.stderr)


def command(session: ChatSession, line: str) -> bool:
    """Run one /command; False means quit."""
    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared; same image)", file=sys.stderr)
    elif name == "/image" and arg.strip():
        path = image_argument(arg)
        try:
            session.set_image(path)
            print(f"(new conversation about {path})", file=sys.stderr)
        except UserError as e:
            print(f"llava-edge: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C while the image loads: the conversation stays as it was
            print("(stopped; the conversation is still about the previous image)", file=sys.stderr)
    elif name == "/help":
        print(HELP, file=sys.stderr)
    else:
        print(f"unknown command {name}" + (" (it needs a path)" if name == "/image" else "") + f"; {HELP}",
              file=sys.stderr)
    return True

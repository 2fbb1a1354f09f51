"""`llava-edge chat`: one answer (--prompt, optionally --json) or an interactive, streamed conversation.
No torch: this is what a laptop user runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import UserError
from .runtime.sampling import SamplingConfig
from .runtime.session import ChatSession

HELP = "commands: /image PATH (new conversation about another image), /reset (forget the questions), /quit"


def answer_once(session: ChatSession, image: Path, prompt: str, sampling: SamplingConfig, as_json: bool) -> None:
    session.set_image(image)
    answer = session.answer(prompt, sampling)
    if as_json:
        out = answer.to_dict()
        out.update(image=str(image), bundle=str(session.bundle.path), vision_provider=session.vision.provider,
                   decoder_quant=session.bundle.quant)
        print(json.dumps(out))
    else:
        print(answer.text)


def repl(session: ChatSession, image: Path, sampling: SamplingConfig) -> None:
    """Read questions until /quit or end of input. Ctrl-C stops the answer being written, not the chat."""
    session.set_image(image)
    print(f"llava-edge chat about {image} — {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("USER: ")
        except (EOFError, KeyboardInterrupt):  # end of input, or Ctrl-C at the prompt: leave
            print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not command(session, line):
                return
            continue
        print("ASSISTANT: ", end="", flush=True)
        try:
            for piece in session.ask(line, sampling):
                print(piece, end="", flush=True)
            print()
        except KeyboardInterrupt:
            print(" [stopped]")
        except UserError as e:  # e.g. the conversation no longer fits the context: the chat goes on
            print()
            print(f"llava-edge: {e}", file=sys.stderr)


def command(session: ChatSession, line: str) -> bool:
    """Run one /command; False means quit."""
    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared; same image)", file=sys.stderr)
    elif name == "/image" and arg.strip():
        try:
            session.set_image(Path(arg.strip()).expanduser())
            print(f"(new conversation about {arg.strip()})", file=sys.stderr)
        except UserError as e:
            print(f"llava-edge: {e}", file=sys.stderr)
    else:
        print(HELP, file=sys.stderr)
    return True

"""Reading the interactive chat's lines: line editing and a history kept across sessions on a terminal, plain
lines from a pipe. A leaf (no torch).

On a terminal prompt_toolkit edits the line (arrow keys, Ctrl-R search, history in the user's cache dir);
without it the standard readline module does the same where Python has one. Both raise KeyboardInterrupt
on Ctrl-C (the caller clears the line) and EOFError on Ctrl-D. Piped input is read as it comes and
never written to the history.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

HISTORY_LINES = 1000


def _writable(path: Path) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        return True
    except OSError:
        return False


def line_reader(history: Path, interactive: bool | None = None) -> Callable[[str], str]:
    """A function prompt -> line, keeping the history in `history` (in memory only if that cannot be written).
    `interactive` None: editing and history only when stdin and stdout are a terminal."""
    if interactive is None:
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if not interactive:
        return input
    path = Path(history)
    keep = _writable(path)
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
    except ImportError:
        return _readline_reader(path if keep else None)
    session = PromptSession(history=FileHistory(str(path)) if keep else InMemoryHistory())
    return lambda prompt: session.prompt(prompt)


def _readline_reader(path: Path | None) -> Callable[[str], str]:
    try:
        import readline
    except ImportError:  # e.g. Windows without prompt_toolkit: plain lines
        return input
    readline.set_history_length(HISTORY_LINES)
    if path is not None:
        try:
            readline.read_history_file(path)
        except OSError:
            pass

    def read(prompt: str) -> str:
        line = input(prompt)
        if path is not None and line.strip():
            try:
                readline.append_history_file(1, path)
            except OSError:
                pass
        return line

    return read

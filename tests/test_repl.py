"""The interactive chat on a real terminal: `llava-edge chat` under a pseudo-terminal, keys sent as a user types
them. Line editing and history (kept across sessions in the cache dir), Ctrl-C clears the line, /image with
a quoted path and with ~, /help, Ctrl-D ends the chat."""

import json
import os
import re
import select
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from hide_modules import cli_without

ROOT = Path(__file__).parents[1]
GREEN = ROOT / "examples" / "green_triangle.png"
TWO = ROOT / "examples" / "red_circle_blue_triangle.png"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")
PROMPT_READY = b"\x1b[?2004h"  # prompt_toolkit turns bracketed paste on as each prompt starts reading keys
UP = b"\x1b[A"

HIDE_PROMPT_TOOLKIT = cli_without("prompt_toolkit")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")


class Terminal:
    """One `llava-edge chat` process on a pty; `expect` waits for text in the output with escape codes removed."""

    def __init__(self, args: list[str], env: dict[str, str], without_prompt_toolkit: bool = False,
                 code: str | None = None):
        import pty

        self.ready = b"USER: " if without_prompt_toolkit else PROMPT_READY  # readline prints the prompt once
        command = ["-c", HIDE_PROMPT_TOOLKIT] if without_prompt_toolkit else ["-m", "llava_edge.cli"]
        if code is not None:  # python -c code that runs the CLI
            command = ["-c", code]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes llava-edge
            # as from a terminal's shell: Ctrl-C interrupts. A runner started in the background (as CI may be)
            # ignores SIGINT, or blocks it (a supervisor that waits for signals); both the ignored disposition and
            # the blocked mask survive exec, and readline's Ctrl-C then never arrives.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, *command, *args], env)
        self.seen = b""

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def text(self) -> str:
        return ANSI.sub(b"", self.seen).decode("utf-8", "replace")

    def prompt(self, count: int, timeout: float = 180) -> None:
        """Wait for the count-th prompt to be reading keys (what is typed before that is not an edit)."""
        self._wait(lambda: self.seen.count(self.ready) >= count, f"prompt #{count}", timeout)

    def reading_keys(self, timeout: float = 180) -> None:
        """Wait until the chat's main thread sleeps in its wait for a key. Readline needs this before a Ctrl-C:
        CPython's readline looks at signals only when its select() is interrupted, so a SIGINT that lands
        while it is still echoing the last key (a loaded machine preempts it there) waits for the next key."""
        task = Path(f"/proc/{self.pid}/task/{self.pid}")
        if not task.exists():  # no /proc: nothing to wait on
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text().strip()
            # wchan reads "0" where the kernel hides it: then sleeping is the best there is to know
            if state == "S" and ("poll" in wchan or "select" in wchan or wchan in ("", "0")):
                return
            time.sleep(0.01)
        raise AssertionError(f"the chat never waited for a key; the terminal shows:\n{self.text()[-3000:]}")

    def expect(self, needle: str, count: int = 1, timeout: float = 180) -> None:
        self._wait(lambda: self.text().count(needle) >= count, f"{needle!r} x{count}", timeout)

    def _wait(self, done, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not done():
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"{what} not seen; the terminal shows:\n{self.text()[-3000:]}")
            try:
                self.seen += os.read(self.fd, 65536)
            except OSError:  # the process ended
                raise AssertionError(f"ended before {what}; the terminal shows:\n{self.text()[-3000:]}") from None

    def wait(self, timeout: float = 120) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:  # drain, so the child never blocks on a full pty
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 65536)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"did not end; the terminal shows:\n{self.text()[-3000:]}")


@pytest.fixture
def term_env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LLAVA_EDGE_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "xdg"), TERM="xterm", COLUMNS="200", LINES="50",
               PROMPT_TOOLKIT_NO_CPR="1")  # no cursor-position request: nothing here would answer it
    return env


def test_terminal_chat_keys_history_and_commands(term_env, tmp_path):
    spaced = tmp_path / "my pictures" / "two shapes.png"
    spaced.parent.mkdir()
    shutil.copy(TWO, spaced)
    shutil.copy(GREEN, Path(term_env["HOME"]) / "green.png")

    t = Terminal(["chat", str(GREEN), "--threads", "1"], term_env)
    t.prompt(1)
    t.send(b"Describe the image.\r")
    t.expect("ASSISTANT: A green triangle.")
    t.prompt(2)
    t.send(b"half a question")
    t.expect("half a question")
    t.send(b"\x03")  # Ctrl-C at the prompt: the line goes, the chat stays
    t.prompt(3)
    t.send(UP + b"\r")  # the previous question again, from the history
    t.expect("ASSISTANT: A green triangle.", count=2)
    t.prompt(4)
    t.send(f"/image '{spaced}'\r".encode())  # what a terminal pastes for a dragged-in file
    t.expect("(new conversation about")
    t.prompt(5)
    t.send(b"Describe the image.\r")
    t.expect("ASSISTANT: A red circle and a blue triangle.")
    t.prompt(6)
    t.send(b"/image ~/green.png\r")
    t.expect("green.png)")
    t.prompt(7)
    t.send(b"/help\r")
    t.expect("/quit")
    t.prompt(8)
    t.send(b"\x04")  # Ctrl-D ends the chat
    assert t.wait() == 0
    assert "[stopped]" not in t.text()  # the Ctrl-C met the prompt, not an answer
    assert "demo model" in t.text()  # the demo says once what it is

    history = (tmp_path / "xdg" / "llava-edge" / "chat-history").read_text()
    assert "Describe the image." in history and "half a question" not in history

    # A new session: the up arrow brings back the last line of the one before.
    t = Terminal(["chat", str(GREEN), "--threads", "1"], term_env)
    t.prompt(1)
    t.send(UP)
    t.expect("/help", count=2)  # once in the banner, once recalled
    t.send(b"\x15/quit\r")  # Ctrl-U clears the recalled line first
    assert t.wait() == 0


def test_readline_does_the_same_without_prompt_toolkit(term_env, tmp_path):
    pytest.importorskip("readline")
    for session in (1, 2):  # the second session recalls the first one's question
        t = Terminal(["chat", str(GREEN), "--threads", "1"], term_env, without_prompt_toolkit=True)
        t.prompt(1)
        if session == 1:
            t.send(b"Describe the image.\r")
        else:
            t.send(UP + b"\r")
        t.expect("ASSISTANT: A green triangle.")
        t.prompt(2)
        t.send(b"half a question")
        t.expect("half a question")
        t.reading_keys()
        t.send(b"\x03")
        t.prompt(3)
        t.send(UP + b"\r")
        t.expect("ASSISTANT: A green triangle.", count=2)
        t.prompt(4)
        t.send(b"\x04")
        assert t.wait() == 0
        assert "[stopped]" not in t.text()
    history = (tmp_path / "xdg" / "llava-edge" / "chat-history").read_text().split("\n")
    assert history.count("Describe the image.") == 4 and "half a question" not in history


def test_history_goes_where_llava_edge_cache_says(term_env, tmp_path):
    term_env["LLAVA_EDGE_CACHE"] = str(tmp_path / "own-cache")
    t = Terminal(["chat", str(GREEN), "--threads", "1"], term_env)
    t.prompt(1)
    t.send(b"/reset\r")
    t.expect("(conversation cleared")
    t.prompt(2)
    t.send(b"/quit\r")
    assert t.wait() == 0
    assert "/reset" in (tmp_path / "own-cache" / "chat-history").read_text()


# --------------------------------------------------------------------------- the REPL's parts, in process


@pytest.mark.parametrize("typed, path", [
    ("'/tmp/my pics/a b.png'", "/tmp/my pics/a b.png"),
    ('"/tmp/my pics/a b.png"', "/tmp/my pics/a b.png"),
    (r"/tmp/my\ pics/a\ b.png", "/tmp/my pics/a b.png"),
    ("file:///tmp/my%20pics/a%20b.png", "/tmp/my pics/a b.png"),
    ("  /tmp/plain.png  ", "/tmp/plain.png"),
    ("/tmp/unquoted with spaces.png", "/tmp/unquoted with spaces.png"),
    ("'/tmp/unbalanced.png", "'/tmp/unbalanced.png"),
])
def test_image_argument(typed, path):
    from llava_edge.chat import image_argument

    assert image_argument(typed) == Path(path)


def test_image_argument_expands_the_home_dir(monkeypatch, tmp_path):
    from llava_edge.chat import image_argument

    monkeypatch.setenv("HOME", str(tmp_path))
    assert image_argument("'~/a b.png'") == tmp_path / "a b.png"


def test_ctrl_c_while_an_image_loads_keeps_the_chat(capsys, fake_session):
    from llava_edge import chat as chat_module

    def read_line(prompt, lines=iter(["/image other.png", "still here?", "/quit"])):
        return next(lines)

    session = fake_session(stop_image={2})
    chat_module.repl(session, GREEN, None, read_line=read_line)
    assert session.asked == ["still here?"]
    assert "still about the previous image" in capsys.readouterr().err


def test_ctrl_c_at_the_prompt_asks_again_and_ctrl_d_ends(fake_session):
    from llava_edge import chat as chat_module

    events = iter([KeyboardInterrupt, "question", EOFError])

    def read_line(prompt):
        event = next(events)
        if isinstance(event, type) and issubclass(event, BaseException):
            raise event
        return event

    session = fake_session()
    chat_module.repl(session, GREEN, None, read_line=read_line)
    assert session.asked == ["question"]


# --------------------------------------------------------------------------- the prefill while the user types

# The chat with a decoder as slow as a 7B on a CPU: every decode of image embeddings takes 2 s more, so the image
# prefix's prefill is still running when the keys below arrive.
SLOW_DECODER = """
import time
from llava_edge.runtime.executor import Executor
decode = Executor.decode_embeddings
def slow(self, *args, **kwargs):
    time.sleep(2.0)
    return decode(self, *args, **kwargs)
Executor.decode_embeddings = slow
from llava_edge.cli import main
main()
"""


def slow_chat(args: list[str], env: dict[str, str]) -> Terminal:
    return Terminal(args, env, code=SLOW_DECODER)


@pytest.mark.slow
def test_ctrl_c_image_and_ctrl_d_during_the_prefill(term_env):
    t = slow_chat(["chat", str(GREEN), "--threads", "1"], term_env)
    t.prompt(1)
    t.send(b"half a question\x03")  # Ctrl-C while the prefill runs: the line goes, the chat and the prefill stay
    t.prompt(2)
    t.send(b"Describe the image.\r")
    t.expect("ASSISTANT: A green triangle.")
    t.prompt(3)
    t.send(f"/image {TWO}\r".encode())  # a new image while nothing runs; its prefill starts at the prompt
    t.expect("(new conversation about")
    t.prompt(4)
    t.send(b"/image " + str(GREEN).encode() + b"\r")  # and another, during that prefill
    t.prompt(5)
    t.send(b"Describe the image.\r")
    t.expect("ASSISTANT: A green triangle.", count=2)  # about the last image set, not the one being prefilled
    t.prompt(6)
    t.send(f"/image {TWO}\r".encode())
    t.prompt(7)
    started = time.monotonic()
    t.send(b"\x04")  # Ctrl-D during a prefill: the chat ends after the step in flight
    assert t.wait(timeout=30) == 0
    assert time.monotonic() - started < 10
    assert "[stopped]" not in t.text() and "Traceback" not in t.text()


@pytest.mark.slow
def test_a_question_typed_after_the_prefill_costs_only_its_own_tokens(term_env):
    t = slow_chat(["chat", str(GREEN), "--threads", "1", "--json"], term_env)
    t.prompt(1)
    time.sleep(6)  # the user types: the prefix (system prompt + image) is prefilled meanwhile
    t.send(b"Describe the image.\r")
    t.expect('"answer": "A green triangle."')
    t.prompt(2)
    t.send(b"\x04")
    assert t.wait() == 0
    line = next(x for x in t.text().splitlines() if x.startswith("{"))
    out = json.loads(line)
    timings = out["timings"]
    assert timings["n_prefilled"] < 40 < timings["n_cached"]  # the image came from the prefill's KV
    assert timings["ttft_ms"] < 1500  # the 2 s image decodes were paid while the user typed
    assert timings["image_tokens"] == 64


def test_piped_questions_get_one_json_line_each():
    import subprocess

    lines = f"Describe the image.\n/image {GREEN}\nDescribe the image.\n"
    done = subprocess.run([sys.executable, "-m", "llava_edge.cli", "chat", str(TWO), "--threads", "1", "--json"],
                          input=lines, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(x) for x in done.stdout.splitlines()]  # stdout holds the JSON lines and nothing else
    assert [x["answer"] for x in answers] == ["A red circle and a blue triangle.", "A green triangle."]
    assert [x["image"] for x in answers] == [str(TWO), str(GREEN)]
    assert all(x["timings"]["ttft_ms"] > 0 and x["timings"]["image_tokens"] == 64 for x in answers)

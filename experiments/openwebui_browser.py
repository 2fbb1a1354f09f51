"""Open WebUI, with its default settings, in a real browser against `llava-edge serve` (a script, not a test).

    OWUI=/path/to/venv-with-open-webui-and-playwright
    $OWUI/bin/python experiments/openwebui_browser.py --llava-edge "/path/to/venv/bin/python -m llava_edge.cli"

Starts `llava-edge serve` (the demo bundle) behind a loopback proxy that records every request body, starts
Open WebUI offline (OFFLINE_MODE=true HF_HUB_OFFLINE=1 WEBUI_AUTH=False, its own DATA_DIR in a temp dir) with
both of its connectors pointed at that proxy, and drives headless Chromium through Playwright: for each
connector (OpenAI: model "llava-edge-demo", Ollama: "llava-edge-demo:latest") a new chat, an image attached,
"Describe the image.", then a follow-up question, the answers read from the page and a screenshot taken.
Nothing in Open WebUI's settings is changed. The answers are compared with clean greedy requests (temperature
0, no tools, no file listing) sent straight to the server. Writes to --out: result.json, one PNG per
connector and requests/NNN.json (what Open WebUI sent; images as data: URIs).

Needs: open-webui 0.12.4 and playwright in the venv that runs this (CPU torch first: `pip install torch` from
the CPU wheels, then `pip install open-webui==0.12.4 playwright`), and Debian's chromium (/usr/bin/chromium;
`playwright install` is never needed). Open WebUI takes minutes to start on 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import recording_proxy  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CONNECTORS = {"openai": "llava-edge-demo", "ollama": "llava-edge-demo:latest"}
IMAGE = ROOT / "examples" / "red_circle_blue_triangle.png"
SUFFIX = "Answer the question using a single word or phrase."
TURNS = ["Describe the image.", "What color is the circle?\n" + SUFFIX]  # the second: a line break typed in


def start_serve(command: str, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, whatever the venv installed
    proc = subprocess.Popen([*shlex.split(command), "serve", "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    first = proc.stdout.readline()
    if "http://" not in first:
        raise SystemExit(f"llava-edge serve did not start: {log.read_text()}")
    return proc, first.split()[-1]


def start_open_webui(executable: str, proxy: str, port: int, data_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "DATA_DIR": str(data_dir), "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1",
           "WEBUI_AUTH": "False", "OPENAI_API_BASE_URL": f"{proxy}/v1", "OPENAI_API_KEY": "unused",
           "OLLAMA_BASE_URL": proxy}
    return subprocess.Popen([executable, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"{url}: not up after {timeout:.0f} s")


def last_answer(page, n: int, timeout: float = 300) -> str:
    """The n-th answer once it stops changing (Open WebUI streams it in)."""
    answers = page.locator("#response-content-container")
    t0, seen, stable = time.time(), None, 0
    while time.time() - t0 < timeout:
        if answers.count() >= n:
            text = answers.nth(n - 1).inner_text().strip()
            stable = stable + 1 if text and text == seen else 0
            seen = text
            if stable >= 4:
                return text
        page.wait_for_timeout(1000)
    raise SystemExit(f"no answer {n} on the page after {timeout:.0f} s (last seen: {seen!r})")


def type_question(page, question: str) -> None:
    page.locator("#chat-input").click()
    for i, line in enumerate(question.split("\n")):
        if i:
            page.keyboard.press("Shift+Enter")
        page.keyboard.type(line)
    page.keyboard.press("Enter")


def ask_in_browser(browser, url: str, model: str, screenshot: Path) -> list[str]:
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(url, timeout=300_000)
    page.wait_for_timeout(3000)
    welcome = page.get_by_text("Okay, Let's Go!")  # the release notes, shown once to a new user
    if welcome.count():
        welcome.click()
    page.locator("#model-selector-model-button").click(timeout=120_000)
    page.locator(f'[data-value="{model}"]').click()
    page.locator("input[type=file]").first.set_input_files(str(IMAGE))
    page.wait_for_timeout(3000)  # the upload
    answers = []
    for n, question in enumerate(TURNS, 1):
        type_question(page, question)
        answers.append(last_answer(page, n))
    page.screenshot(path=str(screenshot))
    page.close()
    return answers


def clean_answers(serve_url: str) -> list[str]:
    """What the same conversation gets without Open WebUI's additions: greedy, no tools, no file listing."""
    image = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    messages, answers = [], []
    for n, question in enumerate(TURNS):
        parts = [{"type": "text", "text": question}] + ([{"type": "image_url", "image_url": {"url": image}}] if n == 0
                                                         else [])
        messages.append({"role": "user", "content": parts})
        body = json.dumps({"messages": messages, "temperature": 0}).encode()
        request = urllib.request.Request(f"{serve_url}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            answers.append(json.load(r)["choices"][0]["message"]["content"])
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def shrink_png(path: Path) -> None:
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)


def summary(exchange: dict) -> dict:
    body = exchange["body"] if isinstance(exchange["body"], dict) else {}
    return {"method": exchange["method"], "path": exchange["path"], "status": exchange["status"],
            "stream": body.get("stream"), "tools": len(body.get("tools") or []),
            "messages": len(body.get("messages") or []), "temperature": body.get("temperature"),
            "options": body.get("options")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llava-edge", default=shutil.which("llava-edge") or "llava-edge",
                    help="the command that runs llava-edge (default: llava-edge on PATH)")
    ap.add_argument("--open-webui", default=str(Path(sys.executable).with_name("open-webui")))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--port", type=int, default=18080, help="Open WebUI's port on 127.0.0.1")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "openwebui_browser")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="openwebui-"))
    serve, serve_url = start_serve(args.llava_edge, args.out / "serve.log")
    proxy, recorder, proxy_server = recording_proxy.start(serve_url, args.out / "requests")
    webui = start_open_webui(args.open_webui, proxy, args.port, work / "data", args.out / "open-webui.log")
    result = {"serve": serve_url, "connectors": {}}
    try:
        url = f"http://127.0.0.1:{args.port}"
        result["open_webui_start_s"] = round(wait_http(url + "/health", 900, webui), 1)
        print(f"Open WebUI up after {result['open_webui_start_s']} s", flush=True)
        expected = clean_answers(serve_url)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            for connector, model in CONNECTORS.items():
                first = len(recorder.exchanges)
                shot = args.out / f"openwebui-{connector}.png"
                answers = ask_in_browser(browser, url, model, shot)
                shrink_png(shot)
                time.sleep(10)  # the title, tags and follow-up requests that Open WebUI sends after an answer
                result["connectors"][connector] = {
                    "model": model, "questions": TURNS, "answers": answers, "clean_greedy": expected,
                    "equal": answers == expected, "screenshot": shot.name,
                    "requests": [summary(e) for e in recorder.exchanges[first:] if e["method"] == "POST"]}
                print(connector, answers, "clean:", expected, flush=True)
            browser.close()
    finally:
        webui.terminate()
        webui.wait(60)
        proxy_server.shutdown()
        serve.terminate()
        serve.wait(60)
        shutil.rmtree(work, ignore_errors=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({c: {k: r[k] for k in ("answers", "equal")} for c, r in result["connectors"].items()}))


if __name__ == "__main__":
    main()

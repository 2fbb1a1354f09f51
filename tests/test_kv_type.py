"""`--kv-type` / `EngineConfig.kv_type`: the context really holds K and V in the type asked for (a quantized one
with flash attention), the demo answers as with f16 in q8_0 (q4_0 changes one of the four descriptions on
examples/: bench/reports/kv_memory_*.md), the disk KV store never hands an entry to a context of
another type, and a type that cannot run is one line (exit 2) before anything native runs."""

import json
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest
from server_process import ServerProcess, chat_cli_answer, image_part

from llava_edge.errors import UserError
from llava_edge.runtime import EngineConfig, Message, SamplingConfig
from llava_edge.paths import DEMO_BUNDLE
from llava_edge.runtime.bundle import open_bundle
from llava_edge.runtime.engine import Engine
from llava_edge.runtime.llama_loader import open_llama

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.png"))
DESCRIBE = "Describe the image."
GREEDY = SamplingConfig(max_tokens=24)
QUANTIZED = ("q8_0", "q4_0")


def ask(engine, image: Path, question: str = DESCRIBE):
    generation = engine.generate([Message("user", question, [image.read_bytes()])], GREEDY)
    return "".join(generation), generation.answer.timings


def one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-edge: error:") and "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_engine_config_checks_the_type():
    assert EngineConfig().kv_type == "f16"
    assert EngineConfig(kv_type="f32").kv_type == "f32"  # the exact parity runs
    with pytest.raises(UserError, match="kv-type"):
        EngineConfig(kv_type="q5_1")


@pytest.mark.slow
@pytest.mark.parametrize("kv_type", QUANTIZED)
def test_the_context_holds_the_type_and_the_demo_answers_as_with_f16(kv_type):
    """The type reaches llama.cpp (with flash attention), the sequence state it saves shrinks as the type says,
    and greedy answers on examples/ equal f16's (q8_0), or mostly do (q4_0: 4 bits per value is lossy)."""
    engines = {t: Engine.open(config=EngineConfig(kv_type=t), threads=1) for t in ("f16", kv_type)}
    try:
        params = engines[kv_type].llm.context_params
        wanted = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}")
        assert (params.type_k, params.type_v) == (wanted, wanted)
        assert params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        answers = {t: [ask(e, image)[0] for image in EXAMPLES] for t, e in engines.items()}
        same = sum(a == b for a, b in zip(answers[kv_type], answers["f16"]))
        assert same == len(EXAMPLES) if kv_type == "q8_0" else same >= len(EXAMPLES) - 1, answers
        sizes = {t: llama_cpp.llama_state_seq_get_size(e.llm.ctx, 0) for t, e in engines.items()}
        assert sizes[kv_type] < 0.6 * sizes["f16"], sizes  # q8_0: 34 bytes per 32 values, q4_0: 18
    finally:
        for e in engines.values():
            e.close()


@pytest.mark.slow
def test_disk_kv_store_is_keyed_by_the_type(tmp_path):
    """An f16 entry is never restored into a q8_0 context: the q8_0 engine prefills (and stores its own entry),
    and its next process restores that one."""
    image = EXAMPLES[1]

    def run(kv_type):
        engine = Engine.open(config=EngineConfig(kv_type=kv_type, kv_cache_dir=str(tmp_path)), threads=1)
        try:
            return ask(engine, image)
        finally:
            engine.close()

    f16_answer, t = run("f16")
    assert not t.kv_restored and len(list(tmp_path.glob("*.kv"))) == 1
    q8_answer, t = run("q8_0")
    assert not t.kv_restored and t.n_cached == 0  # a miss, not an f16 entry refused by llama.cpp
    assert len(list(tmp_path.glob("*.kv"))) == 2
    again, t = run("q8_0")
    assert t.kv_restored and again == q8_answer == f16_answer
    _, t = run("f16")
    assert t.kv_restored


def test_a_type_this_build_cannot_run_is_a_user_error_before_native_calls(monkeypatch):
    decoder = open_bundle(DEMO_BUNDLE, verify=False).decoder_file
    with pytest.raises(UserError, match="flash attention"):
        open_llama(decoder, n_ctx=64, kv_type="q8_0", flash_attn=False)
    monkeypatch.delattr(llama_cpp, "GGML_TYPE_Q4_0")
    with pytest.raises(UserError, match="no q4_0 KV cache"):
        open_llama(decoder, n_ctx=64, kv_type="q4_0")


@pytest.mark.slow
def test_chat_kv_type():
    f16 = chat_cli_answer(EXAMPLES[2], DESCRIBE)
    assert chat_cli_answer(EXAMPLES[2], DESCRIBE, "--kv-type", "q8_0") == f16
    bad = subprocess.run([sys.executable, "-m", "llava_edge.cli", "chat", str(EXAMPLES[0]), "--prompt", DESCRIBE,
                          "--kv-type", "bf16"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    one_line_error(bad, "kv-type", "bf16")
    assert bad.stdout == ""


@pytest.mark.slow
def test_caption_kv_type(tmp_path):
    def caption(out, *args):
        return subprocess.run([sys.executable, "-m", "llava_edge.cli", "caption", *map(str, EXAMPLES), "--out",
                               str(out), "--threads", "1", *args], capture_output=True, text=True, timeout=300,
                              cwd=ROOT)

    runs = {}
    for kv_type in ("f16", "q8_0"):
        proc = caption(tmp_path / f"{kv_type}.jsonl", "--kv-type", kv_type)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = [json.loads(line) for line in (tmp_path / f"{kv_type}.jsonl").read_text().splitlines()]
        runs[kv_type] = {line["path"]: line["answer"] for line in lines}
    assert len(runs["f16"]) == len(EXAMPLES) and runs["q8_0"] == runs["f16"]
    one_line_error(caption(tmp_path / "bad.jsonl", "--kv-type", "q5_1"), "kv-type", "q5_1")
    assert not (tmp_path / "bad.jsonl").exists()


@pytest.mark.slow
def test_serve_kv_type():
    import openai

    server = ServerProcess("--kv-type", "q8_0")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="llava-edge-demo", temperature=0, max_tokens=24, messages=[
            {"role": "user", "content": [{"type": "text", "text": DESCRIBE}, image_part(EXAMPLES[3])]}])
        assert reply.choices[0].message.content == chat_cli_answer(EXAMPLES[3], DESCRIBE)
    finally:
        assert server.stop() == 0, server.stderr()
    bad = subprocess.run([sys.executable, "-m", "llava_edge.cli", "serve", "--port", "0", "--kv-type", "bf16"],
                         capture_output=True, text=True, timeout=120)
    one_line_error(bad, "kv-type", "bf16")

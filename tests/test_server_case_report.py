"""The server case's report: one row per machine state (quiet, busy neighbour), ratios for each, and the
neighbour really spinning on the one core it was pinned to. No servers."""

from __future__ import annotations

import os
import time

import pytest

from llava_edge.bench.server_case import _ratios, markdown
from llava_edge.bench.server_procs import busy_neighbour


def row(machine: str, server: str, clients: int, wall: float, mean: float) -> dict:
    return {"machine": machine, "server": server, "clients": clients, "wall_s": wall, "latency_s": [mean],
            "mean_latency_s": mean, "decode_tokens_per_s": 10.0 / wall, "ttft_ms_p50": 1.0, "ttft_ms_p90": 2.0,
            "rss_mb": 100.0}


def test_the_report_gives_quiet_and_busy_rows_and_ratios():
    rows = [row(m, s, c, w, w * 0.8) for m, k in (("quiet", 1.0), ("busy", 2.0))
            for s, f in (("llava-edge", 0.9), ("llama-cpp-python server", 1.0)) for c, w in ((1, k * f), (4, 4 * k * f))]
    turns = [{"server": s, "api": a, "first_ttft_ms": 10.0, "second_ttft_ms": t}
             for s, a, t in (("llava-edge", "openai", 1.0), ("llama-cpp-python server", "openai", 4.0),
                             ("llava-edge", "ollama", 2.0))]
    ratios = _ratios(rows, turns, 4)
    assert ratios["wall_4_clients_vs_llamacpp_server"] == pytest.approx(0.9)
    assert ratios["busy_mean_latency_4_clients_vs_llamacpp_server"] == pytest.approx(0.9)
    assert ratios["second_turn_ttft_ollama_api_vs_llamacpp_server"] == pytest.approx(0.5)
    text = markdown({"bundle": "b", "cpu": "cpu", "cores": 2, "threads": 2, "n_decode": 32, "rows": rows,
                     "second_turn": turns, "ratios": ratios})
    assert sum(line.startswith("| busy |") for line in text.splitlines()) == 4
    assert sum(line.startswith("| quiet |") for line in text.splitlines()) == 4


def test_the_busy_neighbour_spins_on_its_core_and_stops():
    core = max(os.sched_getaffinity(0))
    with busy_neighbour(core) as proc:
        deadline = time.monotonic() + 60
        while os.sched_getaffinity(proc.pid) != {core} and time.monotonic() < deadline:
            time.sleep(0.05)  # it pins itself once its interpreter is up
        assert os.sched_getaffinity(proc.pid) == {core}
        assert proc.poll() is None
    assert proc.poll() is not None

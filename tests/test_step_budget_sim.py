"""The step budget never loses to a serial server, whatever the machine does: the real Scheduler and the engine's
planning (`plan_step`) on a simulated machine (tests/step_sim.py: a + b·n seconds per decode, jitter, spikes, a
neighbour taking a core for whole stretches, slow first steps), against llama-cpp-python's serial order on the
same machine. Four clients with new images (576 positions each, text before and after), behind one to three
answers already being written; and a text prompt that comes after the images."""

from __future__ import annotations

import pytest
from step_sim import MachineSpec, image_request, run_engine, run_serial, text_request

from llava_edge.runtime.step_budget import StepCost, plan_step

MACHINES = {  # 7B on 2 CPU cores (0.30 s per decode, 29 ms per position), and a GPU-like one
    "cpu quiet": MachineSpec(0.30, 0.029, seed=1, jitter=0.05),
    "cpu busy": MachineSpec(0.30, 0.029, seed=2, jitter=0.2, spikes=0.05, bursts=((10, 40), (60, 100), (130, 150))),
    "cpu outliers": MachineSpec(0.30, 0.029, seed=4, jitter=0.3, spikes=0.15, bursts=((20, 25), (50, 80))),
    "gpu busy": MachineSpec(0.02, 0.0003, seed=3, jitter=0.2, spikes=0.05, bursts=((0.1, 0.3), (0.5, 0.6))),
}


def planner(scheduler, cost):
    return plan_step(scheduler, cost, 512, slowdown=0.25, background_seconds=3.0)


def workload(machine: str, n_running: int, late_text: bool = False) -> list:
    scale = 0.01 if machine.startswith("gpu") else 1.0  # the images come while the answers are being written
    running = [text_request(f"answer{i}", 0.0, n_decode=48) for i in range(n_running)]
    images = [image_request(f"image{i}", scale * (15.0 + 0.01 * i)) for i in range(4)]
    return running + images + ([text_request("late", scale * 16.0)] if late_text else [])


def compare(machine: str, requests: list, embed_text: bool) -> tuple:
    spec = MACHINES[machine]
    return run_engine(spec, requests, StepCost(), planner, embed_text=embed_text), run_serial(spec, requests)


@pytest.mark.parametrize("embed_text", [True, False])
@pytest.mark.parametrize("n_running", [0, 1, 2, 3])
@pytest.mark.parametrize("machine", list(MACHINES))
def test_four_new_images_never_lose_to_the_serial_server(machine, n_running, embed_text):
    edge, serial = compare(machine, workload(machine, n_running), embed_text)
    assert edge.order_is_fcfs(), edge.finished
    assert edge.mean_latency <= serial.mean_latency * (1 + 1e-9), (edge.finished, serial.finished)
    assert edge.wall <= serial.wall * (1 + 1e-9), (edge.finished, serial.finished)


@pytest.mark.parametrize("embed_text", [True, False])
@pytest.mark.parametrize("machine", list(MACHINES))
def test_a_later_text_prompt_never_overtakes_the_images(machine, embed_text):
    edge, serial = compare(machine, workload(machine, 1, late_text=True), embed_text)
    assert edge.order_is_fcfs(), edge.finished
    assert edge.mean_latency <= serial.mean_latency * (1 + 1e-9)
    assert edge.wall <= serial.wall * (1 + 1e-9)


@pytest.mark.parametrize("machine", list(MACHINES))
def test_a_lone_request_is_the_serial_servers_request(machine):
    edge, serial = compare(machine, [image_request("alone", 0.0)], embed_text=True)
    assert edge.finished["alone"] <= serial.finished["alone"] * (1 + 1e-9)


def test_answers_written_together_beat_one_at_a_time():
    """Batching still pays where it should: three answers at once share their decodes."""
    edge, serial = compare("cpu busy", workload("cpu busy", 3), embed_text=True)
    assert edge.mean_latency < 0.95 * serial.mean_latency

"""A training run's resumable state: trainable weights, optimizer, step and RNG (torch.distributed.checkpoint:
one process, DDP and FSDP alike), and this rank's copy of the trainable weights."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .distributed import Dist, barrier, unwrapped


def save_state(run_dir: Path, model, optimizer, step: int, d: Dist) -> None:
    """Trainable weights + optimizer (torch.distributed.checkpoint: works for 1 process, DDP and FSDP),
    step and per-rank RNG. Written to a temp dir and renamed, so a kill mid-save keeps the last one."""
    final, tmp = run_dir / "last", run_dir / "last.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    opts = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    with warnings.catch_warnings():  # dcp warns that a single process saves alone: intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}, tmp / f"rng_rank{d.rank}.pt")
    barrier(d)
    if d.main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier(d)


def load_state(run_dir: Path, model, optimizer, d: Dist) -> int:
    last = run_dir / "last"
    if not (last / "trainer_state.json").exists():
        return 0
    opts = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(last / "dcp"))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),  # frozen weights come from their files
    )
    rng = torch.load(last / f"rng_rank{d.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((last / "trainer_state.json").read_text())["step"]


def trainable_weights(wrapped) -> dict[str, torch.Tensor]:
    """This rank's full copy of every trainable tensor (FSDP shards gathered: collective)."""
    out = {}
    for name, p in unwrapped(wrapped).named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = t.detach().cpu().clone()
    return out


"""The two-stage recipe: what each stage freezes and writes, resume, and 2-rank DDP/FSDP on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_edge.reference.checkpoint import load_checkpoint
from llava_edge.reference.tensor_files import load_bin
from llava_edge.train.recipe import TrainConfig, train
from llava_edge.train.schedule import cosine_lr
from safetensors.torch import load_file
from tiny_parts import make_parts

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("parts"))


def config(parts, stage, out, **kw):
    base = dict(
        stage=stage, output_dir=str(out), llm=str(parts["llm"]), vision_tower=str(parts["clip"]),
        data=str(parts["stage1" if stage == "stage1" else "stage2"]), global_batch_size=8, micro_batch_size=4,
        lr=1e-3, progress=False, seed=3,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def stage1(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    result = train(config(parts, "stage1", out, epochs=2))
    return out, result


def test_stage1_trains_the_projector_only(parts, stage1):
    out, result = stage1
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    proj = load_bin(out / "mm_projector.bin")
    assert sorted(proj) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                            "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    model = result["model"]
    llm = load_file(str(parts["llm"] / "model.safetensors"))
    assert torch.equal(model.language.layers[0].mlp.up_proj.weight, llm["model.layers.0.mlp.up_proj.weight"])
    clip = load_file(str(parts["clip"] / "model.safetensors"))
    assert torch.equal(model.vision.embeddings.patch_embedding.weight,
                       clip["vision_model.embeddings.patch_embedding.weight"])
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7)) and all(m["samples_per_s"] > 0 for m in metrics)


@pytest.mark.slow
def test_stage2_output_is_a_loadable_checkpoint(parts, stage1, tmp_path):
    out1, _ = stage1
    out = tmp_path / "stage2"
    result = train(config(parts, "stage2", out, projector=str(out1 / "mm_projector.bin"), epochs=1))
    loaded = load_checkpoint(out)
    assert loaded.config.format == "liuhaotian" and loaded.config.template == "vicuna_v1"
    trained = result["model"]
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    llm = load_file(str(parts["llm"] / "model.safetensors"))
    assert not torch.equal(trained.language.layers[0].mlp.up_proj.weight, llm["model.layers.0.mlp.up_proj.weight"])
    clip = load_file(str(parts["clip"] / "model.safetensors"))
    assert torch.equal(trained.vision.embeddings.patch_embedding.weight,
                       clip["vision_model.embeddings.patch_embedding.weight"])
    ids = torch.tensor([[1, 5, loaded.config.image_token_index, 9]])
    pix = torch.zeros(1, 3, 28, 28)
    assert isinstance(loaded.model.generate(ids, pix, max_new_tokens=3), list)


@pytest.mark.slow
def test_stage2_lora_merges_into_the_saved_llm(parts, stage1, tmp_path):
    out1, _ = stage1
    out = tmp_path / "lora"
    result = train(config(parts, "stage2", out, projector=str(out1 / "mm_projector.bin"), lora_r=4,
                          lora_alpha=8, lora_dropout=0.0, projector_lr=5e-4, lr=5e-3, epochs=1))
    saved = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in saved)
    llm = load_file(str(parts["llm"] / "model.safetensors"))
    w = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(saved[w], llm[w])  # the adapter was trained and merged
    assert torch.equal(saved["model.norm.weight"], llm["model.norm.weight"])  # non-linear LLM weights stay frozen
    loaded = load_checkpoint(out)
    ids = torch.tensor([[1, 5, loaded.config.image_token_index, 9, 13]])
    pix = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        a, _ = result["model"](ids, pixel_values=pix)
        b, _ = loaded.model(ids, pixel_values=pix)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(parts, stage1, tmp_path):
    out1, _ = stage1
    kw = dict(projector=str(out1 / "mm_projector.bin"), epochs=3, save_every=2)
    full = train(config(parts, "stage2", tmp_path / "full", **kw))
    first = train(config(parts, "stage2", tmp_path / "killed", stop_after_steps=5, **kw))
    assert first["stopped_at"] == 5
    with pytest.raises(Exception, match="--resume"):
        train(config(parts, "stage2", tmp_path / "killed", **kw))
    rest = train(config(parts, "stage2", tmp_path / "killed", resume=True, **kw))
    full_losses = [h["loss"] for h in full["history"]]
    resumed = [h["loss"] for h in first["history"]] + [h["loss"] for h in rest["history"]]
    assert len(full_losses) == 9 and resumed == pytest.approx(full_losses, abs=1e-6)
    for name, t in full["trainable"].items():
        assert torch.allclose(t, rest["trainable"][name], atol=1e-6), name


def test_cosine_schedule_shape():
    assert cosine_lr(0, 100, 3) == pytest.approx(1 / 3)
    assert cosine_lr(3, 100, 3) == pytest.approx(1.0)
    assert cosine_lr(51, 100, 3) == pytest.approx(0.5, abs=0.02)
    assert cosine_lr(99, 100, 3) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(parts, stage1, tmp_path, engine):
    out1, _ = stage1
    kw = dict(stage="stage2", data=str(parts["stage2"]), llm=str(parts["llm"]), vision_tower=str(parts["clip"]),
              projector=str(out1 / "mm_projector.bin"), global_batch_size=8, micro_batch_size=2, lr=1e-3,
              epochs=2, progress=False, seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    two = {**kw, "output_dir": str(tmp_path / "two"), "fsdp": engine == "fsdp"}
    one = {**kw, "output_dir": str(tmp_path / "one")}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
         str(TESTS / "dist_worker.py"), json.dumps(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    subprocess.run([sys.executable, str(TESTS / "dist_worker.py"), json.dumps(one)], env=env, check=True,
                   capture_output=True, timeout=300)
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "one" / "rank0.pt")
    assert len(r0["history"]) == 6
    assert [h["loss"] for h in r0["history"]] == pytest.approx([h["loss"] for h in single["history"]], abs=1e-5)
    for name, t in r0["trainable"].items():
        assert torch.equal(t, r1["trainable"][name]), name  # ranks end with identical weights
        assert torch.allclose(t, single["trainable"][name], atol=1e-5), name
    assert load_checkpoint(tmp_path / "two").config.format == "liuhaotian"

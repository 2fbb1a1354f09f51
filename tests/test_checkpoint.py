"""Every checkpoint layout loads to transformers' logits; bad checkpoints fail with one line, exit 2."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from llava_edge.errors import CheckpointError
from llava_edge.reference.checkpoint import load_checkpoint
from llava_edge.reference.hf_cache import resolve_checkpoint
from tiny_checkpoints import (
    IMAGE_TOKEN,
    hf_ids,
    make_hf_model,
    save_full_clip,
    save_hf_layout,
    save_liuhaotian_layout,
)

PROMPT = [1, 17, IMAGE_TOKEN, 99, 7, 13]


@pytest.fixture(scope="module")
def hf():
    return make_hf_model(image_size=28, kv_heads=2, seed=11)


@pytest.fixture(scope="module")
def expected(hf):
    pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return pix, hf(input_ids=hf_ids(PROMPT, hf), pixel_values=pix).logits


def logits_of(model, pix):
    """The prompt with the model's own image placeholder (llava-hf: <image> id; liuhaotian: -200)."""
    ids = [model.cfg.image_token_index if i == IMAGE_TOKEN else i for i in PROMPT]
    with torch.no_grad():
        return model(torch.tensor([ids]), pixel_values=pix)[0]


@pytest.mark.parametrize("layout", ["save_pretrained", "sharded", "in_memory", "vision_model"])
def test_llava_hf_layouts(hf, expected, tmp_path, layout):
    pix, want = expected
    loaded = load_checkpoint(save_hf_layout(hf, tmp_path / layout, layout))
    assert loaded.config.format == "llava-hf" and loaded.config.template == "llava_hf"
    assert (logits_of(loaded.model, pix) - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_liuhaotian_layout_with_full_clip_dir(hf, expected, tmp_path, fmt):
    pix, want = expected
    clip = save_full_clip(hf, tmp_path / "clip-full")
    ckpt = save_liuhaotian_layout(hf, tmp_path / "llava-v1.5-tiny", "openai/clip-vit-large-patch14-336", fmt=fmt)
    loaded = load_checkpoint(ckpt, vision_tower=clip)
    assert loaded.config.format == "liuhaotian" and loaded.config.aspect == "pad"
    assert loaded.config.template == "vicuna_v1"
    assert (logits_of(loaded.model, pix) - want).abs().max().item() <= 1e-4


def test_names_resolve_in_hf_cache_only(hf, expected, tmp_path, monkeypatch):
    pix, want = expected
    hub = tmp_path / "hf" / "hub"
    snap = hub / "models--liuhaotian--llava-v1.5-tiny" / "snapshots" / "0123abc"
    clip_snap = hub / "models--openai--clip-vit-large-patch14-336" / "snapshots" / "4567def"
    save_liuhaotian_layout(hf, snap, "openai/clip-vit-large-patch14-336")
    save_full_clip(hf, clip_snap)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("llava-v1.5-tiny") == snap
    loaded = load_checkpoint("llava-v1.5-tiny")  # the CLIP tower found by mm_vision_tower in the cache
    assert loaded.vision_tower_path == clip_snap
    assert (logits_of(loaded.model, pix) - want).abs().max().item() <= 1e-4


def test_missing_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("llava-v1.5-7b")
    msg = str(e.value)
    assert "llava-v1.5-7b" in msg and str(tmp_path / "empty" / "hub") in msg and "\n" not in msg


def test_dtype_is_kept(hf, tmp_path):
    path = save_hf_layout(hf.half(), tmp_path / "fp16", "save_pretrained")
    hf.float()
    model = load_checkpoint(path).model
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


# ----------------------------------------------------------------------------- bad checkpoints via the CLI


def run_info(path, *extra):
    return subprocess.run(
        [sys.executable, "-m", "llava_edge.cli", "info", str(path), *extra], capture_output=True, text=True
    )


def assert_one_line_error(result, must_name):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert must_name in lines[0], lines[0]


@pytest.mark.slow
def test_info_reports_a_good_checkpoint(hf, tmp_path):
    path = save_hf_layout(hf, tmp_path / "ok", "sharded")
    result = run_info(path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "llava-hf" and info["n_image_tokens"] == 4 and info["vocab_size"] == 320
    assert info["params"]["total"] == sum(p.numel() for p in hf.parameters())


def test_unknown_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    assert_one_line_error(run_info(tmp_path), "config.json")


@pytest.mark.slow
def test_missing_shard(hf, tmp_path):
    path = save_hf_layout(hf, tmp_path / "sharded", "sharded")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert_one_line_error(run_info(path), shard.name)


@pytest.mark.slow
def test_shape_mismatch(hf, tmp_path):
    path = save_hf_layout(hf, tmp_path / "bad-shape", "save_pretrained")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_info(path), "model.safetensors")


class NotATensor:
    pass


@pytest.mark.slow
def test_bin_with_a_non_tensor_pickle_is_refused(hf, tmp_path):
    clip = save_full_clip(hf, tmp_path / "clip")
    ckpt = save_liuhaotian_layout(hf, tmp_path / "liu", "clip", n_shards=2)
    evil = ckpt / "pytorch_model-00002-of-00002.bin"
    with open(evil, "wb") as f:
        pickle.dump({"model.norm.weight": NotATensor()}, f)
    assert_one_line_error(run_info(ckpt, "--vision-tower", str(clip)), evil.name)


def test_liuhaotian_without_a_vision_tower(hf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    ckpt = save_liuhaotian_layout(hf, tmp_path / "liu", "openai/clip-vit-large-patch14-336")
    result = run_info(ckpt)
    assert_one_line_error(result, "openai/clip-vit-large-patch14-336")
    assert "--vision-tower" in result.stderr

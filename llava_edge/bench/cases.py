"""The models a bench run measures, made once and kept in the work dir (a second run reuses them).

demo     the shipped demo checkpoint and its bundle (a trained model; vision int8, decoder Q4_K_M)
llava7b  LLaVA-1.5-7B shapes with random weights (compute does not depend on the values): CLIP ViT-L/14-336,
         mlp2x_gelu 1024 -> 4096, and a LLaMA decoder of Vicuna-7B's width (4096, ffn 11008, 32 heads,
         vocab 32000) with `decoder_layers` blocks (32 = the real depth; fewer for quick runs). Exported with
         `llava-edge export` (mmproj included), plus the vision graph at fp32, fp16 and int8.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..image import load_image, preprocess
from ..paths import CALIBRATION_DIR, DEMO_BUNDLE, DEMO_CHECKPOINT
from ..runtime.bundle import open_bundle


@dataclass
class Case:
    name: str
    checkpoint: Path
    bundle: Path
    image: Path  # the photo every path is timed on
    vision_graphs: dict[str, Path]  # precision -> ONNX graph of the same weights
    reference_embeds: Path  # .npy, [n_image_tokens, n_embd] from the PyTorch reference on `image`
    description: str

    def to_dict(self) -> dict:
        m = open_bundle(self.bundle).manifest
        return {"name": self.name, "description": self.description, "image": self.image.name,
                "files_mb": {role: round(e["bytes"] / 2**20, 2) for role, e in m["files"].items()}
                | {f"vision_{p}": round(path.stat().st_size / 2**20, 2) for p, path in self.vision_graphs.items()},
                "decoder_quant": m["decoder"]["quant"], "vision_precision": m["vision"]["precision"],
                "n_image_tokens": m["vision"]["n_image_tokens"], "n_embd": m["decoder"]["n_embd"]}


def demo_case(work: Path) -> Case:
    from ..train.shapes import render_scene, sample_scene

    work.mkdir(parents=True, exist_ok=True)
    image = work / "shapes.png"
    if not image.exists():
        render_scene(sample_scene(np.random.default_rng(7))).save(image)
    ref = _reference_embeddings(DEMO_CHECKPOINT, image, work / f"reference_embeds-{_vision_sha(DEMO_BUNDLE)}.npy")
    return Case("demo", DEMO_CHECKPOINT, DEMO_BUNDLE, image, {open_bundle(DEMO_BUNDLE).vision.precision: DEMO_BUNDLE / "vision.onnx"},
                ref, "the shipped demo model (4 M parameters, 112 px, 64 image tokens)")


def llava7b_case(work: Path, decoder_layers: int, threads: int, all_precisions: bool = True) -> Case:
    work = work / f"llava7b-L{decoder_layers}"
    ckpt, bundle = work / "checkpoint", work / "bundle"
    image = CALIBRATION_DIR / "astronaut.jpg"
    if not (bundle / "manifest.json").exists():
        _make_random_checkpoint(ckpt, decoder_layers)
        from ..export.pipeline import ExportOptions, export_bundle

        export_bundle(ExportOptions(str(ckpt), str(bundle), "Q4_K_M", "auto", None, True, True, threads))
    if all_precisions:
        graphs = _vision_variants(ckpt, work / "vision")
    else:  # quick runs: only the graph the bundle chose
        graphs = {open_bundle(bundle, verify=False).vision.precision: bundle / "vision.onnx"}
    ref = _reference_embeddings(ckpt, image, work / f"reference_embeds-{_vision_sha(bundle)}.npy")
    return Case("llava7b", ckpt, bundle, image, graphs, ref,
                f"LLaVA-1.5-7B shapes, random weights: ViT-L/14-336 + MLP -> 4096, "
                f"{decoder_layers} of Vicuna-7B's 32 decoder blocks, 576 image tokens")


def _vision_sha(bundle: Path) -> str:
    """Names the cached reference embeddings after the weights they come from (a rebuilt model gets new ones)."""
    return open_bundle(bundle, verify=False).manifest["files"]["vision"]["sha256"][:12]


def _make_random_checkpoint(ckpt: Path, decoder_layers: int) -> None:
    """A liuhaotian-layout checkpoint with random weights (the values do not change the compute; the scale keeps
    it finite). The decoder is generated tensor by tensor straight into its safetensors file, so a 32-block
    (13.5 GB) checkpoint needs one tensor of anonymous memory, not the whole model."""
    import torch

    from ..architectures import LlavaConfig, ProjectorConfig, TextConfig, VisionConfig
    from ..reference.checkpoint_writer import liuhaotian_config_dict, projector_state_liuhaotian, save_clip_vision
    from ..reference.llava import Llava

    cfg = LlavaConfig(vision=VisionConfig(), projector=ProjectorConfig(type="mlp2x_gelu", in_features=1024, out_features=4096),
                      text=TextConfig(num_hidden_layers=decoder_layers), feature_layer=-2, select_feature="patch")
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = Llava(cfg)
    for module in (model.vision, model.projector):  # small: made in memory
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(_random_values(name, p.shape, gen))
    tensors = {"model." + k: v for k, v in model.language.state_dict().items() if not k.startswith("lm_head.")}
    tensors["lm_head.weight"] = model.language.lm_head.weight
    tensors.update(projector_state_liuhaotian(model))
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_random_safetensors(tmp / "model.safetensors", tensors, gen)
    (tmp / "config.json").write_text(json.dumps(liuhaotian_config_dict(cfg, "clip"), indent=2))
    save_clip_vision(model.vision, tmp / "clip", cfg.image_mean, cfg.image_std, torch.float16)
    # The demo's SentencePiece model; the GGUF vocab is padded to 32000 as llava-hf vocabularies are.
    shutil.copyfile(DEMO_CHECKPOINT / "tokenizer.model", tmp / "tokenizer.model")
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def _random_values(name: str, shape, gen):
    import torch

    if len(shape) == 1:
        return torch.full(shape, 1.0 if "norm" in name else 0.0)
    return torch.empty(shape).normal_(0, 0.02, generator=gen)


def _write_random_safetensors(path: Path, tensors: dict, gen) -> None:
    """fp16 safetensors: 8-byte header length, JSON header, the tensors' bytes in order. Meta tensors get
    random values (rows at a time), real ones are written as they are."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        n = t.numel() * 2
        header[name] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, t in tensors.items():
            if not t.is_meta:
                f.write(t.detach().to(torch.float16).contiguous().numpy().tobytes())
                continue
            rows = max(1, (1 << 24) // max(1, t[0].numel())) if t.ndim > 1 else t.shape[0]
            for r in range(0, t.shape[0], rows):
                part = _random_values(name, (min(rows, t.shape[0] - r), *t.shape[1:]), gen)
                f.write(part.to(torch.float16).numpy().tobytes())


def _vision_variants(ckpt: Path, out: Path) -> dict[str, Path]:
    graphs = {p: out / f"vision-{p}.onnx" for p in ("fp32", "fp16", "int8")}
    if all(g.exists() for g in graphs.values()):
        return graphs
    from ..export.onnx_vision import export_vision_onnx
    from ..quant.vision_precision import convert_fp16, quantize_int8_dynamic
    from ..reference.checkpoint import load_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    model = load_checkpoint(ckpt).model
    model.vision.float()
    model.projector.float()
    export_vision_onnx(model, graphs["fp32"])
    del model
    convert_fp16(graphs["fp32"], graphs["fp16"])
    quantize_int8_dynamic(graphs["fp32"], graphs["int8"])
    return graphs


def _reference_embeddings(ckpt: Path, image: Path, out: Path) -> Path:
    if out.exists():
        return out
    import torch

    from ..reference.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt)
    cfg = loaded.config
    model = loaded.model
    model.vision.float()
    model.projector.float()
    pixels = preprocess(load_image(image), cfg.vision.image_size, cfg.image_mean, cfg.image_std, cfg.aspect)
    with torch.no_grad():
        embeds = model.encode_images(torch.from_numpy(pixels)[None])[0].numpy()
    np.save(out, embeds)
    return out

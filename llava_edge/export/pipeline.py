"""`llava-edge export`: checkpoint -> edge bundle (vision ONNX + decoder GGUF + manifest), measured.

Every number in `manifest.parity` is measured here against the PyTorch reference on fixed inputs; the
decoder's reference runs one layer at a time in fp32 from the memory-mapped weights (reference/streamed.py),
so it is measured at any size. `manifest.export` holds the export's own peak memory, anonymous and
file-backed apart (peak_memory.py), and the vision tower is dropped once its outputs are taken.
The bundle is written into a temp dir beside the target and renamed at the end (see bundle.py).
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..conversation import get_template, render_prompt, tokenize_prompt
from ..errors import UserError
from ..image import load_image, preprocess_batch
from ..peak_memory import PeakMemory
from ..reference.checkpoint import load_checkpoint, read_llava_config
from ..reference.hf_cache import resolve_checkpoint
from ..paths import CALIBRATION_DIR
from ..quant.onnx_run import IMAGE_TOKENS_NAME, PATCHES_NAME
from ..runtime.bundle import FORMAT_VERSION
from .bundle_dir import file_entry, staged_dir, write_manifest

QUANTS = ("Q4_K_M", "Q4_0", "Q5_K_M", "Q8_0", "F16", "F32")


@dataclass
class ExportOptions:
    ckpt: str
    out: str
    quant: str = "Q4_K_M"
    vision_precision: str = "auto"
    vision_tower: str | None = None
    mmproj: bool = False
    overwrite: bool = False
    threads: int | None = None
    progress: bool = True


def calibration_pixels(cfg) -> np.ndarray:
    """Real photos shipped with the package (several aspect ratios) plus two synthetic images."""
    images = [load_image(p) for p in sorted(CALIBRATION_DIR.glob("*")) if p.suffix in (".png", ".jpg")]
    rng = np.random.default_rng(0)
    from PIL import Image

    images.append(Image.fromarray(rng.integers(0, 256, (200, 320, 3), dtype=np.uint8)))
    images.append(Image.new("RGB", (240, 180), (230, 60, 40)))
    return preprocess_batch(images, cfg.vision.image_size, cfg.image_mean, cfg.image_std, cfg.aspect)


def parity_sequence(cfg, sp, n_min: int = 64) -> list[int]:
    """A fixed multi-turn prompt with one image, at least n_min text tokens, in the bundle's template."""
    turns = [
        ("Describe the image in detail, then say what colors you see.", "A red circle and a blue square."),
        ("How many shapes are there?\nAnswer the question using a single word or phrase.", "Two"),
        ("Is there a green triangle in the image?", None),
    ]
    prompt = render_prompt(cfg.template, turns, image=True)
    ids = tokenize_prompt(prompt, sp.encode, sp.bos_id(), cfg.image_token_index, {"</s>": sp.eos_id()})
    while sum(1 for i in ids if i != cfg.image_token_index) < n_min:
        ids += sp.encode(" Please answer carefully.")
    return ids


def export_bundle(opts: ExportOptions) -> dict:
    from ..quant.gguf import check_quant

    quant = check_quant(opts.quant)
    if opts.vision_precision not in ("auto", "fp32", "fp16", "int8"):
        raise UserError(f"--vision-precision must be auto, fp32, fp16 or int8 (got {opts.vision_precision!r})")
    if opts.mmproj:  # before the weights are read: a checkpoint llama.cpp cannot express fails at once
        from .mmproj import check_expressible

        check_expressible(read_llava_config(resolve_checkpoint(opts.ckpt), opts.vision_tower)[0])
    with PeakMemory() as memory:
        memory.step("load")
        loaded = load_checkpoint(opts.ckpt, vision_tower=opts.vision_tower)
        if loaded.tokenizer_path is None:
            raise UserError(f"{loaded.path}: no tokenizer.model (SentencePiece) in the checkpoint")
        with staged_dir(Path(opts.out), overwrite=opts.overwrite) as tmp:
            manifest = write_bundle(loaded, tmp, opts, quant, memory)
    return manifest


def write_bundle(loaded, tmp: Path, opts: ExportOptions, quant: str, memory: PeakMemory | None = None) -> dict:
    """The vision graph, the decoder GGUF and the manifest with their measured parity, written into `tmp`."""
    loaded.model.vision.float()
    loaded.model.projector.float()
    say = print if opts.progress else (lambda *a, **k: None)
    memory = memory or PeakMemory()
    vision = write_vision(loaded, tmp, opts, memory, say)
    decoder_path = write_decoder(loaded, tmp, opts, quant, memory, say)
    files = {"vision": file_entry(vision.path), "decoder": file_entry(decoder_path), **vision.extra_files}

    say("[export] measuring parity against the reference")
    memory.step("parity")
    parity = {"vision": {"precision": vision.precision, **vision.parity},
              **decoder_parities(loaded, decoder_path, vision.parity_image, opts)}
    manifest = build_manifest(loaded, opts, quant, files, vision.precision, parity)
    manifest["export"] = memory.result()
    write_manifest(tmp, manifest)
    return manifest


@dataclass
class WrittenVision:
    path: Path  # the bundle's vision graph
    precision: str  # the one chosen
    parity: dict  # measured against the reference, per token budget too where the graph reduces tokens
    parity_image: torch.Tensor  # the reference's embeddings of the image the decoder parity uses
    extra_files: dict  # the mmproj GGUF's entry, when asked for


def write_vision(loaded, tmp: Path, opts: ExportOptions, memory: PeakMemory, say) -> WrittenVision:
    """The vision tower and projector as ONNX at the chosen precision (and the mmproj GGUF when asked), its
    parity measured; the tower is dropped from memory after."""
    from ..quant.vision_precision import choose_precision
    from .onnx_vision import export_vision_onnx, parity_budgets, reduction_parity, vision_parity

    cfg, model = loaded.config, loaded.model
    say("[export] vision tower + projector -> ONNX")
    memory.step("vision_onnx")
    fp32_path = export_vision_onnx(model, tmp / "vision.fp32.onnx")
    calib = calibration_pixels(cfg)
    memory.step("vision_precision")
    chosen = choose_precision(fp32_path, calib, model, opts.vision_precision, opts.threads)
    vision_path = tmp / "vision.onnx"
    _move_onnx(chosen.path, vision_path)
    if chosen.path != fp32_path:
        _remove_onnx(fp32_path)
    vision_check = vision_parity(vision_path, model, calib, opts.threads)
    if reduction_fields(cfg):
        budgets = parity_budgets(cfg.n_image_tokens, min_image_tokens(cfg))
        vision_check["image_tokens"] = reduction_parity(vision_path, model, calib, budgets, opts.threads)
    with torch.no_grad():
        parity_image = model.encode_images(torch.from_numpy(calib[:1]))  # the decoder parity's image
    extra_files = {}
    if opts.mmproj:
        from .mmproj import write_mmproj

        say("[export] mmproj GGUF for llama.cpp interop")
        extra_files["mmproj"] = file_entry(write_mmproj(model, cfg, tmp / "mmproj-f16.gguf", "f16"))
    release_vision(model)
    return WrittenVision(vision_path, chosen.precision, vision_check, parity_image, extra_files)


def write_decoder(loaded, tmp: Path, opts: ExportOptions, quant: str, memory: PeakMemory, say) -> Path:
    """The decoder as a GGUF: written at F16 (F32 for an F32 bundle), then quantized to `quant`."""
    from ..quant.gguf import quantize_gguf
    from .decoder_source import source_from_loaded
    from .gguf_decoder import write_decoder_gguf

    say(f"[export] decoder -> GGUF {quant}")
    memory.step("decoder_gguf")
    base_ftype = "F32" if quant == "F32" else "F16"
    base = write_decoder_gguf(source_from_loaded(loaded), tmp / f"decoder-{base_ftype}.gguf", base_ftype,
                              progress=opts.progress)
    decoder_path = tmp / f"decoder-{quant}.gguf"
    if quant != base_ftype:
        memory.step("quantize")
        quantize_gguf(base, decoder_path, quant, n_threads=opts.threads, progress=opts.progress)
        base.unlink()  # the F16 intermediate
    return decoder_path


def decoder_parities(loaded, decoder_path: Path, parity_image: torch.Tensor, opts: ExportOptions) -> dict:
    """The GGUF's tokenizer and decoder measured against the checkpoint's (on a fixed prompt with one image)."""
    import sentencepiece as spm

    from .gguf_parity import decoder_parity, tokenizer_parity

    sp = spm.SentencePieceProcessor(model_file=str(loaded.tokenizer_path))
    tokenizer = tokenizer_parity(decoder_path, loaded.tokenizer_path)
    ids = parity_sequence(loaded.config, sp)
    decoder = decoder_parity(decoder_path, loaded.model, ids, image_embeds=parity_image, n_threads=opts.threads)
    decoder.pop("mismatch_positions", None)
    return {"tokenizer": tokenizer, "decoder": decoder}


def release_vision(model) -> None:
    """Drop the vision tower and projector (fp32 copies when the checkpoint stores them in fp16): the
    decoder steps that follow do not need them."""
    model.vision.to("meta")
    model.projector.to("meta")
    gc.collect()


def build_manifest(loaded, opts: ExportOptions, quant: str, files: dict, precision: str, parity: dict) -> dict:
    cfg = loaded.config
    from ..image import pad_color

    return {
        "format_version": FORMAT_VERSION,
        "source": {"path": str(loaded.path), "format": cfg.format},
        "files": files,
        "vision": {
            "precision": precision,
            "input": "pixel_values",
            "output": "image_embeds",
            "image_size": cfg.vision.image_size,
            "patch_size": cfg.vision.patch_size,
            "n_image_tokens": cfg.n_image_tokens,
            **reduction_fields(cfg),
            "mean": list(cfg.image_mean),
            "std": list(cfg.image_std),
            "aspect": cfg.aspect,
            "pad_color": list(pad_color(cfg.image_mean)),
        },
        "decoder": {
            "n_embd": cfg.text.hidden_size,
            "n_ctx_train": cfg.text.max_position_embeddings,
            "quant": quant,
            "bos_id": cfg.text.bos_token_id,
            "eos_id": cfg.text.eos_token_id,
            "image_token_id": cfg.image_token_index,
        },
        "template": get_template(cfg.template).name,
        "parity": parity,
    }


def reduction_fields(cfg) -> dict:
    """The manifest's word that the vision graph gives fewer tokens on request (token reduction)."""
    if cfg.n_image_tokens <= min_image_tokens(cfg):
        return {}
    return {"image_tokens_input": IMAGE_TOKENS_NAME, "image_tokens_min": min_image_tokens(cfg),
            "patches_output": PATCHES_NAME}


def min_image_tokens(cfg) -> int:
    """The fewest image tokens the graph gives: one, besides the CLS token when the checkpoint keeps it."""
    return 1 + int(cfg.keeps_cls)


def _move_onnx(src: Path, dst: Path) -> None:
    """Rename an ONNX file; a graph with external data keeps its `.data` file name (referenced inside)."""
    if Path(str(src) + ".data").exists():
        raise UserError("vision graphs over 2 GB (external data) are not supported in bundles yet")
    shutil.move(src, dst)


def _remove_onnx(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)

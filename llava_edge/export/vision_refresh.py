"""A bundle's vision graph exported again from its checkpoint, the rest of the bundle left as it is.

For bundles exported before the vision graph could give fewer image tokens: the new graph (same precision
as the bundle's) replaces vision.onnx, and the manifest gains the token-reduction fields and parity; the
decoder GGUF and mmproj are not touched, so a 7B bundle is brought up to date in a minute, not an export.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..quant.onnx_run import embeddings_agreement, run_onnx
from ..reference.checkpoint import load_checkpoint
from ..runtime.bundle import read_manifest
from .bundle_dir import file_entry, write_manifest
from .pipeline import calibration_pixels, min_image_tokens, reduction_fields


def refresh_vision(bundle_dir: str | os.PathLike, ckpt: str | os.PathLike | None = None, vision_tower: str | None = None,
                   threads: int | None = None) -> dict:
    """Re-export bundle_dir's vision graph from ckpt (default: the manifest's source path, relative to the
    bundle when it is relative). Returns the new manifest; `manifest["refresh"]` compares the new graph's
    default output (every token) with the old graph's on the calibration images."""
    from ..quant.vision_precision import choose_precision
    from .onnx_vision import export_vision_onnx, parity_budgets, reduction_parity, vision_parity

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    source = Path(ckpt if ckpt is not None else manifest["source"]["path"])
    if not source.is_absolute() and ckpt is None:
        source = bundle_dir / source
    loaded = load_checkpoint(source, vision_tower=vision_tower)
    cfg, model = loaded.config, loaded.model
    if cfg.n_image_tokens != manifest["vision"]["n_image_tokens"] or cfg.text.hidden_size != manifest["decoder"]["n_embd"]:
        raise UserError(f"{source} is not the checkpoint {bundle_dir} was exported from "
                        f"(image tokens {cfg.n_image_tokens}, n_embd {cfg.text.hidden_size})")
    model.vision.float()
    model.projector.float()
    old_graph = bundle_dir / manifest["files"]["vision"]["name"]
    calib = calibration_pixels(cfg)
    with tempfile.TemporaryDirectory(dir=bundle_dir, prefix=".vision-refresh-") as tmp:
        fp32 = export_vision_onnx(model, Path(tmp) / "vision.onnx")
        chosen = choose_precision(fp32, calib, model, manifest["vision"]["precision"], threads)
        check = {"precision": chosen.precision, **vision_parity(chosen.path, model, calib, threads)}
        budgets = parity_budgets(cfg.n_image_tokens, min_image_tokens(cfg))
        check["image_tokens"] = reduction_parity(chosen.path, model, calib, budgets, threads)
        against_old = same_default_output(chosen.path, old_graph, calib, threads)
        if Path(str(chosen.path) + ".data").exists():
            raise UserError("vision graphs over 2 GB (external data) are not supported in bundles yet")
        os.replace(chosen.path, old_graph)
    manifest["files"]["vision"] = file_entry(old_graph)
    manifest["vision"].update(reduction_fields(cfg))
    manifest["parity"]["vision"] = check
    write_manifest(bundle_dir, manifest)
    return {**manifest, "refresh": {"default_vs_old_graph": against_old}}


def same_default_output(a: str | os.PathLike, b: str | os.PathLike, pixels: np.ndarray, threads: int | None = None) -> dict:
    """Two vision graphs' default outputs (every token) on the same pixels: agreement and bitwise equality."""
    x, y = run_onnx(a, pixels, threads), run_onnx(b, pixels, threads)
    return {**embeddings_agreement(x, y), "identical": bool(np.array_equal(x, y))}


"""The inputs both machines get (x86 side, needs torch and the export extras): the demo's vision graph in fp32
(exported from the demo checkpoint; the bundle's vision.onnx is its int8 form), the calibration images the export
measures vision parity on, the decoder parity sequence with its image's embeddings (as export/pipeline.py builds
them), and the shapes world's held-out split (seed 0, as `build-demo` renders it).

usage: python bench/arm/prepare_inputs.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from llava_edge.demo.build import DemoConfig
from llava_edge.export.onnx_vision import export_vision_onnx
from llava_edge.export.pipeline import calibration_pixels, parity_sequence
from llava_edge.paths import DEMO_CHECKPOINT
from llava_edge.reference.checkpoint import load_checkpoint
from llava_edge.train.shapes import build_dataset


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(DEMO_CHECKPOINT)
    cfg, model = loaded.config, loaded.model
    model.float().eval()
    export_vision_onnx(model, out / "vision.fp32.onnx")
    calib = calibration_pixels(cfg)
    sp = spm.SentencePieceProcessor(model_file=str(loaded.tokenizer_path))
    ids = parity_sequence(cfg, sp)
    with torch.no_grad():
        image = model.encode_images(torch.from_numpy(calib[:1]))[0].numpy()
    np.savez(out / "inputs.npz", calib=calib, parity_ids=np.array(ids, np.int64), parity_image=image)
    (out / "inputs.json").write_text(json.dumps({"image_token_id": cfg.image_token_index}))
    demo = DemoConfig()
    build_dataset(out / "shapes", 0, demo.n_test_images, seed=demo.seed, progress=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

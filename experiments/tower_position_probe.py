"""How well a shapes-world CLIP tower's layer -2 patch tokens say where they are (a script, not a test).

    python experiments/tower_position_probe.py --tower DIR/clip --data DIR/clip_data [--images 600]

LLaVA feeds layer -2 patch tokens to the projector; listing objects left to right needs their column.
This fits a least-squares linear readout from each patch token to its column (one-hot over the grid) on
the first 5/6 of the patches and prints the column accuracy on the rest, on object and background patches.
The images are the first ones of clip_pairs.json (the tower's own training images: this measures what the
features hold, not how the tower generalises).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llava_edge.image import load_image, preprocess  # noqa: E402
from llava_edge.train.clip_attributes import ATTRIBUTE_TEXTS, patch_labels  # noqa: E402


def patch_features(tower: Path, data: Path, n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(tower).eval()
    size, patch = model.config.image_size, model.config.patch_size
    grid = size // patch
    records = json.loads((data / "clip_pairs.json").read_text())[:n_images]
    features, columns, on_object = [], [], []
    with torch.no_grad():
        for start in range(0, len(records), 50):
            batch = records[start:start + 50]
            pixels = torch.tensor(np.stack([preprocess(load_image(data / r["image"]), size) for r in batch]))
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            features.append(hidden.reshape(-1, hidden.shape[-1]).numpy())
            for r in batch:
                on_object.append(patch_labels(r, grid).numpy() != len(ATTRIBUTE_TEXTS))
                columns.append(np.tile(np.arange(grid), grid))
    return np.concatenate(features), np.concatenate(columns), np.concatenate(on_object)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tower", required=True, help="a CLIP vision dir (transformers layout)")
    ap.add_argument("--data", required=True, help="a shapes-world dir with clip_pairs.json (object boxes)")
    ap.add_argument("--images", type=int, default=600)
    args = ap.parse_args()
    x, column, on_object = patch_features(Path(args.tower), Path(args.data), args.images)
    x = np.c_[x, np.ones(len(x))]
    split = len(x) * 5 // 6
    weights = np.linalg.lstsq(x[:split], np.eye(column.max() + 1)[column[:split]], rcond=None)[0]
    right = (x[split:] @ weights).argmax(1) == column[split:]
    held_object = on_object[split:]
    print(f"column read from layer -2: {right.mean():.3f} of held-out patches "
          f"(object {right[held_object].mean():.3f}, background {right[~held_object].mean():.3f})")


if __name__ == "__main__":
    main()

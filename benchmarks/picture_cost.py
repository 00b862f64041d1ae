"""What the pictures and curves add to an evaluation at COCO's size (issue 28), on stand-ins of that size.

    python benchmarks/picture_cost.py [--val-images 5000] [--results-per-image 100] [--log-lines 18000]

Each evaluation of a run draws the val-predictions picture (the first `eval.pictures` images, from the
evaluation's COCO results) and, in phases 2-3, the pseudo-label picture; a new best also redraws `curves.png`
from the whole `metrics.jsonl`. Measured here on COCO val's shape (5,000 images x 100 results, 640 x 480 images,
RLE masks) and a metrics log of a paper-length run (368,750 steps / log_every 20 = 18k lines), against the
evaluation itself as measured in benchmarks/RESULTS.md (COCO val on one GPU takes minutes: any figure below a
few seconds is noise beside it). Prints seconds per piece.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from gd_hf.curves import plot_curves
from gd_hf.run.eval_pictures import KeptPseudoLabels, prediction_picture, pseudo_label_picture
from gd_hf.run.metrics_log import read_metrics_log


def coco_like(val_images: int, per_image: int, height: int = 480, width: int = 640):
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(8):  # a few distinct RLEs reused (encoding 500k masks would only measure the stand-in)
        m = np.zeros((height, width), np.uint8, order="F")
        y, x = rng.integers(0, height - 100), rng.integers(0, width - 100)
        m[y : y + 100, x : x + 100] = 1
        rle = mask_utils.encode(m)
        rle["counts"] = rle["counts"].decode()
        masks.append(rle)
    results = [{"image_id": i, "category_id": 1 + int(rng.integers(80)), "score": float(rng.random()),
                "segmentation": masks[k % 8]} for i in range(1, val_images + 1) for k in range(per_image)]  # fmt: skip
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": i, "height": height, "width": width} for i in range(1, val_images + 1)],
        "annotations": [
            {
                "id": i,
                "image_id": 1 + (i % val_images),
                "category_id": 1 + i % 80,
                "iscrowd": 0,
                "segmentation": masks[i % 8],
                "area": 10000.0,
                "bbox": [0, 0, 100, 100],
            }
            for i in range(val_images * 7)
        ],  # fmt: skip
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, 81)],
    }
    ground_truth.createIndex()
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8))
    return results, ground_truth, image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val-images", type=int, default=5000)
    parser.add_argument("--results-per-image", type=int, default=100)
    parser.add_argument("--log-lines", type=int, default=18000)
    parser.add_argument("--pictures", type=int, default=6)
    args = parser.parse_args()
    results, ground_truth, image = coco_like(args.val_images, args.results_per_image)
    ids, names = list(range(1, 81)), [f"class{c}" for c in range(1, 81)]
    examples = [(i, image) for i in range(1, args.pictures + 1)]
    start = time.perf_counter()
    prediction_picture(examples, results, ground_truth, ids, names, 1000)
    predictions_s = time.perf_counter() - start

    weak = torch.randn(args.pictures, 3, 1024, 1024)
    kept = KeptPseudoLabels(1000, weak, [torch.rand(5, 256, 256) > 0.5 for _ in range(args.pictures)],
                            [torch.randint(0, 80, (5,)) for _ in range(args.pictures)],
                            [torch.rand(5) for _ in range(args.pictures)],
                            [torch.rand(7, 1024, 1024) > 0.5 for _ in range(args.pictures)],
                            [torch.randint(0, 80, (7,)) for _ in range(args.pictures)])  # fmt: skip
    start = time.perf_counter()
    pseudo_label_picture(kept, [n for n in names])
    pseudo_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "metrics.jsonl"
        with log.open("w") as f:
            for i in range(args.log_lines):
                step = (i + 1) * 20
                f.write(json.dumps({"step": step, "loss": 50 - i / 1000, "loss_sup": 25.0, "loss_unsup": 25.0,
                                    "pseudo_labels_per_image": 3.0, "pseudo_precision": 0.5, "pseudo_recall": 0.4,
                                    "lr": 1e-4, "seconds_per_step": 0.5}) + "\n")  # fmt: skip
                if step % 5000 == 0:
                    f.write(json.dumps({"step": step, "val/AP": 20 + i / 1000, "val/AP50": 40.0}) + "\n")
        start = time.perf_counter()
        records = read_metrics_log(log)
        plot_curves(records, Path(folder) / "curves.png", [(0, "guided burn-in"), (50000, "EMA distillation")])
        curves_s = time.perf_counter() - start
    print(f"val predictions picture ({args.pictures} images of {args.val_images} x {args.results_per_image} "
          f"results): {predictions_s:.2f} s")  # fmt: skip
    print(f"pseudo-label picture ({args.pictures} weak views of 1024 px): {pseudo_s:.2f} s")
    print(f"curves.png from a {args.log_lines}-line metrics log (at each new best and at the end): {curves_s:.2f} s")


if __name__ == "__main__":
    main()

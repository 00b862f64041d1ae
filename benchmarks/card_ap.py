"""Does a model card's mask AP reproduce with the card's own code? For each run folder given: the AP its card
states, the AP of the card's "with transformers' code" block (as gd_hf writes it) run on the run's val set, and, for
comparison, the AP of transformers' `post_process_instance_segmentation` (one class per query, each pixel to one
instance) at the threshold the usage snippet uses (0.5) and at 0.

    python benchmarks/card_ap.py RUN [RUN ...]     # run folders with a final/ export and a COCO-format val set

Prints one line per run; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

from gd_hf.hub.snippets import reproduce_snippet


def card_code_ap(run: Path, annotations: str, images: str, top_k: int) -> float:
    """The card's reproduction block as gd_hf writes it (`reproduce_snippet`; exports written before it have
    none), as written but for the model's and the val set's paths, in a fresh interpreter."""
    code = re.search(r"```python\n(.*?)```", reproduce_snippet(str((run / "final").resolve()), top_k), re.S).group(1)
    code = code.replace('annotations, images = "instances_val.json", "val"',
                        f'annotations, images = "{Path(annotations).resolve()}", "{Path(images).resolve()}"')  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "card.py").write_text(code)
        out = subprocess.run([sys.executable, "card.py"], cwd=tmp, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"mask AP ([0-9.]+)", out).group(1))


def transformers_ap(run: Path, annotations: str, images: str, threshold: float) -> float:
    """transformers' own instance post-processing, each segment's mask read from the segmentation map."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(annotations)
    processor = AutoImageProcessor.from_pretrained(run / "final")
    model = AutoModelForUniversalSegmentation.from_pretrained(run / "final").eval()
    category = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    results = []
    for info in coco.loadImgs(coco.getImgIds()):
        image = Image.open(f"{images}/{info['file_name']}").convert("RGB")
        with torch.no_grad():
            outputs = model(**processor(images=image, return_tensors="pt"))
        result = processor.post_process_instance_segmentation(outputs, threshold=threshold,
                                                              target_sizes=[image.size[::-1]])[0]  # fmt: skip
        segmentation = result["segmentation"].numpy()
        for segment in result["segments_info"]:
            rle = mask_utils.encode(np.asfortranarray((segmentation == segment["id"]).astype(np.uint8)))
            results.append({"image_id": info["id"], "segmentation": {**rle, "counts": rle["counts"].decode()},
                            "category_id": category[model.config.id2label[segment["label_id"]]],
                            "score": float(segment["score"])})  # fmt: skip
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(results), "segm")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    return 100 * evaluation.stats[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | family | card's AP | card's code | transformers' post-processing, threshold 0.5 / 0 |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        data = yaml.safe_load((run / "recipe.yaml").read_text())["data"]
        annotations, images = data["val_annotations"], data["val_images"]
        stated = json.loads((run / "final" / "eval_results.json").read_text())["AP"]
        family = json.loads((run / "final" / "config.json").read_text())["model_type"]
        top_k = (
            json.loads((run / "final" / "eval_results.json").read_text()).get("evaluated_with", {}).get("top_k", 100)
        )
        reproduced = card_code_ap(run, annotations, images, top_k)
        theirs = [transformers_ap(run, annotations, images, t) for t in (0.5, 0.0)]
        print(f"| {run} | {family} | {stated:.2f} | {reproduced:.2f} | {theirs[0]:.2f} / {theirs[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()

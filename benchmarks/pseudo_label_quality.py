"""How good would a teacher's pseudo labels be? Count, precision and recall per score threshold.

    python benchmarks/pseudo_label_quality.py TEACHER [--recipe recipes/demo_synthetic.yaml] [--images 64]
        [--thresholds 0.9 0.7 0.5 0.3] [key=value ...]

TEACHER is an exported model folder (phase 1's `best/`, or a student's export to see what an EMA teacher hands
out). The recipe's training images (with their labels, which the check uses as the hidden truth) go through the
weak view exactly as in distillation; the teacher's predictions are filtered with `filter_pseudo_labels` at each
threshold (the recipe's min area and mask threshold) and matched to the true objects (same class, mask IoU >=
0.5); the wrong ones are sorted into duplicates, wrong class, mislocated (IoU 0.1-0.5) and background. Use it to
see whether a teacher is worth distilling from before spending a run on it, and which threshold its confidence
supports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import Mask2FormerForUniversalSegmentation

from gd_hf.config import load_recipe
from gd_hf.data.coco import load_coco, to_hf_dataset
from gd_hf.data.loading import UnlabeledTrainDataset, collate_unlabeled
from gd_hf.modeling import size_divisibility
from gd_hf.pseudo_labels import filter_pseudo_labels, pseudo_label_quality

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo_synthetic.yaml"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    recipe = load_recipe(args.recipe, args.overrides)
    d, ssl = recipe.data, recipe.ssl
    teacher = Mask2FormerForUniversalSegmentation.from_pretrained(args.teacher).eval()
    source = load_coco(d.train_annotations, d.train_images)
    ids = sorted(source.images)[: args.images]
    dataset = UnlabeledTrainDataset(to_hf_dataset(source, ids), d)
    loader = torch.utils.data.DataLoader(
        [(row, row) for row in range(len(dataset))],
        batch_size=8,
        collate_fn=lambda keys: collate_unlabeled([dataset[k] for k in keys], size_divisibility(teacher)),
    )
    kinds = ("correct", "fp_duplicate", "fp_wrong_class", "fp_mislocated", "fp_background")
    totals = {t: dict.fromkeys(("labels", *kinds), 0) for t in args.thresholds}
    true_objects = 0
    for batch in loader:
        outputs = teacher(pixel_values=batch["weak_pixel_values"])
        true_objects += sum(len(c) for c in batch["hidden_classes"])
        for t in args.thresholds:
            pseudo = filter_pseudo_labels(
                outputs.class_queries_logits,
                outputs.masks_queries_logits,
                t,
                ssl.pseudo_label_min_area,
                ssl.pseudo_label_mask_threshold,
                ssl.pseudo_label_max_overlap,
            )
            count = sum(pseudo.counts())
            if not count:
                continue
            quality = pseudo_label_quality(pseudo, batch["hidden_masks"], batch["hidden_classes"])
            quality["correct"] = quality["precision"]
            totals[t]["labels"] += count
            for kind in kinds:  # fractions of this batch's pseudo labels -> counts
                totals[t][kind] += round(quality[kind] * count)
    n = len(dataset)
    print(f"teacher {args.teacher} on {n} training images ({true_objects / n:.2f} true objects per image)")
    print(
        "| score threshold | pseudo labels / image | precision | recall | wrong: duplicate / wrong class / mislocated / background |"
    )
    print("|---|---|---|---|---|")
    for t, v in totals.items():
        share = {kind: v[kind] / v["labels"] if v["labels"] else float("nan") for kind in kinds}
        wrong = " / ".join(f"{share[kind]:.2f}" for kind in kinds[1:])
        print(f"| {t} | {v['labels'] / n:.2f} | {share['correct']:.2f} | {v['correct'] / true_objects:.2f} | {wrong} |")


if __name__ == "__main__":
    main()

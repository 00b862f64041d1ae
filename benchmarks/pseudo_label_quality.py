"""How good would a teacher's pseudo labels be? Count, precision and recall per score threshold.

    python benchmarks/pseudo_label_quality.py TEACHER [--recipe recipes/demo_synthetic.yaml] [--images 64]
        [--thresholds 0.9 0.7 0.5 0.3] [key=value ...]

TEACHER is an exported model folder (phase 1's `best/`, or a student's export to see what an EMA teacher hands
out). The recipe's training images (with their labels, which the check uses as the hidden truth) go through the
weak view exactly as in distillation; the teacher's predictions are filtered with the recipe's `PseudoLabelRules` at each
threshold (the recipe's min area and mask threshold) and matched to the true objects (same class, mask IoU >=
0.5); the wrong ones are sorted into duplicates, wrong class, mislocated (IoU 0.1-0.5) and background. Use it to
see whether a teacher is worth distilling from before spending a run on it, and which threshold its confidence
supports. The measurement is `gd_hf.method.teacher_check.measure_teacher`, the one a training run's teacher check
(`ssl.teacher_check`) makes on val before distilling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import torch

from gd_hf.config import load_recipe
from gd_hf.data.coco import load_coco, to_hf_dataset
from gd_hf.method import PseudoLabelRules
from gd_hf.method.teacher_check import WRONG_KINDS, measure_teacher
from gd_hf.models import family_of, load_export

ROOT = Path(__file__).resolve().parents[1]


def quality_table(teacher, records: datasets.Dataset, recipe, images: int, thresholds: list[float]) -> str:
    """The table this benchmark prints; the measurement is `gd_hf.method.teacher_check.measure_teacher`, the one the
    training run's teacher check makes."""
    rules = PseudoLabelRules.from_recipe(recipe.ssl)  # the run's rules, at each threshold
    family = family_of(teacher)  # the teacher predicts as a fixed teacher does (EoMT: without masks)
    reports = measure_teacher(teacher, records, recipe.data, rules, family.padding_divisor(teacher), images,
                              tuple(thresholds), family=family)  # fmt: skip
    lines = [
        "| score threshold | pseudo labels / image | precision | recall | wrong: duplicate / wrong class / "
        "mislocated / background |",
        "|---|---|---|---|---|",
    ]
    for t in sorted(thresholds, reverse=True):
        r = reports[t]
        shares = r.figures()
        wrong = " / ".join(f"{shares[f'fp_{k}']:.2f}" for k in WRONG_KINDS)
        lines.append(f"| {t} | {r.pseudo_labels / r.images:.2f} | {r.precision:.2f} | {r.recall:.2f} | {wrong} |")
    first = next(iter(reports.values()))
    return f"{first.images} images ({first.true_objects / first.images:.2f} true objects per image)\n" + "\n".join(
        lines
    )


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
    d = recipe.data
    teacher = load_export(args.teacher).eval()
    source = load_coco(d.train_annotations, d.train_images)
    records = to_hf_dataset(source, sorted(source.images)[: args.images]).cast_column(
        "image", datasets.Image(decode=False)
    )
    print(f"teacher {args.teacher} on training images:")
    print(quality_table(teacher, records, recipe, args.images, args.thresholds))


if __name__ == "__main__":
    main()

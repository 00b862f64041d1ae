"""Mask AP of a trained model on a COCO-format set.

Usage: `python -m gd_hf.evaluate MODEL [ANNOTATIONS IMAGES] [--out results.json] [--top-k K] [--batch-size 2]`

MODEL is an exported folder (or hub id) as written by `gd_hf.train`, or a run's output folder (its `final/`
export; `--folder best` for the best one); ANNOTATIONS a COCO instances JSON and IMAGES its image folder (default,
for a run's folder or an export in one: the val set its recipe names). By
default the evaluation is the one the export's metrics were measured with (its `eval_results.json` records
`evaluated_with`: instances per image; its image processor the test-time size), so the AP in its model card
reproduces with no flags on the same images. Prints AP, AP50, AP75, APs, APm, APl and writes the predictions as
COCO-JSON results with `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoImageProcessor, PreTrainedModel

from gd_hf.config import DataConfig
from gd_hf.data.categories import Categories
from gd_hf.data.coco import CocoSource, DataError, load_coco, to_hf_dataset
from gd_hf.data.ground_truth import coco_ground_truth
from gd_hf.evaluation.mask_ap import EvalSettings, NonFinitePredictionsError, evaluate_mask_ap, write_results
from gd_hf.files import output_problem
from gd_hf.hub.run_folder import RunFolderError, chosen_export, run_val_set
from gd_hf.models import ModelFamily, family_of, input_size_problem, load_export
from gd_hf.predict import export_max_images, export_top_k


def category_ids_for_model(model: PreTrainedModel, source: CocoSource) -> list[int]:
    """COCO category id of each model class, matched by name; an error lists the names that differ."""
    by_name = dict(zip(source.category_names, source.category_ids))
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(
            f"the model's classes {missing} are not categories of {source.annotation_file} "
            f"(its categories: {source.category_names})"
        )
    return [by_name[n] for n in names]


def evaluate_model(
    model: PreTrainedModel,
    source: CocoSource,
    data: DataConfig,
    top_k: int = 100,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    family: ModelFamily | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Mask AP and COCO results of `model` on every image of `source` (the first `max_images` by id: as training's
    `eval.max_images`), predicting as its `family` does (None: the built-in family of its `model_type`)."""
    image_ids = sorted(source.images)[:max_images] if max_images else None
    # The ground truth is built from the cleaned records first, as in training: a problem shows before inference.
    ground_truth = coco_ground_truth(to_hf_dataset(source, image_ids),
                                     Categories(source.category_ids, source.category_names), checked=True)  # fmt: skip
    category_ids = category_ids_for_model(model, source)
    model.to(device)
    family = family if family is not None else family_of(model)  # predicting as at inference
    settings = EvalSettings(data, family.padding_divisor(model), top_k, batch_size, data.num_workers, family=family)
    # The driver training evaluates with: the same AP for the same model, data and settings.
    evaluation = evaluate_mask_ap(model, to_hf_dataset(source, image_ids, with_labels=False), ground_truth,
                                  category_ids, settings, device)  # fmt: skip
    return evaluation.metrics, evaluation.results


DEFAULT_TOP_K = 100  # for exports that do not record theirs (hub models not written by gd_hf)


def evaluate_export(
    model_path: str | Path,
    annotations: str | Path,
    images: str | Path,
    top_k: int | None = None,
    batch_size: int = 2,
    shortest_edge: int | None = None,
    longest_edge: int | None = None,
    num_workers: int = 2,
    max_images: int | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Mask AP of an exported model (folder or hub id) on a COCO-format set (its first `max_images` images by id;
    None: all), resized as its saved image processor says unless `shortest_edge`/`longest_edge` are given, with
    the export's recorded instances per image unless `top_k` is given."""
    if top_k is None:
        top_k = export_top_k(model_path, DEFAULT_TOP_K)
    try:
        model = load_export(str(model_path))
        size = AutoImageProcessor.from_pretrained(model_path).size
    except Exception as e:  # noqa: BLE001 - truncated weights (safetensors' own error), a broken config: one line
        raise DataError(f"cannot load the model {model_path}: {type(e).__name__}: {e}") from e
    data = DataConfig(
        eval_shortest_edge=shortest_edge or size.get("shortest_edge") or 800,
        eval_longest_edge=longest_edge or size.get("longest_edge") or 1333,
        num_workers=num_workers,
    )
    problem = input_size_problem(model, data.eval_shortest_edge, data.eval_longest_edge)
    if problem:
        raise DataError(f"{problem}; leave --shortest-edge/--longest-edge unset")
    source = load_coco(annotations, images)
    if not source.images:
        raise DataError(f"{annotations} lists no images: there is nothing to evaluate")
    if not any(not a["iscrowd"] for anns in source.annotations.values() for a in anns):
        raise DataError(
            f"{annotations} has no object with a usable mask ({source.skipped_annotations} skipped: "
            f"{source.skip_reasons}): mask AP would be undefined"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate_model(model, source, data, top_k, batch_size, device, max_images)


def _max_images(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise DataError(f"--max-images {value!r}: give a number >= 1 or `all`")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gd_hf.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="exported model folder, a run's output folder, or a hub id")
    parser.add_argument("annotations", nargs="?", help="COCO instances JSON (default: the run's val set)")
    parser.add_argument("images", nargs="?", help="its image folder (default: the run's val set)")
    parser.add_argument("--out", help="write COCO-JSON results here")
    parser.add_argument("--top-k", type=int, help="instances per image (default: the export's recorded evaluation's, "
                        f"else {DEFAULT_TOP_K})")  # fmt: skip
    parser.add_argument("--folder", default="final", help="which export of a run folder (default: final, as push)")
    parser.add_argument("--max-images", help="evaluate the first N images by id, or `all` (default: as the export's "
                        "metrics were measured, the recipe's eval.max_images; else all)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--shortest-edge", type=int, help="test-time shorter side (default: the model's image processor)"
    )
    parser.add_argument("--longest-edge", type=int, help="test-time cap on the longer side")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.out is not None and (problem := output_problem(args.out, folder=False)):
        parser.error(f"--out: {problem}")
    sizes = [size for size in (args.shortest_edge, args.longest_edge) if size is not None]
    if any(not 1 <= size <= 8192 for size in sizes) or (len(sizes) == 2 and sizes[1] < sizes[0]):
        parser.error("--shortest-edge and --longest-edge must be in [1, 8192], the longest not below the shortest")
    if (args.top_k is not None and args.top_k < 1) or args.batch_size < 1 or args.num_workers < 0:
        print("error: --top-k and --batch-size must be >= 1, --num-workers >= 0", file=sys.stderr)
        return 2
    if (args.annotations is None) != (args.images is None):
        print("error: give both ANNOTATIONS and IMAGES, or neither (a run's val set)", file=sys.stderr)
        return 2
    try:
        if args.annotations is None:
            val = run_val_set(args.model)
            args.annotations, args.images = val.annotations, val.images
            print(f"evaluating on the run's val set: {val.annotations} ({val.images})", file=sys.stderr)
        model = chosen_export(args.model, args.folder)
        max_images = export_max_images(model) if args.max_images is None else _max_images(args.max_images)
        if args.max_images is None and max_images:
            print(f"evaluating the first {max_images} images by id, as the export's metrics were measured "
                  "(eval.max_images; --max-images all for every image)", file=sys.stderr)  # fmt: skip
        metrics, results = evaluate_export(
            model,
            args.annotations,
            args.images,
            top_k=args.top_k,
            batch_size=args.batch_size,
            shortest_edge=args.shortest_edge,
            longest_edge=args.longest_edge,
            num_workers=args.num_workers,
            max_images=max_images,
        )
    except (DataError, OSError, RunFolderError, NonFinitePredictionsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_results(Path(args.out), results)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

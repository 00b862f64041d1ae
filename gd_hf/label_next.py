"""Which images to label next: the run's teacher scores every unlabeled image of the run's data and the best
ones become a labelling job.

Usage: `python -m gd_hf.label_next RUN --count N --out DIR [--strategy near_threshold] [--export final]
[--balance 1] [--duplicate-similarity 0.95] [--threshold T] [--batch-size 2] [--seed 0] [--copy-images]`

RUN is a run's output folder (or an export inside one): its `recipe.yaml` names the data and the split, its
export (`--export`, default `final/`) is the teacher. The strategies and the two terms they take are described
in `gd_hf.labelling.ranking` (and docs/labelling.md). DIR gets `label_next.json` (the ranking), `images/` (links
to the picked images, copies with `--copy-images`), `pre_annotations.json` (the teacher's predictions on them,
COCO format, for CVAT and other COCO importers), `split.json` (the run's labeled ids plus the picked ones, for
`data.split_file` once they are labelled; `python -m gd_hf.labelling.merge` puts a labelling tool's COCO export
back into the training JSON with such a split) and `label_next.png`. The pass over the pool is resumable: its signals
go to `DIR.partial/` as it goes, and the same command picks them up after a kill; DIR appears whole at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gd_hf.config import RecipeError, load_recipe
from gd_hf.data.coco import DataError
from gd_hf.data.coco_source import file_digest
from gd_hf.data.images import read_image
from gd_hf.data.prepare import prepare_data
from gd_hf.files import output_problem
from gd_hf.hub.run_folder import RunFolderError, export_folder, run_of
from gd_hf.labelling.job import PickedImage, write_job
from gd_hf.labelling.ranking import STRATEGIES, rank_images
from gd_hf.labelling.scoring import ScoringRules, score_pool, undecoded_examples
from gd_hf.models import family_of, load_export
from gd_hf.predict import dataset_category_ids, export_sizes, segment_images

logger = logging.getLogger(__name__)

ARGUMENTS_FILE = "arguments.json"


class LabelNextError(ValueError):
    """Arguments or a run that label_next cannot work from (the message says what to give instead)."""


def _threshold(run: Path, configured: Any, given: float | None) -> float:
    """The pseudo-label score threshold: given, else the recipe's, else (`auto`) the one the run chose."""
    if given is not None:
        return given
    if isinstance(configured, (int, float)):
        return float(configured)
    for state in sorted(run.glob("checkpoints/*/trainer_state.json"), reverse=True):
        chosen = json.loads(state.read_text()).get("pseudo_label_score_threshold")
        if isinstance(chosen, (int, float)):
            return float(chosen)
    raise LabelNextError(f"the run {run} chose no pseudo-label threshold (auto, none recorded): give --threshold")


def _check_arguments(count: int, strategy: str, out: Path, options: dict[str, Any]) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise LabelNextError(f"--count {count}: give how many images to label next, 1 or more")
    if strategy not in STRATEGIES:
        raise LabelNextError(f"--strategy {strategy}: one of {', '.join(STRATEGIES)}")
    bounds = {"duplicate_similarity": (0, 1), "balance": (0, 8), "pre_annotation_threshold": (0, 1),
              "threshold": (0, 1)}  # fmt: skip
    for key, (low, high) in bounds.items():
        value = options.get(key)
        if value is not None and not low <= value <= high:  # (NaN fails too)
            raise LabelNextError(f"--{key.replace('_', '-')} {value}: give a value in [{low}, {high}]")
    if not isinstance(options["batch_size"], int) or options["batch_size"] < 1:
        raise LabelNextError(f"--batch-size {options['batch_size']}: 1 or more")
    if out.exists():
        raise LabelNextError(f"{out} exists: give a new folder for the labelling job (nothing was written)")
    problem = output_problem(out.with_name(out.name + ".partial"), folder=True)
    if problem:
        raise LabelNextError(f"cannot write the job: {problem}")


def _run_and_export(run: str | Path, export: str) -> tuple[Path, Path]:
    """The run folder (its recipe names the data) and the export that scores: RUN itself when it is an export
    inside a run, else the run's `export` folder."""
    folder = run_of(str(run))
    if folder is None:
        raise LabelNextError(
            f"{run} is not a run's output folder nor an export inside one (no recipe.yaml beside checkpoints/): "
            "label_next needs the run's recipe to know its unlabeled images"
        )
    try:
        return folder, export_folder(run if Path(run).resolve() != folder.resolve() else folder, export)
    except RunFolderError as e:
        raise LabelNextError(f"{e} (--export {export})") from e


def label_next(
    run: str | Path,
    count: int,
    out: str | Path,
    strategy: str = "near_threshold",
    export: str = "final",
    balance: float = 1.0,
    duplicate_similarity: float = 0.95,
    threshold: float | None = None,
    batch_size: int = 2,
    seed: int = 0,
    copy_images: bool = False,
    pre_annotation_threshold: float = 0.5,
) -> Path:
    """Rank the unlabeled pool of `run` and write the `count` images to label next to `out` (see the module
    docstring); returns `out`. Bad arguments raise `LabelNextError` / `DataError` / `RecipeError` before anything
    is written; a pool that turns out smaller than `count` once unreadable images are skipped raises after the
    scoring, whose scores stay in `out.partial` for the next try."""
    out = Path(out)
    options = {"duplicate_similarity": duplicate_similarity, "balance": balance, "threshold": threshold,
               "pre_annotation_threshold": pre_annotation_threshold, "batch_size": batch_size}  # fmt: skip
    _check_arguments(count, strategy, out, options)
    folder, model_path = _run_and_export(run, export)
    recipe = load_recipe(folder / "recipe.yaml")
    try:
        model = load_export(str(model_path))
    except Exception as e:  # noqa: BLE001 - truncated weights (safetensors' own error), a broken config: one line
        raise LabelNextError(f"cannot load the model {model_path}: {type(e).__name__}: {e}") from e
    rules = ScoringRules(_threshold(folder, recipe.ssl.pseudo_label_score_threshold, threshold),
                         recipe.ssl.pseudo_label_min_area, recipe.ssl.pseudo_label_mask_threshold,
                         strategy == "disagreement", seed)  # fmt: skip
    from accelerate import Accelerator

    data = prepare_data(recipe, Accelerator(cpu=not torch.cuda.is_available()), check_later=True)
    data.cancel_val_check()  # (the val images play no part here)
    labeled_ids = set(data.split.labeled)
    pool = {i for i in data.split.unlabeled if i not in labeled_ids and i >= 0}
    if len(pool) < len([i for i in data.split.unlabeled if i not in labeled_ids]):
        logger.info("the images of data.unlabeled_images are not ranked: they are not in the training JSON that "
                    "data.split_file selects from (add them to it to rank them)")  # fmt: skip
    if count > len(pool):
        raise LabelNextError(f"--count {count} is more than the {len(pool)} unlabeled images of {folder}")
    partial = out.with_name(out.name + ".partial")
    arguments = {"run": folder.name, "export": model_path.name, "weights": file_digest(model_path / "model.safetensors"),
                 "labeled": hashlib.sha256(json.dumps(sorted(labeled_ids)).encode()).hexdigest(),
                 "rules": asdict(rules), "eval_size": [recipe.data.eval_shortest_edge, recipe.data.eval_longest_edge]}  # fmt: skip
    _resume_or_start(partial, arguments)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    signals, unreadable = score_pool(model, family_of(model), data.unlabeled, pool, recipe.data, partial, rules,
                                     batch_size, device)  # fmt: skip
    if count > len(signals):
        raise LabelNextError(f"--count {count} is more than the {len(signals)} readable unlabeled images "
                             f"({unreadable} could not be read); the scores stay in {partial} for a smaller --count")  # fmt: skip
    picks = rank_images(signals, strategy, count, _class_images(data.labeled), len(labeled_ids), balance,
                        duplicate_similarity, seed)  # fmt: skip
    picked = _picked_images(model, str(model_path), picks, data.unlabeled, Path(recipe.data.train_images),
                            pre_annotation_threshold, device)  # fmt: skip
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    summary = {"strategy": strategy, "count": count, "run": folder.name, "export": model_path.name,
               "pool_images": len(signals), "unreadable_images": unreadable, "labeled_images": len(labeled_ids),
               "threshold": rules.threshold, "balance": balance, "duplicate_similarity": duplicate_similarity,
               "seed": seed, "pre_annotation_threshold": pre_annotation_threshold}  # fmt: skip
    write_job(partial, picked, {s.image_id: s for s in signals}, summary, dataset_category_ids(model), names,
              sorted(labeled_ids), copy_images)  # fmt: skip
    os.replace(partial, out)
    return out


def _resume_or_start(partial: Path, arguments: dict[str, Any]) -> None:
    """A `.partial` folder of the same command is gone on from; one of other arguments is an error."""
    recorded = partial / ARGUMENTS_FILE
    if partial.exists():
        try:
            before = json.loads(recorded.read_text())
        except (OSError, ValueError):
            before = None
        if before != arguments:
            raise LabelNextError(
                f"{partial} holds the scores of another label_next (other run, export weights, labeled split, "
                f"rules or strategy signals): delete it, or run that command again. Recorded: {before}"
            )
        logger.info("going on with the scores in %s", partial)
        return
    partial.mkdir(parents=True)
    recorded.write_text(json.dumps(arguments, indent=1) + "\n")


def _class_images(labeled) -> dict[int, int]:
    """How many labeled images hold each class (non-crowd objects)."""
    counts: dict[int, int] = {}
    for objects in labeled.select_columns(["objects"]):
        classes = {c for c, crowd in zip(objects["objects"]["category"], objects["objects"]["iscrowd"]) if not crowd}
        for c in classes:
            counts[c] = counts.get(c, 0) + 1
    return counts


def _picked_images(
    model, model_path: str, picks, records, image_folder: Path, threshold: float, device
) -> list[PickedImage]:
    """The picked images as read for training (from files, or bytes of a hub or shards data set; map-style or
    streamed), with the teacher's instances on each (as `gd_hf.predict` gives them)."""
    wanted = {p.image_id for p in picks}
    found = {}
    for example in undecoded_examples(records):
        image_id = int(example["image_id"])
        if image_id in wanted and image_id not in found:
            path = example["image"].get("path")
            found[image_id] = (Image.fromarray(read_image(example).permute(1, 2, 0).numpy()), path)
            if len(found) == len(wanted):
                break
    shortest, longest = export_sizes(model_path)
    folder = image_folder.resolve()
    picked = []
    for pick in picks:
        image, path = found[pick.image_id]
        source = Path(path) if path and Path(path).is_file() else None
        if source is not None and source.resolve().is_relative_to(folder):
            data_set_file = str(source.resolve().relative_to(folder))
        else:
            data_set_file = Path(path).name if path else f"{pick.image_id}.png"
        # (down to half the pre-annotation threshold: the picture shows what the teacher half sees)
        (instances,) = segment_images(model, [image], shortest, longest, threshold / 2, device=device)
        picked.append(PickedImage(pick, image, source, data_set_file, instances.instance_masks().numpy(),
                                  [int(c) for c in instances.labels], [float(s) for s in instances.scores]))  # fmt: skip
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gd_hf.label_next", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run's output folder (or an export inside one)")
    parser.add_argument("--count", type=int, required=True, help="how many images to label next")
    parser.add_argument("--out", required=True, help="a new folder for the labelling job")
    parser.add_argument("--strategy", default="near_threshold", choices=STRATEGIES)
    parser.add_argument("--export", default="final", help="the run's export that scores the pool (final or best)")
    parser.add_argument("--balance", type=float, default=1.0, help="class-balance strength (0: off)")
    parser.add_argument("--duplicate-similarity", type=float, default=0.95,
                        help="thumbnail cosine above which an image counts as a near-duplicate of a picked one (1: off)")  # fmt: skip
    parser.add_argument("--threshold", type=float, default=None, help="pseudo-label threshold (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the random strategy's draw and the perturbed views")
    parser.add_argument("--copy-images", action="store_true", help="copy the images into OUT/images (default: links)")
    parser.add_argument("--pre-annotation-threshold", type=float, default=0.5,
                        help="the score above which the teacher's instances become pre-annotations")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        out = label_next(args.run, args.count, args.out, args.strategy, args.export, args.balance,
                         args.duplicate_similarity, args.threshold, args.batch_size, args.seed, args.copy_images,
                         args.pre_annotation_threshold)  # fmt: skip
    except (LabelNextError, DataError, RecipeError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"the {args.count} images to label next are in {out} ({out / 'label_next.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

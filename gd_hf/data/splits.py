"""Labeled / unlabeled splits of a training set: by percentage + seed, or by a split file of image ids.

Determinism: the draw sorts the image ids, permutes them with NumPy's PCG64 generator seeded by `seed` (a
bit-stable algorithm on every platform and NumPy version >= 1.17) and labels the first
`round(percent / 100 * N)` of them (at least one). As in the paper, images without annotations are then
dropped from the labeled subset; they stay in the unlabeled one.

Split file format: either JSON `{"labeled_image_ids": [1, 5, 9]}` (other keys are ignored) or plain text with
one image id per line (`#` starts a comment).

The paper's splits as files (the same ids a recipe draws from `labeled_percent` + `split_seed`):

    python -m gd_hf.data.splits data/coco/annotations/instances_train2017.json --percents 0.4 1 2 5 10 --seed 0 \
        --out data/coco/splits            # -> coco_1pct_seed0.json ...
    python -m gd_hf.data.splits data/cityscapes/annotations/instances_train.json --preset cityscapes --seed 0 \
        --out data/cityscapes/splits      # -> cityscapes_10pct_seed0.json ... (144/296/592/888 images)

Cityscapes: the reference labels fixed lists of 144 / 296 / 592 / 888 of the 2,975 train images for 5 / 10 /
20 / 30 % (not 5 % of 2,975 = 149); the preset draws lists of exactly those sizes with the seed. The
reference's own lists are not public in a form we can ship; put them in a split file to reproduce them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gd_hf.data.coco import CocoSource, DataError
from gd_hf.files import output_problem, write_text_atomic


@dataclass
class Split:
    """Image ids of the labeled and unlabeled parts of a training set (disjoint, sorted)."""

    labeled: list[int]
    unlabeled: list[int]


CITYSCAPES_COUNTS = {5.0: 144, 10.0: 296, 20.0: 592, 30.0: 888}
"""Labeled images of the reference's Cityscapes splits, by percentage."""


def draw_labeled_ids(image_ids: list[int], percent: float, seed: int, count: int | None = None) -> list[int]:
    """The labeled image ids for `percent` % of `image_ids` (or exactly `count` of them), reproducible from `seed`."""
    ids = np.array(sorted(image_ids), dtype=np.int64)
    if count is None:
        count = max(1, int(round(len(ids) * percent / 100.0)))
    count = min(count, len(ids))
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(ids))
    return sorted(int(i) for i in ids[order[:count]])


def read_split_file(path: str | Path) -> list[int]:
    """Image ids listed in a split file (JSON or one id per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"split file {path} does not exist: check data.split_file, or write the paper's splits with "
            "`python -m gd_hf.data.splits ANNOTATIONS --out FOLDER` (see its --help)"
        )
    text = path.read_text()
    if path.suffix == ".json":
        try:
            ids = json.loads(text)["labeled_image_ids"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f'{path}: expected JSON {{"labeled_image_ids": [...]}} ({e})') from e
        if not all(isinstance(i, int) for i in ids):
            raise DataError(f"{path}: labeled_image_ids must be integers")
        return sorted(set(ids))
    ids = []
    for line_number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            ids.append(int(line))
        except ValueError as e:
            raise DataError(f"{path}:{line_number}: {line!r} is not an image id") from e
    return sorted(set(ids))


def write_split_file(path: str | Path, labeled_ids: list[int], **provenance: object) -> None:
    """Write a JSON split file that `read_split_file` reads back; `provenance` (source, percent, seed) is kept
    beside the ids for people reading it."""
    record = {**provenance, "num_labeled": len(labeled_ids), "labeled_image_ids": sorted(labeled_ids)}
    write_text_atomic(path, json.dumps(record, indent=0) + "\n")  # (never half a split file)


def split_file_provenance(path: str | Path | None) -> dict[str, Any]:
    """What a JSON split file records beside its ids (`write_split_file`'s provenance), or {} (none, not JSON,
    gone)."""
    if not path or Path(path).suffix != ".json":
        return {}
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if k != "labeled_image_ids"} if isinstance(record, dict) else {}


def make_split(source: CocoSource, percent: float = 100.0, seed: int = 0, split_file: str | None = None) -> Split:
    """Split a COCO source into labeled (with annotations) and unlabeled image ids."""
    counts = [sum(1 for a in source.annotations[i] if not a["iscrowd"]) for i in source.images]
    return split_image_ids(list(source.images), counts, percent, seed, split_file, str(source.annotation_file))


def split_image_ids(
    image_ids: list[int],
    object_counts: list[int],
    percent: float = 100.0,
    seed: int = 0,
    split_file: str | None = None,
    where: str = "the training set",
) -> Split:
    """Labeled (drawn or listed, then those with objects) and unlabeled (the others) image ids."""
    known = set(image_ids)
    if len(known) != len(image_ids):
        duplicates = sorted(i for i, n in Counter(image_ids).items() if n > 1)[:10]
        raise DataError(f"{where}: image ids appear more than once: {duplicates}")
    if split_file is not None:
        chosen = read_split_file(split_file)
        unknown = [i for i in chosen if i not in known]
        if unknown:
            raise DataError(
                f"split file {split_file} names image ids not in {where}: {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''}"
            )
    else:
        chosen = draw_labeled_ids(image_ids, percent, seed)
    has_objects = {i for i, n in zip(image_ids, object_counts) if n > 0}
    labeled = [i for i in chosen if i in has_objects]
    if not labeled:
        what = f"split file {split_file}" if split_file else f"labeled_percent={percent}, split_seed={seed}"
        raise DataError(
            f"the labeled split is empty ({what} on {where}): no chosen image has an annotation. "
            "Raise data.labeled_percent or fix the split file."
        )
    labeled_set = set(labeled)
    return Split(labeled=labeled, unlabeled=sorted(i for i in image_ids if i not in labeled_set))


def write_paper_splits(
    annotation_file: str | Path, out: str | Path, percents: list[float], seed: int, preset: str | None = None
) -> list[Path]:
    """Write `{name}_{percent}pct_seed{seed}.json` per percentage (see the module doc); returns the files.

    The ids are those a recipe with `labeled_percent` + `split_seed` trains on (before images without
    annotations are dropped, which the recipe does after reading the file too)."""
    from gd_hf.data.coco import load_coco

    bad = [p for p in percents if not (isinstance(p, (int, float)) and 0 < p <= 100)]
    if bad:  # checked before anything is written
        raise DataError(f"percentages must lie in (0, 100], got {bad}")
    if seed < 0:
        raise DataError(f"the seed must be >= 0, got {seed}")
    source = load_coco(annotation_file, Path(annotation_file).parent, check_images=False)
    name = preset or Path(annotation_file).stem.removeprefix("instances_")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for percent in percents:
        count = CITYSCAPES_COUNTS.get(float(percent)) if preset == "cityscapes" else None
        if preset == "cityscapes" and count is None:
            raise DataError(f"the cityscapes preset has splits {sorted(CITYSCAPES_COUNTS)} %, not {percent} %")
        ids = draw_labeled_ids(list(source.images), percent, seed, count)
        path = out / f"{name}_{percent:g}pct_seed{seed}.json"
        write_split_file(path, ids, source=str(annotation_file), percent=percent, seed=seed)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("annotations", help="COCO instances JSON of the training set")
    parser.add_argument("--out", required=True, help="folder for the split files")
    parser.add_argument("--percents", type=float, nargs="+", help="default: 0.4 1 2 5 10 (cityscapes: 5 10 20 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=["coco", "cityscapes"], default="coco")
    args = parser.parse_args(argv)
    if problem := output_problem(args.out, folder=True):
        parser.error(f"--out: {problem}")
    percents = args.percents or ([5, 10, 20, 30] if args.preset == "cityscapes" else [0.4, 1, 2, 5, 10])
    try:
        for path in write_paper_splits(args.annotations, args.out, percents, args.seed, args.preset):
            print(path)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

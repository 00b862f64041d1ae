"""Labeled / unlabeled splits of a training set: by percentage + seed, or by a split file of image ids.

Determinism: the draw sorts the image ids, permutes them with NumPy's PCG64 generator seeded by `seed` (a
bit-stable algorithm on every platform and NumPy version >= 1.17) and labels the first
`round(percent / 100 * N)` of them (at least one). As in the paper, images without annotations are then
dropped from the labeled subset; they stay in the unlabeled one.

Split file format: either JSON `{"labeled_image_ids": [1, 5, 9]}` or plain text with one image id per line
(`#` starts a comment).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gd_hf.data.coco import CocoSource, DataError


@dataclass
class Split:
    """Image ids of the labeled and unlabeled parts of a training set (disjoint, sorted)."""

    labeled: list[int]
    unlabeled: list[int]


def draw_labeled_ids(image_ids: list[int], percent: float, seed: int) -> list[int]:
    """The labeled image ids for `percent` % of `image_ids`, reproducible from `seed`."""
    ids = np.array(sorted(image_ids), dtype=np.int64)
    count = max(1, int(round(len(ids) * percent / 100.0)))
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(ids))
    return sorted(int(i) for i in ids[order[:count]])


def read_split_file(path: str | Path) -> list[int]:
    """Image ids listed in a split file (JSON or one id per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist: check data.split_file")
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


def write_split_file(path: str | Path, labeled_ids: list[int]) -> None:
    """Write a JSON split file that `read_split_file` reads back."""
    Path(path).write_text(json.dumps({"labeled_image_ids": sorted(labeled_ids)}, indent=0) + "\n")


def make_split(source: CocoSource, percent: float = 100.0, seed: int = 0, split_file: str | None = None) -> Split:
    """Split `source` into labeled (with annotations) and unlabeled image ids."""
    if split_file is not None:
        chosen = read_split_file(split_file)
        unknown = [i for i in chosen if i not in source.images]
        if unknown:
            raise DataError(
                f"split file {split_file} names image ids not in {source.annotation_file}: {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''}"
            )
    else:
        chosen = draw_labeled_ids(list(source.images), percent, seed)
    labeled = [i for i in chosen if any(not a["iscrowd"] for a in source.annotations[i])]
    if not labeled:
        where = f"split file {split_file}" if split_file else f"labeled_percent={percent}, split_seed={seed}"
        raise DataError(
            f"the labeled split is empty ({where} on {source.annotation_file}): no chosen image has an annotation. "
            "Raise data.labeled_percent or fix the split file."
        )
    labeled_set = set(labeled)
    return Split(labeled=labeled, unlabeled=sorted(i for i in source.images if i not in labeled_set))

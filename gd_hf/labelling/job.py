"""The labelling job written out: `label_next.json` (the ranking), `images/` (the picked images), the teacher's
predictions on them as COCO pre-annotations (`pre_annotations.json`, so a labeller corrects instead of drawing),
the split file that adds them to the labeled split once labelled (`split.json`), and a picture of the first ones
with what made them uncertain (`label_next.png`)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from gd_hf.data.splits import write_split_file
from gd_hf.labelling.ranking import Pick
from gd_hf.labelling.signals import ImageSignals
from gd_hf.pictures import draw_overlay, picture_grid

JOB_FILE = "label_next.json"
PRE_ANNOTATIONS_FILE = "pre_annotations.json"
SPLIT_FILE = "split.json"
PICTURE_FILE = "label_next.png"


@dataclass
class PickedImage:
    """A picked image as the job names it: the image as training reads it, its file (None for the bytes of a hub
    or shards data set), its path in the data set, and the teacher's instances on it (masks at its size,
    classes as the model's contiguous ids)."""

    pick: Pick
    image: Image.Image
    source: Path | None  # where it is read from (not written out: a job may be published)
    data_set_file: str  # its path below the data set's image folder (or its name)
    masks: np.ndarray  # (N, H, W) bool
    classes: list[int]
    scores: list[float]  # the pre-annotations are those at or above the job's threshold; the picture shows all

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """A bool (H, W) mask as COCO's uncompressed RLE (column-major runs, zeros first): what CVAT writes for
    masks and every COCO reader (pycocotools, gd_hf, CVAT/datumaro) reads."""
    flat = np.asfortranarray(mask).flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def job_names(picked: list[PickedImage]) -> list[str]:
    """The file name of each picked image in `images/`: its own name, or, when two share one, every name prefixed
    by its image id (ids are unique and hold no "_", so the names are too)."""
    # (an image from bytes is written as the PNG of its pixels)
    names = [Path(p.data_set_file).name if p.source else Path(p.data_set_file).with_suffix(".png").name for p in picked]
    if len(set(names)) == len(names):
        return names
    return [f"{p.pick.image_id}_{n}" for n, p in zip(names, picked)]


def pre_annotations(
    picked: list[PickedImage], names: list[str], category_ids: list[int], category_names: list[str], threshold: float
) -> dict[str, Any]:
    """The teacher's instances scoring `threshold` or more on the picked images, as a COCO instances file (the
    data set's category ids)."""
    images, annotations = [], []
    for p, name in zip(picked, names):
        images.append({"id": p.pick.image_id, "file_name": name, "width": p.width, "height": p.height})
        for mask, category, score in zip(p.masks, p.classes, p.scores):
            if score < threshold or not mask.any():
                continue
            encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": p.pick.image_id,
                    "category_id": category_ids[category],
                    "segmentation": uncompressed_rle(mask),
                    "area": float(mask_utils.area(encoded)),
                    "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
                    "iscrowd": 0,
                    "score": round(float(score), 4),
                }
            )
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in zip(category_ids, category_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_job(
    folder: Path,
    picked: list[PickedImage],
    signals: dict[int, ImageSignals],
    summary: dict[str, Any],
    category_ids: list[int],
    category_names: list[str],
    labeled_ids: list[int],
    copy_images: bool = False,
) -> None:
    """Everything the job holds, into `folder` (which the caller renames into place when it is complete)."""
    names = job_names(picked)
    images = folder / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    for p, name in zip(picked, names):
        if p.source is None:  # bytes of a hub or shards data set: the image as read
            p.image.save(images / name, format="PNG")
        elif copy_images:
            shutil.copyfile(p.source, images / name)
        else:
            os.symlink(os.path.relpath(p.source.resolve(), images.resolve()), images / name)
    ranking = [
        {"rank": p.pick.rank, "image_id": p.pick.image_id, "file_name": name, "data_set_file": p.data_set_file,
         "score": round(p.pick.score, 6), "balance_factor": round(p.pick.balance_factor, 4),
         "signals": {k: v for k, v in signals[p.pick.image_id].as_dict().items() if k not in ("image_id", "thumbnail")}}
        for p, name in zip(picked, names)
    ]  # fmt: skip
    (folder / JOB_FILE).write_text(json.dumps({**summary, "images": ranking}, indent=1) + "\n")
    coco = pre_annotations(picked, names, category_ids, category_names, summary["pre_annotation_threshold"])
    (folder / PRE_ANNOTATIONS_FILE).write_text(json.dumps(coco) + "\n")
    new_ids = [p.pick.image_id for p in picked]
    write_split_file(folder / SPLIT_FILE, sorted(set(labeled_ids) | set(new_ids)), added_by="gd_hf.label_next",
                     strategy=summary.get("strategy"), added_image_ids=sorted(new_ids))  # fmt: skip
    if picked:
        draw_picture(folder / PICTURE_FILE, picked[:8], category_names, summary.get("strategy", ""))


def draw_picture(path: Path, picked: list[PickedImage], class_names: list[str], strategy: str) -> None:
    panels, titles = [], []
    for p in picked:
        labels = [class_names[c] for c in p.classes]
        panels.append(draw_overlay(p.image, p.masks, labels, p.scores))
        titles.append(f"#{p.pick.rank} id {p.pick.image_id}: score {p.pick.score:.3g}")
    rows = [panels[i : i + 4] for i in range(0, len(panels), 4)]
    title_rows = [titles[i : i + 4] for i in range(0, len(titles), 4)]
    heading = f"label next ({strategy}): the teacher's predictions on the first {len(panels)}"
    picture_grid(rows, title_rows, heading=heading).save(path)

"""The val ground truth as pycocotools holds it, built from gd_hf records (what every source opens) or from a COCO
instances JSON read as training reads it."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import datasets
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from gd_hf.data.categories import Categories
from gd_hf.data.coco import DataError, load_coco, to_hf_dataset
from gd_hf.data.masks import compressed_rle_problem, rle_from_polygons


def ground_truth_from_json(annotation_file: str | Path) -> COCO:
    """The pycocotools ground truth of a COCO instances JSON as gd_hf reads it (`load_coco`: polygons, RLE, missing
    `iscrowd`, box-only and empty objects, any ids), not as pycocotools would read the raw file."""
    source = load_coco(annotation_file, Path(annotation_file).parent, check_images=False)
    return coco_ground_truth(
        to_hf_dataset(source), Categories(source.category_ids, source.category_names), checked=True
    )


def coco_ground_truth(records: datasets.Dataset, categories: Categories, checked: bool = False) -> COCO:
    """A pycocotools ground truth built from gd_hf records (area and box computed from the masks). `checked`: the
    records' masks were checked when they were made (a COCO file's, by `load_coco`; its records cache is keyed by
    the file's content), so they are not checked again here (~2.5 s for COCO's 5,000 val images)."""
    images, annotations = [], []
    for row in records.select_columns(["image_id", "width", "height", "objects"]):
        images.append({"id": row["image_id"], "width": row["width"], "height": row["height"]})
        objects = row["objects"]
        geometry = zip(objects["category"], objects["rle_counts"], objects["iscrowd"], objects["polygons"])
        for category, counts, crowd, polygons in geometry:
            if not counts and polygons:  # (polygons kept as parsed: checked then)
                counts = rle_from_polygons(polygons, row["height"], row["width"])["counts"].decode()
            # Val is read whole here, at start: a mask that is not one (shards, hub data sets) stops the run now,
            # not at the first evaluation hours in.
            problem = None if checked else compressed_rle_problem(counts, row["height"], row["width"])
            if problem:
                raise DataError(f"val image id {row['image_id']}: an object's mask is not valid: {problem}")
            rle = {"size": [row["height"], row["width"]], "counts": counts.encode()}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": row["image_id"],
                    "category_id": categories.ids[category],
                    "segmentation": {"size": rle["size"], "counts": counts},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(crowd),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in zip(categories.ids, categories.names)],
        }
        ground_truth.createIndex()
    return ground_truth

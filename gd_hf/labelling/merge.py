"""The loop back from a labelling tool: the labelled images of a `gd_hf.label_next` job, as the tool exports them
(COCO instances, e.g. CVAT's "COCO 1.0" export of the job's images and `pre_annotations.json`), merged into the
run's training JSON, with a split file that adds exactly the images that came back.

    python -m gd_hf.labelling.merge JOB EXPORT.json --train TRAIN.json --out NEW.json [--crowd objects|keep]

NEW.json is TRAIN.json with the export's annotations of the job's images in place of any it had for them (the
labeller's word is the label; their other images, categories and annotations as they were); NEW.split.json (or
`--split-out`) is the job's labeled split plus the images the export holds, for `data.split_file`. Then train
again with `data.train_annotations=NEW.json data.split_file=NEW.split.json` (on the same `output_dir`, a
recorded change with `resume=force`).

An export image is one of the job's by its file name, folders dropped ("images/a.jpg", "images\\a.jpg" are
"a.jpg"), or that name after Label Studio's upload prefix of 8 hex digits ("cb0618f6-a.jpg": uploads are renamed
so); categories by name. Anything that does not fit stops the merge with nothing written: an image not in the
job or of another size, a category the training JSON does not have, an annotation without a mask (a box-only
export) or with a mask of another size. Job images missing from the export are reported and left out of the
split (they stay unlabeled).

`iscrowd: 1` annotations need a decision (`--crowd`): CVAT's COCO export writes every mask it holds so (a
round trip of `pre_annotations.json` through CVAT comes back all crowd), and a crowd region is never a training
target. `--crowd objects` makes them objects (as `data.crowd_masks_as_objects` does for a whole file), `--crowd
keep` keeps them as crowd regions (the labeller marked crowds); without either the merge stops and says so.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gd_hf.data.splits import read_split_file, split_file_provenance, write_split_file
from gd_hf.files import write_text_atomic
from gd_hf.labelling.job import JOB_FILE, SPLIT_FILE

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")  # Label Studio: "<8 hex digits>-<original name>"
DROPPED_KEYS = ("id", "image_id", "category_id", "score")  # rewritten, or the teacher's (a pre-annotation's score)


class MergeError(ValueError):
    """An export that cannot be merged (the message names the file, the record and what to do)."""


@dataclass
class MergeReport:
    merged_images: list[int] = field(default_factory=list)  # data-set ids of the job images the export holds
    missing_images: list[str] = field(default_factory=list)  # job file names the export does not hold
    annotations: int = 0  # written for the merged images
    replaced: int = 0  # the training JSON's annotations of those images, dropped


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MergeError(f"{what} {path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeError(f"{what} {path} is not JSON ({e})") from e
    if not isinstance(data, dict):
        raise MergeError(f"{what} {path}: expected a JSON object")
    return data


def _job_images(job: Path) -> dict[str, int]:
    """The job's image file names (in `images/`) -> data-set image ids."""
    ranking = _read_json(job / JOB_FILE, "job file")
    try:
        return {entry["file_name"]: int(entry["image_id"]) for entry in ranking["images"]}
    except (KeyError, TypeError, ValueError) as e:
        raise MergeError(f"{job / JOB_FILE} is not a gd_hf.label_next job file ({e!r})") from e


def match_job_image(file_name: str, job_names: set[str]) -> str | None:
    """The job image an export's `file_name` is: the name without its folders, or that name without Label
    Studio's upload prefix; None if neither is a job image."""
    name = re.split(r"[\\/]", file_name)[-1]
    if name in job_names:
        return name
    prefixed = UPLOAD_PREFIX.match(name)
    return prefixed.group(1) if prefixed and prefixed.group(1) in job_names else None


def _check_mask(annotation: dict[str, Any], size: tuple[int, int], where: str) -> None:
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):
        if list(segmentation.get("size", [])) != list(size) or "counts" not in segmentation:
            raise MergeError(f"{where}: its RLE mask is of size {segmentation.get('size')}, the image is "
                             f"{list(size)} (height, width): export the masks at the images' own size")  # fmt: skip
        return
    if (
        isinstance(segmentation, list)
        and segmentation
        and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation)
    ):
        return  # (the training launch checks each polygon's numbers and bounds, naming the record)
    raise MergeError(f"{where} has no mask (segmentation {str(segmentation)[:60]}): gd_hf trains masks; export "
                     "polygons or masks, not boxes only")  # fmt: skip


def merge_labels(
    job: Path, export: Path, train: dict[str, Any], train_name: str, crowd: str | None = None
) -> tuple[dict, MergeReport]:
    """TRAIN (the training JSON, as read) with EXPORT's annotations of JOB's images in place of its own for them;
    `crowd`: what `iscrowd: 1` annotations become ("objects", "keep"; None: an error if there are any). Raises
    MergeError, naming the record, on anything that does not fit; `train` is not modified."""
    if crowd not in (None, "objects", "keep"):
        raise MergeError(f"crowd={crowd!r}: give 'objects' or 'keep'")
    job_images = _job_images(job)
    data = _read_json(export, "export")
    images, annotations = data.get("images"), data.get("annotations", [])
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise MergeError(f"{export}: expected COCO instances ('images' and 'annotations' lists)")
    train_images = {int(i["id"]): i for i in train.get("images", [])}
    categories = {c["name"]: int(c["id"]) for c in train.get("categories", [])}
    export_categories = {int(c["id"]): str(c.get("name")) for c in data.get("categories", [])}
    by_export_id: dict[int, int] = {}  # export image id -> data-set image id
    for k, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int):
            raise MergeError(f"{export}: image {k} has no integer id: {str(image)[:100]}")
        name = match_job_image(str(image.get("file_name", "")), set(job_images))
        if name is None:
            raise MergeError(f"{export}: image {k} ({image.get('file_name')!r}) is not one of the job's images "
                             f"({', '.join(sorted(job_images)[:5])}, ...): export this job's images only")  # fmt: skip
        image_id = job_images[name]
        if image_id in by_export_id.values():
            raise MergeError(f"{export}: job image {name!r} is there twice (images {k} and an earlier one)")
        expected = train_images.get(image_id)
        if expected is None:
            raise MergeError(f"{train_name} has no image {image_id} ({name}): give the training JSON of the run "
                             "the job was made from")  # fmt: skip
        if (image.get("width"), image.get("height")) != (expected.get("width"), expected.get("height")):
            raise MergeError(f"{export}: image {name!r} is {image.get('width')}x{image.get('height')} there, "
                             f"{expected.get('width')}x{expected.get('height')} in {train_name}: export it at its "
                             "own size")  # fmt: skip
        by_export_id[int(image["id"])] = image_id
    merged = set(by_export_id.values())
    new_annotations = []
    next_id = max((int(a["id"]) for a in train.get("annotations", [])), default=0) + 1
    for k, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise MergeError(f"{export}: annotation {k} is not an object: {str(annotation)[:100]}")
        where = f"{export}: annotation {k} (id {annotation.get('id')})"
        image_id = by_export_id.get(annotation.get("image_id"))
        if image_id is None:
            raise MergeError(f"{where} is of image id {annotation.get('image_id')}, which the export does not list")
        category = export_categories.get(annotation.get("category_id"))
        if category not in categories:
            raise MergeError(f"{where} is of category {category!r} (id {annotation.get('category_id')}), which "
                             f"{train_name} does not have ({', '.join(categories)}): rename it there or in the "
                             "tool")  # fmt: skip
        image = train_images[image_id]
        _check_mask(annotation, (image["height"], image["width"]), where)
        kept = {key: value for key, value in annotation.items() if key not in DROPPED_KEYS}
        if annotation.get("iscrowd", 0) not in (0, False):
            if crowd is None:
                crowds = sum(1 for a in annotations if a.get("iscrowd", 0) not in (0, False))
                raise MergeError(f"{export} has {crowds} iscrowd: 1 annotations (the first: annotation {k}): CVAT "
                                 "exports every mask so. Give --crowd objects to train on them as objects, or "
                                 "--crowd keep if they are crowd regions")  # fmt: skip
            kept["iscrowd"] = 0 if crowd == "objects" else 1
        new_annotations.append({"id": next_id, "image_id": image_id, "category_id": categories[category], **kept})
        next_id += 1
    kept_annotations = [a for a in train.get("annotations", []) if int(a["image_id"]) not in merged]
    report = MergeReport(
        merged_images=sorted(merged),
        missing_images=sorted(name for name, i in job_images.items() if i not in merged),
        annotations=len(new_annotations),
        replaced=len(train.get("annotations", [])) - len(kept_annotations),
    )
    return {**train, "annotations": kept_annotations + new_annotations}, report


def merge_job(
    job: Path, export: Path, train_json: Path, out: Path, split_out: Path | None = None, crowd: str | None = None
) -> MergeReport:
    """`merge_labels` from and to files: NEW (`out`) and its split file (`split_out`, default NEW.split.json),
    both written only when the whole merge fits, and neither over an existing file."""
    split_out = split_out or out.with_suffix(".split.json")
    for path in (out, split_out):
        if path.exists():
            raise MergeError(f"{path} exists: give a new name (the merge never overwrites a file)")
    if out.resolve() == train_json.resolve():
        raise MergeError("--out is the training JSON: write the merge to a new file")
    job_split = job / SPLIT_FILE
    provenance = split_file_provenance(job_split)
    try:
        labeled = set(read_split_file(job_split)) - set(provenance.get("added_image_ids", []))
    except ValueError as e:
        raise MergeError(str(e)) from e
    merged, report = merge_labels(job, export, _read_json(train_json, "training JSON"), train_json.name, crowd)
    write_text_atomic(out, json.dumps(merged) + "\n")
    write_split_file(split_out, sorted(labeled | set(report.merged_images)), added_by="gd_hf.label_next",
                     strategy=provenance.get("strategy"), added_image_ids=report.merged_images)  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="the gd_hf.label_next job folder")
    parser.add_argument("export", type=Path, help="the labelling tool's COCO export of the job's images")
    parser.add_argument("--train", type=Path, required=True, help="the run's training JSON (data.train_annotations)")
    parser.add_argument("--out", type=Path, required=True, help="the merged training JSON to write (a new file)")
    parser.add_argument("--split-out", type=Path, default=None, help="the split file to write (NEW.split.json)")
    parser.add_argument("--crowd", choices=("objects", "keep"), default=None,
                        help="iscrowd: 1 annotations become objects (CVAT's masks) or stay crowd regions")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        report = merge_job(args.job, args.export, args.train, args.out, args.split_out, args.crowd)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = args.split_out or args.out.with_suffix(".split.json")
    print(f"merged {len(report.merged_images)} images ({report.annotations} annotations, in place of "
          f"{report.replaced}) into {args.out}; split file {split}")  # fmt: skip
    if report.missing_images:
        print(f"not in the export, so left unlabeled: {', '.join(report.missing_images)}")
    print(f"train again with: data.train_annotations={args.out} data.split_file={split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

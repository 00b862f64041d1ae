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
job or of another size, a category the training JSON lacks or has twice, an annotation whose mask the training
reader would skip (a box alone, a mask of another size or off the image, an empty one: an object left unlabeled
in a labeled image), an output file that exists. Job images missing from the export are reported and left out
of the split (they stay unlabeled).

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

from gd_hf.data.coco import DataError, crowd_flag, integer_id  # (the reader's own rules)
from gd_hf.data.masks import convert_segmentations
from gd_hf.data.splits import read_split_file, split_file_provenance, write_split_file
from gd_hf.files import output_problem, write_text_atomic
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
    except OSError as e:
        raise MergeError(f"{what} {path} cannot be read ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeError(f"{what} {path} is not JSON ({e})") from e
    if not isinstance(data, dict):
        raise MergeError(f"{what} {path}: expected a JSON object")
    return data


def _records(data: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    """`data[key]` as a list of JSON objects, else a MergeError naming the first record that is not one."""
    records = data.get(key, [])
    if not isinstance(records, list):
        raise MergeError(f"{path}: `{key}` is a {type(records).__name__}, not a list: is it a COCO instances file?")
    for k, record in enumerate(records):
        if not isinstance(record, dict):
            raise MergeError(f"{path}: `{key}`[{k}] is not an object: {str(record)[:100]}")
    return records


def _job_images(job: Path) -> dict[str, int]:
    """The job's image file names (in `images/`) -> data-set image ids."""
    if not (job / JOB_FILE).is_file():
        raise MergeError(f"{job} is not a gd_hf.label_next job folder (it has no {JOB_FILE})")
    images = {}
    for k, entry in enumerate(_records(_read_json(job / JOB_FILE, "job file"), "images", job / JOB_FILE)):
        if integer_id(entry.get("image_id")) is None or not isinstance(entry.get("file_name"), str):
            raise MergeError(f"{job / JOB_FILE}: image {k} has no integer image_id and file_name: {str(entry)[:100]}")
        images[entry["file_name"]] = integer_id(entry["image_id"])
    return images


def match_job_image(file_name: str, job_names: set[str]) -> str | None:
    """The job image an export's `file_name` is: the name without its folders, or that name without Label
    Studio's upload prefix; None if neither is a job image."""
    name = re.split(r"[\\/]", file_name)[-1]
    if name in job_names:
        return name
    prefixed = UPLOAD_PREFIX.match(name)
    return prefixed.group(1) if prefixed and prefixed.group(1) in job_names else None


def _crowd(annotation: dict[str, Any], crowd: str | None, where: str, k: int, export: Path, count: int) -> int:
    """The annotation's iscrowd as the training reader reads it (absent or null: 0), after `--crowd`."""
    try:
        value = crowd_flag(annotation, where)
    except DataError as e:
        raise MergeError(str(e)) from e
    if value and crowd is None:
        raise MergeError(f"{export} has {count} iscrowd: 1 annotations (the first: annotation {k}): CVAT "
                         "exports every mask so. Give --crowd objects to train on them as objects, or --crowd keep "
                         "if they are crowd regions")  # fmt: skip
    return 0 if crowd == "objects" else value


def _categories(
    train: dict[str, Any], train_name: str, export: dict[str, Any], export_path: Path
) -> dict[int, tuple[str, list[int]]]:
    """Export category id -> its name and the training JSON's ids of that name (none or two are errors where an
    annotation uses it: unknown, or it could mean either; an id the export has twice is an error at once)."""
    by_name: dict[str, list[int]] = {}
    for c in _records(train, "categories", Path(train_name)):
        by_name.setdefault(str(c.get("name", c.get("id"))), []).append(integer_id(c.get("id")))
    mapping: dict[int, tuple[str, list[int]]] = {}
    for k, c in enumerate(_records(export, "categories", export_path)):
        export_id, name = integer_id(c.get("id")), str(c.get("name"))
        if export_id is None:
            raise MergeError(f"{export_path}: `categories`[{k}] has no integer id: {str(c)[:100]}")
        if export_id in mapping:
            raise MergeError(f"{export_path}: category id {export_id} is there twice: it could mean either")
        mapping[export_id] = (name, by_name.get(name, []))
    return mapping


def merge_labels(
    job_images: dict[str, int], export: Path, train: dict[str, Any], train_name: str, crowd: str | None = None
) -> tuple[dict, MergeReport]:
    """TRAIN (the training JSON, as read) with EXPORT's annotations of the job's images (`job_images`: file name
    in the job -> data-set id) in place of its own for them;
    `crowd`: what `iscrowd: 1` annotations become ("objects", "keep"; None: an error if there are any). Every
    mask is checked by the training reader's own rules. Raises MergeError, naming the record, on anything that
    does not fit; `train` is not modified."""
    if crowd not in (None, "objects", "keep"):
        raise MergeError(f"crowd={crowd!r}: give 'objects' or 'keep'")
    data = _read_json(export, "export")
    images, annotations = _records(data, "images", export), _records(data, "annotations", export)
    train_images = {integer_id(i.get("id")): i for i in _records(train, "images", Path(train_name))}
    categories = _categories(train, train_name, data, export)
    by_export_id: dict[int, int] = {}  # export image id -> data-set image id
    for k, image in enumerate(images):
        if integer_id(image.get("id")) is None:
            raise MergeError(f"{export}: image {k} has no integer id: {str(image)[:100]}")
        name = match_job_image(str(image.get("file_name", "")), set(job_images))
        if name is None:
            raise MergeError(f"{export}: image {k} ({image.get('file_name')!r}) is not one of the job's images "
                             f"({', '.join(sorted(job_images)[:5])}, ...): export this job's images only")  # fmt: skip
        image_id = job_images[name]
        if image_id in by_export_id.values():
            raise MergeError(f"{export}: job image {name!r} is there twice (image {k} and an earlier one)")
        if integer_id(image["id"]) in by_export_id:
            raise MergeError(f"{export}: image id {image['id']} is there twice (image {k}): its annotations could be "
                             "either's")  # fmt: skip
        expected = train_images.get(image_id)
        if expected is None:
            raise MergeError(f"{train_name} has no image {image_id} ({name}): give the training JSON of the run "
                             "the job was made from")  # fmt: skip
        if (integer_id(image.get("width")), integer_id(image.get("height"))) != (
            expected.get("width"),
            expected.get("height"),
        ):
            raise MergeError(f"{export}: image {name!r} is {image.get('width')}x{image.get('height')} there, "
                             f"{expected.get('width')}x{expected.get('height')} in {train_name}: export it at its "
                             "own size")  # fmt: skip
        by_export_id[integer_id(image["id"])] = image_id
    merged = set(by_export_id.values())
    crowds = sum(1 for a in annotations if a.get("iscrowd") not in (0, None, False))
    train_annotations = _records(train, "annotations", Path(train_name))
    next_id = max((i for i in (integer_id(a.get("id")) for a in train_annotations) if i is not None), default=0) + 1
    new_annotations, where_of = [], []
    for k, annotation in enumerate(annotations):
        where = f"{export}: annotation {k} (id {annotation.get('id')})"
        image_id = by_export_id.get(integer_id(annotation.get("image_id")))
        if image_id is None:
            raise MergeError(f"{where} is of image id {annotation.get('image_id')}, which the export does not list")
        name, category_ids = categories.get(integer_id(annotation.get("category_id")), (None, []))
        if len(category_ids) != 1:
            why = "is not in the export's categories" if name is None else (
                f"is named {name!r}, which {train_name} does not have" if not category_ids
                else f"is named {name!r}, which {train_name} has {len(category_ids)} times")  # fmt: skip
            raise MergeError(f"{where}: its category (id {annotation.get('category_id')}) {why}: rename it there or "
                             "in the tool")  # fmt: skip
        (category,) = category_ids
        kept = {key: value for key, value in annotation.items() if key not in DROPPED_KEYS}
        kept["iscrowd"] = _crowd(annotation, crowd, where, k, export, crowds)
        new_annotations.append({"id": next_id, "image_id": image_id, "category_id": category, **kept})
        where_of.append(where)
        next_id += 1
    # every mask by the training reader's rules: one it would skip (an RLE of another size, a polygon off the image,
    # an empty mask, a box alone) leaves an object unlabeled in a labeled image
    sizes = [(train_images[a["image_id"]]["height"], train_images[a["image_id"]]["width"]) for a in new_annotations]
    converted = convert_segmentations([(a.get("segmentation"), h, w) for a, (h, w) in zip(new_annotations, sizes)])
    for where, result in zip(where_of, converted):
        if isinstance(result, ValueError):
            raise MergeError(f"{where}: {result}: fix it in the tool (gd_hf trains masks: not boxes only)")
    kept_annotations = [a for a in train_annotations if integer_id(a.get("image_id")) not in merged]
    report = MergeReport(
        merged_images=sorted(merged),
        missing_images=sorted(name for name, i in job_images.items() if i not in merged),
        annotations=len(new_annotations),
        replaced=len(train_annotations) - len(kept_annotations),
    )
    return {**train, "annotations": kept_annotations + new_annotations}, report


def merge_job(
    job: Path, export: Path, train_json: Path, out: Path, split_out: Path | None = None, crowd: str | None = None
) -> MergeReport:
    """`merge_labels` from and to files: NEW (`out`) and its split file (`split_out`, default NEW.split.json),
    both written only when the whole merge fits, and neither over an existing file."""
    split_out = split_out or out.with_suffix(".split.json")
    if out.resolve() == split_out.resolve():
        raise MergeError(f"--out and --split-out are both {out}: give two files")
    for path in (out, split_out):
        if path.exists():  # (the training JSON among them)
            raise MergeError(f"{path} exists: give a new name (the merge never overwrites a file)")
        problem = output_problem(path, folder=False)
        if problem:
            raise MergeError(problem)
    job_images = _job_images(job)  # (a job folder, before its split file is read)
    job_split = job / SPLIT_FILE
    provenance = split_file_provenance(job_split)
    added = provenance.get("added_image_ids", [])
    if not isinstance(added, list) or not all(integer_id(i) is not None for i in added):
        raise MergeError(f"{job_split}: added_image_ids is not a list of image ids")
    try:
        labeled = set(read_split_file(job_split)) - set(added)
    except (ValueError, TypeError) as e:
        raise MergeError(f"{job_split}: {e}") from e
    merged, report = merge_labels(job_images, export, _read_json(train_json, "training JSON"), train_json.name, crowd)
    for path in (out, split_out):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(merged) + "\n")
    try:
        write_split_file(split_out, sorted(labeled | set(report.merged_images)), added_by="gd_hf.label_next",
                         strategy=provenance.get("strategy"), added_image_ids=report.merged_images)  # fmt: skip
    except OSError:
        out.unlink()  # the pair or nothing
        raise
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

"""The `coco` source: a COCO folder (image folder + instances JSON), parsed and validated by `load_coco` once, in
a child process, into a memory-mapped records cache (`data.records_cache`) that relaunches and the other
processes of a launch read; `open_coco` opens the train and val folders."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import datasets
import psutil

from gd_hf.config import DataConfig
from gd_hf.data.categories import Categories, drop_categories, object_statistics
from gd_hf.data.coco import PATH_FEATURES, DataError, load_coco, to_hf_dataset
from gd_hf.data.ground_truth import coco_ground_truth
from gd_hf.data.records import TrainVal
from gd_hf.files import replace_durably

logger = logging.getLogger(__name__)


RECORDS_CACHE_VERSION = 3  # bump when the records' schema or the parsing rules change (2: RLE and fields checked,
# 3: a training file's polygons kept as parsed)
RECORDS_INFO_FILE = "gd_hf_records.json"


def records_cache_root(setting: str | None) -> Path | None:
    """The folder of `data.records_cache` (`auto`: under the `datasets` cache), or None for no cache."""
    if setting is None:
        return None
    return Path(datasets.config.HF_DATASETS_CACHE) / "gd_hf_records" if setting == "auto" else Path(setting)


class CocoFile(NamedTuple):
    """A COCO instances file as gd_hf reads it (see `load_coco` for the flags)."""

    annotation_file: Path
    image_dir: Path
    crowd_as_objects: bool = False
    rasterise_polygons: bool = True


def coco_records(
    annotation_file: str | Path,
    image_dir: str | Path,
    cache_root: Path | None,
    crowd_as_objects: bool = False,
    rasterise_polygons: bool = True,
) -> tuple[datasets.Dataset, Categories]:
    """The gd_hf records of a COCO folder, and its categories: parsed and validated once (`load_coco`), then
    read from a memory-mapped `datasets` folder under `cache_root` (see `DataConfig.records_cache`; built by
    `build_missing_caches`).
    """
    file = CocoFile(Path(annotation_file), Path(image_dir), crowd_as_objects, rasterise_polygons)
    if cache_root is None:
        source = load_coco(*file[:2], crowd_as_objects=crowd_as_objects, rasterise_polygons=rasterise_polygons)
        return to_hf_dataset(source), Categories(source.category_ids, source.category_names)
    folder = records_cache_folder(file, cache_root)
    if (folder / RECORDS_INFO_FILE).is_file():
        logger.info("%s: records read from the cache %s", annotation_file, folder)
    else:
        build_missing_caches([file], cache_root)
    info = json.loads((folder / RECORDS_INFO_FILE).read_text())
    if info["skipped_annotations"]:  # said at every launch, also when read from the cache
        logger.warning(
            "%s: skipped %d annotations without usable segmentation: %s",
            annotation_file,
            info["skipped_annotations"],
            info["skip_reasons"],
        )
    try:
        categories = Categories(info["category_ids"], info["category_names"])
    except DataError as e:  # a cache written before the COCO reader checked its categories
        raise DataError(f"{annotation_file} (records cache {folder}): {e}") from e
    records = datasets.load_from_disk(str(folder)).cast_column("image", datasets.Image())  # paths -> images
    return records, categories


def build_missing_caches(files: list[CocoFile], cache_root: Path) -> None:
    """Parse the files whose records are not cached yet into their caches (`build_records_cache`), each in a
    child process, all at once (a first launch parses train and val side by side).

    The cache key is the JSON's content (SHA-256), the image folder and the flags: an edited JSON is parsed
    again. A child parses, so the parsed JSON (GBs for COCO's train2017, which Python would keep in this
    process's heap) goes with it; the folder is written under a temporary name and renamed into place, so a
    reader sees all of it or none. In a multi-process launch the main process of each machine builds them first
    (`prepare_data`), the others read them.
    """
    missing = {}
    for file in files:
        folder = records_cache_folder(file, cache_root)
        if not (folder / RECORDS_INFO_FILE).is_file():
            missing[folder] = file
    if not missing:
        return
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot write the records cache {cache_root} ({e}): set data.records_cache to a writable folder, "
            "or to null to parse the JSON at every launch"
        ) from e
    for folder, file in missing.items():
        logger.info("%s: parsing (once; the records are cached in %s)", file.annotation_file, folder)
        remove_abandoned_builds(folder)
    # One child process per file, all at once: `python -m gd_hf.data.coco_source` imports the data modules only
    # (a multiprocessing child would import the launch's main module, torch and all: ~5 s each), and a child
    # that dies (killed for memory) is its own file's error while the other file's build finishes.
    children = []
    for folder, file in missing.items():
        log = tempfile.TemporaryFile("w+")  # (not a pipe: a full pipe would block a child nobody reads yet)
        children.append((file, subprocess.Popen(build_command(file, folder), stdout=log, stderr=log), log))
    try:
        failures = []
        for file, child, log in children:
            child.wait()
            log.seek(0)
            lines = [line for line in log.read().splitlines() if line.strip()]
            if child.returncode == 2 and lines and lines[-1].startswith("error: "):
                failures.append(DataError(lines[-1].removeprefix("error: ")))
            elif child.returncode != 0:
                failures.append(DataError(
                    f"{file.annotation_file}: the process parsing it died (exit code {child.returncode}), most likely "
                    "killed for memory. Look for absurd records (huge sizes or coordinates), or free memory and "
                    f"launch again. Its last output: {lines[-3:]}"
                ))  # fmt: skip
        if failures:  # the first file's first
            raise failures[0]
    finally:
        for _, child, log in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            log.close()


def build_command(file: CocoFile, folder: Path) -> list[str]:
    """The command of the child that builds `folder` from `file` (`main` below)."""
    spec = {"file": [str(file.annotation_file), str(file.image_dir), *file[2:]], "folder": str(folder)}
    return [sys.executable, "-m", "gd_hf.data.coco_source", json.dumps(spec)]


def main(argv: list[str]) -> int:
    """`python -m gd_hf.data.coco_source SPEC`: build one records cache (see `build_command`); exit code 2 with
    an `error: ` line for bad data."""
    spec = json.loads(argv[0])
    annotation_file, image_dir, crowd_as_objects, rasterise_polygons = spec["file"]
    file = CocoFile(Path(annotation_file), Path(image_dir), crowd_as_objects, rasterise_polygons)
    try:
        build_records_cache(file, Path(spec["folder"]))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, read again whenever the file may have changed: its size, times or inode (the
    status-change time moves on any write, even one whose modification time is put back), else remembered within
    the launch (the records cache's key and the run's data fingerprint read the same ~0.3 s per 400 MB)."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def records_cache_folder(file: CocoFile, cache_root: Path) -> Path:
    """The cache folder of an instances JSON: a new one whenever the file's content changes (its SHA-256, ~0.3 s
    per 400 MB here: an edit that keeps the file's size and modification time is still seen), or the image
    folder, or the flags."""
    if not file.annotation_file.is_file():
        raise DataError(
            f"annotation file {file.annotation_file} does not exist: check data.*_annotations in the recipe"
        )
    key = json.dumps(
        [RECORDS_CACHE_VERSION, file_digest(file.annotation_file), str(file.image_dir.resolve())]
        + (["crowd_as_objects"] if file.crowd_as_objects else [])
        + ([] if file.rasterise_polygons else ["polygons_as_parsed"])
    )
    return cache_root / f"{file.annotation_file.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def remove_abandoned_builds(folder: Path) -> None:
    """Delete the half-written builds of `folder` whose process is gone (a child killed mid-write, e.g. by the
    OOM killer: its `.NAME.tmpPID` folder holds GBs); a build whose process still runs is left to finish."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            logger.info("removing %s, left by a records build that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def build_records_cache(file: CocoFile, folder: Path) -> None:
    """Parse and validate an instances JSON (`load_coco`) and save its records to `folder` (atomically)."""
    logging.getLogger("gd_hf").setLevel(logging.ERROR)  # the parent says what was skipped, from the info file
    # Absolute image paths: the cache is found by resolved paths, so a launch from another working directory
    # (or naming the folder another way) reads it too.
    source = load_coco(file.annotation_file, file.image_dir.resolve(), crowd_as_objects=file.crowd_as_objects,
                       rasterise_polygons=file.rasterise_polygons)  # fmt: skip
    # Image paths as strings: save_to_disk would copy the files of an Image column into the folder.
    records = to_hf_dataset(source, features=PATH_FEATURES)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    records.save_to_disk(str(tmp))
    info = {
        "annotation_file": str(file.annotation_file),
        "category_ids": source.category_ids,
        "category_names": source.category_names,
        "skipped_annotations": source.skipped_annotations,
        "skip_reasons": source.skip_reasons,
    }
    (tmp / RECORDS_INFO_FILE).write_text(json.dumps(info, indent=1))
    try:
        replace_durably(tmp, folder)
    except OSError:  # another launch wrote the same cache meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def coco_files(d: DataConfig) -> tuple[CocoFile, CocoFile]:
    """The recipe's train and val COCO files. The training file's polygons are rasterised when a record is read (a
    1 % split reads 1 % of them); val's when parsed, for its pycocotools ground truth."""
    crowd = d.crowd_masks_as_objects
    return (
        CocoFile(Path(d.train_annotations), Path(d.train_images), crowd, rasterise_polygons=False),
        CocoFile(Path(d.val_annotations), Path(d.val_images), crowd),
    )


def open_coco(d: DataConfig) -> TrainVal:
    cache_root = records_cache_root(d.records_cache)
    train_file, val_file = coco_files(d)
    if cache_root is not None:
        build_missing_caches([train_file, val_file], cache_root)
    train, categories = coco_records(*train_file[:2], cache_root, *train_file[2:])
    val, val_categories = coco_records(*val_file[:2], cache_root, *val_file[2:])
    if categories != val_categories:
        raise DataError(
            f"{d.train_annotations} and {d.val_annotations} list different categories: "
            f"{list(zip(categories.ids, categories.names))} vs {list(zip(val_categories.ids, val_categories.names))}"
        )
    per_category, crowd_objects = object_statistics(train, len(categories.ids))
    if crowd_objects > per_category.sum():
        described = "all" if not per_category.any() else f"{crowd_objects} of {crowd_objects + per_category.sum()}"
        logger.warning(
            "%s: %s objects are crowd regions (iscrowd: 1), which are never training targets. Labeling tools such "
            "as CVAT export every mask instance so: set data.crowd_masks_as_objects: true to train on them.",
            d.train_annotations,
            f"all {crowd_objects}" if described == "all" else described,
        )
    empty = [i for i in range(len(categories.ids)) if per_category[i] == 0]
    if empty and per_category.any():
        described = [f"{categories.names[i]} (id {categories.ids[i]})" for i in empty]
        if d.drop_empty_categories:
            logger.warning(
                "%s: dropping %d categories no training annotation uses: %s", d.train_annotations, len(empty), described
            )
            train, val, categories = drop_categories(train, val, categories, set(empty), str(d.val_annotations))
        else:
            logger.warning(
                "%s: %d categories have no training annotation: %s. They stay in the class list (the model can "
                "never learn them); data.drop_empty_categories: true drops them.",
                d.train_annotations,
                len(empty),
                described,
            )
    return TrainVal(
        train=train,
        val=val,
        categories=categories,
        # From the cleaned records, not the raw JSON: what training accepts (a missing `iscrowd`, a box-only
        # `segmentation: []`, annotation id 0) evaluation accepts too, and any problem shows now, before step 1,
        # not at the first evaluation hours into a run.
        val_ground_truth=coco_ground_truth(val, categories, checked=True),  # (load_coco checked each mask)
        description=str(d.train_annotations),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A launch's data, opened and split once: the labeled and unlabeled training records, val and its ground truth.

Every check happens here, before anything is written to the run's output folder.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from accelerate import Accelerator
from accelerate.utils import gather_object
from pycocotools.coco import COCO

from gd_hf.config import DataConfig, Recipe
from gd_hf.data.categories import Categories
from gd_hf.data.coco import DataError
from gd_hf.data.coco_source import coco_files, records_cache_folder, records_cache_root
from gd_hf.data.fingerprint import data_fingerprint
from gd_hf.data.images import check_images, image_files_key
from gd_hf.data.masks import compressed_rle_problem, polygons_problem
from gd_hf.data.records import Records, image_folder_records, image_ids_and_object_counts, select_ids
from gd_hf.data.sources import open_source
from gd_hf.data.splits import Split, split_file_provenance, split_image_ids
from gd_hf.data.synthetic import generate as generate_synthetic
from gd_hf.files import write_text_atomic

logger = logging.getLogger("gd_hf.train")


@dataclass
class RunData:
    """Everything the loop needs to know about the data, validated before any output is written."""

    labeled: Records  # gd_hf records of the labeled images (map-style, or a stream with data.streaming)
    unlabeled: Records  # of the unlabeled split (all train images by default, as the paper)
    val: datasets.Dataset
    val_ground_truth: COCO
    categories: Categories
    split: Split
    fingerprint: dict[str, str] = field(default_factory=dict)  # of the files read (`data_fingerprint`)
    pending_val_check: ValCheck | None = None  # `prepare_data(check_later=True)`'s

    def finish_val_check(self) -> None:
        """Wait for the check of the val images that `prepare_data(check_later=True)` began (its `DataError` if an
        image is bad); then nothing."""
        check, self.pending_val_check = self.pending_val_check, None
        if check is not None:
            check.finish()

    def cancel_val_check(self) -> None:
        """A launch that stops before it waited for the check: the images not read yet are not read (the process
        would otherwise wait for all of them on its way out)."""
        check, self.pending_val_check = self.pending_val_check, None
        if check is not None:
            check.stop.set()


@dataclass
class ValCheck:
    """The check of the val images under way (`start_val_check`): `finish` waits for its verdict, `stop` cuts it
    short."""

    finish: Callable[[], None]
    stop: threading.Event


def prepare_data(recipe: Recipe, accelerator: Accelerator, check_later: bool = False) -> RunData:
    """Generate the synthetic set if asked and absent, open the source, split labeled/unlabeled (see
    gd_hf.data.sources). `check_later`: the val images are read in the background (while the model is built) and
    `RunData.finish_val_check` waits for the verdict; else before this returns."""
    d = recipe.data
    if d.generate_synthetic and Path(d.train_annotations).is_file():
        images = json.loads(Path(d.train_annotations).read_text())["images"]
        found, varied = len(images), len({(i["width"], i["height"]) for i in images}) > 1
        if found != d.synthetic_train_images or (varied != d.synthetic_varied_sizes and found > 1):
            raise DataError(
                f"{d.train_annotations} holds a synthetic set of {found} training images "
                f"({'mixed sizes' if varied else 'squares'}) but the recipe asks for {d.synthetic_train_images} "
                f"({'mixed sizes' if d.synthetic_varied_sizes else 'squares'}): delete "
                f"{Path(d.train_annotations).parent.parent} to generate it anew, or point data.train_* / data.val_* "
                "elsewhere"
            )
    if d.generate_synthetic and not Path(d.train_annotations).exists():
        root = Path(d.train_annotations).parent.parent  # <root>/annotations/instances_train.json
        with accelerator.main_process_first():
            if accelerator.is_main_process and not root.exists():
                logger.info("generating the synthetic data set in %s", root)
                generate_synthetic(
                    root,
                    d.synthetic_train_images,
                    d.synthetic_val_images,
                    d.synthetic_image_size,
                    recipe.seed,
                    d.synthetic_varied_sizes,
                )
    # COCO: the main process of each machine parses and caches the records first (data.records_cache), the others
    # read its cache. Other sources wait on `datasets`' own file locks, with no collective timeout.
    first = d.source == "coco" and d.records_cache is not None
    with accelerator.local_main_process_first() if first else contextlib.nullcontext():
        opened = open_source(d)
    if len(opened.val) == 0 or not opened.val_ground_truth.getAnnIds(iscrowd=False):
        raise DataError(
            f"the val split has {len(opened.val)} images and no object to detect: mask AP would be undefined "
            "(reported as 0 or -1). Point the recipe's val keys (data.val_*, data.hub_val_split) at a labeled set"
        )
    val_check = start_val_check(d, opened.val, accelerator)
    if not check_later:
        val_check.finish()
        val_check = None
    ids, object_counts = image_ids_and_object_counts(opened.train)
    split = split_image_ids(ids, object_counts, d.labeled_percent, d.split_seed, d.split_file, opened.description)
    picked = split_file_provenance(d.split_file).get("added_image_ids")
    unlabelled = sorted(set(picked) - set(split.labeled)) if isinstance(picked, list) else []
    if unlabelled:  # (an image without objects stays unlabeled, as any: said, since someone meant to label it)
        logger.warning("%d of the images gd_hf.label_next picked (%s) have no object in %s: they stay unlabeled "
                       "until their labels are in it", len(unlabelled), unlabelled[:10], opened.description)  # fmt: skip
    row_ids = ids if isinstance(opened.train, datasets.Dataset) else None
    labeled = select_ids(opened.train, split.labeled, row_ids)
    if isinstance(labeled, datasets.Dataset) and d.source != "coco":  # (a COCO file's masks were checked when parsed)
        labeled = drop_records_with_bad_masks(labeled, d.on_error)
    unlabeled = (
        opened.train if recipe.ssl.unlabeled_includes_labeled else select_ids(opened.train, split.unlabeled, row_ids)
    )
    if d.unlabeled_images:
        folder = image_folder_records(d.unlabeled_images).cast_column("image", datasets.Image(decode=False))
        split = Split(split.labeled, split.unlabeled + list(folder["image_id"]))
        if not isinstance(unlabeled, datasets.Dataset):
            folder = folder.to_iterable_dataset(num_shards=min(64, len(folder)))
        unlabeled = datasets.concatenate_datasets([unlabeled, folder])
    if recipe.ssl.enabled and not recipe.ssl.unlabeled_includes_labeled and not split.unlabeled:
        # Here, not when the student's batches are built: a one-launch run would train its teacher first.
        raise DataError(
            f"the unlabeled split of {opened.description} is empty (data.labeled_percent {d.labeled_percent}"
            f"{', data.split_file ' + str(d.split_file) if d.split_file else ''}): lower data.labeled_percent, add "
            "images with data.unlabeled_images, or set ssl.unlabeled_includes_labeled"
        )
    return RunData(labeled, unlabeled, opened.val, opened.val_ground_truth, opened.categories, split,
                   data_fingerprint(d), val_check)  # fmt: skip


def start_val_check(d: DataConfig, val: datasets.Dataset, accelerator: Accelerator) -> ValCheck:
    """Every val image is read at start (each process a share; in a thread: the model is built meanwhile): a broken
    one would otherwise stop the run at its first evaluation, hours in. (Training images are checked as they are
    read: data.on_error.) Files already checked and unchanged since (same path, size and modification time; the
    records cache remembers them) are not read again: a relaunch at COCO's size does not spend ~20 s on 5,000
    images it read before. Returns what waits for the verdict (a `DataError` naming the bad images)."""
    memo = checked_memo(d, val)
    remembered = memo is not None and memo.is_file()
    if accelerator.num_processes > 1:  # every process decides alike (a cache on one node only would split them)
        remembered = all(gather_object([remembered]))
    if remembered:
        logger.info("the %d val images are as they were when they were checked: not read again", len(val))
        return ValCheck(lambda: None, threading.Event())
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    found = pool.submit(check_images, val, "val", accelerator.process_index, accelerator.num_processes, stop)
    pool.shutdown(wait=False)

    def finish() -> None:
        problems = found.result()
        if accelerator.num_processes > 1:  # (a collective: in the caller's thread, on every process alike)
            problems = [p for share in gather_object([problems]) for p in share]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise DataError(f"{len(problems)} val images cannot be used: {'; '.join(problems[:3])}{more}")
        if memo is not None and accelerator.is_main_process:
            try:
                write_text_atomic(memo, json.dumps({"images": len(val)}))
            except OSError:
                pass  # (not remembered: checked again next time)

    return ValCheck(finish, stop)


def checked_memo(d: DataConfig, val: datasets.Dataset) -> Path | None:
    """Where a passed check of these val image files is remembered (under the records cache), or None: no cache,
    not a COCO source, or images that are not files."""
    cache_root = records_cache_root(d.records_cache)
    if d.source != "coco" or cache_root is None:
        return None
    # Beside the val JSON's records: a new JSON is a new folder.
    folder = records_cache_folder(coco_files(d)[1], cache_root)
    key = image_files_key(val) if folder.is_dir() else None
    return None if key is None else folder / f"checked_images_{key[:32]}.json"


def drop_records_with_bad_masks(records: datasets.Dataset, on_error: str) -> datasets.Dataset:
    """The labeled records whose every mask decodes (shards and hub data sets are checked here, at start, not
    when a record is read hours in); the others are dropped and named (`data.on_error: skip`) or stop the run."""
    bad: list[str] = []
    keep: list[int] = []
    columns = records.select_columns(["image_id", "width", "height", "objects"])
    for row, record in enumerate(columns):
        objects = record["objects"]
        problems = [  # crowd regions are never decoded for training
            compressed_rle_problem(counts, record["height"], record["width"])
            if counts or not shapes
            else polygons_problem(shapes, record["height"], record["width"])
            for counts, crowd, shapes in zip(objects["rle_counts"], objects["iscrowd"], objects["polygons"])
            if not crowd
        ]
        problem = next((p for p in problems if p), None)
        if problem:
            bad.append(f"image id {record['image_id']}: {problem}")
        else:
            keep.append(row)
    if not bad:
        return records
    if on_error == "raise":
        raise DataError(f"{len(bad)} labeled records hold a mask that cannot be decoded, e.g. {bad[0]}")
    logger.warning("skipping %d labeled records whose masks cannot be decoded (data.on_error: skip): %s", len(bad),
                   "; ".join(bad[:3]))  # fmt: skip
    if not keep:
        raise DataError(f"no labeled record has masks that decode, e.g. {bad[0]}")
    return records.select(keep)

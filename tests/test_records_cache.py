"""COCO records are parsed once: one parse per launch (phase 1 included), in a child process, into a
memory-mapped cache that relaunches and the other processes read, rebuilt when the JSON changes."""

import json
import logging
import os
from pathlib import Path

import datasets
import pytest

import gd_hf.data.coco_source as coco_source
from gd_hf.data.coco import DataError
from gd_hf.data.coco_source import RECORDS_INFO_FILE, coco_records
from gd_hf.train import train

from .conftest import ONE_LAUNCH_SSL, demo_recipe, tiny_overrides


def spy_on(monkeypatch, name):
    """The first argument of every call of `gd_hf.data.coco_source.<name>`, in order."""
    seen = []
    real = getattr(coco_source, name)

    def spy(first, *args, **kwargs):
        seen.append(str(first))
        return real(first, *args, **kwargs)

    monkeypatch.setattr(coco_source, name, spy)
    return seen


def builds(cache):
    """Cache folder -> when its records were written."""
    return {f.name: (f / RECORDS_INFO_FILE).stat().st_mtime_ns for f in cache.iterdir()}


@pytest.fixture
def parses(monkeypatch):
    """Which JSON files child processes parsed (a build runs in one; a cache hit starts none)."""
    count = []
    real = coco_source.build_command

    def counting(file, folder):
        count.append(file.annotation_file.name)
        return real(file, folder)

    monkeypatch.setattr(coco_source, "build_command", counting)
    return count


def test_a_one_launch_run_reads_each_json_once_and_a_relaunch_parses_none(
    synthetic_root, tmp_path, monkeypatch, parses
):
    opened = spy_on(monkeypatch, "coco_records")
    cache = tmp_path / "cache"
    overrides = tiny_overrides(synthetic_root, tmp_path / "run") + ONE_LAUNCH_SSL + [f"data.records_cache={cache}"]
    train(demo_recipe(overrides))
    train_json = str(synthetic_root / "annotations" / "instances_train.json")
    val_json = str(synthetic_root / "annotations" / "instances_val.json")
    assert opened == [train_json, val_json]  # phase 1 and phases 2-3 share the launch's data
    assert sorted(parses) == ["instances_train.json", "instances_val.json"]
    first = builds(cache)
    assert len(first) == 2 and not any(name.startswith(".") for name in first)  # no temporary folder left
    opened.clear()
    relaunch = tiny_overrides(synthetic_root, tmp_path / "again") + ONE_LAUNCH_SSL + [f"data.records_cache={cache}"]
    train(demo_recipe(relaunch))
    assert opened == [train_json, val_json]
    assert len(parses) == 2  # no new parse
    assert builds(cache) == first


def test_the_cache_equals_a_parse_is_memory_mapped_and_is_rebuilt_when_the_json_changes(
    synthetic_root, tmp_path, caplog, parses
):
    annotations = tmp_path / "instances_train.json"
    coco = json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())
    coco["annotations"][0]["segmentation"] = []  # skipped: the warning must come from the cache too
    annotations.write_text(json.dumps(coco))
    images, cache = synthetic_root / "train", tmp_path / "cache"

    parsed, categories = coco_records(annotations, images, None)
    built, built_categories = coco_records(annotations, images, cache)
    first = builds(cache)
    caplog.set_level(logging.WARNING)
    cached, cached_categories = coco_records(annotations, images, cache)
    assert len(parses) == 1 and builds(cache) == first
    assert "skipped 1 annotations without usable segmentation" in caplog.text
    assert built.to_list() == cached.to_list()
    paths = lambda records: records.cast_column("image", datasets.Image(decode=False))["image"]  # noqa: E731
    assert [r["path"] for r in paths(cached)] == [str(images.resolve() / r["path"]) for r in paths(parsed)]
    without_paths = lambda records: records.remove_columns("image").to_list()  # noqa: E731
    assert without_paths(parsed) == without_paths(cached)
    assert categories == built_categories == cached_categories
    assert cached.cache_files and all(str(cache) in f["filename"] for f in cached.cache_files)  # memory-mapped
    assert not any(str(images) in f["filename"] for f in cached.cache_files)  # paths only, no copied images

    coco["annotations"].pop(0)
    annotations.write_text(json.dumps(coco))  # edited: size and modification time change
    rebuilt, _ = coco_records(annotations, images, cache)
    assert len(parses) == 2 and len(builds(cache)) == 2  # one folder per version of the file
    assert without_paths(rebuilt) == without_paths(parsed)  # the removed annotation was the skipped one


def test_a_launch_from_another_working_directory_reads_the_same_cache_with_usable_paths(
    synthetic_root, tmp_path, monkeypatch, parses
):
    cache = tmp_path / "cache"
    monkeypatch.chdir(synthetic_root.parent)
    relative = (synthetic_root.name + "/annotations/instances_val.json", synthetic_root.name + "/val")
    coco_records(*relative, cache)
    monkeypatch.chdir(tmp_path)
    records, _ = coco_records(synthetic_root / "annotations" / "instances_val.json", synthetic_root / "val", cache)
    assert len(parses) == 1  # the same file: found in the cache
    undecoded = records.cast_column("image", datasets.Image(decode=False))["image"]
    assert all(Path(r["path"]).is_file() for r in undecoded)


def test_records_cache_null_parses_in_process_every_time(synthetic_root, monkeypatch):
    parses = spy_on(monkeypatch, "load_coco")
    for _ in range(2):
        coco_records(synthetic_root / "annotations" / "instances_val.json", synthetic_root / "val", None)
    assert len(parses) == 2


def test_a_bad_json_is_named_through_the_child_process(synthetic_root, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        coco_records(tmp_path / "nope.json", synthetic_root / "val", tmp_path / "cache")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DataError, match="bad.json has no `categories` list"):
        coco_records(bad, synthetic_root / "val", tmp_path / "cache")
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


def test_an_unwritable_cache_folder_is_named_with_the_key_to_change(synthetic_root, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match=r"cannot write the records cache .*not_a_folder.*data.records_cache"):
        coco_records(synthetic_root / "annotations" / "instances_val.json", synthetic_root / "val", blocker / "cache")


def test_a_build_left_half_written_by_a_dead_process_is_removed_and_a_running_one_kept(synthetic_root, tmp_path):
    """A child killed mid-write leaves `.NAME.tmpPID` (GBs at COCO size): the next build removes it, unless that
    process still runs (another launch writing the same cache)."""
    import subprocess
    import sys

    annotations = synthetic_root / "annotations" / "instances_val.json"
    cache = tmp_path / "cache"
    folder = coco_source.records_cache_folder(coco_source.CocoFile(annotations, synthetic_root / "val"), cache)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = (folder.with_name(f".{folder.name}.tmp{pid}") for pid in (finished.stdout.strip(), os.getpid()))
    for tmp in (dead, alive):
        (tmp / "part").mkdir(parents=True)
    coco_records(annotations, synthetic_root / "val", cache)
    assert not dead.exists()
    assert alive.exists()
    assert (folder / RECORDS_INFO_FILE).is_file()


def test_an_edit_that_keeps_size_and_modification_time_is_parsed_again(synthetic_root, tmp_path, parses):
    """The cache is keyed by the JSON's content: an edit of the same length whose mtime is put back (`touch -r`,
    `rsync -t`, a restored backup) would otherwise train on the stale records without a word."""
    annotations = tmp_path / "instances_val.json"
    coco = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    text = json.dumps(coco)
    annotations.write_text(text)
    cache = tmp_path / "cache"
    before, categories = coco_records(annotations, synthetic_root / "val", cache)
    stat = annotations.stat()
    renamed = coco["categories"][0]["name"]
    edited = text.replace(f'"name": "{renamed}"', f'"name": "{renamed[::-1]}"', 1)
    assert len(edited) == len(text) and edited != text
    annotations.write_text(edited)
    os.utime(annotations, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert annotations.stat().st_size == stat.st_size and annotations.stat().st_mtime_ns == stat.st_mtime_ns
    _, edited_categories = coco_records(annotations, synthetic_root / "val", cache)
    assert len(parses) == 2
    assert edited_categories.names[0] == renamed[::-1] and categories.names[0] == renamed


def test_a_relaunch_does_not_read_val_images_it_checked_and_that_did_not_change(synthetic_root, tmp_path, monkeypatch):
    """The start-up check reads every val image; the records cache remembers a passed check of these files (path,
    size, time), so a relaunch skips it (at COCO's size ~20 s), and a changed image is read again."""
    import shutil

    import gd_hf.data.prepare as prepare

    root, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(synthetic_root, root)
    checked = []
    real = prepare.check_images
    monkeypatch.setattr(
        prepare, "check_images", lambda records, *a, **k: checked.append(len(records)) or real(records, *a, **k)
    )
    overrides = [f"data.records_cache={cache}", "train.max_steps=2"]
    train(demo_recipe(tiny_overrides(root, tmp_path / "run") + overrides))
    train(demo_recipe(tiny_overrides(root, tmp_path / "again") + overrides))
    assert checked == [8]  # read once
    (root / "val" / "1000002.png").write_bytes(b"not a png any more")
    with pytest.raises(DataError, match=r"1000002\.png"):
        train(demo_recipe(tiny_overrides(root, tmp_path / "third") + overrides))
    assert checked == [8, 8]


def _polygon_folder(root: Path, split: str, image_ids: list[int]) -> tuple[Path, Path]:
    from PIL import Image

    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for image_id in image_ids:
        Image.new("RGB", (40, 30), (90, 60, 30)).save(root / split / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 40, "height": 30})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                            "segmentation": [[2, 2, 20, 2, 20, 15, 2, 15]]})  # fmt: skip
    path = root / f"{split}.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]})
    )
    return path, root / split


def test_a_first_launch_parses_train_and_val_side_by_side_train_polygons_kept_as_parsed(tmp_path, parses):
    """The training file's polygons go to the cache as parsed (rasterised when a record is read), val's as RLE
    (its pycocotools ground truth); each file parsed once, in a child process."""
    from gd_hf.config import DataConfig

    train_json, train_images = _polygon_folder(tmp_path, "train", [1, 2, 3])
    val_json, val_images = _polygon_folder(tmp_path, "val", [7, 8])
    d = DataConfig(train_annotations=str(train_json), train_images=str(train_images), val_annotations=str(val_json),
                   val_images=str(val_images), records_cache=str(tmp_path / "cache"), generate_synthetic=False)  # fmt: skip
    opened = coco_source.open_coco(d)
    assert parses == ["train.json", "val.json"]
    for objects in opened.train["objects"]:
        assert objects["rle_counts"] == [""] and objects["polygons"] == [[[2, 2, 20, 2, 20, 15, 2, 15]]]
    for objects in opened.val["objects"]:
        assert objects["rle_counts"][0] and objects["polygons"] == [[]]
    assert [a["area"] for a in opened.val_ground_truth.dataset["annotations"]] == [18 * 13] * 2

"""COCO records are parsed once: one parse per launch (phase 1 included), in a child process, into a
memory-mapped cache that relaunches and the other processes read, rebuilt when the JSON changes."""

import json
import logging

import pytest

import gd_hf.data.sources as sources
from gd_hf.config import load_recipe
from gd_hf.data.coco import DataError
from gd_hf.data.sources import RECORDS_INFO_FILE, coco_records
from gd_hf.train import train

from .conftest import ONE_LAUNCH_SSL, ROOT, tiny_overrides


def spy_on(monkeypatch, name):
    """The first argument of every call of `gd_hf.data.sources.<name>`, in order."""
    seen = []
    real = getattr(sources, name)

    def spy(first, *args, **kwargs):
        seen.append(str(first))
        return real(first, *args, **kwargs)

    monkeypatch.setattr(sources, name, spy)
    return seen


def builds(cache):
    """Cache folder -> when its records were written (a rebuild writes a new info file)."""
    return {f.name: (f / RECORDS_INFO_FILE).stat().st_mtime_ns for f in cache.iterdir()}


def test_a_one_launch_run_reads_each_json_once_and_a_relaunch_parses_none(synthetic_root, tmp_path, monkeypatch):
    opened = spy_on(monkeypatch, "coco_records")
    cache = tmp_path / "cache"
    overrides = tiny_overrides(synthetic_root, tmp_path / "run") + ONE_LAUNCH_SSL + [f"data.records_cache={cache}"]
    train(load_recipe(ROOT / "recipes" / "demo_synthetic.yaml", overrides))
    train_json = str(synthetic_root / "annotations" / "instances_train.json")
    val_json = str(synthetic_root / "annotations" / "instances_val.json")
    assert opened == [train_json, val_json]  # phase 1 and phases 2-3 share the launch's data
    first = builds(cache)
    assert len(first) == 2 and not any(name.startswith(".") for name in first)  # no temporary folder left
    opened.clear()
    relaunch = tiny_overrides(synthetic_root, tmp_path / "again") + ONE_LAUNCH_SSL + [f"data.records_cache={cache}"]
    train(load_recipe(ROOT / "recipes" / "demo_synthetic.yaml", relaunch))
    assert opened == [train_json, val_json]
    assert builds(cache) == first  # read, not rebuilt


def test_the_cache_equals_a_parse_is_memory_mapped_and_is_rebuilt_when_the_json_changes(
    synthetic_root, tmp_path, caplog
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
    assert builds(cache) == first
    assert "skipped 1 annotations without usable segmentation" in caplog.text
    assert parsed.to_list() == built.to_list() == cached.to_list()
    assert categories == built_categories == cached_categories
    assert cached.cache_files and all(str(cache) in f["filename"] for f in cached.cache_files)  # memory-mapped
    assert not any(str(images) in f["filename"] for f in cached.cache_files)  # paths only, no copied images

    coco["annotations"].pop(0)
    annotations.write_text(json.dumps(coco))  # edited: size and modification time change
    rebuilt, _ = coco_records(annotations, images, cache)
    assert len(builds(cache)) == 2  # one folder per version of the file
    assert rebuilt.to_list() == parsed.to_list()  # the removed annotation was the skipped one


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

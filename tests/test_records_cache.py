"""COCO records are parsed once: one parse per launch (phase 1 included), then a memory-mapped cache that
relaunches and other processes read, rebuilt when the JSON changes."""

import json
import logging
import shutil

import pytest

import gd_hf.data.sources as sources
from gd_hf.config import load_recipe
from gd_hf.data.sources import coco_records
from gd_hf.train import train

from .conftest import ONE_LAUNCH_SSL, ROOT, tiny_overrides


@pytest.fixture
def parses(monkeypatch):
    """The annotation files `load_coco` parses, in order."""
    seen = []
    real = sources.load_coco

    def spy(annotation_file, *args, **kwargs):
        seen.append(str(annotation_file))
        return real(annotation_file, *args, **kwargs)

    monkeypatch.setattr(sources, "load_coco", spy)
    return seen


def test_a_one_launch_run_parses_each_json_once_and_a_relaunch_none(synthetic_root, tmp_path, parses):
    cache = tmp_path / "cache"
    overrides = tiny_overrides(synthetic_root, tmp_path / "run") + ONE_LAUNCH_SSL + [f"data.records_cache={cache}"]
    train(load_recipe(ROOT / "recipes" / "demo_synthetic.yaml", overrides))
    train_json = str(synthetic_root / "annotations" / "instances_train.json")
    val_json = str(synthetic_root / "annotations" / "instances_val.json")
    assert sorted(parses) == sorted([train_json, val_json])  # phase 1 and phases 2-3 share one parse
    parses.clear()
    relaunch = tiny_overrides(synthetic_root, tmp_path / "again") + ONE_LAUNCH_SSL + [f"data.records_cache={cache}"]
    train(load_recipe(ROOT / "recipes" / "demo_synthetic.yaml", relaunch))
    assert parses == []


def test_the_cache_is_memory_mapped_equal_to_a_parse_and_rebuilt_when_the_json_changes(
    synthetic_root, tmp_path, parses, caplog
):
    annotations = tmp_path / "instances_train.json"
    coco = json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())
    coco["annotations"][0]["segmentation"] = []  # skipped: the warning must come back from the cache too
    annotations.write_text(json.dumps(coco))
    images, cache = synthetic_root / "train", tmp_path / "cache"

    parsed, categories = coco_records(annotations, images, None)
    caplog.set_level(logging.WARNING)
    built, built_categories = coco_records(annotations, images, cache)
    caplog.clear()
    cached, cached_categories = coco_records(annotations, images, cache)
    assert len(parses) == 2  # no cache, then the build; the third read parsed nothing
    assert "skipped 1 annotations" in caplog.text
    assert parsed.to_list() == built.to_list() == cached.to_list()
    assert categories == built_categories == cached_categories
    assert cached.cache_files and all(str(cache) in f["filename"] for f in cached.cache_files)  # memory-mapped

    coco["annotations"].pop(0)
    annotations.write_text(json.dumps(coco))  # edited: size and modification time change
    rebuilt, _ = coco_records(annotations, images, cache)
    assert len(parses) == 3
    assert rebuilt.to_list() == parsed.to_list()  # the same records: the skipped annotation was the one removed
    assert len(list(cache.iterdir())) == 2  # one folder per version of the file; no temporary folder left


def test_records_cache_null_parses_every_time(synthetic_root, tmp_path, parses):
    annotations = synthetic_root / "annotations" / "instances_val.json"
    for _ in range(2):
        coco_records(annotations, synthetic_root / "val", None)
    assert len(parses) == 2


def test_a_missing_json_is_named_also_with_a_cache(synthetic_root, tmp_path):
    from gd_hf.data.coco import DataError

    with pytest.raises(DataError, match="does not exist"):
        coco_records(tmp_path / "nope.json", synthetic_root / "val", tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)

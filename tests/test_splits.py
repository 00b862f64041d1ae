import json

import numpy as np
import pytest

from gd_hf.data.coco import NO_POLYGONS, CocoObjects, CocoSource, DataError
from gd_hf.data.splits import draw_labeled_ids, make_split, read_split_file, write_split_file


def source_with(annotated: list[int], total: int = 100) -> CocoSource:
    images = {i: {"file_name": f"{i}.png", "width": 4, "height": 4} for i in range(1, total + 1)}
    objects = CocoObjects(
        image_id=np.array(annotated, np.int64),
        category=np.zeros(len(annotated), np.int32),
        iscrowd=np.zeros(len(annotated), np.int8),
        rle_counts=["04"] * len(annotated),  # a 4x4 mask of 0 then 4 pixels
        polygons=NO_POLYGONS.take(np.zeros(len(annotated), np.int64)),
    )
    return CocoSource("ann.json", ".", images, objects, [1], ["thing"])


def test_draw_is_deterministic_and_pinned():
    ids = list(range(1000, 1100))
    first = draw_labeled_ids(ids, 5, seed=0)
    assert first == draw_labeled_ids(list(reversed(ids)), 5, seed=0)  # input order does not matter
    # Pinned: the same ids on every machine (PCG64 is bit-stable); a change here breaks users' published splits.
    assert first == [1005, 1020, 1036, 1082, 1093]
    assert draw_labeled_ids(ids, 5, seed=1) != first


def test_percent_sets_the_count_with_at_least_one():
    ids = list(range(1182 * 100))
    assert len(draw_labeled_ids(ids, 1, seed=0)) == 1182
    assert len(draw_labeled_ids(list(range(10)), 0.1, seed=0)) == 1


def test_split_is_disjoint_and_covers_every_image():
    source = source_with(annotated=list(range(1, 101)))
    split = make_split(source, percent=10, seed=3)
    assert len(split.labeled) == 10
    assert not set(split.labeled) & set(split.unlabeled)
    assert set(split.labeled) | set(split.unlabeled) == set(source.images)


def test_images_without_annotations_are_dropped_from_the_labeled_split():
    source = source_with(annotated=list(range(1, 51)))
    split = make_split(source, percent=50, seed=0)
    assert all(i <= 50 for i in split.labeled)
    assert set(split.labeled) | set(split.unlabeled) == set(source.images)


def test_split_file_json_and_text(tmp_path):
    source = source_with(annotated=list(range(1, 101)))
    write_split_file(tmp_path / "s.json", [5, 3, 9])
    assert json.loads((tmp_path / "s.json").read_text())["labeled_image_ids"] == [3, 5, 9]
    assert make_split(source, split_file=str(tmp_path / "s.json")).labeled == [3, 5, 9]
    (tmp_path / "s.txt").write_text("# my split\n7\n2  # second\n\n")
    assert read_split_file(tmp_path / "s.txt") == [2, 7]
    (tmp_path / "bad.txt").write_text("7\nseven\n")
    with pytest.raises(DataError, match=r"bad.txt:2: 'seven' is not an image id"):
        read_split_file(tmp_path / "bad.txt")


def test_split_file_with_unknown_ids_is_an_error(tmp_path):
    write_split_file(tmp_path / "s.json", [5, 5000])
    with pytest.raises(DataError, match=r"names image ids not in ann.json: \[5000\]"):
        make_split(source_with(annotated=[5]), split_file=str(tmp_path / "s.json"))


def test_empty_labeled_split_is_an_error():
    with pytest.raises(DataError, match="labeled split is empty.*labeled_percent=1"):
        make_split(source_with(annotated=[]), percent=1, seed=0)

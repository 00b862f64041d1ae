import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from gd_hf.data.coco import FEATURES, DataError, load_coco, to_hf_dataset
from gd_hf.data.images import read_image
from gd_hf.data.loading import read_image_and_targets
from gd_hf.data.masks import check_polygons, decode_masks, object_masks, rle_from_segmentation
from gd_hf.data.records import check_columns


def make_folder(tmp_path, annotations, images=None, categories=None):
    """A 3-image COCO folder (20x30 px) with the given annotations."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    images = images or [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in (1, 2, 3)]
    for record in images:
        Image.new("RGB", (record["width"], record["height"]), (40, 80, 120)).save(image_dir / record["file_name"])
    categories = categories or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, image_dir


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def rle_of(mask: np.ndarray, compressed: bool) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = mask.T.flatten()
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_polygons_rle_crowd_and_empty_images_load(tmp_path):
    mask = np.zeros((20, 30), bool)
    mask[2:8, 5:15] = True
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": square(0, 0, 10, 10), "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "segmentation": rle_of(mask, compressed=False), "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 3, "segmentation": rle_of(mask, compressed=True), "iscrowd": 0},
    ]
    path, image_dir = make_folder(tmp_path, annotations)
    source = load_coco(path, image_dir)
    # categories are contiguous in ascending COCO id order: 3 (dog) -> 0, 7 (cat) -> 1
    assert source.category_ids == [3, 7] and source.id2label == {0: "dog", 1: "cat"}
    assert source.annotations[3] == []  # an image with no annotation is kept
    first = source.annotations[1]
    assert [a["category"] for a in first] == [1, 0] and [a["iscrowd"] for a in first] == [0, 1]
    polygon_mask = decode_masks([first[0]["rle"]["counts"]], 20, 30)[0]
    assert polygon_mask[:10, :10].all() and not polygon_mask[11:, :].any() and not polygon_mask[:, 11:].any()
    np.testing.assert_array_equal(decode_masks([first[1]["rle"]["counts"]], 20, 30)[0], mask)
    np.testing.assert_array_equal(decode_masks([source.annotations[2][0]["rle"]["counts"]], 20, 30)[0], mask)

    dataset = to_hf_dataset(source)
    assert len(dataset) == 3 and dataset[2]["objects"]["category"] == []
    assert dataset[0]["objects"]["iscrowd"] == [0, 1]
    unlabeled = to_hf_dataset(source, [1, 2], with_labels=False)
    assert unlabeled[0]["objects"]["category"] == [] and unlabeled["image_id"] == [1, 2]


@pytest.mark.parametrize("rasterise_polygons", [True, False])
def test_annotation_without_usable_segmentation_is_skipped_and_counted(tmp_path, rasterise_polygons):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": [[0, 0, 5, 5]], "iscrowd": 0},  # 2 points
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 4, 4], "iscrowd": 0},  # bbox only
        {"id": 3, "image_id": 1, "category_id": 7, "segmentation": square(0, 0, 4, 4), "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 7, "segmentation": [[0, 0, 5, 0, 9, 0]], "iscrowd": 0},  # no area
        {"id": 5, "image_id": 1, "category_id": 7, "segmentation": [], "bbox": [1, 1, 2, 2], "iscrowd": 0},
    ]
    source = load_coco(*make_folder(tmp_path, annotations), rasterise_polygons=rasterise_polygons)
    assert len(source.annotations[1]) == 1
    assert source.skipped_annotations == 4
    assert source.skip_reasons == {
        "no polygon with at least 3 points": 1,
        "no segmentation (a bbox alone is not a mask)": 2,
        "empty mask (zero area)": 1,
    }


@pytest.mark.parametrize(
    "annotation, message",
    [
        (
            {"id": 9, "image_id": 42, "category_id": 7, "segmentation": square(0, 0, 4, 4)},
            r"annotation 9 points at image id 42",
        ),
        (
            {"id": 9, "image_id": 1, "category_id": 99, "segmentation": square(0, 0, 4, 4)},
            r"annotation 9 \(image 1\) has category_id 99",
        ),
    ],
)
def test_annotation_pointing_at_unknown_image_or_category_is_an_error(tmp_path, annotation, message):
    path, image_dir = make_folder(tmp_path, [annotation])
    with pytest.raises(DataError, match=message) as error:
        load_coco(path, image_dir)
    assert str(path) in str(error.value)


def test_a_category_id_listed_twice_is_an_error_naming_both(tmp_path):
    categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "lynx"}]
    path, image_dir = make_folder(tmp_path, [], categories=categories)
    with pytest.raises(DataError, match=r"category ids \[7\] appear more than once .*'cat' \(id 7\).*'lynx' \(id 7\)"):
        load_coco(path, image_dir)


def test_missing_image_file_is_named(tmp_path):
    path, image_dir = make_folder(tmp_path, [])
    (image_dir / "2.png").unlink()
    with pytest.raises(DataError, match=r"2\.png \(image id 2 .*does not exist"):
        load_coco(path, image_dir)


def test_missing_folder_and_bad_json_are_named(tmp_path):
    path, image_dir = make_folder(tmp_path, [])
    with pytest.raises(DataError, match="image folder .*nowhere does not exist"):
        load_coco(path, tmp_path / "nowhere")
    with pytest.raises(DataError, match="annotation file .*missing.json does not exist"):
        load_coco(tmp_path / "missing.json", image_dir)
    path.write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        load_coco(path, image_dir)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no `annotations` list"):
        load_coco(path, image_dir)


def test_duplicate_image_id_is_an_error(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
        {"id": 1, "file_name": "b.png", "width": 30, "height": 20},
    ]
    with pytest.raises(DataError, match="image id 1 appears twice"):
        load_coco(*make_folder(tmp_path, [], images=images))


def test_corrupt_image_error_names_the_file(tmp_path):
    path, image_dir = make_folder(tmp_path, [])
    (image_dir / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dataset = to_hf_dataset(load_coco(path, image_dir)).cast_column("image", datasets.Image(decode=False))
    assert read_image(dataset[0]).shape == (3, 20, 30)
    with pytest.raises(DataError, match=r"cannot read image .*2\.png \(image id 2\)"):
        read_image(dataset[1])


def test_image_size_disagreeing_with_json_is_named(tmp_path):
    path, image_dir = make_folder(tmp_path, [])
    Image.new("RGB", (31, 20)).save(image_dir / "3.png")
    dataset = to_hf_dataset(load_coco(path, image_dir)).cast_column("image", datasets.Image(decode=False))
    with pytest.raises(DataError, match=r"3\.png \(image id 3\) is 31x20 but the annotation file says 30x20"):
        read_image(dataset[2])


def test_conversion_in_worker_processes_equals_the_serial_one(tmp_path, monkeypatch):
    """Many annotations are converted by forked workers (COCO's ~860k): same RLEs, same skips, same order."""
    import gd_hf.data.masks as coco_module

    mask = np.zeros((20, 30), bool)
    mask[2:8, 5:15] = True
    annotations = []
    for k in range(60):
        kinds = [
            square(k % 7, k % 5, k % 7 + 3 + k % 4, k % 5 + 4),  # one polygon
            square(0, 0, 5, 5) + square(10, 10, 15, 15),  # two polygons of one object: merged
            rle_of(mask, compressed=False),
            [[0, 0, 5, 5]],  # unusable: skipped and counted
        ]
        annotations.append(
            {"id": k, "image_id": 1 + k % 2, "category_id": 3 + 4 * (k % 2), "segmentation": kinds[k % 4]}
        )
    path, image_dir = make_folder(tmp_path, annotations)
    serial = load_coco(path, image_dir)
    monkeypatch.setattr(coco_module, "PARALLEL_CONVERSION_MIN", 0)
    forked = []
    real_pool = coco_module.mp.get_context("fork").Pool

    class CountingContext:
        def Pool(self, workers):  # noqa: N802 (multiprocessing's name)
            forked.append(workers)
            return real_pool(workers)

    monkeypatch.setattr(coco_module.mp, "get_context", lambda method: CountingContext())
    monkeypatch.setattr(coco_module.os, "cpu_count", lambda: 2)
    parallel = load_coco(path, image_dir)
    assert forked == [2]  # the worker path really ran
    assert parallel.annotations == serial.annotations
    assert parallel.skip_reasons == serial.skip_reasons and serial.skipped_annotations == 15
    merged = decode_masks([serial.annotations[2][0]["rle"]["counts"]], 20, 30)[0]  # annotation 1: two squares
    assert merged[1:4, 1:4].all() and merged[11:14, 11:14].all() and not merged[6:9, :].any()


# Polygon segmentations of a 30 x 20 image: good ones and every way one can be bad.
POLYGON_CASES = [
    square(1, 1, 9, 9),
    [[1, 1, 9, 1, 9, 9, 1, 9], [12, 2, 18, 2, 18, 8]],  # two polygons, merged
    [[1.5, 1.25, 9.75, 1, 9, 9.5, 1, 9, 3]],  # odd length: the trailing coordinate is not read (but checked)
    [[1, 1, 9, 1, 9, 9, 1, 9, 70]],  # odd length, the trailing coordinate far outside
    [[0, 0, 5, 5]],  # 2 points
    [[0, 0, 5, 0, 9, 0]],  # a line: no area
    [[2, 2, 12, 12, 12, 2, 2, 12]],  # a bow tie: signed areas cancel, yet it covers pixels
    [[3, 3, 3.2, 3, 3.2, 3.2]],  # a tiny triangle: positive area, no pixel
    [[1, 1, 25, 1.1, 1, 1.2]],  # a sliver below SMALL_POLYGON_AREA that covers no pixel
    [[1, 1, 25, 1, 1, 1.6]],  # one that covers 4
    [[1, 1, float("nan"), 1, 9, 9]],
    [[1, 1, float("inf"), 1, 9, 9]],
    [[1, 1, True, 1, 9, 9]],  # numpy would read True as 1.0
    [[1, 1, "9", 1, 9, 9]],  # and "9" as 9.0
    [[1, 1, None, 1, 9, 9]],  # and None as NaN
    [[1, 1, 10**400, 1, 9, 9]],  # an int beyond float64
    [[1, 1, 1e7, 1, 9, 9]],  # far outside: pycocotools would take GBs
    [[-31, 1, 9, 1, 9, 9]],  # x below -width
    [[1, 1, 9, 41, 9, 9]],  # y above 2 * height
    [[-30, -20, 60, -20, 60, 40, -30, 40]],  # at the bounds, covering the whole image
    [square(1, 1, 9, 9)[0], [1, 1, float("nan"), 1, 9, 9]],  # one bad polygon spoils its object
    [[1, 1, 9, 1, 9, 9], "not a polygon", [2, 2]],  # the unusable pieces dropped, as pycocotools can't read them
]


def test_polygons_checked_in_bulk_agree_with_the_one_by_one_checks():
    """`check_polygons` (numpy, no rasterisation) gives each hostile polygon the verdict and message that
    `rle_from_segmentation` gives it, and keeps exactly the polygons that rasterise to the same mask."""
    heights, widths = np.full(len(POLYGON_CASES), 20), np.full(len(POLYGON_CASES), 30)
    kept, problems = check_polygons(POLYGON_CASES, heights, widths)
    verdicts = []
    for segmentation in POLYGON_CASES:
        try:
            verdicts.append(rle_from_segmentation(segmentation, 20, 30))
        except ValueError as e:
            verdicts.append(str(e))
    assert problems == [v if isinstance(v, str) else None for v in verdicts]
    assert problems.count(None) == 7  # the cases above that are usable: a check that rejects all would fail
    for polygons, verdict in zip(kept.to_pylist(), verdicts):
        if isinstance(verdict, str):
            assert polygons == []
        else:  # rasterised when read: the very mask a parse-time conversion gave
            lazy = object_masks([""], [polygons], 20, 30)[0]
            assert np.array_equal(lazy, decode_masks([verdict["counts"]], 20, 30)[0])


def test_a_large_sliver_that_covers_no_pixel_is_kept_and_dropped_when_read():
    """The one verdict the bulk check cannot give without rasterising: a thin strip of more than
    SMALL_POLYGON_AREA pixels between pixel rows is kept at parse, and read as an empty mask, which training drops
    as it drops an object cropped away."""
    strip = [[-30, 0.1, 60, 0.1, 60, 0.3, -30, 0.3]]  # 18 px^2
    with pytest.raises(ValueError, match="zero area"):
        rle_from_segmentation(strip, 20, 30)
    kept, problems = check_polygons([strip], np.array([20]), np.array([30]))
    assert problems == [None] and not object_masks([""], kept.to_pylist(), 20, 30).any()


def test_polygons_kept_as_parsed_read_as_the_masks_a_parse_time_conversion_gives(tmp_path):
    """A training file's polygons are rasterised when a record is read: every record's masks equal, pixel for
    pixel, those of the file converted at parse, for mixed image sizes, annotations out of image order, crowd
    RLE and merged polygons."""
    rng = np.random.default_rng(0)
    images = [
        {"id": i, "file_name": f"{i}.png", "width": int(rng.integers(20, 90)), "height": int(rng.integers(20, 90))}
        for i in (5, 1, 9, 3)
    ]
    size = {i["id"]: (i["height"], i["width"]) for i in images}
    annotations = []
    for k in range(40):
        image_id = [5, 1, 9, 3][k % 4] if k % 7 else 9  # not grouped by image
        height, width = size[image_id]
        points = [[float(rng.uniform(-5, width + 5)), float(rng.uniform(-5, height + 5))] for _ in range(5)]
        polygons = [[round(v, 2) for point in points for v in point]]
        if k % 5 == 0:
            polygons.append([1, 1, 6, 1, 6, 6, 1, 6])
        crowd = k % 9 == 0
        mask = np.zeros((height, width), bool)
        mask[: height // 2, : width // 3] = True
        segmentation = rle_of(mask, compressed=False) if crowd else polygons
        annotations.append(
            {"id": k + 1, "image_id": image_id, "category_id": 3 + 4 * (k % 2), "segmentation": segmentation,
             "iscrowd": int(crowd)}
        )  # fmt: skip
    path, image_dir = make_folder(tmp_path, annotations, images=images)
    eager, lazy = load_coco(path, image_dir), load_coco(path, image_dir, rasterise_polygons=False)
    assert lazy.skip_reasons == eager.skip_reasons
    undecoded = datasets.Image(decode=False)
    eager_records = to_hf_dataset(eager).cast_column("image", undecoded)
    lazy_records = to_hf_dataset(lazy).cast_column("image", undecoded)
    kept_as_polygons = 0
    for before, after in zip(eager_records, lazy_records):
        assert after["image_id"] == before["image_id"]
        assert after["objects"]["category"] == before["objects"]["category"]
        assert after["objects"]["iscrowd"] == before["objects"]["iscrowd"]
        assert not any(before["objects"]["polygons"])
        kept_as_polygons += sum(1 for p in after["objects"]["polygons"] if p)
        _, masks_before, classes_before = read_image_and_targets(before)
        _, masks_after, classes_after = read_image_and_targets(after)
        assert torch.equal(masks_after, masks_before) and torch.equal(classes_after, classes_before)
    assert kept_as_polygons == sum(1 for a in annotations if not a["iscrowd"]) - eager.skipped_annotations
    # an image asked for alone gets its own objects, in file order
    alone = to_hf_dataset(lazy, [9])[0]
    assert alone["image_id"] == 9 and alone["objects"]["category"] == eager_records[3]["objects"]["category"]


def test_shards_written_before_polygons_are_named_not_misread():
    old_schema = datasets.Features(
        {**FEATURES, "objects": {k: v for k, v in FEATURES["objects"].items() if k != "polygons"}}
    )
    with pytest.raises(DataError, match=r"missing \['objects.polygons'\].*write them again"):
        check_columns(old_schema, "old_shards/data-00000-of-00001.parquet")


def test_numbers_of_a_float_subclass_and_repeated_ids():
    import numpy as np

    segmentation = [[0.0, 0, 10, 0, 10, np.float64(10)]]
    kept, problems = check_polygons([segmentation], np.array([20]), np.array([30]))
    assert problems == [None]
    assert np.array_equal(object_masks([""], kept.to_pylist(), 20, 30)[0],
                          decode_masks([rle_from_segmentation(segmentation, 20, 30)["counts"]], 20, 30)[0])  # fmt: skip


def test_an_image_asked_for_twice_is_refused(tmp_path):
    source = load_coco(
        *make_folder(tmp_path, [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": square(0, 0, 4, 4)}])
    )
    with pytest.raises(ValueError, match=r"asked for more than once: \[1\]"):
        to_hf_dataset(source, [1, 2, 1])

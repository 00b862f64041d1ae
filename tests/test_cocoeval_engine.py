"""The COCOeval engine of `coco_mask_ap` (hotcoco) against pycocotools, the reference: the 12 segm summary stats
to 0.01 AP points on small cases built to reach COCOeval's edges — size ranges without ground truth (-1), crowd
regions, images without detections, a category without ground truth, results of a category the ground truth
does not list, score ties, empty masks, more than maxDets detections per image, restricted image ids, and a raw
COCO file (polygons, uncompressed crowd RLE, areas that are not the masks')."""

import contextlib
import copy
import io
import json
from collections import Counter

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from gd_hf.evaluation.mask_ap import COCOEVAL_ENGINE, METRIC_NAMES, coco_mask_ap, coco_segm_stats

TOLERANCE = 0.01  # AP points (stats x 100)
ENGINE = "hotcoco"


def test_the_default_engine_is_the_one_checked_here():
    assert COCOEVAL_ENGINE == ENGINE


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


def ellipse(rng, height, width, radii):
    yy, xx = np.mgrid[:height, :width]
    ry, rx = rng.uniform(*radii, 2)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def build_case(
    seed=0,
    images=12,
    categories=(1, 2, 3, 5),
    gt_categories=None,
    sizes=((64, 80), (120, 100), (200, 240)),
    radii=(2, 90),
    crowd=0.1,
    images_without_detections=2,
    per_image=30,
    foreign_category=None,
    tied_scores=False,
    empty_masks=False,
):
    """A ground truth (pycocotools COCO, compressed RLE with string counts, as gd_hf builds it) and results as
    `to_coco_results` writes them: each object found again moved and sometimes cut (some with another class),
    then random masks up to `per_image`; the first `images_without_detections` images get none."""
    rng = np.random.default_rng(seed)
    gt_categories = categories if gt_categories is None else gt_categories
    records, annotations, results = [], [], []
    for i in range(images):
        height, width = sizes[i % len(sizes)]
        image_id = 100 + 7 * i  # sparse ids
        records.append({"id": image_id, "height": height, "width": width, "file_name": f"{image_id}.png"})
        objects = []
        for _ in range(int(rng.integers(0, 6))):
            mask = ellipse(rng, height, width, radii)
            if not mask.any():
                continue
            category = int(rng.choice(gt_categories))
            encoded = rle(mask)
            box = mask_utils.toBbox({"size": encoded["size"], "counts": encoded["counts"].encode()})
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": encoded,
                    "area": float(mask.sum()),
                    "bbox": [float(v) for v in box],
                    "iscrowd": int(rng.uniform() < crowd),
                }
            )
            objects.append((mask, category))
        if i < images_without_detections:
            continue
        for k in range(per_image):
            if objects and k < 2 * len(objects):
                mask, category = objects[k % len(objects)]
                mask = np.roll(mask, tuple(int(v) for v in rng.integers(-4, 5, 2)), axis=(0, 1))
                if rng.uniform() < 0.3:
                    mask = mask & ellipse(rng, height, width, (10, 80))
                if rng.uniform() < 0.15:
                    category = int(rng.choice(categories))
            else:
                mask, category = ellipse(rng, height, width, radii), int(rng.choice(categories))
            if empty_masks and k % 11 == 5:
                mask = np.zeros((height, width), bool)
            score = round(float(rng.uniform()), 1) if tied_scores else float(rng.uniform())
            results.append({"image_id": image_id, "category_id": category, "segmentation": rle(mask), "score": score})
            if foreign_category is not None and k % 5 == 0:
                results.append({**results[-1], "category_id": foreign_category})
    dataset = {
        "images": records,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class_{c}"} for c in categories],
    }
    return ground_truth_of(dataset), results


def ground_truth_of(dataset: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = dataset
        ground_truth.createIndex()
    return ground_truth


def assert_engine_matches_reference(ground_truth, results, image_ids=None):
    """The engine's 12 stats equal pycocotools' to TOLERANCE; returns pycocotools' (x100)."""
    # Each engine gets a ground truth of its own: pycocotools writes `ignore` into the annotations it evaluates.
    reference = coco_segm_stats(copy.deepcopy(ground_truth), results, image_ids, engine="pycocotools") * 100
    stats = coco_segm_stats(copy.deepcopy(ground_truth), results, image_ids, engine=ENGINE) * 100
    assert stats.shape == reference.shape == (12,)
    worst = int(np.abs(stats - reference).argmax())
    assert np.abs(stats - reference).max() <= TOLERANCE, (
        f"stat {worst}: {ENGINE} {stats[worst]:.4f} vs pycocotools {reference[worst]:.4f}"
    )
    # And through coco_mask_ap, the dict training logs.
    ours = coco_mask_ap(copy.deepcopy(ground_truth), results, image_ids, engine=ENGINE)
    theirs = coco_mask_ap(copy.deepcopy(ground_truth), results, image_ids, engine="pycocotools")
    assert list(ours) == list(theirs) == METRIC_NAMES
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(theirs[name], abs=TOLERANCE), name
    return reference


CASES = {
    "mixed_sizes": dict(seed=0),
    "ties_and_empty_masks": dict(seed=1, tied_scores=True, empty_masks=True),
    "no_large_objects": dict(seed=2, sizes=((64, 80), (90, 70)), radii=(2, 20)),
    "small_objects_only": dict(seed=3, sizes=((64, 64),), radii=(1.5, 5)),
    "many_crowd_regions": dict(seed=4, crowd=0.4),
    "categories_without_ground_truth": dict(seed=5, gt_categories=(1, 2)),
    "results_of_a_category_the_ground_truth_lacks": dict(seed=6, foreign_category=99),
    "more_than_max_dets_per_image": dict(seed=7, images=5, categories=(4,), images_without_detections=0, per_image=160),
    "most_images_without_detections": dict(seed=8, images_without_detections=8),
}


@pytest.mark.parametrize("image_ids", ["all", "every_other", "none_given"])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_equals_pycocotools(case, image_ids):
    ground_truth, results = build_case(**CASES[case])
    ids = sorted(ground_truth.imgs)
    chosen = {"all": ids, "every_other": ids[1::2], "none_given": None}[image_ids]
    reference = assert_engine_matches_reference(ground_truth, results, chosen)
    assert 0 < reference[0] < 100  # AP: a case that can tell engines apart, neither empty nor perfect


def test_the_cases_reach_the_edges_they_are_named_for():
    """Each edge is really in its case (a case that lost it would compare nothing there)."""
    stats = {name: coco_segm_stats(*build_case(**kwargs), engine="pycocotools") for name, kwargs in CASES.items()}
    assert stats["no_large_objects"][5] == -1 and stats["no_large_objects"][11] == -1  # APl, ARl
    assert stats["small_objects_only"][4] == stats["small_objects_only"][5] == -1  # APm, APl
    assert all(s[3] > -1 and s[4] > -1 and s[5] > -1 for s in (stats["mixed_sizes"], stats["many_crowd_regions"]))
    ground_truth, results = build_case(**CASES["many_crowd_regions"])
    crowd = [a for a in ground_truth.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) >= 5
    # Detections overlap crowd regions (a crowd match makes a detection ignored, not a false positive).
    detections = ground_truth.loadRes([dict(r) for r in results])
    overlapping = 0
    for annotation in crowd:
        found = detections.loadAnns(detections.getAnnIds(imgIds=annotation["image_id"]))
        if found:
            rles = [{"size": d["segmentation"]["size"], "counts": d["segmentation"]["counts"].encode()} for d in found]
            target = [
                {"size": annotation["segmentation"]["size"], "counts": annotation["segmentation"]["counts"].encode()}
            ]
            overlapping += int((mask_utils.iou(rles, target, [1]) > 0.5).sum())
    assert overlapping > 0
    ground_truth, results = build_case(**CASES["more_than_max_dets_per_image"])
    # COCOeval keeps maxDets detections per image and category: more than 100 of one category in an image.
    assert max(Counter((r["image_id"], r["category_id"]) for r in results).values()) > 100
    ground_truth, _ = build_case(**CASES["categories_without_ground_truth"])
    assert {a["category_id"] for a in ground_truth.dataset["annotations"]} < set(ground_truth.cats)


def test_raw_coco_file_polygons_uncompressed_crowd_rle_and_areas_not_the_masks(tmp_path):
    """A ground truth as pycocotools reads a COCO file itself: polygons, crowd regions as uncompressed RLE, and
    `area` fields that are not the mask's pixel count (COCO's are polygon areas) — the size ranges follow them."""
    rng = np.random.default_rng(11)
    records, annotations, results = [], [], []
    for i in range(10):
        height, width = (240, 320) if i % 2 else (300, 200)
        records.append({"id": i + 1, "height": height, "width": width, "file_name": f"{i}.jpg"})
        for _ in range(int(rng.integers(1, 6))):
            cx, cy, r = rng.uniform(20, width - 20), rng.uniform(20, height - 20), rng.uniform(3, 60)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 8))
            poly = [round(float(v), 2) for a in angles for v in (cx + r * np.cos(a), cy + r * np.sin(a))]
            poly = [min(max(v, 0.0), float(width if k % 2 == 0 else height)) for k, v in enumerate(poly)]
            crowd = rng.uniform() < 0.15
            segmentation = [poly]
            if crowd:  # a rectangle as column-major uncompressed RLE
                mask = np.zeros((height, width), np.uint8)
                y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
                mask[y0 : y0 + int(rng.integers(5, height // 2)), x0 : x0 + int(rng.integers(5, width // 2))] = 1
                flat = mask.ravel(order="F")
                changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
                segmentation = {"size": [height, width], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 4)),
                    "segmentation": segmentation,
                    # not the mask's area: the size ranges must follow this one
                    "area": float(np.exp(rng.uniform(np.log(100), np.log(20000)))),
                    "bbox": [0.0, 0.0, 1.0, 1.0],
                    "iscrowd": int(crowd),
                }
            )
    path = tmp_path / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": records,
                "annotations": annotations,
                "categories": [{"id": c, "name": f"class_{c}"} for c in (1, 2, 3)],
            }
        )
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(path))
    for annotation in annotations:
        results += moved_copies(annotation, ground_truth.annToMask(annotation), rng, (6, 6, 6), 0.85, [1, 2, 3])
    reference = assert_engine_matches_reference(ground_truth, results)
    assert 0 < reference[0] < 100 and all(v > -1 for v in reference[3:6])


def moved_copies(
    annotation: dict, mask: np.ndarray, rng: np.random.Generator, reaches: tuple[int, ...], same_class: float,
    categories: list[int],
) -> list[dict]:  # fmt: skip
    """Results that are `annotation`'s mask moved by up to each of `reaches` pixels, of its class with probability
    `same_class` (else a random one of `categories`), with random scores."""
    copies = []
    for reach in reaches:
        moved = np.roll(mask, tuple(int(v) for v in rng.integers(-reach, reach + 1, 2)), axis=(0, 1))
        category = annotation["category_id"] if rng.uniform() < same_class else int(rng.choice(categories))
        copies.append({"image_id": annotation["image_id"], "category_id": category, "segmentation": rle(moved),
                       "score": float(rng.uniform())})  # fmt: skip
    return copies


def test_gd_hf_ground_truth_and_perturbed_predictions(synthetic_root):
    """The synthetic val set read as training reads it, scored from its file path, with predictions that are its
    objects moved by a few pixels (some with the wrong class) and spurious copies on other images."""
    from gd_hf.data.ground_truth import ground_truth_from_json

    path = synthetic_root / "annotations" / "instances_val.json"
    ground_truth = ground_truth_from_json(path)
    rng = np.random.default_rng(5)
    annotations = ground_truth.dataset["annotations"]
    results = []
    for annotation in annotations:
        segmentation = annotation["segmentation"]
        mask = mask_utils.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()})
        results += moved_copies(annotation, mask, rng, (2, 6), 0.8, list(ground_truth.cats))
    reference = assert_engine_matches_reference(ground_truth, results)
    assert 0 < reference[0] < 100
    from_path = coco_mask_ap(path, results, engine=ENGINE)
    assert from_path["AP"] == pytest.approx(reference[0], abs=TOLERANCE)


@pytest.mark.parametrize("engine", [ENGINE, "pycocotools"])
def test_both_engines_refuse_results_on_images_the_ground_truth_lacks(engine):
    ground_truth, results = build_case(seed=0)
    with pytest.raises(ValueError, match="image ids the ground truth does not list: \\[424242\\]"):
        coco_mask_ap(ground_truth, [*results, {**results[0], "image_id": 424242}], engine=engine)


@pytest.mark.parametrize("engine", [ENGINE, "pycocotools"])
def test_no_result_scores_0_and_no_image_scores_minus_1_with_both_engines(engine):
    ground_truth, results = build_case(seed=0)
    assert coco_mask_ap(ground_truth, [], engine=engine) == {name: 0.0 for name in METRIC_NAMES}
    # (hotcoco alone would read an empty image id list as "every image")
    assert coco_mask_ap(ground_truth, results, image_ids=[], engine=engine) == {name: -1.0 for name in METRIC_NAMES}


def test_engine_changes_neither_ground_truth_nor_results_and_prints_nothing(capfd):
    ground_truth, results = build_case(seed=4, crowd=0.4)
    before = json.dumps([ground_truth.dataset, results])
    coco_mask_ap(ground_truth, results, image_ids=sorted(ground_truth.imgs)[:6], engine=ENGINE)
    assert json.dumps([ground_truth.dataset, results]) == before
    assert capfd.readouterr().out == ""


def test_unknown_engine_is_refused():
    ground_truth, results = build_case(seed=0)
    with pytest.raises(ValueError, match="unknown COCOeval engine"):
        coco_mask_ap(ground_truth, results, engine="detectron")

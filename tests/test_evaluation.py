import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gd_hf.evaluation.coco_metric import CocoMaskAP
from gd_hf.evaluation.mask_ap import Instances, coco_mask_ap, post_process_instances, to_coco_results


@pytest.fixture
def ground_truth(synthetic_root):
    return synthetic_root / "annotations" / "instances_val.json"


def gt_as_results(path, score=1.0):
    coco = json.loads(path.read_text())
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": score}
        for a in coco["annotations"]
    ]


def pycocotools_ap(path, results):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        ev = COCOeval(gt, gt.loadRes(results), iouType="segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev.stats[0] * 100


def eroded(results, gt_path, every=2):
    """Shrink every `every`-th predicted mask to its top half (IoU ~ 0.5): a worse prediction."""
    out = []
    for i, r in enumerate(results):
        r = dict(r)
        if i % every == 0:
            mask = mask_utils.decode(
                {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
            )
            rows = np.nonzero(mask.any(1))[0]
            mask[rows[len(rows) // 2] :, :] = 0
            rle = mask_utils.encode(np.asfortranarray(mask))
            r["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}
        out.append(r)
    return out


def test_perfect_predictions_score_100(ground_truth):
    metrics = coco_mask_ap(ground_truth, gt_as_results(ground_truth))
    assert metrics["AP"] == pytest.approx(100.0)
    assert metrics["AP50"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(100.0)


def test_degraded_predictions_score_lower_and_equal_pycocotools(ground_truth):
    degraded = eroded(gt_as_results(ground_truth), ground_truth)
    metrics = coco_mask_ap(ground_truth, degraded)
    assert 0 < metrics["AP"] < 90
    assert metrics["AP"] == pytest.approx(pycocotools_ap(ground_truth, degraded), abs=1e-9)
    wrong_class = [{**r, "category_id": 1 + r["category_id"] % 4} for r in gt_as_results(ground_truth)]
    assert coco_mask_ap(ground_truth, wrong_class)["AP"] == pytest.approx(0.0)
    assert coco_mask_ap(ground_truth, [])["AP"] == 0.0


def test_results_are_not_mutated(ground_truth):
    results = gt_as_results(ground_truth)
    before = json.dumps(results)
    coco_mask_ap(ground_truth, results)
    assert json.dumps(results) == before  # still JSON-serialisable and unchanged


def test_evaluate_metric_wrapper_agrees(ground_truth):
    degraded = eroded(gt_as_results(ground_truth), ground_truth)
    metric = CocoMaskAP()
    by_image: dict[int, list] = {}
    for r in degraded:
        by_image.setdefault(r["image_id"], []).append({k: v for k, v in r.items() if k != "image_id"})
    image_ids = [img["id"] for img in json.loads(ground_truth.read_text())["images"]]
    metric.add_batch(predictions=[by_image.get(i, []) for i in image_ids], references=image_ids)
    metrics = metric.compute(annotation_file=str(ground_truth))
    assert metrics["AP"] == pytest.approx(coco_mask_ap(ground_truth, degraded)["AP"], abs=1e-4)


def test_a_training_launch_does_not_import_the_evaluate_library():
    """The `evaluate` library (not `gd_hf.evaluate`) is imported by `gd_hf.evaluation.coco_metric.CocoMaskAP`'s users only."""
    import subprocess
    import sys

    from .conftest import ROOT

    code = "import gd_hf.train, sys; assert 'evaluate' not in sys.modules, 'the evaluate library was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_post_processing_takes_topk_over_query_class_pairs_and_rescales():
    class_logits = torch.full((1, 3, 3), -10.0)  # 3 queries, 2 classes + no-object
    class_logits[0, 0, 1] = 10.0  # query 0 -> class 1, confident
    class_logits[0, 1, 2] = 10.0  # query 1 -> no object
    class_logits[0, 2, 0] = 2.0
    mask_logits = torch.full((1, 3, 8, 8), -10.0)
    mask_logits[0, 0, :4, :4] = 10.0  # top-left quarter of the padded input
    (instances,) = post_process_instances(
        class_logits, mask_logits, image_sizes=[(4, 8)], original_sizes=[(2, 4)], padded_size=(8, 8), top_k=2
    )
    scores, labels, masks = instances.scores, instances.labels, instances.instance_masks()
    assert labels.tolist()[0] == 1 and scores[0] == pytest.approx(1.0, abs=1e-3)
    assert masks.shape == (2, 2, 4)
    # The image occupies the top 4 rows of the padded input; the mask covers its left half.
    assert masks[0].tolist() == [[True, True, False, False], [True, True, False, False]]
    results = to_coco_results(5, instances, category_ids=[10, 20])
    assert results[0]["category_id"] == 20 and results[0]["image_id"] == 5
    json.dumps(results)


def two_pass_post_process(class_logits, mask_logits, image_size, original_size, padded_size, top_k):
    """The textbook geometry, written independently: logits upsampled to the whole padded input, the image
    cropped out, resized to the original size, thresholded; score x mean mask probability inside."""
    probs = class_logits.softmax(-1)[:, :-1]
    scores, flat = probs.flatten().topk(top_k)
    labels, queries = flat % probs.shape[1], flat // probs.shape[1]
    full = F.interpolate(mask_logits[queries][None], size=padded_size, mode="bilinear", align_corners=False)
    cropped = full[:, :, : image_size[0], : image_size[1]]
    masks = F.interpolate(cropped, size=original_size, mode="bilinear", align_corners=False)[0].sigmoid()
    binary = masks > 0.5
    return scores * (masks * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6), labels, binary


@pytest.mark.parametrize(
    ("image_size", "original_size", "padded_size"),
    [
        ((256, 341), (480, 640), (256, 352)),
        ((341, 256), (640, 480), (352, 256)),
        ((200, 200), (100, 100), (224, 256)),
        # COCO's 640x427 at shortest edge 800: the image fills its frame's height, 200 x 2.135 rounds below 427
        ((800, 1199), (427, 640), (800, 1216)),
        ((1199, 800), (640, 427), (1216, 800)),
    ],
    ids=["landscape_up", "portrait_up", "square_down_padded_both_ways", "coco_640x427", "coco_427x640"],
)
def test_one_pass_post_processing_matches_the_two_pass_geometry(image_size, original_size, padded_size):
    generator = torch.Generator().manual_seed(0)
    h, w = padded_size[0] // 4, padded_size[1] // 4
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    centres = torch.rand(12, 2, generator=generator) * torch.tensor([h, w])
    # Blobs of several sizes, some near the image's bottom/right edge and in the padding.
    mask_logits = 6 - ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).sqrt() / 2
    class_logits = torch.randn(12, 4, generator=generator) * 3
    (instances,) = post_process_instances(
        class_logits[None], mask_logits[None], [image_size], [original_size], padded_size, top_k=20
    )
    scores, labels, masks = instances.scores, instances.labels, instances.instance_masks()
    assert len(instances.masks) <= 12 < len(scores)  # 20 pairs of 12 queries: one mask per query
    ref_scores, ref_labels, ref_masks = two_pass_post_process(
        class_logits, mask_logits, image_size, original_size, padded_size, 20
    )
    assert masks.shape == (20, *original_size) and masks.dtype == torch.bool
    assert torch.equal(labels, ref_labels)
    # The reference's geometry, not an approximation of it: float rounding may flip a pixel sitting at 0 exactly.
    assert ref_masks.any() and (masks ^ ref_masks).sum() <= 1e-5 * (masks | ref_masks).sum()
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("image_size", "original_size", "padded_size"),
    [
        ((256, 341), (480, 640), (256, 352)),
        ((800, 1199), (427, 640), (800, 1216)),
        ((200, 200), (100, 100), (224, 256)),
    ],
)
def test_masks_resampled_within_their_boxes_equal_whole_masks_and_the_two_pass_reference(
    image_size, original_size, padded_size
):
    """The CPU path resamples each mask only where its positive logits reach: the same masks and mean
    probabilities as resampling whole masks, for small blobs, masks of scattered positives (a box as large as
    the image), a mask with no positive logit, and one positive only in the padding."""
    from gd_hf.evaluation.mask_ap import threshold_at_original_size

    generator = torch.Generator().manual_seed(3)
    h, w = padded_size[0] // 4, padded_size[1] // 4
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    centres = torch.rand(6, 2, generator=generator) * torch.tensor([h, w])
    blobs = 4 - ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).sqrt() / 2
    scattered = torch.randn(2, h, w, generator=generator) - 1.5  # ~7 % positive pixels anywhere
    negative = torch.full((1, h, w), -3.0)
    in_padding = torch.full((1, h, w), -3.0)
    in_padding[0, -1, -1] = 5.0  # the last logit lies under padding on both axes
    logits = torch.cat([blobs, scattered, negative, in_padding])
    boxed, boxed_mean = threshold_at_original_size(logits, image_size, original_size, padded_size, within_boxes=True)
    whole, whole_mean = threshold_at_original_size(logits, image_size, original_size, padded_size, within_boxes=False)
    assert boxed.shape == whole.shape == (len(logits), *original_size)
    assert boxed[:6].any() and boxed[6:8].any() and not boxed[8].any()
    assert (boxed ^ whole).sum() <= 1e-5 * (boxed | whole).sum()
    torch.testing.assert_close(boxed_mean, whole_mean, atol=1e-5, rtol=0)
    full = F.interpolate(logits[None], size=padded_size, mode="bilinear", align_corners=False)
    reference = F.interpolate(
        full[:, :, : image_size[0], : image_size[1]], size=original_size, mode="bilinear", align_corners=False
    )[0]
    assert torch.equal(boxed[9], reference[9] > 0)
    assert ((boxed ^ (reference > 0)).sum()) <= 1e-5 * boxed.sum()


def test_rle_encoding_round_trips_the_masks_and_shares_one_mask_between_classes():
    masks = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(1)) > 0.6
    mask_index = torch.tensor([2, 0, 2, 1])  # instances 0 and 2: one query kept with two classes
    instances = Instances(torch.ones(4), torch.tensor([0, 1, 1, 0]), masks, mask_index)
    results = to_coco_results(1, instances, category_ids=[7, 9])
    assert [r["category_id"] for r in results] == [7, 9, 9, 7]
    for result, mask in zip(results, masks[mask_index]):
        rle = {"size": result["segmentation"]["size"], "counts": result["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle), mask.numpy().astype(np.uint8))


def test_val_ground_truth_comes_from_the_cleaned_records_so_labeling_tool_json_evaluates(synthetic_root, tmp_path):
    """Exports of labeling tools: no `iscrowd`, box-only `segmentation: []`, annotation ids from 0. The raw JSON
    crashes pycocotools (KeyError / IndexError) or loses id 0; the run's ground truth is built at start from what
    training reads, and scores a perfect prediction 100."""
    from gd_hf.config import DataConfig
    from gd_hf.data.sources import open_source

    coco = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    for new_id, annotation in enumerate(coco["annotations"]):
        annotation["id"] = new_id
        del annotation["iscrowd"]
    box_only = dict(coco["annotations"][0], id=len(coco["annotations"]), segmentation=[])
    coco["annotations"].append(box_only)
    messy = tmp_path / "instances_val.json"
    messy.write_text(json.dumps(coco))
    data = DataConfig(
        train_images=str(synthetic_root / "train"),
        train_annotations=str(synthetic_root / "annotations" / "instances_train.json"),
        val_images=str(synthetic_root / "val"),
        val_annotations=str(messy),
    )
    ground_truth = open_source(data).val_ground_truth
    assert isinstance(ground_truth, COCO)
    assert len(ground_truth.dataset["annotations"]) == len(coco["annotations"]) - 1  # the box-only one is skipped
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0}
        for a in coco["annotations"][:-1]
    ]
    assert coco_mask_ap(ground_truth, perfect)["AP"] == pytest.approx(100.0)
    # The file itself, as `coco_mask_ap(path)` and the `evaluate` metric take it, reads the same way (raw, it
    # raised KeyError / IndexError in pycocotools).
    assert coco_mask_ap(messy, perfect)["AP"] == pytest.approx(100.0)
    metric = CocoMaskAP()
    for image_id in sorted({a["image_id"] for a in coco["annotations"][:-1]}):
        mine = [
            {k: r[k] for k in ("category_id", "score", "segmentation")} for r in perfect if r["image_id"] == image_id
        ]
        metric.add(predictions=mine, references=image_id)
    assert metric.compute(annotation_file=str(messy))["AP"] == pytest.approx(100.0)

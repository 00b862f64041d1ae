"""COCO mask AP: batched instance post-processing, the COCO ground truth built from gd_hf records, COCOeval
(hotcoco, checked against pycocotools), and the one evaluation driver of training and `python -m gd_hf.evaluate`.
(The `evaluate` metric wrapper is `gd_hf.evaluation.coco_metric.CocoMaskAP`.)"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm.auto import tqdm

from gd_hf.config import DataConfig
from gd_hf.data.ground_truth import ground_truth_from_json
from gd_hf.data.loading import EvalDataset, collate_eval
from gd_hf.files import write_text_atomic
from gd_hf.models import ModelFamily, family_of

METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


@dataclass
class Instances:
    """One image's instances at its original size: K (score, class) pairs, the mask of pair j being
    `masks[mask_index[j]]`. Top-k over query x class pairs often keeps a query with several classes: its mask is
    computed, moved and RLE-encoded once."""

    scores: torch.Tensor  # (K,)
    labels: torch.Tensor  # (K,) contiguous class ids
    masks: torch.Tensor  # (M, H, W) bool, M <= K distinct masks
    mask_index: torch.Tensor  # (K,) long

    def select(self, keep: torch.Tensor) -> Instances:
        """The instances where `keep` (a bool mask over K) is true."""
        return Instances(self.scores[keep], self.labels[keep], self.masks, self.mask_index[keep])

    def instance_masks(self) -> torch.Tensor:
        """(K, H, W): each instance's mask (a copy per instance)."""
        return self.masks[self.mask_index]


def _axis_resampling(logits_len: int, padded_len: int, image_len: int, out_len: int, device) -> torch.Tensor:
    """(out_len, logits_len): the reference's resampling along one axis as a matrix — linear upsampling of the
    logits to the padded input, crop of the image, linear resize to the original size — made by running those
    very interpolations on unit impulses, so it is exact by construction."""
    impulses = torch.eye(logits_len, device=device)[None]  # channel c: a 1 at logit c
    padded = F.interpolate(impulses, size=padded_len, mode="linear", align_corners=False)
    resized = F.interpolate(padded[..., :image_len], size=out_len, mode="linear", align_corners=False)
    return resized[0].T


def resample_to_original(
    mask_logits: torch.Tensor, image_size: tuple[int, int], original_size: tuple[int, int], padded_size: tuple[int, int]
) -> torch.Tensor:
    """Mask logits (K, h, w) over a padded input -> (K, H, W) at the image's original size.

    The reference (Mask2Former's `sem_seg_postprocess`) upsamples to the whole padded input, crops the image and
    resizes it to the original size: for a COCO image that is 100 x 800 x 1344 values, ~3.5x the result, in two
    bilinear passes. Bilinear resampling is separable, so the same result is two small matrix products per mask,
    (W x w) and (H x h), with no padded-size intermediate. (One bilinear pass straight to the original size is
    cheaper but not the same: near the logit grid's knots it moves mask edges enough to change AP by ~0.1.)
    Computed as (K, W, H) and returned as its transposed view: in memory column-major per mask, the layout COCO's
    RLE encoder reads.
    """
    (height, width), (out_h, out_w), (pad_h, pad_w) = image_size, original_size, padded_size
    logits = mask_logits.float()
    rows = _axis_resampling(logits.shape[-2], pad_h, height, out_h, logits.device)  # (H, h)
    cols = _axis_resampling(logits.shape[-1], pad_w, width, out_w, logits.device)  # (W, w)
    # Logit rows/columns that only padding reads have zero weight: leave them out of the products.
    used_rows, used_cols = int(rows.any(0).nonzero().max()) + 1, int(cols.any(0).nonzero().max()) + 1
    along_width = logits[:, :used_rows, :used_cols] @ cols[:, :used_cols].T  # (K, h', W)
    return (along_width.mT @ rows[:, :used_rows].T).mT  # (K, W, H) in memory


def _band_limits(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a resampling matrix, its first and last nonzero column (non-decreasing along the rows)."""
    nonzero = matrix != 0
    first = nonzero.int().argmax(1)
    last = matrix.shape[1] - 1 - nonzero.flip(1).int().argmax(1)
    return first, last


def threshold_at_original_size(
    mask_logits: torch.Tensor,
    image_size: tuple[int, int],
    original_size: tuple[int, int],
    padded_size: tuple[int, int],
    within_boxes: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits (K, h, w) -> the binary masks at the original size (K, H, W; a view of column-major memory,
    what COCO's RLE encoder reads) and each mask's mean probability inside it, as the reference computes them.

    `within_boxes` (default: on the CPU) resamples each mask only inside the box its positive logits can reach.
    Exact, not an approximation: a resampled pixel is a convex combination (bilinear weights are >= 0 and sum to
    1) of the logits its two bands cover, so where all of those are <= 0 the pixel is <= 0, outside the mask, and
    its probability never enters the mean. Objects cover a small part of most images: on the CPU this is ~6x
    faster than resampling whole masks. Off (the accelerator), every mask is resampled at once, batched.
    """
    within_boxes = mask_logits.device.type == "cpu" if within_boxes is None else within_boxes
    if not within_boxes:
        column_major = resample_to_original(mask_logits, image_size, original_size, padded_size).mT
        binary = column_major > 0  # probability > 0.5
        # The sigmoid of the inside pixels only, summed mask by mask (the selected pixels come out in mask order).
        # Counts per mask: a bool reduction over dims is ~15x slower on the CPU.
        inside = torch.stack([torch.count_nonzero(mask) for mask in binary])
        sums = torch.segment_reduce(column_major[binary].sigmoid(), "sum", lengths=inside)
        return binary.mT, sums / (inside + 1e-6)
    (height, width), (out_h, out_w), (pad_h, pad_w) = image_size, original_size, padded_size
    logits = mask_logits.float()
    rows = _axis_resampling(logits.shape[-2], pad_h, height, out_h, logits.device)  # (H, h)
    cols = _axis_resampling(logits.shape[-1], pad_w, width, out_w, logits.device)  # (W, w)
    row_first, row_last = _band_limits(rows)
    col_first, col_last = _band_limits(cols)
    binary = torch.zeros(len(logits), out_w, out_h, dtype=torch.bool, device=logits.device)
    sums = torch.zeros(len(logits), device=logits.device)
    counts = torch.zeros(len(logits), device=logits.device)
    positive = logits > 0
    positive_rows, positive_cols = positive.any(2), positive.any(1)
    for k in range(len(logits)):
        rows_k, cols_k = positive_rows[k].nonzero(), positive_cols[k].nonzero()
        if len(rows_k) == 0:
            continue  # no positive logit: an empty mask
        r0, r1, c0, c1 = int(rows_k[0]), int(rows_k[-1]), int(cols_k[0]), int(cols_k[-1])
        # The output rows (columns) whose band reaches a positive logit's row (column): a contiguous range.
        y0, y1 = int(torch.searchsorted(row_last, r0)), int(torch.searchsorted(row_first, r1, right=True)) - 1
        x0, x1 = int(torch.searchsorted(col_last, c0)), int(torch.searchsorted(col_first, c1, right=True)) - 1
        if y0 > y1 or x0 > x1:
            continue
        i0, i1 = int(row_first[y0]), int(row_last[y1]) + 1  # the logits those outputs read
        j0, j1 = int(col_first[x0]), int(col_last[x1]) + 1
        along_width = logits[k, i0:i1, j0:j1] @ cols[x0 : x1 + 1, j0:j1].T  # (rows read, box width)
        box = along_width.T @ rows[y0 : y1 + 1, i0:i1].T  # (box width, box height): column-major
        inside = box > 0
        binary[k, x0 : x1 + 1, y0 : y1 + 1] = inside
        sums[k] = box[inside].sigmoid().sum()
        counts[k] = inside.sum()
    return binary.mT, sums / (counts + 1e-6)


def post_process_instances(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    image_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
    padded_size: tuple[int, int],
    top_k: int = 100,
) -> list[Instances]:
    """Mask2Former outputs -> per image its instances (scores, labels, bool masks at original size), as the
    reference; the results are on the CPU.

    Top-k over the flattened query x class probabilities (no threshold); score = class probability x mean
    mask probability inside the binary mask. class_logits: (B, Q, C+1); mask_logits: (B, Q, h, w) for an
    input padded to `padded_size`, of which the top-left `image_sizes[i]` is the resized image.
    The work runs where the logits are (the accelerator during training): each kept query is resampled once,
    straight to the original size, and thresholded there (`threshold_at_original_size`); only the binary masks
    and the scores leave the device.
    """
    results = []
    num_classes = class_logits.shape[-1] - 1
    probs = class_logits.float().softmax(-1)[..., :-1]  # (B, Q, C): "no object" dropped
    k = max(1, min(top_k, probs.shape[1] * num_classes))
    top_scores, flat = probs.flatten(1).topk(k)  # (B, k)
    for i in range(class_logits.shape[0]):
        labels, queries = flat[i] % num_classes, flat[i] // num_classes
        # A query may be kept with several classes: resample each query once.
        unique_queries, which = queries.unique(return_inverse=True)
        binary, mean_inside = threshold_at_original_size(
            mask_logits[i, unique_queries], image_sizes[i], original_sizes[i], padded_size
        )
        scores = top_scores[i] * mean_inside[which].to(top_scores.dtype)
        # (M, H, W) views of column-major memory: what the RLE encoder reads, with no copy.
        results.append(Instances(scores.cpu(), labels.cpu(), binary.cpu(), which.cpu()))
    return results


def to_coco_results(image_id: int, instances: Instances, category_ids: list[int]) -> list[dict[str, Any]]:
    """One image's instances as COCO results (compressed RLE, COCO category ids); each distinct mask is encoded
    once."""
    if len(instances.scores) == 0:
        return []
    used = torch.unique(instances.mask_index)
    # pycocotools wants (H, W, M) in Fortran order, which is (M, W, H) in C order: the masks' own memory when
    # they come from `post_process_instances` (so pick the used ones in that layout: no copy but the selection),
    # else one transposing copy.
    column_major = instances.masks.mT[used].contiguous()
    fortran = column_major.numpy().view(np.uint8).T
    encoded = dict(zip(used.tolist(), mask_utils.encode(fortran)))
    results = []
    for index, label, score in zip(instances.mask_index.tolist(), instances.labels.tolist(), instances.scores.tolist()):
        rle = encoded[index]
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[int(label)]),
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()},
                "score": float(score),
            }
        )
    return results


# The COCOeval that scores mask AP: "hotcoco" (Rust; on every case compared, the same 12 stats as pycocotools to
# the last bit; at COCO's size, 5,000 images x 100 detections, 1.5 s against pycocotools' 75 s on a 2-core VM:
# benchmarks/cocoeval_engines.py) or "pycocotools", the reference tests/test_cocoeval_engine.py holds it to.
COCOEVAL_ENGINE = "hotcoco"
COCOEVAL_ENGINES = ("hotcoco", "pycocotools")


def coco_segm_stats(
    ground_truth: COCO, results: list[dict[str, Any]], image_ids: list[int] | None = None, engine: str | None = None
) -> np.ndarray:
    """COCOeval's 12 segm summary stats (fractions; -1 where a size range has no ground truth) of non-empty
    `results` on the images `image_ids` (default: all of the ground truth's), by `engine` (default
    `COCOEVAL_ENGINE`). maxDets 1 / 10 / 100, COCO's size ranges and IoU thresholds, as pycocotools."""
    engine = COCOEVAL_ENGINE if engine is None else engine
    if engine not in COCOEVAL_ENGINES:
        raise ValueError(f"unknown COCOeval engine {engine!r}: one of {', '.join(COCOEVAL_ENGINES)}")
    # Where the engines would differ, one answer for both: pycocotools asserts that the results' images are the
    # ground truth's (hotcoco warns and drops the others), and hotcoco reads no image ids as "every image".
    unknown = {r["image_id"] for r in results} - ground_truth.imgs.keys()
    if unknown:
        raise ValueError(f"results name image ids the ground truth does not list: {sorted(unknown)[:10]}")
    if image_ids is not None and len(image_ids) == 0:
        return np.full(12, -1.0)  # no image evaluated: pycocotools' stats are all -1
    if engine == "pycocotools":
        with contextlib.redirect_stdout(io.StringIO()):
            # loadRes adds numpy-typed area/bbox fields to the dicts it gets: give it copies.
            detections = ground_truth.loadRes([dict(r) for r in results])
            coco_eval = COCOeval(ground_truth, detections, iouType="segm")
            if image_ids is not None:
                coco_eval.params.imgIds = sorted(image_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return np.asarray(coco_eval.stats, dtype=np.float64)
    import hotcoco

    with contextlib.redirect_stdout(io.StringIO()):
        # hotcoco copies what it is given (its own COCO, in Rust): neither the ground truth nor the results change.
        hot_ground_truth = hotcoco.COCO(ground_truth.dataset)
        coco_eval = hotcoco.COCOeval(hot_ground_truth, hot_ground_truth.load_res(results), "segm")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats, dtype=np.float64)


def coco_mask_ap(
    ground_truth: COCO | str | Path,
    results: list[dict[str, Any]],
    image_ids: list[int] | None = None,
    *,
    engine: str | None = None,
) -> dict[str, float]:
    """COCO segm AP (x100): AP, AP50, AP75, APs, APm, APl. No result at all scores 0.

    `ground_truth`: a pycocotools COCO, or a COCO instances JSON, read as training reads it
    (`ground_truth_from_json`): what training accepts, the evaluation accepts. `engine`: the COCOeval that
    computes it (default `COCOEVAL_ENGINE`; "pycocotools" is the reference)."""
    if not isinstance(ground_truth, COCO):
        ground_truth = ground_truth_from_json(ground_truth)
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    stats = coco_segm_stats(ground_truth, results, image_ids, engine)
    # COCOeval reports -1 where a size range has no ground truth; keep it visible as -1.
    return {name: float(v) * 100 if v >= 0 else -1.0 for name, v in zip(METRIC_NAMES, stats[:6])}


@torch.no_grad()
def predict_coco_results(
    model: torch.nn.Module,
    dataloader: torch.utils.data.DataLoader,
    category_ids: list[int],
    top_k: int,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    timings: dict[str, float] | None = None,
    family: ModelFamily | None = None,
) -> list[dict[str, Any]]:
    """Run the model over an evaluation loader (`collate_eval` batches) and return COCO results. The model
    predicts as its `family` says (None: the built-in family of its `model_type`), as its teacher does in training.

    `timings`, if given, receives the seconds spent in `forward`, `postprocess` and `encode` (RLE + results),
    added to what it holds, and the number of `images`."""
    family = family if family is not None else family_of(model)
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    timings = {} if timings is None else timings
    on_cuda = torch.device(device).type == "cuda"

    def lap(key: str, since: float) -> float:
        if on_cuda:
            torch.cuda.synchronize(device)  # kernels run asynchronously: charge them to the stage that ran them
        now = time.perf_counter()
        timings[key] = timings.get(key, 0.0) + now - since
        return now

    try:
        for batch in tqdm(dataloader, desc="evaluate", disable=not show_progress, leave=False):
            start = time.perf_counter()
            pixel_values = batch["pixel_values"].to(device)
            predictions = family.predict(model, pixel_values)
            start = lap("forward", start)
            processed = post_process_instances(
                predictions.class_logits,
                predictions.mask_logits,
                batch["image_sizes"],
                batch["original_sizes"],
                tuple(pixel_values.shape[-2:]),
                top_k,
            )
            start = lap("postprocess", start)
            for image_id, instances in zip(batch["image_ids"], processed):
                results += to_coco_results(image_id, instances, category_ids)
            lap("encode", start)
            timings["images"] = timings.get("images", 0) + len(batch["image_ids"])
    finally:
        model.train(was_training)
    return results


@dataclass
class Evaluation:
    """Mask AP of one model on one set: the metrics, the COCO results, and where the time went (seconds per
    image of forward / post-processing / encoding on this process's share, and COCOeval's seconds)."""

    metrics: dict[str, float]
    results: list[dict[str, Any]]
    costs: dict[str, float]


def evaluate_mask_ap(
    model: torch.nn.Module,
    records: datasets.Dataset,
    ground_truth: COCO,
    category_ids: list[int],
    settings: EvalSettings,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
) -> Evaluation:
    """The one evaluation driver, for training and `python -m gd_hf.evaluate` alike: `model` predicts on its
    share of `records` (every `world_size`-th image from `rank`, resized as `settings.data` says), `gather` joins
    the shares (None: one process), and COCOeval scores all of them against `ground_truth` on exactly the
    images of `records`. `category_ids`: the COCO category id of each model class."""
    family = settings.family if settings.family is not None else family_of(model)
    dataset = EvalDataset(records, settings.data)
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(
        share,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        collate_fn=partial(
            collate_eval,
            padding_divisor=settings.padding_divisor,
            black_padding=family.black_padding,
        ),  # fmt: skip
    )
    timings: dict[str, float] = {}
    results = predict_coco_results(model, loader, category_ids, settings.top_k, device, settings.show_progress,
                                   timings, family)  # fmt: skip
    if gather is not None:
        results = gather(results)
    nonfinite = sum(1 for r in results if not math.isfinite(r["score"]))
    if nonfinite:  # (COCOeval cannot rank them; every figure would be meaningless)
        raise NonFinitePredictionsError(
            f"{nonfinite} of the model's {len(results)} predictions have a non-finite score (NaN or infinity): its "
            "weights give non-finite outputs"
        )
    start = time.perf_counter()
    metrics = coco_mask_ap(ground_truth, results, image_ids=list(records["image_id"]))
    images = max(1, timings.pop("images", 0))
    costs = {f"{stage}_s_per_image": seconds / images for stage, seconds in timings.items()}
    costs["cocoeval_s"] = time.perf_counter() - start
    return Evaluation(metrics, results, costs)


class NonFinitePredictionsError(ValueError):
    """The model's predictions are not numbers: nothing can be scored (training has diverged, or the export is)."""


@dataclass
class EvalSettings:
    """How `evaluate_mask_ap` predicts: test-time sizes (`data.eval_shortest_edge` / `eval_longest_edge`), the
    padding divisor of the model, instances kept per image, batch size, loader workers, a progress bar, and the
    model family (None: the built-in family of the model's `model_type`)."""

    data: DataConfig
    padding_divisor: int
    top_k: int = 100
    batch_size: int = 2
    num_workers: int = 2
    show_progress: bool = True
    family: ModelFamily | None = None


def write_results(path: str | Path, results: list[dict[str, Any]]) -> None:
    """Write COCO-JSON results atomically."""
    write_text_atomic(path, json.dumps(results))

"""Torch datasets over the HF datasets, the step-indexed batch sampler, and collation.

Resuming exactly: the sample at global stream position p (counted over all processes) is image
`perm_e[p % N]` of epoch e = p // N (perm_e seeded by `seed + e`), augmented with a generator seeded from
(seed, p). So step s of a run — on any number of processes, with any number of workers — sees the same
images with the same augmentation, and a resumed run simply starts the sampler at its step.

With repeat factors (the reference's labeled loader in phases 2-3, detectron2's RepeatFactorTrainingSampler),
epoch e lists image i floor(r_i) or floor(r_i) + 1 times (stochastic rounding, seeded by `seed + e`) in a
shuffled order; epochs then differ in length, and position p falls in the epoch whose span holds it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from gd_hf.config import DataConfig
from gd_hf.data.coco import DataError
from gd_hf.data.images import read_image
from gd_hf.data.masks import object_masks
from gd_hf.data.transforms import (
    BLACK,
    REFERENCE_STRONG,
    StrongAugment,
    eval_size,
    normalize,
    pad_to,
    padded_size,
    resize,
    scale_jitter_crop_flip,
    strong_photometric,
)

logger = logging.getLogger(__name__)


def read_image_and_targets(
    example: dict[str, Any], targets_needed: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image (3, H, W) uint8, masks (N, H, W) bool and classes (N,) of the non-crowd objects (crowd regions are
    not targets). `targets_needed=False` (an unlabeled image's hidden labels, for monitoring only): masks that
    cannot be decoded leave the image without labels instead of making it a bad record."""
    image = read_image(example)
    objects = example["objects"]
    keep = [i for i, crowd in enumerate(objects["iscrowd"]) if not crowd]
    try:
        rle_counts, polygons = [objects["rle_counts"][i] for i in keep], [objects["polygons"][i] for i in keep]
        masks = torch.from_numpy(object_masks(rle_counts, polygons, *image.shape[-2:]))
    except ValueError as e:  # a bad record, skipped and counted like a bad image (data.on_error)
        if not targets_needed:
            return image, torch.zeros(0, *image.shape[-2:], dtype=torch.bool), torch.zeros(0, dtype=torch.long)
        path = example["image"].get("path") if isinstance(example["image"], dict) else None
        raise DataError(
            f"image id {example['image_id']} ({path or 'no path'}): a mask cannot be decoded: {e}. Fix or remove "
            "that annotation"
        ) from e
    classes = torch.tensor([objects["category"][i] for i in keep], dtype=torch.long)
    return image, masks, classes


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of the sample at a global stream position."""
    return (seed * 1_000_003 + position) % (2**63 - 1)


def labeled_sample(example: dict[str, Any], data: DataConfig, seed: int) -> dict[str, Any]:
    """A training sample: scale jitter + crop + flip drawn from `seed` (objects cropped away are dropped)."""
    image, masks, classes, _ = _jittered(example, data, seed)
    return {"image": image, "masks": masks, "classes": classes, "image_id": example["image_id"]}


def unlabeled_sample(
    example: dict[str, Any], data: DataConfig, seed: int, strong: StrongAugment = REFERENCE_STRONG
) -> dict[str, Any]:
    """Two views with one geometry: weak (for the teacher) and strong (for the student).

    Both views share the scale jitter, crop and flip; the strong one adds photometric noise only, so the
    teacher's masks on the weak view are valid targets on the strong one. If the record carries labels (the
    hidden labels of synthetic data or ablations), they come back transformed alike, for pseudo-label
    monitoring only; they are never training targets.
    """
    weak, masks, classes, generator = _jittered(example, data, seed, targets_needed=False)
    strong_view = strong_photometric(weak, generator, strong)
    return {
        "weak": weak,
        "strong": strong_view,
        "hidden_masks": masks,
        "hidden_classes": classes,
        "image_id": example["image_id"],
    }


def _jittered(
    example: dict[str, Any], data: DataConfig, seed: int, targets_needed: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    image, masks, classes = read_image_and_targets(example, targets_needed)
    generator = torch.Generator().manual_seed(seed)
    image, masks = scale_jitter_crop_flip(
        image, masks, data.crop_size, data.min_scale, data.max_scale, data.hflip_prob, generator
    )
    visible = masks.flatten(1).any(1)
    return image, masks[visible], classes[visible], generator


MAX_CONSECUTIVE_BAD_RECORDS = 50


class SkipCounter:
    """`data.on_error` for one reader: re-raise, or count and warn (the first few times) and go on."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.total = 0
        self.since_last_sample = 0

    def bad(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise error
        self.total += 1
        self.since_last_sample += 1
        if self.total <= 10:
            logger.warning("skipping a bad record (data.on_error: skip): %s", error)
        if self.since_last_sample >= MAX_CONSECUTIVE_BAD_RECORDS:
            raise DataError(f"{self.since_last_sample} bad records in a row, the last: {error}") from error

    def good(self, sample: dict[str, Any]) -> dict[str, Any]:
        sample["skipped"] = self.since_last_sample  # summed per batch by the collate functions, logged by the loop
        self.since_last_sample = 0
        return sample


class LabeledTrainDataset(torch.utils.data.Dataset):
    """Labeled images with scale jitter + crop + flip; indexed by (row, augmentation seed).

    A bad row (unreadable image, missing field) is skipped for the next row when `data.on_error: skip`, so a
    key always gives a sample, and still the same one on a resumed run."""

    def __init__(self, hf_dataset: datasets.Dataset, data: DataConfig):
        # Decode images ourselves so a bad file raises our error, not a datasets one.
        self.dataset = hf_dataset.cast_column("image", datasets.Image(decode=False))
        self.data = data
        self.skips = SkipCounter(data.on_error)

    def __len__(self) -> int:
        return len(self.dataset)

    def make_sample(self, example: dict[str, Any], seed: int) -> dict[str, Any]:
        return labeled_sample(example, self.data, seed)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        row, seed = key
        while True:
            try:
                return self.skips.good(self.make_sample(self.dataset[row], seed))
            except DataError as e:
                self.skips.bad(e)
                row = (row + 1) % len(self.dataset)


class UnlabeledTrainDataset(LabeledTrainDataset):
    """Unlabeled images as weak + strong views (`unlabeled_sample`), indexed like `LabeledTrainDataset`."""

    def __init__(self, hf_dataset: datasets.Dataset, data: DataConfig, strong: StrongAugment = REFERENCE_STRONG):
        super().__init__(hf_dataset, data)
        self.strong = strong

    def make_sample(self, example: dict[str, Any], seed: int) -> dict[str, Any]:
        return unlabeled_sample(example, self.data, seed, self.strong)


class StreamedTrainDataset(torch.utils.data.IterableDataset):
    """Training samples from a stream of records: shuffled per epoch (shard order + a buffer), split over
    processes (`split_dataset_by_node`; the DataLoader workers of a process split its shards), endless (epoch
    after epoch), and resumable with `torchdata`'s `StatefulDataLoader` (`state_dict` / `load_state_dict`).

    The state is (epoch, records read this epoch) per process and worker. What one worker reads is a function
    of (seed, epoch, rank, world size, worker, number of workers), so a resumed worker re-reads the records it
    had read this epoch without decoding them and goes on exactly where it stopped (same records, same
    augmentation seeds). Not `datasets`' own `state_dict`: it drops the shuffle buffer on resume, and its
    state cannot be restored inside a DataLoader worker in datasets 5.2.
    """

    def __init__(
        self,
        records: datasets.IterableDataset,
        make_sample: Any,  # (record, seed=...) -> sample
        data: DataConfig,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        check: Any = None,  # record -> record, raising DataError on a malformed one
    ):
        if records.features is not None and "image" in records.features:
            # Decode images ourselves so a bad file is skipped (or raises our error), not a datasets one.
            records = records.cast_column("image", datasets.Image(decode=False))
        self.records = records
        self.make_sample = make_sample
        self.data = data
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.check = check
        self._epoch = 0
        self._count = 0
        self.skips = SkipCounter(data.on_error)

    def epoch_stream(self, epoch: int) -> datasets.IterableDataset:
        """This process's records for `epoch` (the same shuffle seed on every rank, as split_dataset_by_node
        requires)."""
        stream = self.records.shuffle(seed=self.seed, buffer_size=self.data.shuffle_buffer)
        stream.set_epoch(epoch)
        return split_dataset_by_node(stream, self.rank, self.world_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        while True:
            already_read, self._count = self._count, 0
            for example in self.epoch_stream(self._epoch):
                self._count += 1
                if self._count <= already_read:
                    continue  # resuming: read before the checkpoint
                seed = _stream_seed(self.seed, self.rank, worker, self._epoch, self._count)
                try:
                    if self.check is not None:
                        example = self.check(example)
                    sample = self.make_sample(example, seed=seed)
                except DataError as e:
                    self.skips.bad(e)
                    continue
                yield self.skips.good(sample)
            if self._count == 0:
                raise DataError("a training stream is empty for this process: fewer records than processes?")
            self._epoch, self._count = self._epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._count = state["epoch"], state["count"]


def _stream_seed(seed: int, rank: int, worker: int, epoch: int, count: int) -> int:
    return int(np.random.SeedSequence([seed, rank, worker, epoch, count]).generate_state(1, np.uint64)[0] >> 1)


def collate_unlabeled(
    samples: list[dict[str, Any]], padding_divisor: int, black_padding: bool = False
) -> dict[str, Any]:
    """Pad both views of a batch alike; keep the hidden labels (possibly empty) for monitoring. `black_padding`:
    the model family's padding (`ModelFamily.black_padding`; False: the mean colour)."""
    height, width = padded_size([tuple(s["weak"].shape[-2:]) for s in samples], padding_divisor)
    fill = BLACK if black_padding else None
    return {
        "skipped": sum(s.get("skipped", 0) for s in samples),
        "weak_pixel_values": torch.stack([pad_to(normalize(s["weak"]), height, width, fill) for s in samples]),
        "strong_pixel_values": torch.stack([pad_to(normalize(s["strong"]), height, width, fill) for s in samples]),
        "hidden_masks": [pad_to(s["hidden_masks"].float(), height, width) for s in samples],
        "hidden_classes": [s["hidden_classes"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        **({"pad_fill": fill} if black_padding else {}),  # how `pad_batch` pads the images further
    }


class EvalDataset(torch.utils.data.Dataset):
    """Images resized for evaluation (as the saved image processor does), with their original size."""

    def __init__(self, hf_dataset: datasets.Dataset, data: DataConfig):
        self.dataset = hf_dataset.cast_column("image", datasets.Image(decode=False))
        self.data = data

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> dict[str, Any]:
        example = self.dataset[row]
        image = read_image(example)
        resized = resize_for_eval(image, self.data.eval_shortest_edge, self.data.eval_longest_edge)
        return {"image": resized, "image_id": example["image_id"], "original_size": tuple(image.shape[-2:])}


def resize_for_eval(image: torch.Tensor, shortest_edge: int, longest_edge: int) -> torch.Tensor:
    """A uint8 (3, H, W) image resized as the exported image processor resizes it (`eval_size`)."""
    height, width = image.shape[-2:]
    new_h, new_w = eval_size(height, width, shortest_edge, longest_edge)
    return resize(image, torch.zeros(0, height, width, dtype=torch.bool), new_h, new_w)[0]


def repeat_factors(image_categories: list[list[int]], threshold: float) -> np.ndarray:
    """detectron2's repeat factors from category frequency (LVIS, Gupta et al. 2019), one per image.

    f(c) = share of the images that contain class c; r(c) = max(1, sqrt(threshold / f(c))); an image's factor
    is the largest r(c) of its classes (1 for an image without objects). The reference uses threshold 10 for
    the labeled loader of phases 2-3: above 1, every class counts as rare, so images are drawn in proportion
    to 1 / sqrt(f) of their rarest class.
    """
    if threshold <= 0:
        raise ValueError(f"repeat threshold must be > 0, got {threshold}")
    num_images = len(image_categories)
    images_with: dict[int, int] = {}
    for categories in image_categories:
        for c in set(categories):
            images_with[c] = images_with.get(c, 0) + 1
    class_factor = {c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in images_with.items()}
    return np.array([max((class_factor[c] for c in set(cats)), default=1.0) for cats in image_categories])


@dataclass
class StepBatchSampler:
    """Infinite batches of (row, augmentation seed) for one process, starting at `start_step` (see module doc).

    `repeat_factors` (one per row, each >= 1) turns on repeat-factor sampling; `None` = every row once per epoch.
    """

    num_items: int
    batch_size: int
    seed: int
    start_step: int = 0
    rank: int = 0
    world_size: int = 1
    repeat_factors: np.ndarray | None = None

    def batch_positions(self, step: int) -> list[int]:
        """Global stream positions this process reads at micro-batch `step`."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The rows of `epoch`, in the order they are read."""
        rng = np.random.Generator(np.random.PCG64(self.seed + epoch))
        if self.repeat_factors is None:
            return rng.permutation(self.num_items)
        whole = np.floor(self.repeat_factors)
        copies = (whole + (rng.random(self.num_items) < self.repeat_factors - whole)).astype(np.int64)
        return rng.permutation(np.repeat(np.arange(self.num_items), copies))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.repeat_factors is not None and (
            len(self.repeat_factors) != self.num_items or np.any(self.repeat_factors < 1)
        ):
            raise ValueError(f"need {self.num_items} repeat factors, each >= 1")
        # Epochs are walked from the first, so their (possibly varying) lengths place every position.
        epoch, epoch_start, order = 0, 0, self.epoch_order(0)
        step = self.start_step
        while True:
            batch = []
            for position in self.batch_positions(step):
                while position >= epoch_start + len(order):
                    epoch, epoch_start = epoch + 1, epoch_start + len(order)
                    order = self.epoch_order(epoch)
                batch.append((int(order[position - epoch_start]), sample_seed(self.seed, position)))
            yield batch
            step += 1


def collate_train(samples: list[dict[str, Any]], padding_divisor: int, black_padding: bool = False) -> dict[str, Any]:
    """Pad to a common size (multiple of `padding_divisor`; images with the mean colour, or black with
    `black_padding`) and build the model's inputs and targets."""
    height, width = padded_size([tuple(s["image"].shape[-2:]) for s in samples], padding_divisor)
    fill = BLACK if black_padding else None
    return {
        "skipped": sum(s.get("skipped", 0) for s in samples),
        "pixel_values": torch.stack([pad_to(normalize(s["image"]), height, width, fill) for s in samples]),
        "mask_labels": [pad_to(s["masks"].float(), height, width) for s in samples],
        "class_labels": [s["classes"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        **({"pad_fill": fill} if black_padding else {}),
    }


# The spatial entries of collated training batches: images (B, 3, H, W) and per-image masks (N_i, H, W).
_FRAME_TENSORS = ("pixel_values", "weak_pixel_values", "strong_pixel_values")
_FRAME_MASK_LISTS = ("mask_labels", "hidden_masks")


def frame_size(batch: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of the padded frame a collated training batch (labeled or unlabeled) lives in."""
    key = "pixel_values" if "pixel_values" in batch else "weak_pixel_values"
    return tuple(batch[key].shape[-2:])


def pad_batch(batch: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """The batch in a larger padded frame: its images and every mask that belongs to them, padded alike.

    Mask2Former's matcher and loss sample targets in coordinates normalised to each tensor's extent, so a target
    is only under its prediction when the target covers exactly the frame of the `pixel_values` it belongs to.
    Whatever meets in one forward pass (labeled images, strong views, the teacher's weak views and so its pseudo
    labels) must therefore be padded to one frame, images and masks together: this does that for one batch.
    """
    if frame_size(batch) == (height, width):
        return batch
    padded = dict(batch)
    for key in _FRAME_TENSORS:
        if key in batch:
            padded[key] = pad_to(batch[key], height, width, batch.get("pad_fill"))
    for key in _FRAME_MASK_LISTS:
        if key in batch:
            padded[key] = [pad_to(m, height, width) for m in batch[key]]
    return padded


def collate_eval(samples: list[dict[str, Any]], padding_divisor: int, black_padding: bool = False) -> dict[str, Any]:
    """Pad a batch of evaluation images (as the family's exported processor pads); keep each one's resized and
    original size for post-processing."""
    sizes = [tuple(s["image"].shape[-2:]) for s in samples]
    height, width = padded_size(sizes, padding_divisor)
    fill = BLACK if black_padding else None
    return {
        "pixel_values": torch.stack([pad_to(normalize(s["image"]), height, width, fill) for s in samples]),
        "image_sizes": sizes,
        "original_sizes": [s["original_size"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
    }

"""Torch datasets over the HF datasets, the step-indexed batch sampler, and collation.

Resuming exactly: the sample at global stream position p (counted over all processes) is image
`perm_e[p % N]` of epoch e = p // N (perm_e seeded by `seed + e`), augmented with a generator seeded from
(seed, p). So step s of a run — on any number of processes, with any number of workers — sees the same
images with the same augmentation, and a resumed run simply starts the sampler at its step.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from gd_hf.config import DataConfig
from gd_hf.data.coco import DataError, decode_masks
from gd_hf.data.transforms import (
    eval_size,
    normalize,
    pad_to,
    padded_size,
    resize,
    scale_jitter_crop_flip,
    strong_photometric,
)


def read_image(example: dict[str, Any]) -> torch.Tensor:
    """Decode the example's image (an undecoded `datasets.Image` cell) as uint8 RGB (3, H, W).

    Unreadable files raise a `DataError` that names the file and the image id.
    """
    cell = example["image"]
    path = cell.get("path") or "<bytes>"
    try:
        image = Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"])
        image.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise DataError(
            f"cannot read image {path} (image id {example['image_id']}): {e}. Replace the file, or remove the image "
            "and its annotations from the JSON."
        ) from e
    if image.mode != "RGB":
        image = image.convert("RGB")
    if (image.width, image.height) != (example["width"], example["height"]):
        raise DataError(
            f"image {path} (image id {example['image_id']}) is {image.width}x{image.height} but the annotation file "
            f"says {example['width']}x{example['height']}: fix width/height in the JSON"
        )
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def read_image_and_targets(example: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image (3, H, W) uint8, masks (N, H, W) bool and classes (N,) of the non-crowd objects (crowd regions are
    not targets)."""
    image = read_image(example)
    objects = example["objects"]
    keep = [i for i, crowd in enumerate(objects["iscrowd"]) if not crowd]
    masks = torch.from_numpy(
        decode_masks([objects["rle_counts"][i] for i in keep], example["height"], example["width"])
    )
    classes = torch.tensor([objects["category"][i] for i in keep], dtype=torch.long)
    return image, masks, classes


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of the sample at a global stream position."""
    return (seed * 1_000_003 + position) % (2**63 - 1)


class LabeledTrainDataset(torch.utils.data.Dataset):
    """Labeled images with scale jitter + crop + flip; indexed by (row, augmentation seed)."""

    def __init__(self, hf_dataset: datasets.Dataset, data: DataConfig):
        # Decode images ourselves so a bad file raises our error, not a datasets one.
        self.dataset = hf_dataset.cast_column("image", datasets.Image(decode=False))
        self.data = data

    def __len__(self) -> int:
        return len(self.dataset)

    def jittered(
        self, key: tuple[int, int]
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
        """Row `key[0]` after the geometry draw seeded by `key[1]`; the generator is returned to draw on."""
        row, seed = key
        example = self.dataset[row]
        image, masks, classes = read_image_and_targets(example)
        generator = torch.Generator().manual_seed(seed)
        d = self.data
        image, masks = scale_jitter_crop_flip(
            image, masks, d.crop_size, d.min_scale, d.max_scale, d.hflip_prob, generator
        )
        visible = masks.flatten(1).any(1)  # objects cropped away are no longer targets
        return example, image, masks[visible], classes[visible], generator

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        example, image, masks, classes, _ = self.jittered(key)
        return {"image": image, "masks": masks, "classes": classes, "image_id": example["image_id"]}


class UnlabeledTrainDataset(LabeledTrainDataset):
    """Unlabeled images as two views with one geometry: weak (for the teacher) and strong (for the student).

    Both views share the scale jitter, crop and flip; the strong one adds photometric noise only, so the
    teacher's masks on the weak view are valid targets on the strong one. If the rows carry labels (the
    hidden labels of synthetic data or ablations), they come back transformed alike, for pseudo-label
    monitoring only; they are never training targets.
    """

    def __init__(self, hf_dataset: datasets.Dataset, data: DataConfig, strong_erase_prob: float = 0.0):
        super().__init__(hf_dataset, data)
        self.strong_erase_prob = strong_erase_prob

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        example, weak, masks, classes, generator = self.jittered(key)
        strong = strong_photometric(weak, generator, erase_prob=self.strong_erase_prob)
        return {
            "weak": weak,
            "strong": strong,
            "hidden_masks": masks,
            "hidden_classes": classes,
            "image_id": example["image_id"],
        }


def collate_unlabeled(samples: list[dict[str, Any]], divisibility: int) -> dict[str, Any]:
    """Pad both views of a batch alike; keep the hidden labels (possibly empty) for monitoring."""
    height, width = padded_size([tuple(s["weak"].shape[-2:]) for s in samples], divisibility)
    return {
        "weak_pixel_values": torch.stack([pad_to(normalize(s["weak"]), height, width) for s in samples]),
        "strong_pixel_values": torch.stack([pad_to(normalize(s["strong"]), height, width) for s in samples]),
        "hidden_masks": [pad_to(s["hidden_masks"].float(), height, width) for s in samples],
        "hidden_classes": [s["hidden_classes"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
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
        height, width = image.shape[-2:]
        new_h, new_w = eval_size(height, width, self.data.eval_shortest_edge, self.data.eval_longest_edge)
        image, _ = resize(image, torch.zeros(0, height, width, dtype=torch.bool), new_h, new_w)
        return {"image": image, "image_id": example["image_id"], "original_size": (height, width)}


@dataclass
class StepBatchSampler:
    """Infinite batches of (row, augmentation seed) for one process, starting at `start_step` (see module doc)."""

    num_items: int
    batch_size: int
    seed: int
    start_step: int = 0
    rank: int = 0
    world_size: int = 1

    def batch_positions(self, step: int) -> list[int]:
        """Global stream positions this process reads at micro-batch `step`."""
        first = (step * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        permutations: dict[int, np.ndarray] = {}
        step = self.start_step
        while True:
            batch = []
            for position in self.batch_positions(step):
                epoch, offset = divmod(position, self.num_items)
                if epoch not in permutations:
                    permutations.clear()  # keep one or two epochs in memory
                    rng = np.random.Generator(np.random.PCG64(self.seed + epoch))
                    permutations[epoch] = rng.permutation(self.num_items)
                batch.append((int(permutations[epoch][offset]), sample_seed(self.seed, position)))
            yield batch
            step += 1


def collate_train(samples: list[dict[str, Any]], divisibility: int) -> dict[str, Any]:
    """Pad to a common size (multiple of `divisibility`) and build Mask2Former's inputs and targets."""
    height, width = padded_size([tuple(s["image"].shape[-2:]) for s in samples], divisibility)
    return {
        "pixel_values": torch.stack([pad_to(normalize(s["image"]), height, width) for s in samples]),
        "mask_labels": [pad_to(s["masks"].float(), height, width) for s in samples],
        "class_labels": [s["classes"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
    }


def collate_eval(samples: list[dict[str, Any]], divisibility: int) -> dict[str, Any]:
    """Pad a batch of evaluation images; keep each one's resized and original size for post-processing."""
    sizes = [tuple(s["image"].shape[-2:]) for s in samples]
    height, width = padded_size(sizes, divisibility)
    return {
        "pixel_values": torch.stack([pad_to(normalize(s["image"]), height, width) for s in samples]),
        "image_sizes": sizes,
        "original_sizes": [s["original_size"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
    }

"""What a run draws at each evaluation: the model's predictions on val images beside their truth, and the teacher's
pseudo labels on the weak views the student just trained on beside their hidden truth (`gd_hf.pictures` draws).

The pseudo-label picture shows what flowed: `GuidedDistillation` keeps the weak views, pseudo labels and hidden
labels of the step before an evaluation (`KeptPseudoLabels`), exactly as the loss used them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from gd_hf.data.images import read_image
from gd_hf.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gd_hf.files import write_bytes_atomic
from gd_hf.pictures import draw_overlay, picture_grid

PREDICTION_THRESHOLD = 0.5  # the score above which the pictures show an instance (gd_hf.predict's default)
EXPORT_EXAMPLES = 2  # val images shipped in each export's examples/ (the card's snippet and a Space use them)


@dataclass
class KeptPseudoLabels:
    """The first images of one step's unlabeled batch as the loss saw them: normalised weak views (B, 3, H, W),
    the pseudo labels (hard masks at the teacher's mask resolution, classes, scores) and the hidden labels."""

    step: int
    weak_pixel_values: torch.Tensor
    masks: list[torch.Tensor]
    classes: list[torch.Tensor]
    scores: list[torch.Tensor]
    hidden_masks: list[torch.Tensor]
    hidden_classes: list[torch.Tensor]


def keep_pseudo_labels(step: int, unlabeled: dict[str, Any], pseudo: Any, count: int) -> KeptPseudoLabels:
    """The first `count` images of a step's unlabeled batch and their pseudo labels, on the CPU."""
    return KeptPseudoLabels(
        step=step,
        weak_pixel_values=unlabeled["weak_pixel_values"][:count].detach().cpu(),
        masks=[m.detach().cpu() for m in pseudo.mask_labels[:count]],
        classes=[c.detach().cpu() for c in pseudo.class_labels[:count]],
        scores=[s.detach().cpu() for s in pseudo.scores[:count]],
        hidden_masks=[m.detach().cpu() for m in unlabeled["hidden_masks"][:count]],
        hidden_classes=[c.detach().cpu() for c in unlabeled["hidden_classes"][:count]],
    )


def denormalize(pixel_values: torch.Tensor) -> Image.Image:
    """A normalised (3, H, W) frame back to the picture it was made from (padding included)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((pixel_values.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


PANEL = 320  # the side of a picture's panels (`picture_grid`'s cell)


def overlay_in_panel(image: Image.Image, masks: torch.Tensor | np.ndarray, labels: list[str],
                     scores: list[float] | None = None) -> Image.Image:  # fmt: skip
    """The overlay drawn at the size the panel shows it (labels and outlines sized for the panel: a 64 px image
    drawn first and enlarged after would get labels as big as its objects)."""
    scale = PANEL / max(image.width, image.height)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    masks = torch.as_tensor(np.asarray(masks, dtype=bool))
    resized = _at_size(masks.float(), height, width) if len(masks) else torch.zeros(0, height, width, dtype=torch.bool)
    return draw_overlay(image.resize((width, height), Image.BILINEAR), resized, labels, scores)


def _at_size(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Masks (N, h, w) -> bool (N, height, width), nearest (the teacher's masks are at 1/4 of the input)."""
    if masks.numel() == 0:
        return torch.zeros(0, height, width, dtype=torch.bool)
    if tuple(masks.shape[-2:]) == (height, width):
        return masks > 0.5
    return torch.nn.functional.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0] > 0.5


def pseudo_label_picture(kept: KeptPseudoLabels, names: list[str]) -> Image.Image:
    """One row per unlabeled image: the weak view with the teacher's pseudo labels, and beside it the hidden
    truth when the data carry one."""
    rows, titles = [], []
    with_truth = any(len(c) for c in kept.hidden_classes)
    for i in range(len(kept.masks)):
        view = denormalize(kept.weak_pixel_values[i])
        height, width = view.height, view.width
        # The paper's soft-area rule can keep a query whose hard mask is empty ("this class, no pixels"): a
        # target the student is taught, but nothing to draw; the title counts it apart.
        drawn = (kept.masks[i] > 0.5).flatten(1).any(1) if len(kept.masks[i]) else torch.zeros(0, dtype=torch.bool)
        masks = _at_size(kept.masks[i][drawn], height, width)
        labels = [names[int(c)] for c in kept.classes[i][drawn]]
        row = [overlay_in_panel(view, masks, labels, kept.scores[i][drawn].tolist())]
        empty = len(drawn) - int(drawn.sum())
        title = [f"pseudo labels: {len(labels)}" + (f" (+{empty} with an empty mask)" if empty else "")]
        if with_truth:
            truth = _at_size(kept.hidden_masks[i], height, width)
            row.append(overlay_in_panel(view, truth, [names[int(c)] for c in kept.hidden_classes[i]]))
            title.append(f"hidden truth: {len(kept.hidden_classes[i])}")
        rows.append(row)
        titles.append(title)
    return picture_grid(rows, titles, PANEL, f"teacher's pseudo labels on the weak views of step {kept.step}")


def val_examples(val: datasets.Dataset, count: int) -> list[tuple[int, Image.Image]]:
    """The first `count` val images (id, RGB image as evaluation reads it)."""
    rows = val.select(range(min(count, len(val)))).cast_column("image", datasets.Image(decode=False))
    return [(int(row["image_id"]), Image.fromarray(read_image(row).permute(1, 2, 0).numpy())) for row in rows]


def _decoded(segmentation: dict[str, Any]) -> np.ndarray:
    rle = dict(segmentation)
    if isinstance(rle.get("counts"), str):
        rle["counts"] = rle["counts"].encode()
    return mask_utils.decode(rle).astype(bool)


def prediction_picture(
    examples: list[tuple[int, Image.Image]], results: list[dict[str, Any]], ground_truth: COCO,
    category_ids: list[int], names: list[str], step: int, threshold: float = PREDICTION_THRESHOLD,
) -> Image.Image:  # fmt: skip
    """One row per val image: the model's instances above `threshold` (COCO results, as evaluated), and its
    ground truth beside."""
    name_of = dict(zip(category_ids, names))
    shown: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id, _ in examples}
    for result in results:  # one pass (COCO val: 5,000 images x 100 results)
        if result["image_id"] in shown and result["score"] > threshold:
            shown[result["image_id"]].append(result)
    rows, titles = [], []
    for image_id, image in examples:
        mine = sorted(shown[image_id], key=lambda r: -r["score"])
        masks = (
            np.stack([_decoded(r["segmentation"]) for r in mine])
            if mine
            else np.zeros((0, image.height, image.width), bool)
        )
        predicted = overlay_in_panel(
            image, masks, [name_of[r["category_id"]] for r in mine], [r["score"] for r in mine]
        )
        truth = [a for a in ground_truth.imgToAnns.get(image_id, []) if not a.get("iscrowd")]
        truth_masks = (np.stack([ground_truth.annToMask(a).astype(bool) for a in truth]) if truth
                       else np.zeros((0, image.height, image.width), bool))  # fmt: skip
        rows.append(
            [predicted, overlay_in_panel(image, truth_masks, [name_of.get(a["category_id"], "?") for a in truth])]
        )
        titles.append([f"prediction: {len(mine)} (score > {threshold:g})", f"truth: {len(truth)}"])
    return picture_grid(rows, titles, PANEL, f"val predictions at step {step}")


def png_bytes(image: Image.Image) -> bytes:
    """A picture as a PNG file (zlib level 3: `optimize` took ~1 s per picture, at every evaluation)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    """An example image as a JPEG file (quality 95: photos stay small, predictions barely change)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def save_picture(png: bytes, path: Path) -> Path:
    """Write a PNG (`png_bytes`) atomically (a crash leaves the previous picture or none)."""
    return write_bytes_atomic(path, png)

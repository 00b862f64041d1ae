"""Image + mask transforms in plain torch (torchvision is not required), applied identically to both.

Images are uint8 tensors (3, H, W) until `normalize`; masks are bool tensors (N, H, W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(image: torch.Tensor, masks: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (antialiased) for the image, nearest for the masks, so mask edges stay binary."""
    if (height, width) == tuple(image.shape[-2:]):
        return image, masks
    resized = F.interpolate(
        image[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    image = resized[0].round().clamp(0, 255).to(torch.uint8)
    if masks.shape[0]:
        masks = F.interpolate(masks[None].to(torch.uint8), size=(height, width), mode="nearest-exact")[0].bool()
    else:
        masks = masks.new_zeros((0, height, width))
    return image, masks


def scale_jitter_crop_flip(
    image: torch.Tensor,
    masks: torch.Tensor,
    crop_size: int,
    min_scale: float,
    max_scale: float,
    hflip_prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Large-scale jitter: fit into `crop_size * s` (s ~ U[min, max]), random `crop_size` crop, random flip."""
    height, width = image.shape[-2:]
    scale = min_scale + (max_scale - min_scale) * torch.rand((), generator=generator).item()
    ratio = crop_size * scale / max(height, width)
    new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    image, masks = resize(image, masks, new_h, new_w)
    top = int(torch.randint(0, new_h - crop_size + 1, (), generator=generator)) if new_h > crop_size else 0
    left = int(torch.randint(0, new_w - crop_size + 1, (), generator=generator)) if new_w > crop_size else 0
    image = image[:, top : top + crop_size, left : left + crop_size]
    masks = masks[:, top : top + crop_size, left : left + crop_size]
    if torch.rand((), generator=generator).item() < hflip_prob:
        image, masks = image.flip(-1), masks.flip(-1)
    return image, masks


def eval_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """Size after the test-time resize: shorter side -> shortest_edge, longer side capped at longest_edge."""
    scale = shortest_edge / min(height, width)
    if max(height, width) * scale > longest_edge:
        scale = longest_edge / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float, ImageNet mean/std (the image processor's defaults)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


def padded_size(sizes: list[tuple[int, int]], divisibility: int) -> tuple[int, int]:
    """The smallest (H, W) holding every size, rounded up to a multiple of `divisibility`."""
    height = max(s[0] for s in sizes)
    width = max(s[1] for s in sizes)
    return math.ceil(height / divisibility) * divisibility, math.ceil(width / divisibility) * divisibility


def pad_to(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad the last two dims at the bottom/right (after normalisation 0 is the mean colour)."""
    return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))

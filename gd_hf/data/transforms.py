"""Image + mask transforms in plain torch (torchvision is not required), applied identically to both.

Images are uint8 tensors (3, H, W) until `normalize`; masks are bool tensors (N, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# Black (uint8 0) after normalisation, per channel: the padding of a processor that pads before normalising.
BLACK = normalize(torch.zeros(3, 1, 1, dtype=torch.uint8)).flatten()


def padded_size(sizes: list[tuple[int, int]], padding_divisor: int) -> tuple[int, int]:
    """The smallest (H, W) holding every size, rounded up to a multiple of `padding_divisor`."""
    height = max(s[0] for s in sizes)
    width = max(s[1] for s in sizes)
    return math.ceil(height / padding_divisor) * padding_divisor, math.ceil(width / padding_divisor) * padding_divisor


def pad_to(tensor: torch.Tensor, height: int, width: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Pad the last two dims at the bottom/right: with zeros (after normalisation 0 is the mean colour), or, for
    images (..., 3, H, W), with the per-channel `fill` (`BLACK`: what an image processor that pads before
    normalising gives, as EoMT's)."""
    if fill is None:
        return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))
    padded = fill.to(tensor.dtype).view(3, 1, 1).expand(*tensor.shape[:-2], height, width).clone()
    padded[..., : tensor.shape[-2], : tensor.shape[-1]] = tensor
    return padded


# ---------------------------------------------------------------------------------------------------
# Photometric ("strong") augmentation of the student's view: colour only, geometry untouched, so the
# teacher's masks on the weak view stay valid targets.


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image.unbind(0)
    maximum, _ = image.max(0)
    minimum, _ = image.min(0)
    delta = maximum - minimum
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        maximum == r, ((g - b) / safe) % 6, torch.where(maximum == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    saturation = torch.where(
        maximum > 0, delta / torch.where(maximum > 0, maximum, torch.ones_like(maximum)), torch.zeros_like(maximum)
    )
    return torch.stack([hue, saturation, maximum])


def _hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = image.unbind(0)
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    p, q, t = value * (1 - saturation), value * (1 - saturation * f), value * (1 - saturation * (1 - f))
    i = i.long() % 6
    r = torch.stack([value, q, p, p, t, value])
    g = torch.stack([t, value, value, q, p, p])
    b = torch.stack([p, p, t, value, value, q])
    index = i[None]
    return torch.stack([r.gather(0, index)[0], g.gather(0, index)[0], b.gather(0, index)[0]])


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]


def color_jitter(
    image: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float, generator: torch.Generator
) -> torch.Tensor:
    """torchvision-style ColorJitter on a float image in [0, 1] (3, H, W), factors applied in random order."""

    def factor(amount: float) -> float:
        return 1.0 + (2 * torch.rand((), generator=generator).item() - 1) * amount

    for op in torch.randperm(4, generator=generator).tolist():
        if op == 0 and brightness > 0:
            image = (image * factor(brightness)).clamp(0, 1)
        elif op == 1 and contrast > 0:
            mean = _grayscale(image).mean()
            image = ((image - mean) * factor(contrast) + mean).clamp(0, 1)
        elif op == 2 and saturation > 0:
            gray = _grayscale(image)
            image = ((image - gray) * factor(saturation) + gray).clamp(0, 1)
        elif op == 3 and hue > 0:
            hsv = _rgb_to_hsv(image)
            shift = (2 * torch.rand((), generator=generator).item() - 1) * hue
            hsv[0] = (hsv[0] + shift) % 1.0
            image = _hsv_to_rgb(hsv).clamp(0, 1)
    return image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a float image (3, H, W), kernel radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return blurred[0]


@dataclass(frozen=True)
class StrongAugment:
    """The strong view's photometric noise; the defaults are the reference's."""

    jitter_prob: float = 0.8
    hue: float = 0.1  # colour jitter's hue shift (brightness/contrast/saturation: 0.4)
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    erase_prob: float = 0.0  # not in the reference


REFERENCE_STRONG = StrongAugment()


def strong_photometric(
    image: torch.Tensor, generator: torch.Generator, augment: StrongAugment = REFERENCE_STRONG
) -> torch.Tensor:
    """The strong view on a uint8 image: colour jitter (0.4/0.4/0.4/hue, p `jitter_prob`), grayscale, Gaussian
    blur (sigma 0.1-2), optional random erasing, with the probabilities of `augment`."""
    jitter_prob, grayscale_prob = augment.jitter_prob, augment.grayscale_prob
    blur_prob, erase_prob = augment.blur_prob, augment.erase_prob
    out = image.float() / 255.0

    def chance(p: float) -> bool:
        return p > 0 and torch.rand((), generator=generator).item() < p

    if chance(jitter_prob):
        out = color_jitter(out, 0.4, 0.4, 0.4, augment.hue, generator)
    if chance(grayscale_prob):
        out = _grayscale(out).expand(3, -1, -1).clone()
    if chance(blur_prob):
        out = gaussian_blur(out, 0.1 + 1.9 * torch.rand((), generator=generator).item())
    if chance(erase_prob):
        height, width = out.shape[-2:]
        area = (0.02 + 0.18 * torch.rand((), generator=generator).item()) * height * width
        aspect = math.exp((2 * torch.rand((), generator=generator).item() - 1) * math.log(3))
        h = min(height, max(1, round(math.sqrt(area * aspect))))
        w = min(width, max(1, round(math.sqrt(area / aspect))))
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        out[:, top : top + h, left : left + w] = torch.rand((3, 1, 1), generator=generator)
    return (out * 255).round().clamp(0, 255).to(torch.uint8)

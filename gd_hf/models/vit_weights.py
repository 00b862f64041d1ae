"""DINOv2 weights into an EoMT: the ViT's names, its [CLS] position folded in, the position grid and the patch
embedding resampled to EoMT's sizes (`load_dinov2_weights`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import EomtForUniversalSegmentation


def load_dinov2_weights(model: EomtForUniversalSegmentation, dinov2: torch.nn.Module) -> None:
    """Copy the ViT of a DINOv2 model (`Dinov2Model` or `Dinov2WithRegistersModel`: patch embedding, [CLS] and
    register tokens, position embeddings, every layer, the final norm) into EoMT's; the queries, the mask head, the
    upscaling blocks and the classifier keep their fresh weights. Raises `ValueError` naming what does not fit."""
    source = dinov2.state_dict()
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        if name.startswith("encoder.layer."):
            mapped[
                "layers." + name.removeprefix("encoder.layer.").replace("attention.o_proj", "attention.out_proj")
            ] = tensor
        elif name.startswith(("layernorm.", "embeddings.patch_embeddings.", "embeddings.register_tokens")):
            mapped[name] = tensor
    patches = source["embeddings.patch_embeddings.projection.weight"]  # (D, 3, p, p)
    patch_size = model.config.patch_size
    if patches.shape[-1] != patch_size:
        mapped["embeddings.patch_embeddings.projection.weight"] = resample_patch_embedding(patches, patch_size)
    positions = source["embeddings.position_embeddings"]  # (1, 1 + n*n, D): [CLS] first
    mapped["embeddings.cls_token"] = source["embeddings.cls_token"] + positions[:, :1]
    mapped["embeddings.position_embeddings.weight"] = _resampled_grid(
        positions[0, 1:], model.embeddings.position_embeddings.num_embeddings
    )
    unknown = sorted(set(mapped) - set(target))
    mismatched = sorted(k for k in set(mapped) & set(target) if mapped[k].shape != target[k].shape)
    if unknown or mismatched:
        raise ValueError(
            f"the DINOv2 weights do not fit this EoMT: names it lacks {unknown[:5]}, other shapes {mismatched[:5]} "
            "(hidden size, layer count, patch size and register tokens must match the checkpoint's)"
        )
    missing = sorted(
        k for k in target if k.startswith(("layers.", "embeddings.")) and k not in mapped and target[k].numel()
    )  # (an EoMT without register tokens has an empty `register_tokens`)
    if missing:
        raise ValueError(f"the DINOv2 checkpoint has no weights for EoMT's {missing[:5]}")
    model.load_state_dict(mapped, strict=False)


def resample_patch_embedding(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A patch embedding's kernels (D, C, p, p) for another patch size, by FlexiViT's pseudo-inverse resize (what
    the EoMT reference's timm backbone does to DINOv2's 14-px kernels): the new kernel applied to a patch resized
    bicubically to the new size gives, in the least-squares sense, what the old kernel gave on the old patch."""
    old = weight.shape[-1]
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resize = F.interpolate(basis, size=(patch_size, patch_size), mode="bicubic", antialias=True, align_corners=False)
    resize = resize.reshape(old * old, patch_size * patch_size)  # row i: old basis patch i, resized
    pinv = torch.linalg.pinv(resize)  # (new*new, old*old)
    flat = weight.double().reshape(-1, old * old)
    return (flat @ pinv.T).reshape(*weight.shape[:2], patch_size, patch_size).to(weight.dtype)


def _resampled_grid(positions: torch.Tensor, count: int) -> torch.Tensor:
    """Patch position embeddings (n*n, D) as (m*m, D) with m*m = `count` (bicubic on the grid, as DINOv2's own
    interpolation)."""
    n, m = math.isqrt(positions.shape[0]), math.isqrt(count)
    if n * n != positions.shape[0] or m * m != count:
        raise ValueError(f"position embeddings of {positions.shape[0]} and {count} patches are not square grids")
    if n == m:
        return positions
    grid = positions.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    resampled = F.interpolate(grid, size=(m, m), mode="bicubic", align_corners=False)
    return resampled.permute(0, 2, 3, 1).reshape(m * m, -1).to(positions.dtype)

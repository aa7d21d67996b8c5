"""What every model family does to its input images first: the shape and dtype checks, and ImageNet normalisation
constants."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from spark3r.errors import Spark3rError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_SLACK = 1e-3  # frames may stray this far outside [0, 1] (rounding); further is another scale or a normalisation


def check_pixel_range(images: Tensor) -> None:
    """A sentence for non-finite pixels or values outside [0, 1] (frames in [0, 255], or already normalised)."""
    if images.is_meta:
        return
    low, high = (float(value) for value in torch.aminmax(images))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise Spark3rError("images hold NaN or Inf pixels: check how the frames were read and converted")
    if low < -PIXEL_SLACK or high > 1 + PIXEL_SLACK:
        hint = "divide frames in [0, 255] by 255" if high > 2 else "pass them before any normalisation"
        raise Spark3rError(f"images hold values from {low:.4g} to {high:.4g}, not in [0, 1]: {hint} (the model "
                           "normalises them itself)")


def check_images(images: Tensor, patch_size: int) -> Tensor:
    """Images [S, 3, H, W] or [B, S, 3, H, W] in [0, 1] -> [B, S, 3, H, W]; one-sentence errors for bad input."""
    if not isinstance(images, Tensor):
        raise Spark3rError(f"images must be a tensor [S, 3, H, W] or [B, S, 3, H, W], got {type(images).__name__}")
    if images.dim() == 4:
        images = images[None]
    if images.dim() != 5 or images.shape[2] != 3:
        raise Spark3rError(
            f"images have shape {list(images.shape)}: pass RGB frames as [S, 3, H, W] or [B, S, 3, H, W]"
        )
    if images.shape[0] == 0 or images.shape[1] == 0:
        raise Spark3rError("got 0 images: pass at least one frame")
    if not images.is_floating_point():
        raise Spark3rError(f"images have dtype {images.dtype}: pass floats in [0, 1] (e.g. images.float() / 255)")
    check_pixel_range(images)
    height, width = images.shape[-2:]
    if height < patch_size or width < patch_size or height % patch_size or width % patch_size:
        raise Spark3rError(
            f"image size {height}x{width} is not a multiple of the patch size {patch_size}: "
            f"preprocess the frames to multiples of {patch_size}"
        )
    return images

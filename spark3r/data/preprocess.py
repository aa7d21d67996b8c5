"""Per-model image preprocessing as upstream, applied to a clip's images and its ground truth alike.

A recipe turns an input size into a plan: a short list of `Resize` and `Crop` steps. `apply_plan` runs the plan on the
images (PIL, per channel in float so nothing is quantised), the depth (nearest neighbour: no mixed depths at edges)
and the intrinsics (scaled by each resize, shifted by each crop), so the ground truth stays consistent with the pixels.
Image coordinates put the centre of pixel (row i, column j) at (j + 0.5, i + 0.5), so a resize scales fx, cx by the
width ratio and fy, cy by the height ratio exactly.

Recipes, named "NAME" or "NAME:SIDE", where SIDE is the output size of a square
image (the upstream default when omitted); all return images in [0, 1]:
- "vggt[:518]"  width -> SIDE, height -> round(h * SIDE / w / 14) * 14, bicubic; a height above SIDE is centre-cropped
  to SIDE ("crop" mode). The tiny models use vggt:112 or vggt:224.
- "pi3[:504]"   one size from the pixel limit 255000 * (SIDE / 504)^2 (upstream's PIXEL_LIMIT 255000 at 504): scale to
  the limit, round each side to patches of 14, then take patches off the side that keeps the aspect ratio closest
  until the area fits; LANCZOS.
- "da3[:504]"   longest side -> SIDE (bicubic when upscaling, area when downscaling), then each side to its nearest
  multiple of 14 (ties up) by a second small resize. Upstream applies ImageNet mean/std in its processor; here images
  stay in [0, 1] and spark3r's DA3 model applies mean/std in its forward.
- "omega[:512]" centre-crop the aspect ratio (h / w) into [0.5, 2], then "balanced": about (SIDE / 16)^2 patches of 16
  with the input's aspect ratio; bicubic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spark3r.errors import Spark3rError

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "area": Image.Resampling.BOX}


@dataclass(frozen=True)
class Resize:
    """Resize to height x width with a PIL filter named in RESAMPLE (depth: nearest)."""

    height: int
    width: int
    resample: str


@dataclass(frozen=True)
class Crop:
    """Keep rows top..top+height and columns left..left+width."""

    top: int
    left: int
    height: int
    width: int


Step = Union[Resize, Crop]


class Recipe:
    """A named preprocessing rule: `plan(height, width)` gives the steps for an input of that size."""

    name: ClassVar[str]
    patch_size: int

    @classmethod
    def from_side(cls, side: int) -> "Recipe":
        """The recipe that makes a square image `side` pixels wide."""
        return cls(side)

    def plan(self, height: int, width: int) -> list[Step]:
        raise NotImplementedError

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an input of this size after preprocessing."""
        for step in self.plan(height, width):
            height, width = step.height, step.width
        return height, width


@dataclass(frozen=True)
class VGGTRecipe(Recipe):
    """VGGT `load_and_preprocess_images(mode="crop")` with target width `width`."""

    width: int = 518
    patch_size: int = 14
    name: ClassVar[str] = "vggt"

    def plan(self, height: int, width: int) -> list[Step]:
        new_height = max(round(height * (self.width / width) / self.patch_size) * self.patch_size, self.patch_size)
        steps: list[Step] = [Resize(new_height, self.width, "bicubic")]
        if new_height > self.width:
            steps.append(Crop((new_height - self.width) // 2, 0, self.width, self.width))
        return steps


@dataclass(frozen=True)
class Pi3Recipe(Recipe):
    """pi3 `load_images_as_tensor` with PIXEL_LIMIT `pixel_limit`."""

    pixel_limit: float = 255000
    patch_size: int = 14
    name: ClassVar[str] = "pi3"

    @classmethod
    def from_side(cls, side: int) -> "Pi3Recipe":
        return cls(255000 * (side / 504) ** 2)

    def plan(self, height: int, width: int) -> list[Step]:
        scale = math.sqrt(self.pixel_limit / (width * height))
        target_w, target_h = width * scale, height * scale
        cols, rows = round(target_w / self.patch_size), round(target_h / self.patch_size)
        while cols * rows * self.patch_size**2 > self.pixel_limit:
            if cols / rows > target_w / target_h:
                cols -= 1
            else:
                rows -= 1
        return [Resize(max(1, rows) * self.patch_size, max(1, cols) * self.patch_size, "lanczos")]


@dataclass(frozen=True)
class DA3Recipe(Recipe):
    """Depth-Anything-3 `InputProcessor` with `process_res`, "upper_bound_resize" (normalisation left to the model)."""

    process_res: int = 504
    patch_size: int = 14
    name: ClassVar[str] = "da3"

    def plan(self, height: int, width: int) -> list[Step]:
        steps: list[Step] = []
        longest = max(height, width)
        if longest != self.process_res:
            scale = self.process_res / longest
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
            steps.append(Resize(height, width, "bicubic" if scale > 1 else "area"))
        new_height, new_width = self._nearest_multiple(height), self._nearest_multiple(width)
        if (new_height, new_width) != (height, width):
            upscale = new_height > height or new_width > width
            steps.append(Resize(new_height, new_width, "bicubic" if upscale else "area"))
        return steps

    def _nearest_multiple(self, size: int) -> int:
        down = size // self.patch_size * self.patch_size
        up = down + self.patch_size
        return max(self.patch_size, up if up - size <= size - down else down)


@dataclass(frozen=True)
class OmegaRecipe(Recipe):
    """VGGT-Omega `load_and_preprocess_images(mode="balanced", image_resolution=resolution, patch_size=16)`."""

    resolution: int = 512
    patch_size: int = 16
    name: ClassVar[str] = "omega"

    def plan(self, height: int, width: int) -> list[Step]:
        steps: list[Step] = []
        if height / width < 0.5:
            crop_width = min(width, max(1, round(height / 0.5)))
            steps.append(Crop(0, (width - crop_width) // 2, height, crop_width))
            width = crop_width
        elif height / width > 2.0:
            crop_height = min(height, max(1, round(width * 2.0)))
            steps.append(Crop((height - crop_height) // 2, 0, crop_height, width))
            height = crop_height
        patches = (self.resolution // self.patch_size) ** 2
        cols = math.sqrt(patches / (height / width))
        rows = patches / cols
        steps.append(Resize(max(1, round(rows)) * self.patch_size, max(1, round(cols)) * self.patch_size, "bicubic"))
        return steps


RECIPES: dict[str, type[Recipe]] = {"vggt": VGGTRecipe, "pi3": Pi3Recipe, "da3": DA3Recipe, "omega": OmegaRecipe}


def get_recipe(spec: str | Recipe) -> Recipe:
    """A recipe from "NAME" or "NAME:SIDE" (SIDE: output size of a square image), e.g. "vggt", "vggt:224", "pi3:56"."""
    if isinstance(spec, Recipe):
        return spec
    name, _, side = str(spec).partition(":")
    if name not in RECIPES or (side and not (side.isdigit() and int(side) > 0)):
        raise Spark3rError(f"unknown preprocessing recipe {spec!r}: use one of {', '.join(RECIPES)}, "
                           "optionally with a positive square size as in vggt:224")
    return RECIPES[name].from_side(int(side)) if side else RECIPES[name]()


def apply_plan(steps: list[Step], images: torch.Tensor, depth: torch.Tensor | None = None,
               intrinsics: torch.Tensor | None = None):
    """Run `steps` on images [S, 3, H, W] in [0, 1], depth [S, H, W] and intrinsics [S, 3, 3] (both optional).

    Returns (images, depth, intrinsics) on the input devices and dtypes; None stays None.
    """
    for step in steps:
        height, width = images.shape[-2:]
        if isinstance(step, Crop):
            rows, cols = slice(step.top, step.top + step.height), slice(step.left, step.left + step.width)
            images = images[..., rows, cols]
            depth = None if depth is None else depth[..., rows, cols]
            if intrinsics is not None:
                intrinsics = intrinsics.clone()
                intrinsics[..., 0, 2] -= step.left
                intrinsics[..., 1, 2] -= step.top
        elif (step.height, step.width) != (height, width):
            images = _resize_images(images, step)
            if depth is not None:
                depth = F.interpolate(depth[:, None], size=(step.height, step.width), mode="nearest-exact")[:, 0]
            if intrinsics is not None:
                scale = torch.tensor([step.width / width, step.height / height, 1.0], dtype=intrinsics.dtype,
                                     device=intrinsics.device)
                intrinsics = intrinsics * scale[:, None]
    return images.contiguous(), None if depth is None else depth.contiguous(), intrinsics


def _resize_images(images: torch.Tensor, step: Resize) -> torch.Tensor:
    """PIL resize of every channel of every frame in float ("F" mode), clamped back into [0, 1]."""
    planes = images.detach().to("cpu", torch.float32).numpy()
    resized = np.empty((*planes.shape[:2], step.height, step.width), dtype=np.float32)
    for index in np.ndindex(*planes.shape[:2]):
        plane = Image.fromarray(planes[index])  # float32 -> mode "F"
        resized[index] = np.asarray(plane.resize((step.width, step.height), RESAMPLE[step.resample]))
    return torch.from_numpy(resized).clamp_(0, 1).to(images.device, images.dtype)

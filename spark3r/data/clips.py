"""Clips on disk: the readers and writer of the clip formats, and the one clip-spec parser (the Clip itself:
spark3r.data.clip).

On disk a clip is
- a folder of images (png / jpg, 8 or 16 bits; natural sort order; EXIF orientation applied; transparency composited
  on white), or a folder holding such an `images/` folder (the upstream `scene/images/` layout), with optional ground
  truth in `gt.npz` beside the images; frames of different sizes are fitted to the first one's size;
- a video file (.mp4 .mov .avi .mkv .webm; needs PyAV: `pip install spark3r[video]`), with optional ground truth in
  `<video stem>.gt.npz` beside it;
- an .npz file holding `images` uint8 [S, H, W, 3] (or float [S, H, W, 3] in [0, 1]) and optional ground-truth arrays.

Ground-truth arrays (each optional, one entry per frame of the whole clip, before any sampling):
  depth [S, H, W]        z-depth at the image size; 0, negative or non-finite values mean "no measurement"
  intrinsics [S, 3, 3]   pixels; the centre of pixel (row i, column j) is at image coordinates (j + 0.5, i + 0.5)
  extrinsics [S, 3, 4]   world-to-camera [R | t] (x_cam = R x_world + t), OpenCV camera (x right, y down, z forward);
                         [S, 4, 4] is accepted and cut to its first 3 rows
Other arrays in these files are ignored.

A clip spec (what every command's --calib / --clips takes) is a folder of clips (sub-folders of images, videos, .npz
files), one clip, or `synthetic:N[:SEED][:walk]`: N generated clips with ground truth (spark3r.data.synthetic), seed 0
by default; `:walk` gives a hand-held walk through the scene instead of the default short arc, for long clips (e.g.
`synthetic:16:500:walk` with `--frames 256`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from spark3r.data.clip import GROUND_TRUTH_KEYS, Clip, to_uint8
from spark3r.data.preprocess import Recipe, Resize, apply_plan, fit_plan, get_recipe, kept_fraction
from spark3r.data.synthetic import SceneConfig, clip_seeds, render_clip
from spark3r.errors import ParameterError, Spark3rError, Spark3rWarning
from spark3r.files import check_output_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")
IMAGES_SUBFOLDER = "images"  # upstream layout: scene/images/*.png
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # how PIL opens a 16-bit grayscale PNG
GROUND_TRUTH_FILE = "gt.npz"
GROUND_TRUTH_SUFFIX = ".gt.npz"
FORMATS = ("folder", "npz", "mp4")
DEFAULT_SYNTHETIC_FRAMES = 8
DEFAULT_SYNTHETIC_SIZE = (224, 224)
VIDEO_FPS = 10
_SYNTHETIC_SPEC = re.compile(r"synthetic:(\d+)(?::(\d+))?(?::(arc|walk))?")
_CLIP_SPEC_HELP = "pass a folder of clips, one clip (image folder, video or .npz) or synthetic:N[:SEED][:walk]"


def frame_indices(total: int, every: int | None = None, max_frames: int | None = None) -> list[int]:
    """The frames kept of a clip of `total` frames: every `every`-th (0, every, 2 * every, ...), or `max_frames`
    spread uniformly over the whole clip (the first and last included; all frames when there are no more), or all."""
    check_sampling(every, max_frames)
    if every is not None:
        return list(range(0, total, every))
    if max_frames is None or total <= max_frames:
        return list(range(total))
    if max_frames == 1:
        return [0]
    # round(i * (total - 1) / (max_frames - 1)), halves up, in integers
    return [(2 * i * (total - 1) + max_frames - 1) // (2 * (max_frames - 1)) for i in range(max_frames)]


def open_clips(spec: str | os.PathLike, *, preprocess: str | Recipe | None, max_frames: int | None = None,
               every: int | None = None, frames: int | None = None, size: tuple[int, int] | None = None,
               scene: SceneConfig | None = None, device: torch.device | str | None = None) -> list[Clip]:
    """Every clip a spec names, sampled (`frame_indices`: every `every`-th frame, or `max_frames` spread over the
    clip) and preprocessed.

    spec: a folder of clips, one clip, or `synthetic:N[:SEED][:walk]`.
    preprocess: a recipe (spark3r.data.preprocess, e.g. "vggt", "vggt:112", "da3"), or None to keep the images as read.
    frames, size, scene, device: for `synthetic:` only: frames per clip (8), (height, width) to render at (the recipe's
    size for a square image, or 224 x 224 without a recipe), a `SceneConfig`, and the device to ray-cast on (default
    the CPU; the clips come back on the CPU either way).
    Frames of one clip that come out of the recipe at different sizes are fitted to the first one's size
    (`fit_plan`); a crop that drops part of a frame is said once per clip as a `Spark3rWarning`.
    """
    return list(iter_clips(spec, preprocess=preprocess, max_frames=max_frames, every=every, frames=frames,
                           size=size, scene=scene, device=device))


def iter_clips(spec: str | os.PathLike, *, preprocess: str | Recipe | None, max_frames: int | None = None,
               every: int | None = None, frames: int | None = None, size: tuple[int, int] | None = None,
               scene: SceneConfig | None = None, device: torch.device | str | None = None) -> Iterator[Clip]:
    """`open_clips` one clip at a time (the spec is checked before the first clip is read)."""
    check_sampling(every, max_frames)
    recipe = None if preprocess is None else get_recipe(preprocess)
    if str(spec).startswith("synthetic:"):
        clips = (clip.select(frame_indices(clip.frames, every, max_frames))
                 for clip in _synthetic_clips(str(spec), recipe, frames, size, scene, device))
        return clips if recipe is None else (preprocess_clip(clip, recipe) for clip in clips)
    return (read_clip(path, every=every, max_frames=max_frames, preprocess=recipe) for path in clip_paths(spec))


def check_sampling(every: int | None, max_frames: int | None) -> None:
    """One sentence unless the frame sampling options are valid (`frame_indices`)."""
    if every is not None and every < 1:
        raise ParameterError(f"`every` is {every}: keep every N-th frame with N >= 1", "every")
    if max_frames is not None and max_frames < 1:
        raise ParameterError(f"`max_frames` is {max_frames}: give at least 1 (or leave it unset for all frames)",
                             "max_frames")
    if every is not None and max_frames is not None:
        raise ParameterError("give `every` (every N-th frame) or `max_frames` (N frames spread over the clip), not "
                             "both", "every", "max_frames")


def preprocess_clip(clip: Clip, recipe: str | Recipe) -> Clip:
    """The clip resized / cropped by `recipe`, its depth and intrinsics transformed to match."""
    steps = get_recipe(recipe).plan(clip.height, clip.width)
    images, depth, intrinsics = apply_plan(steps, clip.images, clip.depth, clip.intrinsics)
    return dataclasses.replace(clip, images=images, depth=depth, intrinsics=intrinsics)


def fit_clips(clips: Sequence[Clip]) -> list[Clip]:
    """The clips brought to the first clip's size (`fit_plan`: resize to cover, centre crop; bicubic); the clips that
    lose part of their frames to the crop are said in one `Spark3rWarning`."""
    if not clips:
        return []
    height, width = clips[0].height, clips[0].width
    fitted, cropped = [], []
    for clip in clips:
        if (clip.height, clip.width) == (height, width):
            fitted.append(clip)
            continue
        steps = fit_plan(clip.height, clip.width, height, width, "bicubic")
        kept = kept_fraction(steps, clip.height, clip.width)
        if kept < 1:
            cropped.append(f"{clip.name} ({clip.width}x{clip.height}) keeps {100 * kept:.0f}%")
        images, depth, intrinsics = apply_plan(steps, clip.images, clip.depth, clip.intrinsics)
        fitted.append(dataclasses.replace(clip, images=images, depth=depth, intrinsics=intrinsics))
    if cropped:
        listed = ", ".join(cropped[:3]) + (f" and {len(cropped) - 3} more" if len(cropped) > 3 else "")
        warnings.warn(Spark3rWarning(f"{len(cropped)} of {len(clips)} clips are resized and centre-cropped to the "
                                     f"first clip's {width}x{height}: {listed}"), stacklevel=2)
    return fitted


def parse_synthetic_spec(spec: str) -> tuple[int, int, str]:
    """(count, seed, camera path) of `synthetic:N[:SEED][:PATH]`; PATH is "arc" (the default) or "walk" (a hand-held
    walk through the scene, for long clips: spark3r.data.synthetic)."""
    match = _SYNTHETIC_SPEC.fullmatch(spec)
    if not match or int(match.group(1)) < 1:
        raise Spark3rError(f"bad clip spec {spec!r}: write synthetic:N, synthetic:N:SEED or synthetic:N:SEED:walk with "
                           "whole numbers N >= 1 and SEED >= 0")
    return int(match.group(1)), int(match.group(2) or 0), match.group(3) or "arc"


def _synthetic_clips(spec: str, recipe: Recipe | None, frames: int | None, size: tuple[int, int] | None,
                     scene: SceneConfig | None, device: torch.device | str | None) -> Iterator[Clip]:
    count, seed, path = parse_synthetic_spec(spec)
    scene = dataclasses.replace(scene or SceneConfig(), path=path)
    if size is None:
        size = DEFAULT_SYNTHETIC_SIZE if recipe is None else recipe.output_size(1024, 1024)
    frames = DEFAULT_SYNTHETIC_FRAMES if frames is None else frames
    prefix = "synthetic" if path == "arc" else f"synthetic-{path}"
    return (render_clip(clip_seed, frames, size[0], size[1], config=scene, device=device,
                        name=f"{prefix}{seed}-{index:03d}")
            for index, clip_seed in enumerate(clip_seeds(seed, count)))


def clip_paths(spec: str | os.PathLike) -> list[Path]:
    """The clips a path names: itself if it is one clip, else the clips inside the folder (natural order)."""
    path = Path(spec)
    if not path.exists():
        raise Spark3rError(f"clip path {path} does not exist: {_CLIP_SPEC_HELP}")
    if path.is_file() or image_folder(path) is not None:
        return [path]
    entries = _natural_sorted(entry for entry in path.iterdir() if not entry.name.startswith("."))
    if not entries:
        raise Spark3rError(f"folder {path} is empty: put png/jpg images in it, or clip folders, videos or .npz clips")
    clips = [entry for entry in entries if entry.is_dir() or entry.suffix.lower() in VIDEO_SUFFIXES
             or (entry.suffix.lower() == ".npz" and not _is_ground_truth(entry))]
    if not clips:
        raise Spark3rError(f"folder {path} holds no png/jpg images, clip folders, videos or .npz clips: "
                           f"{_CLIP_SPEC_HELP}")
    return clips


def image_folder(path: Path) -> Path | None:
    """The folder holding a clip's images: `path` itself if it holds png/jpg images, else `path/images` if that does
    (the upstream `scene/images/` layout), else None."""
    for folder in (path, path / IMAGES_SUBFOLDER):
        if folder.is_dir() and any(_is_image(entry) for entry in folder.iterdir()):
            return folder
    return None


def read_clip(path: str | os.PathLike, *, every: int | None = None, max_frames: int | None = None,
              preprocess: str | Recipe | None = None) -> Clip:
    """One clip from an image folder (or a folder with an `images/` folder), a video or an .npz file, keeping frames
    `frame_indices(S, every, max_frames)`, each preprocessed by the recipe `preprocess` as it is read (None: as read).

    Frames are read one at a time, so memory holds only the kept frames (a video is decoded as a stream).
    """
    path = Path(path)
    check_sampling(every, max_frames)
    recipe = None if preprocess is None else get_recipe(preprocess)
    if not path.exists():
        raise Spark3rError(f"clip path {path} does not exist: {_CLIP_SPEC_HELP}")
    if path.is_dir():
        clip = _read_image_folder(path, every, max_frames, recipe)
    elif path.suffix.lower() == ".npz":
        clip = _read_npz(path, every, max_frames, recipe)
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        clip = _read_video(path, every, max_frames, recipe)
    else:
        raise Spark3rError(f"{path} is not a clip: give a folder of png/jpg images, a video "
                           f"({' '.join(VIDEO_SUFFIXES)}) or an .npz file")
    if clip is None:
        raise Spark3rError(f"clip {path} has zero frames: check the file")
    return clip


class _ClipBuilder:
    """Collects a clip's kept frames one at a time, each preprocessed by the recipe as it arrives and fitted to the
    first frame's output size, with its ground truth (tensors cut to the kept frames) transformed alike."""

    def __init__(self, name: str, source: str, frame_names: list[str], recipe: Recipe | None,
                 truth: dict[str, torch.Tensor]):
        self.name, self.source, self.frame_names, self.recipe, self.truth = name, source, frame_names, recipe, truth
        self.count = len(frame_names)
        self.images: torch.Tensor | None = None
        self.depth: torch.Tensor | None = None
        self.intrinsics: torch.Tensor | None = None
        self.added = 0
        self.cropped: dict[tuple[int, int], float] = {}

    def add(self, pixels: np.ndarray) -> None:
        """Append one frame: pixels [H, W, 3], uint8 or float in [0, 1]."""
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
        image = image.float().div_(255) if pixels.dtype == np.uint8 else image.float()
        height, width = image.shape[-2:]
        steps = self._steps(height, width)
        kept = kept_fraction(steps, height, width)
        if kept < 1:
            self.cropped[(height, width)] = kept
        index = self.added
        depth, intrinsics = (self.truth[key][index:index + 1] if key in self.truth else None
                             for key in ("depth", "intrinsics"))
        image, depth, intrinsics = apply_plan(steps, image, depth, intrinsics)
        if self.images is None:
            self.images = torch.empty(self.count, *image.shape[1:])
            self.depth = None if depth is None else torch.empty(self.count, *depth.shape[1:])
            self.intrinsics = None if intrinsics is None else torch.empty(self.count, 3, 3)
        self.images[index] = image[0]
        if depth is not None:
            self.depth[index] = depth[0]
        if intrinsics is not None:
            self.intrinsics[index] = intrinsics[0]
        self.added += 1

    def _steps(self, height: int, width: int) -> list:
        steps = [] if self.recipe is None else self.recipe.plan(height, width)
        if self.images is None:
            return steps
        target = tuple(self.images.shape[-2:])
        output = (height, width) if not steps else (steps[-1].height, steps[-1].width)
        if output == target:
            return steps
        resample = next((step.resample for step in steps if isinstance(step, Resize)), "bicubic")
        return fit_plan(height, width, *target, resample)

    def clip(self) -> Clip | None:
        if self.images is None:
            return None
        if self.cropped:
            sizes = ", ".join(f"{width}x{height} keeps {100 * kept:.0f}%"
                              for (height, width), kept in sorted(self.cropped.items()))
            why = f"the {self.recipe.name} preprocessing" if self.recipe is not None else "fitting to one size"
            warnings.warn(Spark3rWarning(  # no clip name: clips of the same sizes are said once
                f"{why} centre-crops frames to {self.images.shape[-1]}x{self.images.shape[-2]}, dropping part of "
                f"each image ({sizes}); crop the images yourself to choose what is kept"), stacklevel=3)
        return Clip(name=self.name, images=self.images, depth=self.depth, intrinsics=self.intrinsics,
                    extrinsics=self.truth.get("extrinsics"), source=self.source, frame_names=tuple(self.frame_names))


def _read_image_folder(path: Path, every: int | None, max_frames: int | None, recipe: Recipe | None) -> Clip | None:
    folder = image_folder(path)
    if folder is None:
        if not any(not entry.name.startswith(".") for entry in path.iterdir()):
            raise Spark3rError(f"folder {path} is empty: put the clip's png/jpg images in it")
        raise Spark3rError(f"folder {path} holds no png/jpg images (nor an {IMAGES_SUBFOLDER}/ folder of them): "
                           "put the clip's frames in it as images")
    files = _natural_sorted(entry for entry in folder.iterdir() if _is_image(entry))
    indices = frame_indices(len(files), every, max_frames)
    first = _load_image(files[indices[0]])
    ground_truth = folder / GROUND_TRUTH_FILE
    truth = _ground_truth(_load_npz(ground_truth), ground_truth, len(files), first.shape[:2], indices) \
        if ground_truth.exists() else {}
    builder = _ClipBuilder(path.name, str(path), [files[index].stem for index in indices], recipe, truth)
    builder.add(first)
    for index in indices[1:]:
        builder.add(_load_image(files[index]))
    return builder.clip()


def _read_npz(path: Path, every: int | None, max_frames: int | None, recipe: Recipe | None) -> Clip | None:
    arrays = _load_npz(path)
    if "images" not in arrays:
        raise Spark3rError(f"{path} has no 'images' array: save the frames as images=uint8 [S, H, W, 3]")
    pixels = arrays["images"]
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise Spark3rError(f"{path} holds images of shape {pixels.shape}: save them as [S, H, W, 3]")
    floating = np.issubdtype(pixels.dtype, np.floating)
    if not (pixels.dtype == np.uint8 or (floating and np.isfinite(pixels).all() and pixels.min(initial=0) >= 0
                                         and pixels.max(initial=0) <= 1)):
        raise Spark3rError(f"{path} holds images of dtype {pixels.dtype}: save them as uint8 or as float in [0, 1]")
    indices = frame_indices(len(pixels), every, max_frames)
    if not indices:
        return None
    truth = _ground_truth(arrays, path, len(pixels), pixels.shape[1:3], indices)
    builder = _ClipBuilder(path.stem, str(path), _index_names(indices), recipe, truth)
    for index in indices:
        builder.add(pixels[index] if pixels.dtype == np.uint8 else pixels[index].astype(np.float32))
    return builder.clip()


def _read_video(path: Path, every: int | None, max_frames: int | None, recipe: Recipe | None) -> Clip | None:
    """Decode the video as a stream, keeping (and preprocessing) only the sampled frames, turned as its display
    matrix says; the frame count comes from the container's header (or a demux-only pass where it has none), so a
    video that decodes fewer frames than its header lists is truncated or damaged. Ground truth is at the stored size."""
    try:
        import av
    except ImportError:
        raise Spark3rError(f"reading the video {path} needs PyAV: install spark3r[video]") from None
    ground_truth = path.with_name(path.stem + GROUND_TRUTH_SUFFIX)
    corrupt = f"cannot read the video {path}: it is corrupt or not a video (re-encode it, e.g. to H.264 mp4)"
    try:
        total = _video_frame_count(path)
        if not total:
            return None
        indices = frame_indices(total, every, max_frames)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            size = (stream.codec_context.height, stream.codec_context.width)
            truth = _ground_truth(_load_npz(ground_truth), ground_truth, total, size, indices) \
                if ground_truth.exists() else {}
            builder = _ClipBuilder(path.stem, str(path), _index_names(indices), recipe, truth)
            wanted, decoded = iter(indices), 0
            next_index = next(wanted)
            for decoded, frame in enumerate(container.decode(stream), start=1):
                if decoded - 1 == next_index:
                    # the display matrix's counter-clockwise rotation (phone videos are often stored landscape)
                    builder.add(np.rot90(frame.to_ndarray(format="rgb24"), k=round(frame.rotation / 90)))
                    next_index = next(wanted, None)
    except (av.FFmpegError, OSError):
        raise Spark3rError(corrupt) from None
    if decoded < total:
        raise Spark3rError(f"the video {path} is truncated or damaged: its header lists {total} frames but only "
                           f"{decoded} decode (copy or download it again, or re-encode it)")
    return builder.clip()


def _index_names(indices: list[int]) -> list[str]:
    """Names of frames known by their index in the source: frame000042."""
    return [f"frame{index:06d}" for index in indices]


def _video_frame_count(path: Path) -> int:
    """Frames of the first video stream: from the container's header, else counted by demuxing (no decoding)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise Spark3rError(f"{path} has no video stream: give a video file or a folder of images")
        stream = container.streams.video[0]
        if stream.frames:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size)


def _load_image(path: Path) -> np.ndarray:
    """Float [H, W, 3] RGB in [0, 1] of an image file: 16-bit images (grayscale, RGB, RGBA) scaled by 1 / 65535,
    8-bit by 1 / 255, EXIF orientation applied (not for 16-bit colour png), transparency composited on white; a
    truncated or corrupt file is one sentence."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG" and image.mode in ("RGB", "RGBA") and ";16" in str(image.tile[0].args):
                return _load_colour_png_16(path)  # PIL would keep only the high byte of each value
            image = ImageOps.exif_transpose(image)
            if image.mode in SIXTEEN_BIT_MODES:
                gray = np.asarray(image, dtype=np.float32) / 65535
                return np.repeat(gray[..., None], 3, axis=-1)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    except (OSError, SyntaxError, ValueError):
        raise Spark3rError(f"cannot read the image {path}: it is truncated, corrupt or not an image "
                           "(remove or replace it)") from None


def _load_colour_png_16(path: Path) -> np.ndarray:
    """Float [H, W, 3] RGB in [0, 1] of a 16-bit RGB or RGBA png (OpenCV reads all 16 bits), alpha composited on
    white."""
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16:
        raise OSError(f"OpenCV cannot read {path} as a 16-bit png")
    values = pixels.astype(np.float32) / 65535
    rgb = values[..., 2::-1]
    if values.shape[-1] == 4:
        alpha = values[..., 3:]
        rgb = rgb * alpha + (1 - alpha)
    return np.ascontiguousarray(rgb)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise Spark3rError(f"cannot read {path}: it is not a valid .npz file (write it with numpy.savez)") from None


def _ground_truth(arrays: dict[str, np.ndarray], where: Path, total: int, size: Sequence[int],
                  indices: list[int]) -> dict[str, torch.Tensor]:
    """The ground-truth arrays of a clip of `total` frames, checked against it and cut to `indices`."""
    height, width = size
    expected = {"depth": (height, width), "intrinsics": (3, 3), "extrinsics": (3, 4)}
    truth = {}
    for key, shape in expected.items():
        if key not in arrays:
            continue
        value = arrays[key]
        if not np.issubdtype(value.dtype, np.number) or value.ndim != 1 + len(shape):
            raise Spark3rError(f"ground truth {where} has {key} of shape {value.shape} and dtype {value.dtype}: "
                               f"store it as float [S, {', '.join(map(str, shape))}]")
        if len(value) != total:
            raise Spark3rError(f"ground truth {where} has {key} for {len(value)} frames but the clip has {total}: "
                               "give one entry per frame")
        if key == "extrinsics" and value.shape[1:] == (4, 4):
            value = value[:, :3]
        if value.shape[1:] != shape:
            what = "size" if key == "depth" else "shape"
            raise Spark3rError(f"ground truth {where} has {key} of {what} {'x'.join(map(str, value.shape[1:]))} but "
                               f"the clip needs {'x'.join(map(str, shape))}: store it at the image size / as "
                               f"[S, {', '.join(map(str, shape))}]")
        truth[key] = torch.from_numpy(np.ascontiguousarray(value[indices], dtype=np.float32))
    return truth


def write_clip(clip: Clip, out_dir: str | os.PathLike, format: str = "folder") -> Path:
    """Write `clip` under `out_dir` in a clip format `read_clip` reads back, atomically; returns its path.

    folder: `<out>/<name>/000000.png ...` plus `gt.npz`; npz: `<out>/<name>.npz` (uint8 images + ground truth);
    mp4: `<out>/<name>.mp4` (H.264 4:4:4, needs PyAV) plus `<out>/<name>.gt.npz`. An older clip of the same
    name is replaced.
    """
    if format not in FORMATS:
        raise Spark3rError(f"unknown clip format {format!r}: use one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(clip.images).permute(0, 2, 3, 1).numpy()
    truth = {key: getattr(clip, key).detach().cpu().float().numpy()
             for key in GROUND_TRUTH_KEYS if getattr(clip, key) is not None}
    if format == "npz":
        target = out_dir / f"{clip.name}.npz"
        with _atomic(target) as staging:
            _save_npz(staging, {"images": pixels, **truth})
    elif format == "mp4":
        target = out_dir / f"{clip.name}.mp4"
        with _atomic(target) as staging:
            _write_video(staging, pixels)
        if truth:
            with _atomic(out_dir / f"{clip.name}{GROUND_TRUTH_SUFFIX}") as staging:
                _save_npz(staging, truth)
    else:
        target = out_dir / clip.name
        with _atomic(target) as staging:
            staging.mkdir()
            for index, frame in enumerate(pixels):
                Image.fromarray(frame).save(staging / f"{index:06d}.png")
            if truth:
                _save_npz(staging / GROUND_TRUTH_FILE, truth)
    return target


@dataclass(frozen=True)
class WrittenClip:
    """A clip as `write_clips` wrote it: where, its size, which ground truth it holds and its content digest."""

    name: str
    path: Path
    frames: int
    height: int
    width: int
    ground_truth: tuple[str, ...]
    sha256: str

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "frames": self.frames, "height": self.height,
                "width": self.width, "ground_truth": list(self.ground_truth), "sha256": self.sha256}


def write_clips(clips: Iterable[Clip], out_dir: str | os.PathLike, format: str = "folder") -> list[WrittenClip]:
    """`write_clip` every clip of `clips` (e.g. `iter_clips(...)`, read one at a time) and describe what was written."""
    check_output_folder(out_dir, "out_dir")  # before the first clip is read or made
    written = []
    for clip in clips:
        path = write_clip(clip, out_dir, format)
        truth = tuple(key for key in GROUND_TRUTH_KEYS if getattr(clip, key) is not None)
        written.append(WrittenClip(clip.name, path, clip.frames, clip.height, clip.width, truth, clip.fingerprint()))
    return written


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Compressed .npz at exactly `path` (numpy would append .npz to a name without it)."""
    with open(path, "wb") as file:
        np.savez_compressed(file, **arrays)


@contextlib.contextmanager
def _atomic(target: Path) -> Iterator[Path]:
    """Yield a hidden path beside `target` to write a file or folder to, then move it into place (replacing `target`).

    On failure the partial write is removed and `target` is left as it was.
    """
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    if target.is_dir():
        retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        os.replace(target, retired)
        os.replace(staging, target)
        _remove(retired)
    else:
        os.replace(staging, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _write_video(path: Path, pixels: np.ndarray) -> None:
    """H.264 mp4 of uint8 frames [S, H, W, 3]: 4:4:4 chroma (no colour bleeding on small frames), crf 10."""
    try:
        import av
    except ImportError:
        raise Spark3rError(f"writing the video {path} needs PyAV: install spark3r[video]") from None
    height, width = pixels.shape[1:3]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _is_ground_truth(path: Path) -> bool:
    return path.name == GROUND_TRUTH_FILE or path.name.endswith(GROUND_TRUTH_SUFFIX)


def _natural_sorted(paths) -> list[Path]:
    """Sort so that frame2 comes before frame10."""
    return sorted(paths, key=lambda path: [int(part) if part.isdigit() else part.lower()
                                           for part in re.split(r"(\d+)", path.name)])

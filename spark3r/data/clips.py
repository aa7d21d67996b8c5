"""Clips on disk: the readers and writer of the clip formats, and the one clip-spec parser (the Clip itself:
spark3r.data.clip).

On disk a clip is
- a folder of images (png / jpg; natural sort order; EXIF orientation applied; transparency composited on white), with
  optional ground truth in `<folder>/gt.npz`;
- a video file (.mp4 .mov .avi .mkv .webm; needs PyAV: `pip install spark3r[video]`), with optional ground truth in
  `<video stem>.gt.npz` beside it;
- an .npz file holding `images` uint8 [S, H, W, 3] (or float [S, H, W, 3] in [0, 1]) and optional ground-truth arrays.

Ground-truth arrays (each optional, one entry per frame of the whole clip, before any subsampling):
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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from spark3r.data.clip import GROUND_TRUTH_KEYS, Clip, to_uint8
from spark3r.data.preprocess import Recipe, apply_plan, get_recipe
from spark3r.data.synthetic import SceneConfig, clip_seeds, render_clip
from spark3r.errors import ParameterError, Spark3rError
from spark3r.files import check_output_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")
GROUND_TRUTH_FILE = "gt.npz"
GROUND_TRUTH_SUFFIX = ".gt.npz"
FORMATS = ("folder", "npz", "mp4")
DEFAULT_SYNTHETIC_FRAMES = 8
DEFAULT_SYNTHETIC_SIZE = (224, 224)
VIDEO_FPS = 10
_SYNTHETIC_SPEC = re.compile(r"synthetic:(\d+)(?::(\d+))?(?::(arc|walk))?")
_CLIP_SPEC_HELP = "pass a folder of clips, one clip (image folder, video or .npz) or synthetic:N[:SEED][:walk]"


def frame_indices(total: int, stride: int = 1, max_frames: int | None = None) -> list[int]:
    """Frames 0, stride, 2 * stride, ... of a clip of `total` frames, at most `max_frames` of them."""
    indices = list(range(0, total, stride))
    return indices if max_frames is None else indices[:max_frames]


def open_clips(spec: str | os.PathLike, *, preprocess: str | Recipe | None, max_frames: int | None = None,
               stride: int = 1, frames: int | None = None, size: tuple[int, int] | None = None,
               scene: SceneConfig | None = None) -> list[Clip]:
    """Every clip a spec names, subsampled (every `stride`-th frame, at most `max_frames`) and preprocessed.

    spec: a folder of clips, one clip, or `synthetic:N[:SEED][:walk]`.
    preprocess: a recipe (spark3r.data.preprocess, e.g. "vggt", "vggt:112", "da3"), or None to keep the images as read.
    frames, size, scene: for `synthetic:` only: frames per clip (8), (height, width) to render at (the recipe's size
    for a square image, or 224 x 224 without a recipe) and a `SceneConfig`.
    """
    return list(iter_clips(spec, preprocess=preprocess, max_frames=max_frames, stride=stride, frames=frames,
                           size=size, scene=scene))


def iter_clips(spec: str | os.PathLike, *, preprocess: str | Recipe | None, max_frames: int | None = None,
               stride: int = 1, frames: int | None = None, size: tuple[int, int] | None = None,
               scene: SceneConfig | None = None) -> Iterator[Clip]:
    """`open_clips` one clip at a time (the spec is checked before the first clip is read)."""
    if stride < 1:
        raise Spark3rError(f"stride is {stride}: give a stride of at least 1")
    if max_frames is not None and max_frames < 1:
        raise Spark3rError(f"max_frames is {max_frames}: give at least 1 (or leave it unset for all frames)")
    recipe = None if preprocess is None else get_recipe(preprocess)
    if str(spec).startswith("synthetic:"):
        clips = (clip.select(frame_indices(clip.frames, stride, max_frames))
                 for clip in _synthetic_clips(str(spec), recipe, frames, size, scene))
    else:
        clips = (read_clip(path, stride=stride, max_frames=max_frames) for path in clip_paths(spec))
    return clips if recipe is None else (preprocess_clip(clip, recipe) for clip in clips)


def preprocess_clip(clip: Clip, recipe: str | Recipe) -> Clip:
    """The clip resized / cropped by `recipe`, its depth and intrinsics transformed to match."""
    steps = get_recipe(recipe).plan(clip.height, clip.width)
    images, depth, intrinsics = apply_plan(steps, clip.images, clip.depth, clip.intrinsics)
    return dataclasses.replace(clip, images=images, depth=depth, intrinsics=intrinsics)


def parse_synthetic_spec(spec: str) -> tuple[int, int, str]:
    """(count, seed, camera path) of `synthetic:N[:SEED][:PATH]`; PATH is "arc" (the default) or "walk" (a hand-held
    walk through the scene, for long clips: spark3r.data.synthetic)."""
    match = _SYNTHETIC_SPEC.fullmatch(spec)
    if not match or int(match.group(1)) < 1:
        raise Spark3rError(f"bad clip spec {spec!r}: write synthetic:N, synthetic:N:SEED or synthetic:N:SEED:walk with "
                           "whole numbers N >= 1 and SEED >= 0")
    return int(match.group(1)), int(match.group(2) or 0), match.group(3) or "arc"


def _synthetic_clips(spec: str, recipe: Recipe | None, frames: int | None, size: tuple[int, int] | None,
                     scene: SceneConfig | None) -> Iterator[Clip]:
    count, seed, path = parse_synthetic_spec(spec)
    scene = dataclasses.replace(scene or SceneConfig(), path=path)
    if size is None:
        size = DEFAULT_SYNTHETIC_SIZE if recipe is None else recipe.output_size(1024, 1024)
    frames = DEFAULT_SYNTHETIC_FRAMES if frames is None else frames
    prefix = "synthetic" if path == "arc" else f"synthetic-{path}"
    return (render_clip(clip_seed, frames, size[0], size[1], config=scene, name=f"{prefix}{seed}-{index:03d}")
            for index, clip_seed in enumerate(clip_seeds(seed, count)))


def clip_paths(spec: str | os.PathLike) -> list[Path]:
    """The clips a path names: itself if it is one clip, else the clips inside the folder (natural order)."""
    path = Path(spec)
    if not path.exists():
        raise Spark3rError(f"clip path {path} does not exist: {_CLIP_SPEC_HELP}")
    if path.is_file():
        return [path]
    entries = _natural_sorted(entry for entry in path.iterdir() if not entry.name.startswith("."))
    if not entries:
        raise Spark3rError(f"folder {path} is empty: put png/jpg images in it, or clip folders, videos or .npz clips")
    if any(_is_image(entry) for entry in entries):
        return [path]
    clips = [entry for entry in entries if entry.is_dir() or entry.suffix.lower() in VIDEO_SUFFIXES
             or (entry.suffix.lower() == ".npz" and not _is_ground_truth(entry))]
    if not clips:
        raise Spark3rError(f"folder {path} holds no png/jpg images, clip folders, videos or .npz clips: "
                           f"{_CLIP_SPEC_HELP}")
    return clips


def read_clip(path: str | os.PathLike, *, stride: int = 1, max_frames: int | None = None) -> Clip:
    """One clip from an image folder, a video or an .npz file, keeping frames `frame_indices(S, stride, max_frames)`."""
    path = Path(path)
    if not path.exists():
        raise Spark3rError(f"clip path {path} does not exist: {_CLIP_SPEC_HELP}")
    if path.is_dir():
        clip = _read_image_folder(path, stride, max_frames)
    elif path.suffix.lower() == ".npz":
        clip = _read_npz(path, stride, max_frames)
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        clip = _read_video(path, stride, max_frames)
    else:
        raise Spark3rError(f"{path} is not a clip: give a folder of png/jpg images, a video "
                           f"({' '.join(VIDEO_SUFFIXES)}) or an .npz file")
    if clip is None:
        raise ParameterError(f"clip {path} has zero frames after subsampling: check the file and `stride` / "
                             "`max_frames`", "stride", "max_frames")
    return clip


def _read_image_folder(folder: Path, stride: int, max_frames: int | None) -> Clip | None:
    entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    if not entries:
        raise Spark3rError(f"folder {folder} is empty: put the clip's png/jpg images in it")
    files = _natural_sorted(entry for entry in entries if _is_image(entry))
    if not files:
        raise Spark3rError(f"folder {folder} holds no png/jpg images: put the clip's frames in it as images")
    indices = frame_indices(len(files), stride, max_frames)
    if not indices:
        return None
    pixels = [_load_image(files[index]) for index in indices]
    for index, array in zip(indices, pixels):
        if array.shape != pixels[0].shape:
            raise Spark3rError(
                f"images in {folder} have different sizes ({files[indices[0]].name} is {pixels[0].shape[1]}x"
                f"{pixels[0].shape[0]}, {files[index].name} is {array.shape[1]}x{array.shape[0]}): "
                "resize them to one size")
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255)
    ground_truth = folder / GROUND_TRUTH_FILE
    truth = _ground_truth(_load_npz(ground_truth), ground_truth, len(files), images.shape[-2:], indices) \
        if ground_truth.exists() else {}
    return Clip(name=folder.name, images=images, source=str(folder), **truth)


def _read_npz(path: Path, stride: int, max_frames: int | None) -> Clip | None:
    arrays = _load_npz(path)
    if "images" not in arrays:
        raise Spark3rError(f"{path} has no 'images' array: save the frames as images=uint8 [S, H, W, 3]")
    pixels = arrays["images"]
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise Spark3rError(f"{path} holds images of shape {pixels.shape}: save them as [S, H, W, 3]")
    if pixels.dtype == np.uint8:
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)
    elif np.issubdtype(pixels.dtype, np.floating) and np.isfinite(pixels).all() \
            and pixels.min(initial=0) >= 0 and pixels.max(initial=0) <= 1:
        images = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2)
    else:
        raise Spark3rError(f"{path} holds images of dtype {pixels.dtype}: save them as uint8 or as float in [0, 1]")
    indices = frame_indices(len(images), stride, max_frames)
    if not indices:
        return None
    truth = _ground_truth(arrays, path, len(images), images.shape[-2:], indices)
    return Clip(name=path.stem, images=images[indices].contiguous(), source=str(path), **truth)


def _read_video(path: Path, stride: int, max_frames: int | None) -> Clip | None:
    try:
        import av
    except ImportError:
        raise Spark3rError(f"reading the video {path} needs PyAV: install spark3r[video]") from None
    ground_truth = path.with_name(path.stem + GROUND_TRUTH_SUFFIX)
    limit = max_frames or float("inf")
    kept, total = [], 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise Spark3rError(f"{path} has no video stream: give a video file or a folder of images")
            for total, frame in enumerate(container.decode(container.streams.video[0]), start=1):
                if (total - 1) % stride == 0 and len(kept) < limit:
                    kept.append(frame.to_ndarray(format="rgb24"))
                elif len(kept) >= limit and not ground_truth.exists():
                    break
    except (av.FFmpegError, OSError):
        raise Spark3rError(f"cannot read the video {path}: it is corrupt or not a video (re-encode it, "
                           "e.g. to H.264 mp4)") from None
    if not kept:
        return None
    images = torch.from_numpy(np.stack(kept)).permute(0, 3, 1, 2).float().div_(255)
    indices = frame_indices(total, stride, max_frames)
    truth = _ground_truth(_load_npz(ground_truth), ground_truth, total, images.shape[-2:], indices) \
        if ground_truth.exists() else {}
    return Clip(name=path.stem, images=images, source=str(path), **truth)


def _load_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file, EXIF orientation applied, transparency composited on white."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError):
        raise Spark3rError(f"cannot read the image {path}: it is corrupt or not an image "
                           "(remove or replace it)") from None


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

"""Clips with ground truth: readers for image folders, videos and .npz files, the synthetic scene generator, and
per-model preprocessing. `open_clips` is the one parser of clip specs every command uses."""
from spark3r.data.clip import Clip, unproject_depth
from spark3r.data.clips import open_clips, preprocess_clip, read_clip, write_clip
from spark3r.data.preprocess import RECIPES, Recipe, get_recipe
from spark3r.data.synthetic import SceneConfig, SyntheticBatch, clip_seeds, render_batch, render_clip

__all__ = ["Clip", "open_clips", "preprocess_clip", "read_clip", "unproject_depth", "write_clip", "RECIPES", "Recipe",
           "get_recipe", "SceneConfig", "SyntheticBatch", "clip_seeds", "render_batch", "render_clip"]

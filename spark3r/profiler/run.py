"""The measurement engine of profile-layers: one dense forward per clip, then every (global layer, level) alone.

For a clip the dense forward runs step by step, caching the `TrunkState` entering each global layer's block and, through
a forward hook, that layer's attention input and output. Then, for every global layer l and every non-dense level:

* local deviation: the reduced attention of layer l run on the cached input, against the cached dense output;
* end-to-end deviation: layer l's block rerun reduced from the cached state (earlier blocks are not recomputed), then
  the rest of the trunk and the heads, compared with the dense outputs by `output_deviation`. The reduced blocks of all
  levels of one layer are stacked into one batch (B = levels) for the rest of the trunk and the heads.

K/V levels keep queries dense and query levels keep K/V dense. The dense level (keep 1, merge 1) is measured locally
(it must be exactly 0) and is 0 end to end by definition.

`ProfileOptions.resume` screens levels: "alternate" resumes end to end only every other level of each kind, counted
from the strongest, and the mildest (5 of the default 8 resumes per layer); "ends" the mildest and the strongest of
each kind (4 of 8); "strongest" only the strongest level of each kind (2 of 8). The others get each end-to-end metric
as their local deviation times that metric's ratio of end-to-end to local deviation at the resumed levels around them
(same layer and kind), interpolated linearly over the level index and held flat beyond the resumed ones
(`estimate_from_local`).
benchmarks/profile_screening.py measures how well it keeps the layer ranking (results: profile-screening-*.md).

The heads decode in fp32 as upstream, or with the dense heads in the trunk's compute dtype (`ProfileOptions.head_dtype`;
`ReconstructionModel.decode`). The dense reference outputs are decoded in the same head dtype as the levels, so a
deviation compares like with like: against fp32 reference outputs, every level's deviation would also hold the heads'
own bf16 rounding, a floor under the mildest levels (random vggt-tiny, bf16, 4 frames, K/V 1/2, 1/4 and merge 2: the
scores' median relative difference from fp32 heads was 0.4%, 0.1% and 6% with the reference in the levels' head dtype,
2.7%, 1.2% and 25% with an fp32 reference).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from spark3r.errors import ParameterError
from spark3r.evaluate.deviation import DenseReference
from spark3r.models.base import FrameLayout, ReconstructionModel, TrunkState
from spark3r.models.blocks import compute_autocast
from spark3r.profiler.format import Profile
from spark3r.reduce import DEFAULT_KV_METHOD, Reduction, apply_reductions, kv_count, query_count

LOCAL_METRICS = ("local_rel_l2", "local_cos")
RESUMES = ("all", "alternate", "ends", "strongest")
PHASES = ("dense", "cache", "local", "resume", "decode", "additivity")


@dataclass(frozen=True)
class ProfileOptions:
    """What to measure. kv_keep starts with the dense 1.0 and query_merge with the dense 1 (see `profile_levels`).

    score_weights: weights of `output_deviation`'s terms in the combined "score".
    additivity_schedules: random multi-layer schedules measured per clip for the additivity check.
    level_batch: at most this many levels of one layer share one batched forward (memory vs speed; no effect on
    the numbers beyond rounding).
    head_dtype: "fp32" (the heads decode as upstream) or "compute" (the dense heads under autocast to the model's
    compute dtype, as the trunk runs), for the dense reference and every level alike.
    resume: "all" (every level resumed end to end), "alternate" (every other level of each kind from the strongest,
    and the mildest), "ends" (the mildest and the strongest of each kind) or "strongest" (the strongest level of each
    kind); the others are estimated from their local deviation (`resumed_columns`, `estimate_from_local`).
    """

    kv_keep: tuple[float, ...]
    query_merge: tuple[int, ...]
    kv_method: str = DEFAULT_KV_METHOD
    keep_reference_frame: bool = True
    group_frames: int = 20
    score_weights: dict = field(default_factory=dict)
    additivity_schedules: int = 6
    level_batch: int = 8
    seed: int = 0
    head_dtype: str = "fp32"
    resume: str = "all"

    @classmethod
    def of_profile(cls, profile: Profile) -> "ProfileOptions":
        """The options `profile` was measured with (those profile.json does not record take their defaults)."""
        recorded = {name: profile.options[name] for name in ("kv_method", "keep_reference_frame", "group_frames",
                                                             "score_weights", "additivity_schedules", "seed",
                                                             "head_dtype", "resume")
                    if name in profile.options}
        return cls(kv_keep=tuple(profile.kv_keep), query_merge=tuple(profile.query_merge), **recorded)

    def reduction(self, kv_keep: float = 1.0, query_merge: int = 1) -> Reduction:
        """The Reduction of one level measured with these options."""
        return Reduction(kv_keep=kv_keep, kv_method=self.kv_method, keep_reference_frame=self.keep_reference_frame,
                         query_merge=query_merge, group_frames=self.group_frames)

    def decode_dtype(self, model: ReconstructionModel) -> torch.dtype:
        """The dtype the dense heads decode in: fp32, or the model's compute dtype for head_dtype "compute"."""
        return model.decode_dtype(self.head_dtype)

    def identity(self) -> dict:
        """The options that change the numbers (what a resumed run must match); level_batch does not."""
        return {"kv_keep": list(self.kv_keep), "query_merge": list(self.query_merge), "kv_method": self.kv_method,
                "keep_reference_frame": self.keep_reference_frame, "group_frames": self.group_frames,
                "score_weights": dict(self.score_weights), "additivity_schedules": self.additivity_schedules,
                "seed": self.seed, "head_dtype": self.head_dtype, "resume": self.resume}


def resumed_columns(columns: int, resume: str) -> list[int]:
    """The level columns of one kind that are resumed end to end, of `columns` (column 0 the dense level, never
    resumed): all of 1..columns-1; for "alternate" every other one counted from the strongest (columns-1, columns-3,
    ...) and the mildest (1), so that every estimated level lies between two resumed ones; for "ends" the mildest and
    the strongest (1, columns-1); for "strongest" columns-1."""
    if resume == "alternate":
        return sorted({*range(columns - 1, 0, -2), *([1] if columns > 1 else [])})
    if resume == "ends":
        return sorted({1, columns - 1}) if columns > 1 else []
    if resume == "strongest":
        return [columns - 1] if columns > 1 else []
    return list(range(1, columns))


def estimate_from_local(local: np.ndarray, measured: np.ndarray, resumed: list[int]) -> np.ndarray:
    """End-to-end values of one layer and kind at every level column from the resumed ones: local [K] (local rel L2),
    measured [K] (end to end, valid at `resumed`) -> [K]: resumed columns as measured, column 0 as 0, the others
    local x (measured / local) interpolated linearly over the column index (held flat beyond the resumed ones)."""
    ratio = np.divide(measured[resumed], local[resumed], out=np.zeros(len(resumed)), where=local[resumed] > 0)
    estimate = local * np.interp(np.arange(len(local)), resumed, ratio)
    estimate[resumed] = measured[resumed]
    estimate[0] = 0.0
    return estimate


def profile_levels(layout: FrameLayout, options: ProfileOptions) -> tuple[ProfileOptions, list[str]]:
    """Drop levels that reduce exactly as much as a milder one at this layout (e.g. frame_stride keeps below 1/S).

    Returns the options with distinct levels (kv_keep descending from 1.0, query_merge ascending from 1) and one note
    per dropped level. A clip of one frame is refused: its global attention is frame attention, nothing to profile.
    """
    if layout.frames < 2:
        raise ParameterError(f"a clip of {layout.frames} frame is too short to profile: global attention needs at "
                             "least 2 frames; give longer clips (or `frames` of 2 or more)", "frames")
    notes = []

    def distinct(levels, count, describe):
        kept, seen = [], {}
        for level in levels:
            tokens = count(level)
            if tokens in seen:
                notes.append(f"{describe(level)} keeps the same {tokens} tokens as {describe(seen[tokens])} at "
                             f"{layout.frames} frames: dropped")
            else:
                seen[tokens] = level
                kept.append(level)
        return tuple(kept)

    kv_keep = distinct(sorted({1.0, *options.kv_keep}, reverse=True),
                       lambda keep: kv_count(layout, options.reduction(kv_keep=keep)),
                       lambda keep: f"K/V keep {keep:g}")
    query_merge = distinct(sorted({1, *options.query_merge}),
                           lambda merge: query_count(layout, options.reduction(query_merge=merge)),
                           lambda merge: f"query merge {merge}")
    return dataclasses.replace(options, kv_keep=kv_keep, query_merge=query_merge), notes


class PhaseTimer:
    """Wall seconds per phase (`phases`, each starting at 0); synchronises CUDA at both ends so GPU work lands in the
    right phase. Each phase is also a torch.profiler range named after it (benchmarks/profile_layers.py --trace)."""

    def __init__(self, device: torch.device, phases: tuple[str, ...] = PHASES):
        self.device = device
        self.seconds = dict.fromkeys(phases, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(phase):
                yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class AttentionCapture:
    """One global attention call of the dense run: input x [1, N, C], RoPE positions, output [1, N, C], autocast."""

    x: Tensor
    pos: Tensor | None
    out: Tensor
    autocast_dtype: torch.dtype


@dataclass
class DenseRun:
    """The dense forward of one clip: states entering each global layer's block, attention captures, outputs decoded
    in `head_dtype` (every level of the clip is decoded in it too), and those outputs prepared for comparisons."""

    images: Tensor
    layout: FrameLayout
    states: dict[int, TrunkState]
    captures: dict[int, AttentionCapture]
    outputs: dict[str, Tensor]
    head_dtype: torch.dtype = torch.float32
    reference: DenseReference = field(init=False)

    def __post_init__(self):
        self.reference = DenseReference(self.outputs)


def dense_run(model: ReconstructionModel, images: Tensor, timer: PhaseTimer,
              head_dtype: torch.dtype = torch.float32) -> DenseRun:
    """images [1, S, 3, H, W] -> the dense forward with every global layer's entering state and attention cached, its
    outputs decoded with the heads in `head_dtype`."""
    layout = model.adapter.layout(images)
    captures: dict[int, AttentionCapture] = {}
    hooks = [attn.register_forward_hook(_capture_hook(layer, captures, timer), with_kwargs=True)
             for layer, attn in enumerate(model.adapter.modules(model))]
    states = {}
    try:
        with timer("dense"):
            state = model.prepare(images)
            for layer, step in enumerate(model.global_layer_steps):
                state = model.run_steps(state, stop=step)
                states[layer] = state
            outputs = finite_outputs(model.decode(model.run_steps(state), images, head_dtype))
    finally:
        for hook in hooks:
            hook.remove()
    timer.seconds["dense"] -= timer.seconds["cache"]
    return DenseRun(images, layout, states, captures, outputs, head_dtype)


def finite_outputs(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The output tensors that are finite everywhere; the others cannot be compared (e.g. the intrinsics of a random
    VGGT camera head, whose field of view is 0) and leave their terms out of the profile."""
    return {key: value for key, value in outputs.items() if isinstance(value, Tensor) and torch.isfinite(value).all()}


def _capture_hook(layer: int, captures: dict[int, AttentionCapture], timer: PhaseTimer) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> None:
        with timer("cache"):
            x = args[0]
            pos = args[1] if len(args) > 1 else kwargs.get("pos")
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) \
                else torch.float32
            captures[layer] = AttentionCapture(x, pos, out, dtype)

    return hook


def relative_l2(reduced: Tensor, dense: Tensor) -> float:
    """||reduced - dense||_F / ||dense||_F in float64."""
    reduced, dense = reduced.double(), dense.double()
    return float((reduced - dense).norm() / dense.norm().clamp(min=1e-300))


def cosine_distance(reduced: Tensor, dense: Tensor) -> float:
    """Mean over tokens of 1 - cos(reduced_t, dense_t), float64; tensors [..., C].

    Computed as |u - w|^2 / 2 of the unit vectors u, w: the same value, exactly 0 for equal tokens and free of the
    cancellation of 1 - cos for small angles.
    """
    unit = [torch.nn.functional.normalize(t.double(), dim=-1, eps=1e-300) for t in (reduced, dense)]
    return float((unit[0] - unit[1]).square().sum(-1).mean() / 2)


def local_deviation(model: ReconstructionModel, run: DenseRun, layer: int, reduction: Reduction) -> tuple[float, float]:
    """(relative L2, cosine distance) of layer `layer`'s attention output under `reduction`, from its cached input."""
    capture = run.captures[layer]
    attn = model.adapter.modules(model)[layer]
    with apply_reductions(model, {layer: reduction}) as handle:
        handle.set_layout(run.layout)
        with compute_autocast(capture.x.device.type, capture.autocast_dtype):
            out = attn(capture.x, pos=capture.pos)
    return relative_l2(out, capture.out), cosine_distance(out, capture.out)


def stack_states(states: list[TrunkState]) -> TrunkState:
    """Stack single-clip states of the same step along the batch: tokens and taps concatenated (dim 0); an extra is
    kept when every state holds the same object (set by `prepare`) and concatenated when they differ."""
    first = states[0]
    extras = {}
    for key, value in first.extras.items():
        values = [state.extras[key] for state in states]
        if all(other is value for other in values):
            extras[key] = value
        elif all(isinstance(other, Tensor) for other in values):
            extras[key] = torch.cat(values)
        else:
            raise ParameterError(f"trunk extra {key!r} differs between states and is not a tensor: this model "
                                 "cannot batch levels, use `level_batch` 1", "level_batch")
    taps = {key: torch.cat([state.taps[key] for state in states]) for key in first.taps}
    return TrunkState(tokens=torch.cat([state.tokens for state in states]), step=first.step, taps=taps, extras=extras)


def split_outputs(outputs: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """Batch item `index` of a batched output dict, keeping the batch dim."""
    return {key: value[index:index + 1] for key, value in outputs.items() if isinstance(value, Tensor)}


def end_to_end(model: ReconstructionModel, run: DenseRun, start_layer: int, reductions: list[dict[int, Reduction]],
               weights: dict, timer: PhaseTimer, phase: str = "resume") -> list[dict[str, float]]:
    """Deviation of the outputs for each reduction map (layer -> Reduction), resuming at `start_layer`'s block.

    Every map must leave layers before `start_layer` dense. The first block is run per map (B = 1) with the map's layers
    patched; if a map reduces only `start_layer`, the rest of the trunk and the heads run batched over the maps. The
    heads decode in the dense run's head dtype.
    """
    stop = model.global_layer_steps[start_layer] + 1
    states = []
    single = all(set(mapping) == {start_layer} for mapping in reductions)
    for mapping in reductions:
        with timer(phase), apply_reductions(model, mapping) as handle:
            handle.set_layout(run.layout)
            state = model.run_steps(run.states[start_layer], stop=stop if single else None)
            states.append(state)
    with timer(phase):
        final = model.run_steps(stack_states(states)) if single else stack_states(states)
    decode_phase = "decode" if phase == "resume" else phase
    with timer(decode_phase):
        outputs = model.decode(final, run.images.expand(len(states), *run.images.shape[1:]), run.head_dtype)
        return [run.reference.deviation(split_outputs(outputs, index), weights) for index in range(len(states))]


def sample_schedules(count: int, layers: int, kv_levels: int, query_levels: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random multi-layer schedules as level indices, kv [count, L] and query [count, L].

    Schedule i reduces each layer with probability (i + 1) / count (a random non-dense K/V level and a random query
    level, dense included), so the schedules span mild to heavy.
    """
    rng = np.random.default_rng(seed)
    kv_index = np.zeros((count, layers), dtype=np.int64)
    query_index = np.zeros((count, layers), dtype=np.int64)
    for row in range(count):
        chosen = rng.random(layers) < (row + 1) / count
        if kv_levels > 1:
            kv_index[row] = np.where(chosen, rng.integers(1, kv_levels, layers), 0)
        query_index[row] = np.where(chosen, rng.integers(0, query_levels, layers), 0)
    return kv_index, query_index


@dataclass
class ClipMeasurement:
    """One clip's arrays ("kv_<metric>" [L, K_kv], "query_<metric>" [L, K_q], "additivity_<metric>" [n]) and timings."""

    arrays: dict[str, np.ndarray]
    timings: dict[str, float]


def profile_clip(model: ReconstructionModel, images: Tensor, options: ProfileOptions,
                 on_layer: Callable[[], None] | None = None) -> ClipMeasurement:
    """Measure every global layer at every level of `options` on one clip, images [S, 3, H, W] on the model's device.

    `options` must already hold distinct levels (`profile_levels`).
    """
    timer = PhaseTimer(images.device)
    with torch.inference_mode():
        run = dense_run(model, images[None], timer, options.decode_dtype(model))
        metrics = [*LOCAL_METRICS, *run.reference.deviation(run.outputs, options.score_weights)]
        layers = model.adapter.num_global_layers
        kv_levels, query_levels = len(options.kv_keep), len(options.query_merge)
        arrays = {f"{kind}_{metric}": np.zeros((layers, levels))
                  for kind, levels in (("kv", kv_levels), ("query", query_levels)) for metric in metrics}

        kv_index, query_index = sample_schedules(options.additivity_schedules, layers, kv_levels, query_levels,
                                                 options.seed)
        additivity = [schedule_deviation(model, run, options, kv_row, query_row, timer)
                      for kv_row, query_row in zip(kv_index, query_index)]
        for metric in metrics[len(LOCAL_METRICS):]:
            arrays[f"additivity_{metric}"] = np.array([deviation.get(metric, 0.0) for deviation in additivity])

        resumed = {"kv": resumed_columns(kv_levels, options.resume),
                   "query": resumed_columns(query_levels, options.resume)}
        levels = [("kv", column, options.reduction(kv_keep=keep)) for column, keep in enumerate(options.kv_keep)
                  if column] + [("query", column, options.reduction(query_merge=merge))
                                for column, merge in enumerate(options.query_merge) if column]
        resumes = [(kind, column, reduction) for kind, column, reduction in levels if column in resumed[kind]]
        for layer in range(layers):
            with timer("local"):
                dense_local = local_deviation(model, run, layer, options.reduction())
                for kind in ("kv", "query"):
                    arrays[f"{kind}_local_rel_l2"][layer, 0], arrays[f"{kind}_local_cos"][layer, 0] = dense_local
                for kind, column, reduction in levels:
                    local = local_deviation(model, run, layer, reduction)
                    arrays[f"{kind}_local_rel_l2"][layer, column], arrays[f"{kind}_local_cos"][layer, column] = local
            for start in range(0, len(resumes), options.level_batch):
                chunk = resumes[start:start + options.level_batch]
                deviations = end_to_end(model, run, layer, [{layer: reduction} for _, _, reduction in chunk],
                                        options.score_weights, timer)
                for (kind, column, _), deviation in zip(chunk, deviations):
                    for metric, value in deviation.items():
                        arrays[f"{kind}_{metric}"][layer, column] = value
            for kind in ("kv", "query"):
                if len(resumed[kind]) < arrays[f"{kind}_local_rel_l2"].shape[1] - 1:
                    for metric in metrics[len(LOCAL_METRICS):]:
                        table = arrays[f"{kind}_{metric}"]
                        table[layer] = estimate_from_local(arrays[f"{kind}_local_rel_l2"][layer], table[layer],
                                                           resumed[kind])
            del run.states[layer], run.captures[layer]
            if on_layer is not None:
                on_layer()
    return ClipMeasurement(arrays, dict(timer.seconds))


def schedule_deviation(model: ReconstructionModel, run: DenseRun, options: ProfileOptions, kv_row: np.ndarray,
                       query_row: np.ndarray, timer: PhaseTimer) -> dict[str, float]:
    """End-to-end deviation of one multi-layer schedule given as level indices per layer."""
    mapping = {layer: options.reduction(kv_keep=options.kv_keep[kv], query_merge=options.query_merge[query])
               for layer, (kv, query) in enumerate(zip(kv_row.tolist(), query_row.tolist())) if kv or query}
    if not mapping:
        return {}
    return end_to_end(model, run, min(mapping), [mapping], options.score_weights, timer, phase="additivity")[0]

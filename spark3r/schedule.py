"""The schedule: which reduction each global attention layer applies, as a YAML file (version 1).

```yaml
spark3r_schedule: 1
model: vggt-1b                       # checked at apply time
global_layers: 24                    # checked at apply time
default:                             # every layer, unless `layers` overrides it
  query: {merge: 2, group_frames: 20, similarity: key}
  kv: {keep: 0.04, method: frame_stride, keep_reference_frame: true, seed: 0}
layers:                              # global-layer index -> overrides of the default
  11: {kv: {keep: 0.12}}
budget: {fraction: 0.1, of: global_attention, frames: 1000}
predicted: {flops_fraction: 0.097, deviation: 0.031}
provenance: {profile_sha256: ..., sampler: tpe, trials: 2000, seed: 0}
```

Keys (all optional unless marked):
- `spark3r_schedule` (required, 1), `model` (required), `global_layers` (required), `default` (required).
- `kv`: the amount is either `keep: x` (fraction kept, in (0, 1]) or `frames: N` (keep about N frames whatever S is:
  factor ceil(S / N)); `default.kv` must give one of them. `method`: frame_stride (default), grid, random or key_norm;
  `keep_reference_frame` (default true); `seed` of the random method (default 0).
  Two extensions express the paper's length-adaptive rule:
  `full_up_to: T` (with `frames`): the factor is 1 while S <= T (the paper: 100);
  `factor: f` (>= 1): multiplies the reduction factor (keep / f); the paper's insensitive layers use 3.
- `query`: `merge` is the factor r_Q, an integer or a step map `{100: 1, 300: 2, else: 4}` (the first threshold
  with S <= threshold, else the `else` value); `group_frames` (default 20); `similarity`: key (default) or input.
- `layers`: a layer's `kv` / `query` keys replace the default's one by one, except that giving `keep` drops the
  default's `frames` and `full_up_to`, and giving `frames` drops the default's `keep`.
- `budget`: `fraction` (required in it), `of` (global_attention or model), `frames`. `predicted`: name -> number.
  `provenance`: free-form name -> value.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import yaml
from torch import nn

from spark3r.errors import Spark3rError
from spark3r.files import write_atomic
from spark3r.models.base import Adapter
from spark3r.reduce.patch import ReductionHandle, adapter_of, patch_attention
from spark3r.reduce.reduction import KV_METHODS, SIMILARITIES, Reduction

SCHEDULE_VERSION = 1
BUDGET_OF = ("global_attention", "model")
PAPER_KV_METHOD = "frame_stride"
PAPER_KV_FRAMES = 40
PAPER_FULL_UP_TO = 100
PAPER_INSENSITIVE_FACTOR = 3
PAPER_QUERY_MERGE = ((100, 1), (300, 2), (500, 3))
PAPER_QUERY_MERGE_ELSE = 4


@dataclass(frozen=True)
class Stepped:
    """An integer that steps with the number of frames S: the value of the first (up_to, value) with S <= up_to,
    else `otherwise`. Thresholds increase."""

    steps: tuple[tuple[int, int], ...]
    otherwise: int

    def at(self, frames: int) -> int:
        return next((value for up_to, value in self.steps if frames <= up_to), self.otherwise)


@dataclass(frozen=True)
class KVSpec:
    """K/V settings of a layer; None = not set here (inherit or use the default)."""

    keep: float | None = None
    frames: int | None = None
    full_up_to: int | None = None
    factor: float | None = None
    method: str | None = None
    keep_reference_frame: bool | None = None
    seed: int | None = None


@dataclass(frozen=True)
class QuerySpec:
    """Query settings of a layer; None = not set here."""

    merge: int | Stepped | None = None
    group_frames: int | None = None
    similarity: str | None = None


@dataclass(frozen=True)
class LayerSpec:
    """The K/V and query settings of the default or of one layer's override."""

    kv: KVSpec = field(default_factory=KVSpec)
    query: QuerySpec = field(default_factory=QuerySpec)

    def over(self, base: "LayerSpec") -> "LayerSpec":
        """This spec's settings on top of `base` (see the module docstring for keep / frames)."""
        kv_base = base.kv
        if self.kv.keep is not None:
            kv_base = replace(kv_base, frames=None, full_up_to=None)
        if self.kv.frames is not None:
            kv_base = replace(kv_base, keep=None)
        return LayerSpec(kv=_overlay(self.kv, kv_base), query=_overlay(self.query, base.query))


def _overlay(top, base):
    """`base` with every field that `top` sets replaced."""
    return replace(base, **{f.name: getattr(top, f.name) for f in fields(top) if getattr(top, f.name) is not None})


@dataclass(frozen=True)
class Budget:
    """The budget a schedule was searched under: `fraction` of the dense `of` FLOPs at `frames` frames."""

    fraction: float
    of: str = "global_attention"
    frames: int | None = None


@dataclass
class Schedule:
    """A loaded, validated schedule. `layers` holds the overrides as written; `layer(i)` the merged settings."""

    model: str
    global_layers: int
    default: LayerSpec
    layers: dict[int, LayerSpec] = field(default_factory=dict)
    budget: Budget | None = None
    predicted: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def layer(self, index: int) -> LayerSpec:
        """The merged settings of global layer `index`."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.global_layers:
            raise Spark3rError(
                f"global layer {index!r} does not exist: this schedule has layers 0..{self.global_layers - 1}"
            )
        override = self.layers.get(index)
        return override.over(self.default) if override is not None else self.default

    def resolve(self, layer: int, frames: int) -> Reduction:
        """The reduction of global layer `layer` on a clip of `frames` frames."""
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise Spark3rError(f"frames must be a positive integer, got {frames!r}")
        spec = self.layer(layer)
        kv, query = spec.kv, spec.query
        if kv.keep is not None:
            keep = kv.keep
        else:
            full = kv.full_up_to is not None and frames <= kv.full_up_to
            keep = 1.0 if full else 1.0 / math.ceil(frames / kv.frames)
        merge = query.merge.at(frames) if isinstance(query.merge, Stepped) else query.merge
        settings = {
            "kv_keep": keep / (kv.factor or 1),
            "kv_method": kv.method,
            "keep_reference_frame": kv.keep_reference_frame,
            "query_merge": merge,
            "group_frames": query.group_frames,
            "similarity": query.similarity,
            "seed": kv.seed,
        }
        return Reduction(**{name: value for name, value in settings.items() if value is not None})

    def reductions(self, frames: int) -> list[Reduction]:
        """The reduction of every global layer at `frames` frames, in layer order."""
        return [self.resolve(layer, frames) for layer in range(self.global_layers)]

    def to_dict(self) -> dict:
        """The YAML document of this schedule (unset keys left out)."""
        doc = {
            "spark3r_schedule": SCHEDULE_VERSION,
            "model": self.model,
            "global_layers": self.global_layers,
            "default": dict(_layer_doc(self.default)),
        }
        if self.layers:
            doc["layers"] = {index: _layer_doc(spec) for index, spec in sorted(self.layers.items())}
        if self.budget is not None:
            doc["budget"] = _spec_doc(self.budget)
        if self.predicted:
            doc["predicted"] = _Flow(self.predicted)
        if self.provenance:
            doc["provenance"] = dict(self.provenance)
        return doc


class _Flow(dict):
    """A mapping written on one line ({a: 1, b: 2})."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda dumper, data: dumper.represent_mapping(
    "tag:yaml.org,2002:map", data.items(), flow_style=True))


def _spec_doc(spec) -> dict:
    doc = _Flow()
    for f in fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, Stepped):
            value = _Flow({**dict(value.steps), "else": value.otherwise})
        if value is not None:
            doc[f.name] = value
    return doc


def _layer_doc(spec: LayerSpec) -> dict:
    return _Flow({name: doc for name, doc in (("query", _spec_doc(spec.query)), ("kv", _spec_doc(spec.kv))) if doc})


# ---------------------------------------------------------------------------------------------------- validation


class _Reader:
    """Typed access to a parsed YAML document; every failure is one sentence naming the file and the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, message: str):
        raise Spark3rError(f"{self.source}: {message}")

    def mapping(self, value, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(f"{where} must be a mapping of keys to values, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                self.fail(f"{_join(where, key)} is not a known key: {where or 'the top level'} takes "
                          f"{', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.fail(f"{_join(where, key)} is missing: add it (it is required)")
        return value

    def integer(self, value, where: str, low: int | None = None, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{where} must be an integer, got {_kind(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in {low}..{high}"
            self.fail(f"{where} must be {bounds}, got {value}")
        return value

    def number(self, value, where: str, low: float, high: float | None, low_open: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(f"{where} must be a number, got {_kind(value)}")
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            bounds = f"{'(' if low_open else '['}{low}, {high}]" if high is not None else f">= {low}"
            self.fail(f"{where} must be in {bounds}, got {value}")
        return value

    def boolean(self, value, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(f"{where} must be true or false, got {_kind(value)}")
        return value

    def choice(self, value, where: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        return value


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _kv_spec(reader: _Reader, doc, where: str) -> KVSpec:
    allowed = ("keep", "frames", "full_up_to", "factor", "method", "keep_reference_frame", "seed")
    doc = reader.mapping(doc, where, allowed)
    if "keep" in doc and "frames" in doc:
        reader.fail(f"{where} gives both keep and frames: give one of them")
    get = doc.get
    return KVSpec(
        keep=None if get("keep") is None else reader.number(doc["keep"], f"{where}.keep", 0, 1, True),
        frames=None if get("frames") is None else reader.integer(doc["frames"], f"{where}.frames", 1),
        full_up_to=None if get("full_up_to") is None else reader.integer(doc["full_up_to"], f"{where}.full_up_to", 1),
        factor=None if get("factor") is None else reader.number(doc["factor"], f"{where}.factor", 1, None, False),
        method=None if get("method") is None else reader.choice(doc["method"], f"{where}.method", KV_METHODS),
        keep_reference_frame=None if get("keep_reference_frame") is None
        else reader.boolean(doc["keep_reference_frame"], f"{where}.keep_reference_frame"),
        seed=None if get("seed") is None else reader.integer(doc["seed"], f"{where}.seed"),
    )


def _merge(reader: _Reader, value, where: str) -> int | Stepped:
    if not isinstance(value, dict):
        return reader.integer(value, where, 1)
    if "else" not in value:
        reader.fail(f"{where} needs an 'else' entry: the merge factor beyond the last frame threshold")
    steps = []
    for up_to, merge in value.items():
        if up_to == "else":
            continue
        reader.integer(up_to, f"{where} threshold {up_to!r}", 1)
        steps.append((up_to, reader.integer(merge, f"{where}.{up_to}", 1)))
    thresholds = [up_to for up_to, _ in steps]
    if thresholds != sorted(set(thresholds)):
        reader.fail(f"{where} thresholds {thresholds} must increase: list them from the shortest clip up")
    return Stepped(tuple(steps), reader.integer(value["else"], f"{where}.else", 1))


def _query_spec(reader: _Reader, doc, where: str) -> QuerySpec:
    doc = reader.mapping(doc, where, ("merge", "group_frames", "similarity"))
    get = doc.get
    return QuerySpec(
        merge=None if get("merge") is None else _merge(reader, doc["merge"], f"{where}.merge"),
        group_frames=None if get("group_frames") is None
        else reader.integer(doc["group_frames"], f"{where}.group_frames", 1),
        similarity=None if get("similarity") is None
        else reader.choice(doc["similarity"], f"{where}.similarity", SIMILARITIES),
    )


def _layer_spec(reader: _Reader, doc, where: str) -> LayerSpec:
    doc = reader.mapping(doc, where, ("query", "kv"))
    return LayerSpec(
        kv=_kv_spec(reader, doc.get("kv", {}), f"{where}.kv"),
        query=_query_spec(reader, doc.get("query", {}), f"{where}.query"),
    )


def _check_amount(reader: _Reader, spec: KVSpec, where: str) -> None:
    if spec.keep is None and spec.frames is None:
        reader.fail(f"{where} needs kv.keep (a fraction) or kv.frames (frames of K/V to keep)")
    if spec.full_up_to is not None and spec.frames is None:
        reader.fail(f"{where} sets kv.full_up_to without kv.frames: full_up_to only applies to the frames form")


def schedule_from_dict(doc, source: str = "schedule") -> Schedule:
    """Validate a parsed schedule document; `source` names it in error messages."""
    reader = _Reader(source)
    if doc is None:
        reader.fail("the schedule is empty: write a spark3r_schedule: 1 document (see schedules/ for examples)")
    top = ("spark3r_schedule", "model", "global_layers", "default", "layers", "budget", "predicted", "provenance")
    if not isinstance(doc, dict):
        reader.fail(f"a schedule must be a YAML mapping, got {_kind(doc)}")
    if doc.get("spark3r_schedule") != SCHEDULE_VERSION:
        reader.fail(f"spark3r_schedule must be {SCHEDULE_VERSION} (the format version), got "
                    f"{_kind(doc.get('spark3r_schedule'))}")
    reader.mapping(doc, "", top, required=("model", "global_layers", "default"))
    if not isinstance(doc["model"], str) or not doc["model"]:
        reader.fail(f"model must be a model name such as vggt-1b, got {_kind(doc['model'])}")
    global_layers = reader.integer(doc["global_layers"], "global_layers", 1)
    reader.mapping(doc["default"], "default", ("query", "kv"), required=("kv",))
    default = _layer_spec(reader, doc["default"], "default")
    _check_amount(reader, default.kv, "default")
    overrides = doc.get("layers") or {}
    if not isinstance(overrides, dict):
        reader.fail(f"layers must be a mapping of layer index to overrides, got {_kind(overrides)}")
    layers = {}
    for index, override in overrides.items():
        if isinstance(index, bool) or not isinstance(index, int):
            reader.fail(f"layers key {index!r} must be a global-layer index (an integer)")
        if not 0 <= index < global_layers:
            reader.fail(f"layers.{index} is beyond the model: its global layers are 0..{global_layers - 1}")
        layers[index] = _layer_spec(reader, override, f"layers.{index}")
        _check_amount(reader, layers[index].over(default).kv, f"layers.{index}")
    budget = None
    if doc.get("budget") is not None:
        spec = reader.mapping(doc["budget"], "budget", ("fraction", "of", "frames"), required=("fraction",))
        budget = Budget(
            fraction=reader.number(spec["fraction"], "budget.fraction", 0, 1, True),
            of=reader.choice(spec.get("of", "global_attention"), "budget.of", BUDGET_OF),
            frames=None if spec.get("frames") is None else reader.integer(spec["frames"], "budget.frames", 1),
        )
    predicted = doc.get("predicted") or {}
    if not isinstance(predicted, dict):
        reader.fail(f"predicted must be a mapping of names to numbers, got {_kind(predicted)}")
    for name, value in predicted.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            reader.fail(f"predicted.{name} must be a number, got {_kind(value)}")
    provenance = doc.get("provenance") or {}
    if not isinstance(provenance, dict):
        reader.fail(f"provenance must be a mapping of names to values, got {_kind(provenance)}")
    return Schedule(doc["model"], global_layers, default, layers, budget, dict(predicted), dict(provenance))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for key in keys:
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice", node.start_mark)
        return super().construct_mapping(node, deep)


def load_schedule(path_or_dict) -> Schedule:
    """Read and validate a schedule from a YAML file path or an already-parsed dict."""
    if isinstance(path_or_dict, dict):
        return schedule_from_dict(path_or_dict)
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise Spark3rError(f"a schedule is a Schedule, a dict or the path of a YAML file, got "
                           f"{type(path_or_dict).__name__}")
    path = Path(path_or_dict)
    if path.is_dir():
        raise Spark3rError(f"schedule {str(path)!r} is a folder: give the path of the schedule YAML file in it")
    if not path.is_file():
        raise Spark3rError(f"schedule file {str(path)!r} does not exist: give the path of a schedule YAML file")
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise Spark3rError(f"{path} is not a text file (not UTF-8): give a schedule YAML file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise Spark3rError(f"{path}: not valid YAML{where} ({problem}): fix the syntax") from None
    return schedule_from_dict(doc, str(path))


def save_schedule(schedule: Schedule, path, header: str = "") -> Path:
    """Write `schedule` as YAML to `path` atomically, after a `# ` comment block holding `header` (validated first)."""
    doc = schedule.to_dict()
    schedule_from_dict(doc, "the schedule to save")
    text = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    text += yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    return write_atomic(path, text.encode("utf-8"))


def check_model(schedule: Schedule, model_name: str, num_global_layers: int) -> None:
    """Raise a Spark3rError if `schedule` was made for another model or another number of global layers."""
    if schedule.model != model_name:
        raise Spark3rError(f"this schedule was made for {schedule.model}, not {model_name}: "
                           f"use a schedule made for {model_name}")
    if schedule.global_layers != num_global_layers:
        raise Spark3rError(f"this schedule has {schedule.global_layers} global layers but the {model_name} model has "
                           f"{num_global_layers}: use a schedule made for this model")


def apply_schedule(model: nn.Module, schedule: Schedule | str | Path,
                   adapter: Adapter | None = None) -> ReductionHandle:
    """Patch every global attention layer of `model` with `schedule` (a Schedule or a YAML path).

    adapter defaults to `model.adapter`. The schedule's model name and layer count must match the adapter's.
    """
    adapter = adapter_of(model, adapter)
    if not isinstance(schedule, Schedule):
        schedule = load_schedule(schedule)
    check_model(schedule, adapter.model_name, adapter.num_global_layers)
    return patch_attention(model, schedule.resolve, range(adapter.num_global_layers), adapter)


@contextlib.contextmanager
def reduced(model: nn.Module, schedule: Schedule | str | Path,
            adapter: Adapter | None = None) -> Iterator[ReductionHandle]:
    """`with reduced(model, schedule):` runs `model` with the schedule applied and restores it on exit."""
    handle = apply_schedule(model, schedule, adapter)
    try:
        yield handle
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- the paper's rule


def paper_schedule(model: str, global_layers: int, sensitive: list[int]) -> Schedule:
    """The paper's hand-set rule as a schedule.

    r_Q steps 1/2/3/4 at 100/300/500 frames; r_KV = 1 up to 100 frames, else ceil(S / 40), by frame stride, with the
    reference frame kept; the `sensitive` layers use r_KV and all others 3 x r_KV (3 on short inputs).
    """
    default = LayerSpec(
        kv=KVSpec(frames=PAPER_KV_FRAMES, full_up_to=PAPER_FULL_UP_TO, factor=PAPER_INSENSITIVE_FACTOR,
                  method=PAPER_KV_METHOD, keep_reference_frame=True),
        query=QuerySpec(merge=Stepped(PAPER_QUERY_MERGE, PAPER_QUERY_MERGE_ELSE), group_frames=20),
    )
    layers = {index: LayerSpec(kv=KVSpec(factor=1)) for index in sorted(sensitive)}
    provenance = {"rule": "paper", "sensitive": range_text(sensitive)}
    return Schedule(model, global_layers, default, layers, provenance=provenance)


def uniform_schedule(model: str, global_layers: int, sensitive_count: int) -> Schedule:
    """One K/V factor for every layer with the paper rule's mean K/V keep (so comparable global-attention FLOPs).

    The paper rule keeps 1/r_KV on `sensitive_count` layers and 1/(3 r_KV) on the rest; the uniform factor f with
    1/f = (sensitive + (L - sensitive) / 3) / L keeps the same mean fraction. r_Q is the paper's.
    """
    factor = global_layers / (sensitive_count + (global_layers - sensitive_count) / PAPER_INSENSITIVE_FACTOR)
    default = LayerSpec(
        kv=KVSpec(frames=PAPER_KV_FRAMES, full_up_to=PAPER_FULL_UP_TO, factor=round(factor, 6),
                  method=PAPER_KV_METHOD, keep_reference_frame=True),
        query=QuerySpec(merge=Stepped(PAPER_QUERY_MERGE, PAPER_QUERY_MERGE_ELSE), group_frames=20),
    )
    provenance = {"rule": "uniform", "matches": "paper rule mean K/V keep"}
    return Schedule(model, global_layers, default, provenance=provenance)


def range_text(layers: list[int]) -> str:
    """[10, 11, 12, 15] -> "10-12,15"."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)

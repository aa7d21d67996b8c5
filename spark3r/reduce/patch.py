"""Patching a model's global attention, and restoring it bit for bit: with reductions (`patch_attention`; the
schedule's `apply_schedule` is one use of it) or with frame-only attention (`frame_only_patch`).

Each patched attention module gets an instance-level `forward` (q, k, v from qkv_heads -> the layer's attention ->
project_heads, on the merged queries, then un-merged when the layer merges queries);
`remove()` deletes it, so the class forward runs again. The frame layout of the clip comes from a forward pre-hook on
the model root reading its images argument, or from `handle.set_layout(layout)` for callers that run trunk steps
directly. A layer whose reduction keeps everything at the current layout runs the class forward unchanged. Under
autocast, q, k and v are cast to the autocast dtype before selection and merging (the attention would cast them anyway).
A long sequence without autograd makes q, k and v a span of whole merge groups at a time (`spanned_attention`), so a
reduced layer holds only the merged queries and kept keys/values, never q, k and v whole as the dense layer does.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

from torch import Tensor, nn

from spark3r.errors import Spark3rError
from spark3r.models.base import Adapter, FrameLayout
from spark3r.models.blocks import active_compute_dtype, project_heads, qkv_chunk, qkv_heads, rope_period
from spark3r.reduce.attention import frame_attention, is_dense, merged_attention, span_frames, spanned_attention
from spark3r.reduce.merge import unmerge
from spark3r.reduce.reduction import Reduction

# (heads, x, chunk) -> out [B, h, N, D], or (out [B, h, n, D], slot [B, N] or None) where slot maps the n merged
# queries back to the tokens (projected first, then un-merged). heads(index) -> [q, k, v] of the tokens `index` (a
# slice of whole frames); chunk: tokens per call for a long sequence (None: take slice(None), one call)
Attend = Callable[[Callable[[slice], list[Tensor]], Tensor, int | None], Tensor | tuple[Tensor, Tensor | None]]


class AttentionPatch:
    """A live patch of global attention layers `layers`. Use `remove()` (or `with patch:`) to restore the model.

    attention_for(layer, layout) -> None (that layer runs its class forward on this layout) or the function that
    computes its attention (an `Attend`) from heads(index) -> [q, k, v], each [B, heads, n, head_dim] (after qk-norm
    and RoPE, in the compute dtype) of the tokens `index`, the attention input x [B, N, C], and the tokens per call for
    a long sequence without autograd (else None). The patched forward keeps no reference to q, k and v, so a function
    that empties the list can free each as soon as it has used it (`merged_attention` does).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, layers: Iterable[int],
                 attention_for: Callable[[int, FrameLayout], Attend | None]):
        self.model = model
        self.adapter = adapter
        self.layout: FrameLayout | None = None
        self._attention_for = attention_for
        modules = adapter.modules(model)
        layers = sorted(layers)
        busy = [layer for layer in layers if "forward" in vars(modules[layer])]
        if busy:
            raise Spark3rError(f"global attention layer {busy[0]} is already patched: remove() the other handle first")
        self._patched = {layer: modules[layer] for layer in layers}
        for layer, attn in self._patched.items():
            attn.forward = self._patched_forward(layer, attn)
        self._hook = model.register_forward_pre_hook(self._read_layout, with_kwargs=True)

    def set_layout(self, layout: FrameLayout) -> None:
        """Set the frame layout of the clip the global layers will see (the pre-hook overwrites it on model(images))."""
        self.layout = layout

    def remove(self) -> None:
        """Restore the class forwards (idempotent)."""
        for attn in self._patched.values():
            vars(attn).pop("forward", None)
        self._patched = {}
        self._hook.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _read_layout(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        images = args[0] if args else kwargs.get(self.adapter.image_arg)
        if isinstance(images, Tensor):
            self.layout = self.adapter.layout(images)

    def _patched_forward(self, layer: int, attn: nn.Module) -> Callable[..., Tensor]:
        dense_forward = type(attn).forward

        def forward(x: Tensor, pos: Tensor | None = None) -> Tensor:
            layout = self.layout
            if layout is None:
                raise Spark3rError(
                    "the reduced model does not know the frame layout: call the model on images, or call "
                    "handle.set_layout(layout) before running trunk steps directly"
                )
            if x.shape[1] != layout.tokens:
                raise Spark3rError(
                    f"global layer {layer} got {x.shape[1]} tokens but the frame layout holds {layout.tokens}: call "
                    f"handle.set_layout with the layout of the clip being run"
                )
            attend = self._attention_for(layer, layout)
            if attend is None:
                return dense_forward(attn, x, pos=pos)
            dtype = active_compute_dtype(x.device.type, x.dtype)
            chunk = qkv_chunk(attn, x, pos)
            out = attend(lambda index: [t.to(dtype) for t in qkv_heads(attn, x[:, index], pos)], x,
                         chunk if chunk and layout.tokens_per_frame % rope_period(pos) == 0 else None)
            out, slot = out if isinstance(out, tuple) else (out, None)
            out = project_heads(attn, out)
            return out if slot is None else unmerge(out, slot)

        return forward


class ReductionHandle(AttentionPatch):
    """A patch whose layers run the reduced attention (`merged_attention`): resolve(layer, frames) -> the Reduction of
    global layer `layer` on a clip of `frames` frames. A layer whose reduction keeps everything at the current layout
    runs its class forward unchanged."""

    def __init__(self, model: nn.Module, adapter: Adapter, resolve: Callable[[int, int], Reduction],
                 layers: Iterable[int]):
        self._resolve = resolve
        self._resolved: dict[tuple[int, int], Reduction] = {}
        super().__init__(model, adapter, layers, self._reduced_attention_for)

    def reduction(self, layer: int, frames: int) -> Reduction:
        """The reduction global layer `layer` applies on a clip of `frames` frames."""
        key = (layer, frames)
        if key not in self._resolved:
            self._resolved[key] = self._resolve(layer, frames)
        return self._resolved[key]

    def _reduced_attention_for(self, layer: int, layout: FrameLayout) -> Attend | None:
        reduction = self.reduction(layer, layout.frames)
        if is_dense(layout, reduction):
            return None

        def attend(heads: Callable[[slice], list[Tensor]], x: Tensor, chunk: int | None):
            frames = span_frames(layout, reduction, chunk)
            if frames is None:
                return merged_attention(heads(slice(None)), layout, reduction, x=x)
            return spanned_attention(heads, layout, reduction, frames, x=x)

        return attend


def frame_only_patch(model: nn.Module, adapter: Adapter | None = None) -> AttentionPatch:
    """Patch every global attention layer of `model` to attend within each frame only (`frame_attention`)."""
    adapter = adapter_of(model, adapter)
    return AttentionPatch(model, adapter, range(adapter.num_global_layers),
                          lambda layer, layout: lambda heads, x, chunk: frame_attention(*heads(slice(None)), layout))


def adapter_of(model: nn.Module, adapter: Adapter | None) -> Adapter:
    """`adapter`, else `model.adapter`; one sentence if neither is a spark3r Adapter."""
    adapter = adapter if adapter is not None else getattr(model, "adapter", None)
    if not isinstance(adapter, Adapter):
        raise Spark3rError(
            f"{type(model).__name__} has no spark3r adapter: pass adapter= (the Adapter of its model family)"
        )
    return adapter


def patch_attention(model: nn.Module, reduction_for: Callable[[int, int], Reduction], layers: Iterable[int],
                    adapter: Adapter | None = None) -> ReductionHandle:
    """Patch the global attention layers `layers` of `model` through its adapter (default `model.adapter`); layer l
    runs `reduction_for(l, frames)` on a clip of `frames` frames."""
    return ReductionHandle(model, adapter_of(model, adapter), reduction_for, sorted(layers))


def apply_reductions(model: nn.Module, reductions: Mapping[int, Reduction],
                     adapter: Adapter | None = None) -> ReductionHandle:
    """Patch only the listed global layers, each with a fixed reduction whatever the clip length; others stay dense."""
    adapter = adapter_of(model, adapter)
    for layer, reduction in reductions.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < adapter.num_global_layers:
            raise Spark3rError(
                f"global layer {layer!r} does not exist: {adapter.model_name} has layers "
                f"0..{adapter.num_global_layers - 1}"
            )
        if not isinstance(reduction, Reduction):
            raise Spark3rError(
                f"the reduction of layer {layer} must be a spark3r Reduction, got {type(reduction).__name__}"
            )
    fixed = dict(reductions)
    return patch_attention(model, lambda layer, frames: fixed[layer], fixed, adapter)

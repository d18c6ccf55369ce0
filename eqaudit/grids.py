"""Per-layer sampling grids, read from the model graph: where each feature-map cell sits in the input.

Convention: input pixel centres sit at integer coordinates ``0 .. N-1`` on each axis. A spatial
tensor's cell ``i`` (on one axis) is centred at input coordinate ``offset + stride * i``, for
``i = 0 .. n-1`` (:class:`AxisGrid`). The input itself is ``AxisGrid(N, 1, 0)``. A grid is
symmetric about the image centre when ``offset + stride * (n - 1) / 2 == (N - 1) / 2``; a flip or
a 90-degree rotation maps cells onto cells exactly only then (DESIGN.md section 4).

Propagation rules, per axis (``stride``/``offset`` belong to the op's input; ``k`` kernel,
``s`` stride, ``d`` dilation, ``pb``/``pe`` padding at the begin/end):

* window ops (Conv, ConvInteger, QLinearConv, MaxPool, AveragePool, LpPool; ``aten.conv2d``,
  ``convolution``, ``max_pool2d(_with_indices)``, ``avg_pool2d``)::

      n_out      = floor_or_ceil((n + pb + pe - d*(k-1) - 1) / s) + 1
      stride_out = stride * s
      offset_out = offset + stride * (-pb + d*(k-1)/2)

  With ``ceil_mode`` the last window is dropped when it starts inside the end padding
  (``(n_out-1)*s >= n + pb``), as PyTorch and onnxruntime do. ``auto_pad`` SAME_UPPER/SAME_LOWER
  pads ``total = max((ceil(n/s)-1)*s + d*(k-1) + 1 - n, 0)``, the odd cell at the end (UPPER) or
  the begin (LOWER); these pads depend on ``n``, so they are computed at every replayed size.
  A window that finds fewer than one output cell makes the input size invalid.
* transposed convolution: output cell ``j`` sits at input cell ``(j + pb - d*(k-1)/2) / s``::

      n_out      = (n-1)*s - pb - pe + d*(k-1) + output_padding + 1
      stride_out = stride / s
      offset_out = offset + stride * (pb - d*(k-1)/2) / s

* padding (Pad; ``aten.pad``, ``constant_pad_nd``, reflection/replication pads; negative pads
  crop): ``n_out = n + pb + pe``, ``offset_out = offset - stride*pb``.
* ONNX pads, slice bounds and resize sizes computed from maps' shapes (Shape, Gather, integer
  arithmetic ...: TF-style "same" padding, a crop to a skip connection's size in a dynamic
  export) are evaluated at each replayed size (:class:`_ShapeProgram`), as onnxruntime would;
  a value that depends on the batch size, or on image content, is unknown.
* slicing with constant ``start:end:step`` (``step > 0``, Python slice semantics):
  ``n_out = len(range(n)[start:end:step])``, ``offset_out = offset + stride*start``,
  ``stride_out = stride*step``.
* resizing by ``scale = n_out / n`` (or the given scale factor): output cell ``j`` sits at input
  cell ``x(j) = a*j + b``, so ``stride_out = stride*a`` and ``offset_out = offset + stride*b``:
  half_pixel / pytorch_half_pixel ``x = (j + 0.5)/scale - 0.5``; align_corners
  ``x = j*(n-1)/(n_out-1)``; asymmetric ``x = j/scale``; tf_half_pixel_for_nn
  ``x = (j + 0.5)/scale``. Nearest resizing copies input cells, so its exact source indices are
  computed: a subsample ``src(j) = src(0) + c*j`` is a grid of stride ``stride*c``; an upsample by
  an integer ``m`` that repeats every cell ``m`` times is given the half-pixel centre (see
  :func:`_nearest_axis`); anything else is unknown.
* space-to-depth by ``b`` is a ``b x b`` window of stride ``b``; depth-to-space is its inverse
  (``stride/b``, ``offset - stride*(b-1)/(2b)``).
* element-wise ops and normalisations keep the grid; an op combining several spatial inputs
  needs them on one grid, layout and rank (a constant, or a tensor with 1x1 spatial axes of the
  map's rank, broadcasts). Channel concatenation likewise. NCHW <-> NHWC transposes change the
  layout, not the grid.
* grouped channels: a NCHW map may be viewed with several channel axes,
  ``(B, C1, .., Ck, H, W)`` (rank >= 4; group pooling reshapes ``(B, C, H, W)`` to
  ``(B, C/G, G, H, W)`` and takes the max over ``G``). A reshape/view/flatten/unflatten/
  squeeze/unsqueeze whose output keeps the batch axis first and H, W last, with their sizes,
  keeps the grid: row-major order then gives every element the same ``(b, h, w)``. A reduction
  over channel axes only keeps the grid (while a channel axis is left); permuting channel axes
  only keeps it. Anything else on such a tensor (a window op, a resize, a pad) is unknown.
* token sequences (:class:`_Tokens`; torch.export graphs and ONNX graphs alike, the sizes of
  an ONNX Reshape's target read at each replayed size, :class:`_OnnxTarget`, and a dynamic
  batch equal only to itself, :data:`_BATCH`): a rank-4 map flattened to ``(B, C,
  H*W)`` (or NHWC to ``(B, H*W, C)``) indexes its cells on the token axis, row-major; constant
  tokens concatenated in front (a class token) are prefix tokens, not cells. Views that regroup
  the channel axes after the batch and token axes, permutes, element-wise ops with constants or
  a sequence of the same tokens, layer norms over the channels, linear layers, softmaxes over
  channels, slices of channel axes keep the sequence; ``q @ k^T`` gives scores on two
  sequences' tokens, and scores (or scaled dot-product attention) times the values give the
  queries' sequence (written as matmuls or as einsums), every cell reading the whole map (none
  padding-free), as does an
  ``nn.MultiheadAttention`` call, read whole (:data:`_ATTENTION_MODULES`); ``x[:, prefix:]``
  drops the prefix tokens, ``x[:, i < prefix]`` and means over the tokens are flat; without
  prefix tokens ``(B, C, H*W) -> (B, C, H, W)`` is the map again. Anything else on a sequence
  is unknown. The grid of a sequence is its cells' (:meth:`GridGraph.token_layouts`).
* global pools, flatten, Gemm/linear, reductions over both H and W (amax, mean, norm ...),
  adaptive pools to 1x1 give ``"flat"`` (no spatial axes); a reduction over one of H and W is
  unknown. An adaptive pool to ``m`` cells is the window ``k = s = n/m`` when ``m`` divides
  ``n``, else unknown. NHWC maps stay rank 4: a reshape of one is unknown.

Anything else that depends on the image makes its output unknown (``None``), and everything
downstream of it; :meth:`GridGraph.unknown_reason` names the op. Nothing is guessed.

Padding-free cells (``AxisGrid.free``): per axis, the cells ``lo .. hi`` whose values read no
padding anywhere upstream, i.e. whose receptive field stays inside the image and inside every
intermediate map. A rotation by an arbitrary angle is compared only there (DESIGN.md section 4:
the padding frame does not turn with the image, so cells that read it differ between ``h(T x)``
and ``T h(x)`` for reasons that are the padding's, not the model's). The input is ``0 .. N-1``:

* window ops: output ``i`` reads input cells ``i*s - pb .. i*s - pb + d*(k-1)``, so
  ``lo' = ceil((lo + pb) / s)``, ``hi' = floor((hi + pb - d*(k-1)) / s)`` (zero, reflected,
  replicated and -inf padding alike; ceil-mode windows that run into the end padding too);
* transposed convolution: ``lo' = lo*s + d*(k-1) - pb``, ``hi' = hi*s - pb`` (every tap's input
  cell inside ``lo .. hi``);
* pads ``lo + pb .. hi + pb`` (the padded cells themselves are padding; circular padding
  written as Slice + Concat too); slices ``(lo - start) / step .. (hi - start) / step``;
* resizes: cells whose interpolation taps (``1`` cell linear, ``2`` cubic, wider by ``1/scale``
  when downsampling) or nearest source stay inside; depth-to-space ``lo*b .. hi*b + b - 1``;
* element-wise combinations and channel concatenations: the intersection of their inputs';
  everything that keeps the grid keeps them, but for ops that take statistics across cells
  (instance and group norms; layer norms, Lp norms and softmaxes whose axes include H or W) and
  a map combined with image features broadcast over it (a squeeze-excite gate from a global
  pool): each of their cells reads the whole map, so none is free.

Clipped to ``0 .. n-1``; ``(0, -1)`` when no cell is free (deep layers of a network whose
receptive field outgrows the image: ResNet-18's last stage at 224 pixels).

A :class:`GridGraph` is compiled once from the graph and replayed for any input size by pure
arithmetic on node attributes, so an input-size search can call :meth:`GridGraph.grids` for
many candidate sizes cheaply.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import operator
import re
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch

from eqaudit.errors import cause_line

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = [
    "ONNX_GRID_PRESERVING",
    "AxisGrid",
    "Grid",
    "GridGraph",
    "TokenLayout",
    "export_grid_graph",
    "inferred_dims",
    "onnx_grid_graph",
    "torch_grid_graph",
]

_TOL = 1e-9
_NOMINAL_SIZE = (224, 224)  # replayed for unknown_reason/layouts when no size was asked yet


@dataclass(frozen=True)
class AxisGrid:
    """One axis of a sampling grid: ``n`` cells, cell ``i`` centred at ``offset + stride*i``
    (input pixel coordinates, pixel centres at ``0 .. N-1``)."""

    n: int  # cells on this axis
    stride: float  # input pixels per cell
    offset: float  # input coordinate of cell 0's centre
    #: Cells ``lo .. hi`` (inclusive) whose values read no padding anywhere upstream (see
    #: "Padding-free cells" in the module docstring); ``(0, -1)`` when every cell does, None when
    #: not known. An annotation of the grid, not part of its identity (equality, hashing).
    free: tuple[int, int] | None = field(default=None, compare=False)

    @property
    def centre(self) -> float:
        """Input coordinate of the grid's centre, ``offset + stride*(n-1)/2``."""
        return self.offset + self.stride * (self.n - 1) / 2

    def centred(self, size: int) -> bool:
        """Whether the grid is symmetric about the centre ``(size-1)/2`` of a ``size``-pixel axis."""
        return abs(self.centre - (size - 1) / 2) <= 1e-6 * max(1.0, size)


_NO_CELLS = (0, -1)


def _free_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """The padding-free cells ``ceil(lo) .. floor(hi)`` clipped to ``0 .. n-1`` (``(0, -1)``
    when none)."""
    first, last = max(math.ceil(lo - _TOL), 0), min(math.floor(hi + _TOL), n - 1)
    return (first, last) if first <= last else _NO_CELLS


def _mapped_free(
    free: tuple[int, int] | None, n: int, bounds: Callable[[int, int], tuple[float, float]]
) -> tuple[int, int] | None:
    """An input axis's padding-free cells ``free`` carried to an output axis of ``n`` cells:
    ``bounds(lo, hi)`` is the output span they reach (unknown stays unknown, none stays none)."""
    if free is None:
        return None
    if free[0] > free[1]:
        return _NO_CELLS
    return _free_span(*bounds(*free), n)


def _intersect(spans: Sequence[tuple[int, int] | None]) -> tuple[int, int] | None:
    """Cells free in every one of ``spans`` (None when one is unknown)."""
    if any(span is None for span in spans):
        return None
    lo, hi = max(s[0] for s in spans), min(s[1] for s in spans)  # type: ignore[index]
    return (lo, hi) if lo <= hi else _NO_CELLS


@dataclass(frozen=True)
class Grid:
    """The sampling grid of a spatial tensor: one :class:`AxisGrid` per axis (height, width)."""

    h: AxisGrid
    w: AxisGrid


@dataclass(frozen=True)
class TokenLayout:
    """Where a token sequence keeps its cells: axis ``token`` of the tensor indexes ``prefix``
    tokens that are not cells (a class token) and then the ``h x w`` cells of its grid in
    row-major order; axis ``batch`` the images; the other axes are channels."""

    batch: int
    token: int
    prefix: int
    h: int
    w: int

    def as_map(self, value: torch.Tensor) -> torch.Tensor | None:
        """The ``(B, C, h, w)`` map of a sequence's cells (channel axes flattened in order);
        None when the tensor does not have the cells' count of tokens."""
        if value.ndim <= max(self.batch, self.token):
            return None
        moved = value.movedim((self.batch, self.token), (0, -1))
        if moved.shape[-1] != self.prefix + self.h * self.w:
            return None
        cells = moved.reshape(moved.shape[0], -1, moved.shape[-1])[..., self.prefix :]
        return cells.reshape(cells.shape[0], cells.shape[1], self.h, self.w)


# -- replay states ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Map:
    """A spatial tensor whose axes are known; ``grid`` None when the grid is unknown.

    NHWC maps have rank 4. NCHW maps may have rank ``r > 4``: ``(B, C1, .., Ck, H, W)``, the
    batch axis first, H and W last and ``r - 3`` channel axes between them (grouped channels:
    a ``(B, C // G, G, H, W)`` view of a ``(B, C, H, W)`` map)."""

    layout: str  # "NCHW" (NCHW-like at rank > 4) or "NHWC"
    grid: Grid | None
    reason: str | None = None  # why the grid is unknown
    rank: int = 4


@dataclass(frozen=True)
class _Flat:
    """A tensor without spatial axes. ``layout`` is set for a rank-4 tensor with 1x1 spatial axes
    ((B, C, 1, 1) or (B, 1, 1, C)); ``broadcasts``: constant over H and W when broadcast against
    a map (1x1 spatial axes, or a scalar); ``rank``: the tensor's rank when known and ``layout``
    does not say it (a scalar: 0; ``(B, C, G, 1, 1)``: 5)."""

    layout: str | None = None
    broadcasts: bool = False
    rank: int | None = None

    @property
    def ndim(self) -> int | None:
        """The tensor's rank when known."""
        return 4 if self.layout is not None else self.rank


@dataclass(frozen=True)
class _Lost:
    """A tensor whose axes are not known (an op the walk does not understand)."""

    reason: str


@dataclass(frozen=True)
class _Folded(_Lost):
    """A NCHW map reshaped to ``(B, G, -1)``: each group's channels and cells in one axis, as
    exporters write a GroupNorm (Reshape, InstanceNormalization, Reshape back to the shape of
    ``source``). Lost to every op but those two (:attr:`_Step.unfolds`); the Reshape back to
    ``source``'s shape gives ``origin`` again, its grid spread by the statistics."""

    origin: _Map | None = None
    source: str = ""


_State = _Map | _Flat | _Lost
_Rule = Callable[[list[Any]], Any]


class _TooSmall(Exception):
    """The input size gives a window op fewer than one output cell."""

    def __init__(self, message: str, layout: str = "NCHW", rank: int = 4) -> None:
        super().__init__(message)
        self.layout = layout
        self.rank = rank


@dataclass(frozen=True)
class _Step:
    """One node: its input/output tensor names and the rule mapping input states to outputs."""

    label: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    rule: _Rule
    meta: bool = False  # its outputs describe tensors (shapes, sizes), not image content
    unfolds: bool = False  # its rule takes a _Folded input (any other step: lost)
    #: the last ``reads`` inputs are other tensors whose states the rule reads (a Resize's
    #: sizes from another map's shape), not the node's own: they make it neither image content
    #: nor lost
    reads: int = 0
    tokens: bool = False  # its rule takes token sequences and attention scores (_Tokens)


@dataclass
class _Replay:
    states: dict[str, Any]
    invalid: str | None


class GridGraph:
    """Per-axis geometry of every tensor in a model graph, replayable at any input size.

    Built by :func:`onnx_grid_graph` (names: tensor names) or :func:`torch_grid_graph` (names:
    module paths, ``path:1`` for a module's second call, as :class:`TorchAdapter` names layers).
    """

    def __init__(
        self,
        input_name: str,
        layout: str,
        steps: Sequence[_Step],
        public: Mapping[str, str],
        missing: Mapping[str, str] | None = None,
        ranks: Mapping[str, int] | None = None,
    ) -> None:
        self.input_name = input_name
        self.layout = layout
        self._steps = tuple(steps)
        self._public = dict(public)  # public name -> tensor (graph) name
        self._missing = dict(missing or {})  # public name -> why it has no tensor
        self._ranks = dict(ranks or {})  # tensor name -> rank, where the graph records it
        #: The constant the graph first divides its image input by (``x / 255``, or ``x *
        #: (1 / 255)``: a model that scales 0-255 pixels itself), None when it does not
        self.input_divisor: float | None = None
        self._cache: dict[tuple[int, int], _Replay] = {}
        self._last: tuple[int, int] | None = None
        self._content = self._content_tensors()
        # Tensors computed from the image's shape only (Shape, then arithmetic on it).
        self._meta = {out for step in self._steps for out in step.outputs} - self._content

    def _content_tensors(self) -> set[str]:
        """The input and the tensors computed from its content."""
        content = {self.input_name}
        for step in self._steps:
            if not step.meta and any(name in content for name in step.inputs):
                content.update(step.outputs)
        return content

    @property
    def names(self) -> list[str]:
        """Every tensor (or module call) name carrying image content, in graph order."""
        return [n for n, t in self._public.items() if t not in self._meta] + [*self._missing]

    def token_descendants(self) -> set[str]:
        """Names of the tensors computed from a token sequence: a rank-3 tensor of image content
        (a ViT's ``(batch, tokens, dim)``), and what is computed from token tensors alone
        (attention scores ``(batch, heads, tokens, tokens)``, a residual sum of two). An op
        that also reads a tensor of no token descent is not: a squeeze-excite gate, an ECA or
        global-context block, a non-local block's output added back to its input. Their
        squeezes go through ``(batch, C, H*W)``, and the maps they gate stay image maps.
        Needs the ranks the graph recorded; without them, none."""
        tokens: set[str] = set()
        for step in self._steps:
            own = step.inputs[: len(step.inputs) - step.reads]  # (not the tensors it reads)
            content = [name for name in own if name in self._content]
            if step.meta or not content:
                continue
            inherited = all(name in tokens for name in content)
            tokens.update(o for o in step.outputs if inherited or self._ranks.get(o) == 3)
        return {name for name, tensor in self._public.items() if tensor in tokens}

    def grids(self, height: int, width: int) -> dict[str, Grid | str | None]:
        """Tensor/layer name -> :class:`Grid` for spatial tensors, ``"flat"`` for tensors without
        spatial axes (after global pooling / flatten / gemm), ``None`` when unknown.

        Pure arithmetic from node attributes: no model run; cached per size.
        """
        replay = self._replay(height, width)
        out: dict[str, Grid | str | None] = {}
        for name, tensor in self._public.items():
            state = _first(replay.states.get(tensor))
            if tensor in self._meta:
                continue  # shape arithmetic on the image's size, not image content
            if isinstance(state, _Tokens) and state.merged != 1:
                out[name] = None  # (the batch axis holds the heads too: not comparable)
            elif isinstance(state, (_Map, _Tokens)):
                out[name] = state.grid
            elif isinstance(state, _Flat):
                out[name] = "flat"
            else:
                out[name] = None
        out.update(dict.fromkeys(self._missing))
        return out

    def token_layouts(self, height: int, width: int) -> dict[str, TokenLayout]:
        """Name -> :class:`TokenLayout` for the token sequences of known grid (a ViT's blocks).
        The layout does not depend on the size; the number of cells does."""
        replay = self._replay(height, width)
        out: dict[str, TokenLayout] = {}
        for name, tensor in self._public.items():
            state = _first(replay.states.get(tensor))
            if isinstance(state, _Tokens) and state.grid is not None and state.merged == 1:
                grid = state.grid
                out[name] = TokenLayout(state.batch, state.token, state.prefix, grid.h.n, grid.w.n)
        return out

    def layouts(self, height: int, width: int) -> dict[str, str | None]:
        """Name -> ``"NCHW"``/``"NHWC"`` for rank-4 tensors (maps, and flat ones with 1x1 spatial
        axes), ``None`` otherwise or when unknown. Layouts do not depend on the size."""
        replay = self._replay(height, width)
        out: dict[str, str | None] = {}
        for name, tensor in self._public.items():
            state = _first(replay.states.get(tensor))
            if tensor not in self._meta:
                rank4 = isinstance(state, (_Map, _Flat)) and _rank_of(state) == 4
                out[name] = state.layout if rank4 else None
        return out

    def unknown_reason(
        self, name: str, height: int | None = None, width: int | None = None
    ) -> str | None:
        """Which op (type and node name) made ``name``'s grid unknown, or None when it is known.

        At the given size; else at the size of the latest :meth:`grids` call (else 224x224)."""
        if name in self._missing:
            return self._missing[name]
        if name not in self._public:
            return f"'{name}' is not a tensor or module of the graph"
        if height is None or width is None:
            height, width = self._last or _NOMINAL_SIZE
        state = _first(self._replay(height, width).states.get(self._public[name]))
        if isinstance(state, _Tokens) and state.merged != 1:
            return "a token sequence whose batch axis holds its heads too (followed, not compared)"
        if isinstance(state, (_Map, _Tokens)):
            return state.reason if state.grid is None else None
        if isinstance(state, _Lost):
            return state.reason
        if state is None:
            return f"'{name}' does not depend on the image input"
        return None

    def invalid_reason(self, height: int, width: int) -> str | None:
        """Why the graph cannot take a ``height x width`` input (a window op gets fewer than one
        output cell), or None."""
        return self._replay(height, width).invalid

    # -- replay ----------------------------------------------------------------------------------
    def _replay(self, height: int, width: int) -> _Replay:
        key = (int(height), int(width))
        self._last = key
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if height < 1 or width < 1:
            raise ValueError(f"input size {height}x{width} is not positive")
        start = Grid(
            AxisGrid(key[0], 1.0, 0.0, (0, key[0] - 1)), AxisGrid(key[1], 1.0, 0.0, (0, key[1] - 1))
        )
        states: dict[str, Any] = {self.input_name: _Map(self.layout, start)}
        invalid: str | None = None
        for step in self._steps:
            if step.meta:
                continue
            ins = [states.get(name) for name in step.inputs]
            if step.unfolds and not step.tokens:
                ins = [s.fold if isinstance(s, _Tokens) and s.fold is not None else s for s in ins]
            own = ins[: len(ins) - step.reads]  # (the node's own inputs; then the ones it reads)
            if all(state is None for state in own):
                continue  # a constant subgraph: does not depend on the image
            lost = next((s for s in own if isinstance(s, _Lost) and not _takes(step, s)), None)
            if isinstance(lost, _Folded):
                lost = _Lost(lost.reason)
            elif isinstance(lost, (_Tokens, _Scores)):
                lost = _Lost(_token_reason(step.label))
            if lost is not None:
                out: Any = lost  # axes unknown upstream: unknown downstream, same reason
            else:
                try:
                    out = step.rule(ins)
                except _TooSmall as exc:
                    invalid = invalid or str(exc)
                    out = _Map(exc.layout, None, str(exc), exc.rank)
            if out is None:
                continue  # not image content (a shape, an assertion)
            if isinstance(out, tuple) and len(step.outputs) > 1:
                for name, state in zip(step.outputs, out, strict=False):
                    if state is not None:
                        states[name] = state
            else:
                for name in step.outputs:
                    states[name] = out
        replay = _Replay(states, invalid)
        if len(self._cache) >= 256:
            self._cache.clear()
        self._cache[key] = replay
        return replay


def _first(state: Any) -> Any:
    """A multi-output node's first output stands for the node (as a module's first tensor does)."""
    if isinstance(state, tuple):
        return state[0] if state else None
    return state


def _takes(step: _Step, state: _Lost) -> bool:
    """Whether a step's rule is called with this state among its inputs (a GroupNorm's fold, a
    token sequence), rather than its outputs being lost."""
    if isinstance(state, _Folded):
        return step.unfolds
    return isinstance(state, (_Tokens, _Scores)) and step.tokens


# -- per-axis arithmetic ----------------------------------------------------------------------
_AXES = ("height", "width")
_SPATIAL = {"NCHW": (2, 3), "NHWC": (1, 2)}
_CHANNEL = {"NCHW": 1, "NHWC": 3}


def _rank_of(state: Any) -> int | None:
    """A state's tensor rank when known."""
    if isinstance(state, _Map):
        return state.rank
    if isinstance(state, _Flat):
        return state.ndim
    return None


def _spatial_axes(state: _Map) -> tuple[int, int]:
    """Tensor axes of H and W: the last two of a NCHW(-like) map, 1 and 2 of a NHWC one."""
    return (state.rank - 2, state.rank - 1) if state.layout == "NCHW" else _SPATIAL["NHWC"]


def _channel_axes(state: _Map) -> tuple[int, ...]:
    """Tensor axes between the batch axis and the spatial ones (NCHW), or the last one (NHWC)."""
    return tuple(range(1, state.rank - 2)) if state.layout == "NCHW" else (3,)


def _normalised(axes: Sequence[int], rank: int) -> list[int] | None:
    """Axes in ``0 .. rank-1`` (negative ones count from the end); None if one is out of range."""
    if any(not -rank <= a < rank for a in axes):
        return None
    return [a % rank for a in axes]


def _not_rank4(state: _Map, label: str) -> _Lost:
    """Why an op defined on rank-4 maps only cannot take a map of another rank."""
    return _Lost(f"{label} is applied to a rank-{state.rank} map (it expects rank 4)")


def _window_axis(
    g: AxisGrid,
    k: int,
    s: int,
    d: int,
    pb: int,
    pe: int,
    ceil_mode: bool,
    auto_pad: str,
    label: str,
    axis: str,
) -> AxisGrid:
    """Output grid of a window op on one axis (formulas in the module docstring)."""
    n = g.n
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
        half = total // 2
        pb, pe = (half, total - half) if auto_pad == "SAME_UPPER" else (total - half, half)
    elif auto_pad == "VALID":
        pb = pe = 0
    span = n + pb + pe - d * (k - 1) - 1
    if span < 0:
        raise _TooSmall(
            f"{label} needs at least {d * (k - 1) + 1 - pb - pe} cells on the {axis} axis "
            f"but gets {n}"
        )
    if ceil_mode:
        n_out = -(-span // s) + 1
        if (n_out - 1) * s >= n + pb:  # the last window would start in the end padding
            n_out -= 1
    else:
        n_out = span // s + 1
    # Output cell i reads input cells i*s - pb .. i*s - pb + d*(k-1).
    free = _mapped_free(g.free, n_out, lambda lo, hi: ((lo + pb) / s, (hi + pb - d * (k - 1)) / s))
    return AxisGrid(n_out, g.stride * s, g.offset + g.stride * (-pb + d * (k - 1) / 2), free)


def _transpose_axis(
    g: AxisGrid,
    k: int,
    s: int,
    d: int,
    pb: int,
    pe: int,
    output_padding: int,
    label: str,
    axis: str,
) -> AxisGrid:
    n_out = (g.n - 1) * s - pb - pe + d * (k - 1) + output_padding + 1
    if n_out < 1:
        raise _TooSmall(f"{label} gives {n_out} cells on the {axis} axis")
    # Output cell j gathers input cells (j + pb - d*kk) / s: inside lo .. hi for every tap when
    # j + pb - d*(k-1) >= lo*s and j + pb <= hi*s (a tap that falls off the map is a border
    # effect; taps between cells are not, but the bound keeps them in: at most s-1 cells lost).
    free = _mapped_free(g.free, n_out, lambda lo, hi: (lo * s + d * (k - 1) - pb, hi * s - pb))
    return AxisGrid(n_out, g.stride / s, g.offset + g.stride * (pb - d * (k - 1) / 2) / s, free)


def _pad_axis(g: AxisGrid, pb: int, pe: int, label: str, axis: str, layout: str) -> AxisGrid:
    n_out = g.n + pb + pe
    if n_out < 1:
        raise _TooSmall(f"{label} crops the {axis} axis to {n_out} cells", layout)
    free = _mapped_free(g.free, n_out, lambda lo, hi: (lo + pb, hi + pb))
    return AxisGrid(n_out, g.stride, g.offset - g.stride * pb, free)


def _slice_axis(
    g: AxisGrid,
    start: int | None,
    end: int | None,
    step: int,
    label: str,
    axis: str,
    layout: str,
    rank: int = 4,
) -> AxisGrid:
    first, _, _ = slice(start, end, step).indices(g.n)
    n_out = len(range(*slice(start, end, step).indices(g.n)))
    if n_out < 1:
        raise _TooSmall(f"{label} leaves no cells on the {axis} axis", layout, rank)
    free = _mapped_free(g.free, n_out, lambda lo, hi: ((lo - first) / step, (hi - first) / step))
    return AxisGrid(n_out, g.stride * step, g.offset + g.stride * first, free)


def _affine_axis(g: AxisGrid, n_out: int, a: float, b: float, reach: float) -> AxisGrid:
    """Output cell ``j`` at input cell ``a*j + b``, interpolated from the input cells within
    ``reach`` of it (1 linear, 2 cubic; times ``a`` when downsampling, as an antialiasing filter
    widens: the bound is kept even without one). The op clamps its taps to the map: a cell
    within reach of the border reads a replicated edge, which is padding all the same."""
    reach *= max(1.0, a)

    def bounds(lo: int, hi: int) -> tuple[float, float]:
        if a == 0:  # one output cell at b: free when all its taps are (else an empty span)
            return (0, n_out - 1) if lo <= b - reach and b + reach <= hi else (1, 0)
        return (lo + reach - b) / a, (hi - reach - b) / a

    free = _mapped_free(g.free, n_out, bounds)
    return AxisGrid(n_out, g.stride * a, g.offset + g.stride * b, free)


def _round(x: Fraction, mode: str) -> int:
    if mode == "floor":
        return math.floor(x)
    if mode == "ceil":
        return math.ceil(x)
    low = math.floor(x)
    frac = x - low
    if frac == Fraction(1, 2):
        return low if mode == "round_prefer_floor" else low + 1
    return low if frac < Fraction(1, 2) else low + 1


def _nearest_axis(g: AxisGrid, n_out: int, wanted: list[int], label: str) -> AxisGrid | str:
    """Grid of a nearest-neighbour resize whose cell ``j`` copies input cell
    ``clamp(wanted[j])`` (:func:`_nearest_sources`), or the reason it has none.

    A copy is a sample *at the source cell*, so a subsample ``src(j) = src(0) + c*j`` is the grid
    ``(stride*c, offset + stride*src(0))``. An upsample by an integer ``m`` that repeats each cell
    ``m`` times (``src(j) = j // m``) gets the half-pixel centre ``offset + stride*(0.5/m - 0.5)``
    at stride ``stride/m`` even when the op's own coordinate mode is asymmetric: the ``m`` copies of
    cell ``i`` cover ``i - 0.5 .. i + 0.5`` exactly, repeating cells commutes with flipping the map
    (the asymmetric centre ``j/m`` would call that grid shifted and misaligned), and the upsampled
    grid stays symmetric exactly when its input grid was.
    """
    n = g.n
    src = [min(max(i, 0), n - 1) for i in wanted]
    free = None  # the cells copying a free input cell (a clamped copy is a replicated edge)
    if g.free is not None:
        kept = [j for j, i in enumerate(wanted) if g.free[0] <= i <= g.free[1]]
        free = (kept[0], kept[-1]) if kept else _NO_CELLS
    if n_out == 1:
        return AxisGrid(1, g.stride, g.offset + g.stride * src[0], free)
    step = src[1] - src[0]
    if step >= 1 and all(src[j] == src[0] + step * j for j in range(n_out)):
        return AxisGrid(n_out, g.stride * step, g.offset + g.stride * src[0], free)
    if n_out % n == 0:
        m = n_out // n
        if all(src[j] == j // m for j in range(n_out)):
            return AxisGrid(n_out, g.stride / m, g.offset + g.stride * (0.5 / m - 0.5), free)
    return f"{label} repeats input cells unevenly ({n} -> {n_out} cells, nearest)"


def _spread(state: Any) -> Any:
    """A map (or token sequence) each of whose cells reads the whole input map (a normalisation
    over H and W, a gate from a global pool, attention): every cell reads whatever padding any
    cell read."""
    if not isinstance(state, (_Map, _Tokens)) or state.grid is None:
        return state
    h, w = state.grid.h, state.grid.w
    spread = [None if g.free is None else _NO_CELLS for g in (h, w)]
    return replace(state, grid=Grid(replace(h, free=spread[0]), replace(w, free=spread[1])))


def _same_grid(a: Grid, b: Grid) -> bool:
    return all(
        x.n == y.n and abs(x.stride - y.stride) <= _TOL and abs(x.offset - y.offset) <= _TOL
        for x, y in ((a.h, b.h), (a.w, b.w))
    )


def _grid_text(grid: Grid) -> str:
    return (
        f"{grid.h.n}x{grid.w.n} cells, stride {grid.h.stride:g}x{grid.w.stride:g}, "
        f"offset {grid.h.offset:g},{grid.w.offset:g}"
    )


def _combine(ins: Sequence[Any], label: str, out_rank: int | None = None) -> Any:
    """State of an element-wise combination of ``ins`` (None entries: constants); ``out_rank``:
    the output's rank when the graph says it.

    Maps must share one grid, layout and rank; flat tensors with 1x1 spatial axes of the map's
    rank (or scalars) broadcast over a map; other flat tensors broadcast against a map would mix
    features into the W axis (or the batch axis into a channel axis). An output of higher rank
    than its maps (a constant broadcast in front) no longer has the batch axis first.
    """
    states = [_first(s) for s in ins if s is not None]
    maps = [s for s in states if isinstance(s, _Map)]
    flats = [s for s in states if isinstance(s, _Flat)]
    if not maps:
        if not flats:
            return None
        layouts = {f.layout for f in flats}
        ranks = {f.ndim for f in flats}
        rank = next(iter(ranks)) if len(ranks) == 1 else None
        if out_rank is not None and rank is not None and out_rank != rank:
            return _Flat(None, False, out_rank)  # broadcast to a higher rank: the batch axis moved
        layout = flats[0].layout if len(layouts) == 1 else None
        return _Flat(layout, all(f.broadcasts for f in flats), None if layout else rank)
    if any(not f.broadcasts for f in flats):
        return _Lost(f"{label} broadcasts flat features against a spatial map")
    layout, rank = maps[0].layout, maps[0].rank
    if any(m.layout != layout for m in maps):
        return _Lost(f"{label} combines maps of different layouts (NCHW and NHWC)")
    if any(m.rank != rank for m in maps):
        return _Lost(f"{label} combines maps of ranks {sorted({m.rank for m in maps})}")
    if out_rank is not None and out_rank != rank:
        return _Lost(f"{label} broadcasts a rank-{rank} map to rank {out_rank}")
    for f in flats:
        if f.layout not in (None, layout) or f.ndim not in (None, 0, rank):
            kind = f"{f.layout} tensor" if f.layout else f"rank-{f.ndim} tensor"
            return _Lost(f"{label} broadcasts a {kind} against a rank-{rank} {layout} map")
    unknown = next((m for m in maps if m.grid is None), None)
    if unknown is not None:
        return unknown
    first = maps[0].grid
    assert first is not None
    for other in maps[1:]:
        assert other.grid is not None
        if not _same_grid(first, other.grid):
            return _Map(
                layout,
                None,
                f"{label} combines maps on different grids ({_grid_text(first)} and "
                f"{_grid_text(other.grid)})",
                rank,
            )
    if flats:  # image features broadcast over the map: a global pool's gate (squeeze-excite)
        return _spread(maps[0])
    if len(maps) == 1:
        return maps[0]
    # A cell reads padding when any of its inputs does (the identity branch of a residual block
    # has more free cells than the convolution branch added to it).
    grids = [m.grid for m in maps]
    h = replace(first.h, free=_intersect([g.h.free for g in grids]))  # type: ignore[union-attr]
    w = replace(first.w, free=_intersect([g.w.free for g in grids]))  # type: ignore[union-attr]
    return replace(maps[0], grid=Grid(h, w))


@dataclass(frozen=True)
class _Window:
    """A 2-D window op's constant attributes, per axis (height, width)."""

    label: str
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads_begin: tuple[int, int]
    pads_end: tuple[int, int]
    ceil_mode: bool = False
    auto_pad: str = "NOTSET"
    transposed: bool = False
    output_padding: tuple[int, int] = (0, 0)

    @classmethod
    def of(
        cls,
        label: str,
        kernel: Sequence[int],
        strides: Sequence[int],
        dilations: Sequence[int],
        pads_begin: Sequence[int],
        pads_end: Sequence[int] | None = None,
        **options: Any,
    ) -> _Window:
        """From per-axis (height, width) sequences; ``pads_end`` defaults to ``pads_begin``
        (PyTorch pads both ends alike)."""

        def pair(values: Sequence[int]) -> tuple[int, int]:
            return (int(values[0]), int(values[1]))

        ends = pads_begin if pads_end is None else pads_end
        return cls(
            label,
            pair(kernel),
            pair(strides),
            pair(dilations),
            pair(pads_begin),
            pair(ends),
            **options,
        )

    def axis(self, g: AxisGrid, i: int) -> AxisGrid:
        if self.transposed:
            return _transpose_axis(
                g,
                self.kernel[i],
                self.strides[i],
                self.dilations[i],
                self.pads_begin[i],
                self.pads_end[i],
                self.output_padding[i],
                self.label,
                _AXES[i],
            )
        return _window_axis(
            g,
            self.kernel[i],
            self.strides[i],
            self.dilations[i],
            self.pads_begin[i],
            self.pads_end[i],
            self.ceil_mode,
            self.auto_pad,
            self.label,
            _AXES[i],
        )


def _window_state(state: Any, window: _Window) -> Any:
    """A window op (or transposed convolution) on a NCHW map; a flat (B, C, 1, 1) tensor stays
    flat when the op keeps it at 1x1 (a 1x1 convolution head after global pooling)."""
    label = window.label
    if isinstance(state, _Flat):
        if state.layout != "NCHW":
            return _Lost(f"{label} is applied to flat features")
        one = AxisGrid(1, 1.0, 0.0)
        if all(window.axis(one, i).n == 1 for i in range(2)):
            return state
        return _Lost(f"{label} grows a 1x1 map")
    if state.layout != "NCHW":
        return _Lost(f"{label} is applied to a {state.layout} map (it expects NCHW)")
    if state.rank != 4:
        return _not_rank4(state, label)
    if state.grid is None:
        return state
    return _Map("NCHW", Grid(window.axis(state.grid.h, 0), window.axis(state.grid.w, 1)))


def _global_state(state: Any, label: str) -> Any:
    """A global pool over every axis after the channel one: flat, 1x1 spatial axes kept."""
    if isinstance(state, _Flat):
        return state
    if state.layout != "NCHW":
        return _Lost(f"{label} is applied to a {state.layout} map (it expects NCHW)")
    if state.rank != 4:  # also pools the channel axes after the first: (B, C, 1, .., 1)
        return _Flat(None, True, state.rank)
    return _Flat("NCHW", True)


def _pad_state(state: Any, pads: Mapping[int, tuple[int, int]], rank: int, label: str) -> Any:
    """Pad by ``pads[axis] = (begin, end)`` (tensor axes, normalised)."""
    if isinstance(state, _Flat):
        return (
            state
            if not any(pads.get(a, (0, 0)) != (0, 0) for a in (2, 3))
            else _Lost(f"{label} pads flat features spatially")
        )
    if rank != 4 or state.rank != 4:
        return _Lost(f"{label} pads a tensor of rank {rank if rank != 4 else state.rank}")
    if pads.get(0, (0, 0)) != (0, 0):
        return _Lost(f"{label} pads the batch axis")
    if state.grid is None:
        return state
    ah, aw = _SPATIAL[state.layout]
    h = _pad_axis(state.grid.h, *pads.get(ah, (0, 0)), label, "height", state.layout)
    w = _pad_axis(state.grid.w, *pads.get(aw, (0, 0)), label, "width", state.layout)
    return _Map(state.layout, Grid(h, w))


def _resolve_axes(
    state: Any, axes: Sequence[int], rank: int | None, label: str
) -> list[int] | _Lost:
    """``axes`` (negative ones count from the end) normalised by the state's rank: a map's own
    (which must agree with the graph's ``rank`` when that is known), else ``rank``, else 4 (flat
    tensors of unknown rank, as before ranks were tracked)."""
    own = _rank_of(state)
    if isinstance(state, _Map) and rank is not None and rank != own:
        return _Lost(f"{label} sees a rank-{rank} tensor where the walk has a rank-{own} map")
    size = own if own is not None else (rank if rank is not None else 4)
    found = _normalised(axes, size)
    if found is None:
        return _Lost(f"{label} names axes {list(axes)} of a rank-{size} tensor")
    return found


def _slice_state(
    state: Any,
    axis: int,
    start: int | None,
    end: int | None,
    step: int,
    label: str,
    rank: int | None = None,
) -> Any:
    """Slice one tensor axis (negative: from the end; ``rank``: the graph's rank for it, when
    known); steps must be positive."""
    if step < 1:
        return _Lost(f"{label} slices with step {step} (only positive steps are understood)")
    found = _resolve_axes(state, [axis], rank, label)
    if isinstance(found, _Lost):
        return found
    axis = found[0]
    if isinstance(state, _Flat):
        if state.layout is not None and axis in _SPATIAL[state.layout]:
            first = slice(start, end, step).indices(1)
            if len(range(*first)) != 1:
                return _Lost(f"{label} slices a 1x1 axis empty")
        return state
    ah, aw = _spatial_axes(state)
    if axis not in (ah, aw) or state.grid is None:
        return state  # the batch axis or a channel axis
    where = (label, _AXES[0] if axis == ah else _AXES[1], state.layout, state.rank)
    if axis == ah:
        h = _slice_axis(state.grid.h, start, end, step, *where)
        return replace(state, grid=Grid(h, state.grid.w))
    w = _slice_axis(state.grid.w, start, end, step, *where)
    return replace(state, grid=Grid(state.grid.h, w))


def _concat_state(ins: Sequence[Any], axis: int, label: str, rank: int | None = None) -> Any:
    """Concatenate along ``axis`` (negative: from the end; ``rank``: the graph's, when known):
    maps along a channel axis only."""
    states = [_first(s) for s in ins if s is not None]
    maps = [s for s in states if isinstance(s, _Map)]
    found = _resolve_axes(maps[0] if maps else next(iter(states), None), [axis], rank, label)
    if isinstance(found, _Lost):
        return found
    if not maps:
        if found[0] == 0:
            return _Lost(f"{label} concatenates along the batch axis")
        return _combine(ins, label)
    if found[0] in _spatial_axes(maps[0]) and len(maps) == len(states):
        wrapped = _wrapped(maps, found[0])
        if wrapped is not None:
            return wrapped
    if found[0] not in _channel_axes(maps[0]):
        return _Lost(f"{label} concatenates along axis {found[0]}, not a channel axis")
    return _combine(ins, label)


def _wrapped(pieces: Sequence[_Map], axis: int) -> _Map | None:
    """Pieces of one map concatenated along a spatial axis in wrap-around order, as exporters
    write circular padding (``[x[-p:], x, x[:p]]`` by ``Slice`` and ``Concat``): a map of the
    same stride whose cells run on from the whole map's, as a padding would give (the padded
    cells hold wrapped content instead of zeros, which does not move a grid). None when the
    pieces are not such a run: different strides or other axes, no single longest piece (the
    whole map), a piece outside it, or cells out of order modulo its period. A padding as wide
    as the map itself is left unknown (its pieces tie with the map)."""
    grids = [piece.grid for piece in pieces]
    if any(g is None for g in grids) or len({(m.layout, m.rank) for m in pieces}) != 1:
        return None
    along = [g.h if axis == _spatial_axes(pieces[0])[0] else g.w for g in grids]  # type: ignore[union-attr]
    across = [g.w if axis == _spatial_axes(pieces[0])[0] else g.h for g in grids]  # type: ignore[union-attr]
    whole = max(range(len(along)), key=lambda i: along[i].n)
    if sum(a.n == along[whole].n for a in along) > 1:
        return None  # no one piece is the map the others wrap around ([x, f(x)], [x[:4], x[:4]])
    stride, period = along[whole].stride, along[whole].stride * along[whole].n
    if len(set(across)) != 1 or any(a.stride != stride for a in along):
        return None
    low, high = along[whole].offset, along[whole].offset + stride * (along[whole].n - 1)
    tolerance = 1e-9 * max(1.0, period)
    if any(
        a.offset < low - tolerance or a.offset + stride * (a.n - 1) > high + tolerance
        for a in along
    ):
        return None  # pieces of more than one map (or a roll by half): not a padding of one
    for before, after in itertools.pairwise(along):
        step = (after.offset - (before.offset + stride * before.n)) % period
        if min(step, period - step) > tolerance:
            return None
    cells = sum(a.n for a in along)
    before = sum(a.n for a in along[:whole])
    offset = along[whole].offset - stride * before
    # The wrapped cells are a padding (of other content than zeros): only the whole map's own
    # free cells stay free.
    own = along[whole].free
    free = _mapped_free(own, cells, lambda lo, hi: (lo + before, hi + before))
    grid = AxisGrid(cells, stride, offset, free)
    other = replace(across[0], free=_intersect([a.free for a in across]))
    first_axis = axis == _spatial_axes(pieces[0])[0]
    return replace(pieces[0], grid=Grid(grid, other) if first_axis else Grid(other, grid))


def _split_state(state: Any, axis: int, rank: int | None, drops: bool, label: str) -> Any:
    """Each piece of a tensor cut along ``axis`` (``drops``: the axis goes, as unbind's): a
    map's grid when the axis is a channel axis (CSP blocks, GLU gates, a ShuffleNet's halves),
    else unknown (pieces of H or W have other offsets)."""
    if not isinstance(state, _Map):
        if drops and state is not None:
            return _Lost(f"{label} removes an axis of flat features")
        return state
    found = _resolve_axes(state, [axis], rank, label)
    if isinstance(found, _Lost):
        return found
    if found[0] not in _channel_axes(state):
        return _Lost(f"{label} splits axis {found[0]}, not a channel axis")
    if not drops:
        return state
    if state.layout != "NCHW" or state.rank <= 4:
        return _Lost(f"{label} removes the channel axis of a map")
    return replace(state, rank=state.rank - 1)


def _permute_state(state: Any, perm: Sequence[int], label: str) -> Any:
    """Permute axes: NCHW <-> NHWC moves the layout; a permutation of the channel axes of a
    NCHW(-like) map alone keeps it."""
    perm = list(perm)
    if isinstance(state, _Map) and len(perm) != state.rank:
        return _Lost(f"{label} permutes {len(perm)} axes of a rank-{state.rank} map")
    if perm == list(range(len(perm))):
        return state
    moves = {("NCHW", (0, 2, 3, 1)): "NHWC", ("NHWC", (0, 3, 1, 2)): "NCHW"}
    if isinstance(state, _Flat):
        if state.layout is None:
            return state if perm[:1] == [0] else _Lost(f"{label} moves the batch axis")
        target = moves.get((state.layout, tuple(perm)))
        return (
            _Flat(target, state.broadcasts)
            if target
            else _Lost(f"{label} permutes axes {perm} of flat features")
        )
    r = state.rank
    if state.layout == "NCHW" and perm[0] == 0 and perm[-2:] == [r - 2, r - 1]:
        return state  # only the channel axes between batch and H move
    target = moves.get((state.layout, tuple(perm)))
    if target is None or r != 4:
        return _Lost(f"{label} permutes axes {perm} of a rank-{r} {state.layout} map")
    return _Map(target, state.grid, state.reason)


def _reduce_state(
    state: Any, axes: Sequence[int] | None, keepdims: bool, rank: int | None, label: str
) -> Any:
    """A reduction over ``axes`` (None: all; negative ones count from the end) of a tensor of
    rank ``rank`` (the graph's, None when unknown).

    Over channel axes only: the grid is kept (the result must keep a channel axis, rank >= 4).
    Over H and W both (a reduction always takes a whole axis): flat, a broadcastable
    ``(B, C, 1, 1)`` with ``keepdims``. Over one of H and W: unknown (the other stays, alone).
    """
    if isinstance(state, _Flat):
        if keepdims:
            return state
        if axes is None:
            return _Flat(None, True, 0)
        found = _resolve_axes(state, axes, rank, label)
        if isinstance(found, _Lost):
            return found
        size = state.ndim if state.ndim is not None else rank
        left = None if size is None else size - len(set(found))
        return _Flat(None, state.broadcasts or left == 0, left)
    found = list(range(state.rank)) if axes is None else _resolve_axes(state, axes, rank, label)
    if isinstance(found, _Lost):
        return found
    chosen = set(found)
    r = state.rank
    ah, aw = _spatial_axes(state)
    if {ah, aw} <= chosen:
        if keepdims:
            return _Flat(state.layout, True) if r == 4 else _Flat(None, True, r)
        left = r - len(chosen)
        return _Flat(None, left == 0, left)
    if chosen & {ah, aw}:
        taken, kept = _AXES if ah in chosen else _AXES[::-1]
        return _Lost(f"{label} reduces the {taken} axis but not the {kept} axis")
    if 0 in chosen:
        return _Lost(f"{label} reduces the batch axis")
    left = r if keepdims else r - len(chosen)
    if left < 4:
        return _Lost(
            f"{label} reduces away every channel axis: a rank-{left} (B, H, W) tensor is not "
            "tracked (keepdims keeps a channel axis)"
        )
    return replace(state, rank=left)


def _reshape_state(
    state: Any,
    in_dims: Sequence[int | None] | None,
    out_dims: Sequence[int | None] | None,
    label: str,
) -> Any:
    """A reshape from ``in_dims`` to ``out_dims`` (None entries: unknown sizes) that is not a
    regrouping of channel axes (those keep the grid; the callers decide, see
    :func:`_torch_regroup_rank` and :func:`_onnx_regroup_rank`).

    A map or flat tensor reshaped to (B, D) is flat, as flatten is, unless the batch axis visibly
    changes (a (B*H*W, C) view folds the spatial axes into the batch); a flat tensor reshaped to
    (B, C, 1, 1) stays flat; a reshape to the same dims changes nothing; anything else is unknown.
    """
    if out_dims is None:
        return _Lost(f"{label} gives a tensor of unknown rank")
    out_dims, in_dims = list(out_dims), None if in_dims is None else list(in_dims)
    if in_dims == out_dims and None not in out_dims:
        return state
    if len(out_dims) == 2 or (isinstance(state, _Flat) and len(out_dims) < 2):
        batch = (in_dims or [None])[0], (out_dims or [None])[0]
        if len(out_dims) == 2 and None not in batch and batch[0] != batch[1]:
            return _Lost(f"{label} folds other axes into the batch axis")
        return _Flat(None, len(out_dims) == 0, len(out_dims))
    if isinstance(state, _Flat) and len(out_dims) == 4 and out_dims[2:] == [1, 1]:
        return _Flat("NCHW", True)
    if isinstance(state, _Flat) and in_dims is not None and _unit_axes_only(in_dims, out_dims):
        # (B, C) -> (B, C, 1) -> (B, 1, 1, C): axes of size 1 added or removed (x[:, None])
        if len(out_dims) == 4 and out_dims[1:3] == [1, 1]:
            return _Flat("NHWC", True)
        return _Flat(None, False, len(out_dims))
    if isinstance(state, _Map):
        return _Lost(
            f"{label} reshapes a map other than by regrouping its channel axes (batch first, "
            "H and W last, all three kept)"
        )
    return _Lost(f"{label} reshapes a tensor")


def _unit_axes_only(in_dims: Sequence[int | None], out_dims: Sequence[int | None]) -> bool:
    """Whether a reshape only adds or removes axes of size 1 after the batch axis."""
    if not in_dims or not out_dims or None in in_dims[1:] or None in out_dims[1:]:
        return False
    same_batch = in_dims[0] == out_dims[0] or None in (in_dims[0], out_dims[0])
    return same_batch and [d for d in in_dims[1:] if d != 1] == [d for d in out_dims[1:] if d != 1]


def _space_to_depth_state(state: Any, block: int, label: str) -> Any:
    if not isinstance(state, _Map) or state.layout != "NCHW" or state.rank != 4:
        return _Lost(f"{label} is applied to a tensor that is not a rank-4 NCHW map")
    if state.grid is None:
        return state
    axes = []
    for g, axis in ((state.grid.h, "height"), (state.grid.w, "width")):
        if g.n % block:
            raise _TooSmall(f"{label} needs a multiple of {block} cells on the {axis} axis")
        axes.append(_window_axis(g, block, block, 1, 0, 0, False, "NOTSET", label, axis))
    return _Map("NCHW", Grid(axes[0], axes[1]))


def _depth_to_space_state(state: Any, block: int, label: str) -> Any:
    if not isinstance(state, _Map) or state.layout != "NCHW" or state.rank != 4:
        return _Lost(f"{label} is applied to a tensor that is not a rank-4 NCHW map")
    if state.grid is None:
        return state
    h, w = (
        AxisGrid(
            g.n * block,
            g.stride / block,
            g.offset - g.stride * (block - 1) / (2 * block),
            _mapped_free(g.free, g.n * block, lambda lo, hi: (lo * block, hi * block + block - 1)),
        )
        for g in (state.grid.h, state.grid.w)
    )
    return _Map("NCHW", Grid(h, w))


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _scaled_cells(n: int, scale: Fraction, runtime: str) -> int:
    """``floor(n * scale)`` as the runtime rounds the product before the floor: torch in
    float64, onnxruntime in float32. Exact arithmetic differs from both: 21 x 1/3 is 6.99..
    exactly but 7.0 in float64, and 10 x 0.7f 6.99.. but 7.0 in float32 (checked against each
    runtime's output over 13 scales x 57 sizes: no difference). A float32 product, sum or
    quotient of float32 values is the float64 one rounded to float32 (53 bits hold 2 x 24 + 2)."""
    if runtime == "onnxruntime":
        return math.floor(_float32(_float32(n) * _float32(float(scale))))
    return math.floor(n * float(scale))


def _nearest_sources(
    n: int,
    n_out: int,
    given: float | None,
    coordinates: str,
    rounding: str,
    runtime: str,
    exact: tuple[Fraction, Fraction],
) -> list[int]:
    """The input cell each of ``n_out`` output cells of a nearest-neighbour resize copies,
    before clamping to ``0 .. n - 1``, computed as the runtime computes it: in float32 (exact
    arithmetic picks other cells: torch's 0.2 on 12 cells copies 0 and 5, not 0 and 4;
    onnxruntime's half-pixel 1/3 on 9 copies 1, 4, 7, not 0, 3, 6). ``given``: the scale as the
    model gives it (None: sizes given); ``exact``: ``(a, b)`` of ``round(a j + b)``, for the
    coordinate modes computed exactly (half_pixel_symmetric).

    torch (``upsample_nearest2d``, ``_upsample_nearest_exact2d``): the same size or twice it
    copies ``j`` or ``j // 2``; else ``floor(j * s)`` (``floor((j + 0.5) * s)`` for
    nearest-exact) with ``s = float32(1 / scale)`` or ``float32(n) / n_out``. onnxruntime: the
    coordinate formula of its mode in float32 with the float32 scale (``n_out / n`` when sizes
    are given), then its rounding: ``round_prefer_floor`` and ``round_prefer_ceil`` (halves away
    from zero, as ``std::round``), ``floor``, ``ceil``, and ``simple`` (Upsample and Resize
    before opset 11: ``ceil`` when downsampling, else truncation)."""
    f32 = _float32
    if runtime == "torch" and rounding == "floor":
        if coordinates == "asymmetric" and n_out in (n, 2 * n):
            return [j * n // n_out for j in range(n_out)]
        s = f32(1.0 / given) if given is not None else f32(f32(n) / n_out)
        if coordinates == "asymmetric":
            return [math.floor(f32(f32(j) * s)) for j in range(n_out)]
        if coordinates == "tf_half_pixel_for_nn":  # nearest-exact
            return [math.floor(f32((j + 0.5) * s)) for j in range(n_out)]
    scale = f32(given) if given is not None else f32(f32(n_out) / f32(n))
    formulas: dict[str, Callable[[float], float]] = {
        "asymmetric": lambda x: f32(x / scale),
        "half_pixel": lambda x: f32(f32(f32(x + 0.5) / scale) - 0.5),
        "pytorch_half_pixel": lambda x: f32(f32(f32(x + 0.5) / scale) - 0.5) if n_out > 1 else 0.0,
        "tf_half_pixel_for_nn": lambda x: f32(f32(x + 0.5) / scale),
        "align_corners": lambda x: f32(f32(x * (n - 1)) / (n_out - 1)) if n_out > 1 else 0.0,
    }
    if runtime != "onnxruntime" or coordinates not in formulas:
        a, b = exact
        return [_round(a * j + b, rounding) for j in range(n_out)]
    return [_ort_round(formulas[coordinates](float(j)), rounding, scale < 1) for j in range(n_out)]


def _ort_round(x: float, mode: str, downsampling: bool) -> int:
    """onnxruntime's nearest modes on a float32 coordinate."""
    if mode == "simple":
        return math.ceil(x) if downsampling else int(x)
    if mode == "floor":
        return math.floor(x)
    if mode == "ceil":
        return math.ceil(x)
    if mode == "round_prefer_floor" and x == int(x) + 0.5:
        return int(x)
    return int(math.copysign(math.floor(abs(x) + 0.5), x))  # std::round


def _constant_map(state: _Flat) -> bool:
    """Is a flat state a ``(B, C, 1, 1)`` map, whose resize to any size is constant over it?"""
    return state.layout == "NCHW" and state.broadcasts


def _resize_state(
    state: Any,
    sizes: tuple[int | None, int | None] | None,
    scales: tuple[float, float] | None,
    mode: str,
    coordinates: str,
    rounding: str,
    label: str,
    runtime: str = "torch",
) -> Any:
    """A resize of the spatial axes of a map: ``sizes`` (output cells) or ``scales`` per axis.

    ``mode``: nearest | linear | cubic; ``coordinates``: an ONNX coordinate_transformation_mode;
    ``rounding``: the nearest mode (floor, ceil, round_prefer_floor, round_prefer_ceil, simple);
    ``runtime``: torch or onnxruntime, whose arithmetic sizes the output (:func:`_scaled_cells`)
    and picks a nearest resize's cells (:func:`_nearest_sources`)."""
    if isinstance(state, _Flat):
        # a 1x1 map resized (a DeepLab ASPP's image-pooling branch): constant over the new
        # cells, it broadcasts as the 1x1 map did
        return state if _constant_map(state) else _Lost(f"{label} resizes flat features")
    if state.rank != 4:
        return _not_rank4(state, label)
    if state.grid is None:
        return state
    axes = []
    for i, g in enumerate((state.grid.h, state.grid.w)):
        scale = Fraction(scales[i]) if scales is not None and scales[i] is not None else None
        if sizes is not None and sizes[i] is not None:
            n_out = int(sizes[i])
            scale = Fraction(n_out, g.n) if scale is None else scale
        elif scale is not None:
            n_out = _scaled_cells(g.n, scale, runtime)
        else:
            return _Lost(f"{label} gives neither sizes nor scales")
        if n_out < 1:
            raise _TooSmall(f"{label} gives {n_out} cells on the {_AXES[i]} axis", state.layout)
        if scale <= 0:
            return _Lost(f"{label} has scale {float(scale)}")
        a, b = 1 / scale, Fraction(0)
        if coordinates in ("half_pixel", "pytorch_half_pixel"):
            b = (1 / scale) / 2 - Fraction(1, 2)
            if coordinates == "pytorch_half_pixel" and n_out == 1:
                b = Fraction(0)
        elif coordinates == "align_corners":
            a = Fraction(g.n - 1, n_out - 1) if n_out > 1 else Fraction(0)
        elif coordinates == "tf_half_pixel_for_nn":
            b = (1 / scale) / 2
        elif coordinates == "half_pixel_symmetric":
            adjustment = Fraction(n_out) / (scale * g.n)
            b = (1 / scale) / 2 - Fraction(1, 2) + Fraction(g.n, 2) * (1 - adjustment)
        elif coordinates != "asymmetric":
            return _Lost(f"{label} uses coordinate mode '{coordinates}'")
        if mode == "nearest":
            given = scales[i] if scales is not None else None
            wanted = _nearest_sources(g.n, n_out, given, coordinates, rounding, runtime, (a, b))
            found = _nearest_axis(g, n_out, wanted, label)
            if isinstance(found, str):
                return _Map(state.layout, None, found)
            axes.append(found)
        elif mode in ("linear", "cubic"):
            axes.append(
                _affine_axis(g, n_out, float(a), float(b), 1.0 if mode == "linear" else 2.0)
            )
        else:
            return _Lost(f"{label} uses resize mode '{mode}'")
    return _Map(state.layout, Grid(axes[0], axes[1]))


# -- ONNX ----------------------------------------------------------------------------------------
#: ONNX ops that keep the spatial grid of their inputs (element-wise, normalisation).
ONNX_GRID_PRESERVING = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Clip",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Erf",
        "Softplus",
        "Softsign",
        "Mish",
        "Exp",
        "Log",
        "Abs",
        "Neg",
        "Sqrt",
        "Pow",
        "Reciprocal",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "Where",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "LpNormalization",
        "MeanVarianceNormalization",
        "LRN",
        "Identity",
        "Dropout",
        "Cast",
        "CastLike",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Not",
        "Equal",
        "Greater",
        "GreaterOrEqual",
        "Less",
        "LessOrEqual",
        "And",
        "Or",
        "Xor",
        "Softmax",
        "LogSoftmax",
        "Shrink",
        "ThresholdedRelu",
        "Sin",
        "Cos",
        "Swish",
    }
)
_ONNX_WINDOW = {"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"}
_ONNX_GLOBAL = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_ONNX_REDUCE = {
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceSum",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}
# Ops whose outputs describe the tensor (shape, size) rather than carry image content.
_ONNX_META = {"Shape", "Size"}
# Constant-subgraph ops the walk folds (with _shape_op) to read pads, starts, scales.
_ONNX_FOLDABLE = {
    "Cast",
    "Concat",
    "ConstantOfShape",
    "Reshape",
    "Slice",
    "Transpose",
    "Unsqueeze",
    "Squeeze",
    "Gather",
    "Identity",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Range",
    "Expand",
    "Shape",
    "Neg",
    "Mod",
    "Max",
    "Min",
    "Abs",
    "Ceil",
    "Floor",
    "Equal",
    "Less",
    "Greater",
    "Where",
    "Not",
    "And",
    "Or",
    "Xor",
    "Clip",
}


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _onnx_axes(node: onnx.NodeProto, facts: _OnnxGraphFacts) -> list[int] | None:
    """An op's ``axes`` (Squeeze, Unsqueeze, reductions): its attribute (older opsets), else
    its second input's constant value (newer ones); ``[]`` when it has neither (a reduction
    over every axis; a Squeeze of every unit axis); None when that input is not constant."""
    found = _attr(node, "axes", None)
    if found is not None:
        return [int(a) for a in found]
    if len(node.input) > 1 and node.input[1]:
        return facts.ints(node.input[1])
    return []


def inferred_dims(model: onnx.ModelProto, inferred: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every tensor's sizes that shape inference gave ``model`` (``inferred``; None: a size it
    did not find static), and its initializers'."""
    dims: dict[str, list[int | None]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            dims[value.name] = [
                int(d.dim_value) if d.HasField("dim_value") else None for d in tensor.shape.dim
            ]
    for init in model.graph.initializer:
        dims.setdefault(init.name, [int(d) for d in init.dims])
    return dims


class _OnnxGraphFacts:
    """Constant values, ranks and dims of a graph's tensors, looked up on demand."""

    def __init__(self, model: onnx.ModelProto, inferred: onnx.ModelProto, dependent: set[str]):
        from onnx import numpy_helper

        graph = model.graph
        self._numpy_helper = numpy_helper
        self._initializers = {i.name: i for i in graph.initializer}
        self._producers = {out: node for node in graph.node for out in node.output if out}
        self._order = list(graph.node)  # (topologically sorted, as ONNX requires)
        self._dependent = dependent
        self._values: dict[str, np.ndarray | None] = {}
        self._entries: dict[str, list[_Entry] | None] = {}
        self._opsets = {
            (o.domain or ""): o.version for o in model.opset_import if o.domain in ("", "ai.onnx")
        }
        self.dims = inferred_dims(model, inferred)
        #: ranks shape inference left out, propagated through common ops (:func:`_onnx_ranks`)
        self.ranks: dict[str, int] = {}

    def rank(self, name: str, depth: int = 0) -> int | None:
        """A tensor's rank from shape inference, else (a Reshape's output) the number of
        entries of its target."""
        dims = self.dims.get(name)
        if dims is not None:
            return len(dims)
        if name in self.ranks:
            return self.ranks[name]
        node = self._producers.get(name)
        if node is None or node.op_type != "Reshape" or len(node.input) < 2:
            return None
        entries = self.shape_entries(node.input[1], depth + 1)
        return None if entries is None else len(entries)

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The constant value of a tensor, folding small constant subgraphs; None if unknown."""
        import numpy as np

        if not name or name in self._dependent:
            return None
        if name in self._values:
            return self._values[name]
        result: np.ndarray | None = None
        if name in self._initializers:
            result = self._numpy_helper.to_array(self._initializers[name])
        elif name in self._producers and depth < 32:
            node = self._producers[name]
            if node.op_type == "Constant":
                result = _constant_value(node)
            elif node.op_type in _ONNX_FOLDABLE and node.domain in ("", "ai.onnx"):
                inputs = [self.value(i, depth + 1) if i else None for i in node.input]
                if all(v is not None for v, i in zip(inputs, node.input, strict=True) if i):
                    try:
                        outputs = _shape_op(node)(inputs)
                        result = np.asarray(outputs[list(node.output).index(name)])
                    except Exception:  # folding is a help: an unknown value stays unknown
                        result = None
        self._values[name] = result
        return result

    def partial(self, name: str) -> list[Any] | None:
        """A 1-D constant's entries, or those of a Concat of 1-D pieces with None for the
        entries of pieces that are not constant (a shape read from the image); None if unknown."""
        value = self.value(name)
        if value is not None:
            return value.reshape(-1).tolist()
        node = self._producers.get(name)
        if node is None or node.op_type != "Concat":
            return None
        entries: list[Any] = []
        for piece in node.input:
            known = self.value(piece)
            if known is not None:
                entries.extend(known.reshape(-1).tolist())
                continue
            dims = self.dims.get(piece)
            if dims is None or len(dims) != 1 or dims[0] is None:
                return None
            entries.extend([None] * dims[0])
        return entries

    def ints(self, name: str) -> list[int] | None:
        value = self.value(name)
        return None if value is None else [int(v) for v in value.reshape(-1)]

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node that computes tensor ``name`` (None: an input or an initializer)."""
        return self._producers.get(name)

    def forget_entries(self) -> None:
        """Forget the shape entries traced so far (traced again once :attr:`ranks` is set)."""
        self._entries.clear()

    def shape_entries(self, name: str, depth: int = 0) -> list[_Entry] | None:
        """The entries of a small int tensor (a Reshape target; a scalar is one entry): an int
        where constant, ``(tensor, axis)`` where it reads that size of a tensor's shape
        (Shape, then Gather/Slice/Concat/Unsqueeze/Squeeze/Cast/Identity), None where it is
        computed otherwise; None when even the number of entries is unknown."""
        if name in self._entries:
            return self._entries[name]
        value = self.value(name)
        if value is not None:
            return [int(v) for v in value.reshape(-1)]
        node = self._producers.get(name)
        if node is None or depth > 32 or node.domain not in ("", "ai.onnx"):
            return self._opaque_entries(name)
        found = self._traced_entries(node, depth)
        self._entries[name] = found
        return found

    def _traced_entries(self, node: onnx.NodeProto, depth: int) -> list[_Entry] | None:
        op, args = node.op_type, list(node.input)
        if op == "Shape":
            rank = self.rank(args[0], depth + 1)
            if rank is None:
                return None
            first, last = int(_attr(node, "start", 0)), int(_attr(node, "end", rank))
            return [(args[0], k) for k in range(rank)[first:last]]
        if op in ("Identity", "Cast", "Unsqueeze", "Squeeze"):
            return self.shape_entries(args[0], depth + 1)
        if op == "Concat":
            # (a piece computed otherwise, a head's size from C // heads, leaves the others'
            # entries known: the batch size read from the sequence's shape)
            pieces = [self.shape_entries(piece, depth + 1) for piece in args]
            pieces = [
                self._opaque_entries(arg) if piece is None else piece
                for arg, piece in zip(args, pieces, strict=True)
            ]
            if any(p is None for p in pieces):
                return self._opaque_entries(node.output[0])
            return [entry for piece in pieces for entry in piece or []]
        if op == "Gather" and int(_attr(node, "axis", 0)) == 0:
            data, indices = self.shape_entries(args[0], depth + 1), self.ints(args[1])
            if (
                data is not None
                and indices is not None
                and all(-len(data) <= i < len(data) for i in indices)
            ):
                return [data[i] for i in indices]
        if op == "Slice" and len(args) >= 3:
            data = self.shape_entries(args[0], depth + 1)
            starts, ends = self.ints(args[1]), self.ints(args[2])
            axes = self.ints(args[3]) if len(args) > 3 and args[3] else [0]
            steps = self.ints(args[4]) if len(args) > 4 and args[4] else [1]
            if data is not None and starts and ends and axes in ([0], [-1]) and steps[0] > 0:
                return data[slice(starts[0], ends[0], steps[0])]
        return self._opaque_entries(node.output[0])

    def shape_program(self, name: str) -> _ShapeProgram | None:
        """The nodes that compute a small tensor from constants and the shapes of image tensors
        (TF-style "same" pads: Shape, Gather, Sub, Div, ... Concat), to be run at each replayed
        size; None where anything else feeds it (an image value, an op outside
        ``_ONNX_FOLDABLE``, more than 256 nodes)."""
        wanted, reads, pending = set(), set(), [name]
        while pending:
            tensor = pending.pop()
            if not tensor or tensor in wanted or self.value(tensor) is not None:
                continue
            node = self._producers.get(tensor)
            if node is None or node.domain not in ("", "ai.onnx") or len(wanted) > 256:
                return None
            wanted.update(o for o in node.output if o)
            if node.op_type == "Shape":
                reads.add(node.input[0])
            elif node.op_type in _ONNX_FOLDABLE:
                pending.extend(node.input)
            else:
                return None
        nodes = [n for n in self._order if any(o in wanted for o in n.output)]
        return _ShapeProgram(name, nodes, tuple(sorted(reads)), self)

    def _opaque_entries(self, name: str) -> list[_Entry] | None:
        """``[None] * n`` for a tensor of ``n`` entries computed some other way."""
        dims = self.dims.get(name)
        if dims is None or len(dims) > 1 or (dims and dims[0] is None):
            return None
        return [None] * (dims[0] if dims else 1)


#: One entry of a shape tensor: a constant, a size read from ``(tensor, axis)``, or unknown.
_Entry = int | tuple[str, int] | None


class _ShapeProgram:
    """A small tensor computed from the shapes of image tensors (:meth:`_OnnxGraphFacts.
    shape_program`), evaluated at a replayed size from the maps' grids.

    ``reads``: the tensors whose Shape it reads. A map's spatial sizes come from its grid, its
    other sizes from shape inference. A size neither gives (a dynamic batch) is followed
    through the program as a taint, entry by entry (ops that move entries move their taints;
    any other op taints its whole output when an input is tainted), and the output's tainted
    entries are unknown (None): no value of the size is guessed (a pad of ``B % 2`` reads 0 at
    every odd guess)."""

    def __init__(
        self, output: str, nodes: list[onnx.NodeProto], reads: tuple[str, ...], facts: Any
    ) -> None:
        self.output, self.nodes, self.reads, self._facts = output, nodes, reads, facts
        #: per node: its function (a Shape: the tensor and slice it reads), op type, inputs and
        #: outputs
        self._compiled: list[tuple[Any, str, tuple[str, ...], tuple[str, ...]]] | None = None
        self._constants: dict[str, Any] = {}

    def ints(self, states: Mapping[str, Any]) -> list[int | None] | None:
        """The output's entries at the sizes of ``states`` (the reads' replayed states); None
        where it cannot be evaluated."""
        import numpy as np

        shapes: dict[str, list[int | None]] = {}
        for tensor in self.reads:
            shape = self._shape(tensor, _first(states.get(tensor)))
            if shape is None:
                return None
            shapes[tensor] = shape
        filled = {t: [1 if d is None else d for d in s] for t, s in shapes.items()}
        tainted = {t: [d is None for d in s] for t, s in shapes.items()}
        try:
            value, taint = self._run(filled, tainted)
        except Exception:  # an evaluation that fails (an op on values it refuses): unknown
            return None
        flags = np.broadcast_to(taint, value.shape).reshape(-1)
        return [None if t else int(v) for v, t in zip(value.reshape(-1), flags, strict=True)]

    def _shape(self, tensor: str, state: Any) -> list[int | None] | None:
        dims = self._facts.dims.get(tensor)
        if isinstance(state, _Map):
            if state.grid is None:
                return None
            shape: list[int | None] = list(dims) if dims and len(dims) == state.rank else []
            shape = shape or [None] * state.rank
            h, w = _spatial_axes(state)
            shape[h], shape[w] = state.grid.h.n, state.grid.w.n
            return shape
        if isinstance(state, _Tokens):  # (a dynamic batch size: unknown, followed as a taint)
            shape = _replayed_dims(state, dims, None)
            if shape is not None and dims is not None and len(dims) == state.rank:
                shape[state.batch] = dims[state.batch]  # (heads merged in, if any, included)
            return shape
        if state is None or isinstance(state, _Flat):  # (a shape tensor; flat features)
            return None if dims is None else list(dims)
        return None  # a tensor whose axes are unknown

    def _run(
        self, shapes: Mapping[str, list[int]], tainted: Mapping[str, list[bool]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The output and, per entry, whether it depends on a tainted size."""
        import numpy as np

        if self._compiled is None:  # each node's function, and the constants they read
            compiled = []
            for node in self.nodes:
                for name in node.input:
                    known = self._facts.value(name) if name else None
                    if known is not None:
                        self._constants[name] = known
                if node.op_type == "Shape":
                    start, end = int(_attr(node, "start", 0)), _attr(node, "end", None)
                    run: Any = (node.input[0], slice(start, None if end is None else int(end)))
                else:
                    run = _shape_op(node)
                compiled.append((run, node.op_type, tuple(node.input), tuple(node.output)))
            self._compiled = compiled
        values = dict(self._constants)
        taints: dict[str, np.ndarray] = {}
        sized: set[str] = set()  # tensors whose shape depends on a tainted size
        with np.errstate(all="ignore"):  # (tainted entries may divide by zero)
            for run, op, inputs, outputs in self._compiled:
                if isinstance(run, tuple):  # Shape
                    values[outputs[0]] = np.asarray(shapes[run[0]][run[1]], dtype=np.int64)
                    taints[outputs[0]] = np.asarray(tainted[run[0]][run[1]], dtype=bool)
                    continue
                ins = [values[i] if i else None for i in inputs]
                found = [np.asarray(v) for v in run(ins)]
                marks = [
                    taints.get(i, np.zeros(np.shape(v), bool))
                    for i, v in zip(inputs, ins, strict=True)
                ]
                moved = any(i in sized for i in inputs)  # (every entry may be elsewhere)
                for name, value in zip(outputs, found, strict=False):
                    values[name] = value
                    mark, grows = _taint(op, run, ins, marks, value)
                    taints[name] = np.ones(value.shape, bool) if moved else mark
                    if moved or grows:
                        sized.add(name)
        return values[self.output], taints.get(self.output, np.zeros((), bool))


def _onnx_slice(n: int, start: int, end: int, step: int) -> slice:
    """ONNX Slice's bounds on an axis of ``n`` entries as onnxruntime computes them: negative
    bounds count from the end, then are clamped (to ``[0, n]``, or ``[0, n-1]`` and ``[-1,
    n-1]`` for a negative step); an end of INT32_MAX or INT64_MAX means past the last entry in
    the step's direction."""
    start = start + n if start < 0 else start
    if end in (2**31 - 1, 2**63 - 1):
        end = -1 if step < 0 else n
    elif end < 0:
        end += n
    if step > 0:
        return slice(min(max(start, 0), n), min(max(end, 0), n), step)
    start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return slice(start, None if end < 0 else end, step)


#: Ops that only move entries: their taint is the same op applied to the first input's taint
#: (when their other inputs, indices, axes or a target shape, are untainted).
_MOVING_OPS = {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose"}
#: Element-wise ops: an entry is tainted where any input's (broadcast) entry is.
_ENTRYWISE_OPS = {
    "Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Neg", "Abs", "Ceil", "Floor", "Equal",
    "Less", "Greater", "And", "Or", "Xor", "Not", "Where", "Clip", "Cast", "Identity",
}  # fmt: skip


def _taint(
    op: str, run: Callable, ins: list[Any], marks: list[np.ndarray], value: np.ndarray
) -> tuple[np.ndarray, bool]:
    """Which entries of a shape-arithmetic node's output depend on a tainted input entry, and
    whether the output's shape may (a Range to the batch size, a Slice at a computed index:
    then where every entry sits depends on it, and whatever reads it is tainted whole)."""
    import numpy as np

    present = [m for v, m in zip(ins, marks, strict=True) if v is not None]
    if not any(m.any() for m in present):
        return np.zeros(value.shape, bool), False
    if op in _ENTRYWISE_OPS:
        return np.logical_or.reduce([np.broadcast_to(m, value.shape) for m in present]), False
    if op == "Concat":
        return np.asarray(run(marks)[0], bool).reshape(value.shape), False
    parameters = [m for v, m in zip(ins[1:], marks[1:], strict=True) if v is not None]
    if op in _MOVING_OPS and not any(m.any() for m in parameters):
        return np.asarray(run([marks[0], *ins[1:]])[0], bool).reshape(value.shape), False
    return np.ones(value.shape, bool), True


def _shape_op(node: onnx.NodeProto) -> Callable[[list[Any]], list[Any]]:
    """A function of a node's inputs (None for an omitted one) to its outputs: NumPy for the
    ops exporters write into shape arithmetic (ONNX semantics: integer division truncates,
    Reshape's 0 copies a dimension), else onnx's reference evaluator (slower: ~20 us a call)."""
    import numpy as np

    op = node.op_type
    binary = {
        "Add": np.add,
        "Sub": np.subtract,
        "Mul": np.multiply,
        "Equal": np.equal,
        "Less": np.less,
        "Greater": np.greater,
        "And": np.logical_and,
        "Or": np.logical_or,
        "Xor": np.logical_xor,
    }
    unary = {"Neg": np.negative, "Abs": np.abs, "Not": np.logical_not, "Identity": np.asarray}
    axis = int(_attr(node, "axis", 0))
    if op in binary:
        return lambda a: [binary[op](a[0], a[1])]
    if op in unary:
        return lambda a: [unary[op](a[0])]
    if op in ("Ceil", "Floor"):
        rounded = np.ceil if op == "Ceil" else np.floor
        return lambda a: [rounded(a[0]).astype(a[0].dtype)]
    if op == "Div":

        def divide(a: list[Any]) -> list[Any]:
            x, y = a
            if not np.issubdtype(x.dtype, np.integer):
                return [np.divide(x, y).astype(x.dtype)]
            q = np.floor_divide(x, y)  # truncated toward zero, as onnxruntime's C++ does
            return [q + ((np.remainder(x, y) != 0) & ((x < 0) ^ (y < 0))).astype(q.dtype)]

        return divide
    if op in ("Max", "Min"):
        pick = np.maximum if op == "Max" else np.minimum
        return lambda a: [functools.reduce(pick, a)]
    if op == "Where":
        return lambda a: [np.where(a[0], a[1], a[2])]
    if op == "Mod":
        remainder = np.fmod if int(_attr(node, "fmod", 0)) else np.mod
        return lambda a: [remainder(a[0], a[1])]
    if op == "Clip" and not any(a.name in ("min", "max") for a in node.attribute):

        def clip(a: list[Any]) -> list[Any]:
            x, low, high = [*a, None, None][:3]
            x = x if low is None else np.maximum(x, low.astype(x.dtype))
            return [x if high is None else np.minimum(x, high.astype(x.dtype))]

        return clip
    if op == "ConstantOfShape":
        given = _constant_value(node)
        fill = given.reshape(-1)[:1] if given is not None else np.zeros(1, np.float32)
        return lambda a: [np.full(a[0].astype(np.int64).tolist(), fill[0], dtype=fill.dtype)]
    if op == "Gather":
        return lambda a: [np.take(a[0], a[1], axis=axis)]
    if op == "Concat":
        return lambda a: [np.concatenate([np.atleast_1d(v) for v in a], axis=axis)]
    if op == "Cast":
        from onnx.helper import tensor_dtype_to_np_dtype

        dtype = tensor_dtype_to_np_dtype(int(_attr(node, "to", 1)))
        return lambda a: [a[0].astype(dtype)]
    # (axes: an input from opset 13, an attribute before, as exporters at opset 11 write them)
    attribute_axes = [int(i) for i in _attr(node, "axes", [])]
    if op == "Unsqueeze" and (len(node.input) == 2 or attribute_axes):

        def unsqueeze(a: list[Any]) -> list[Any]:
            axes = a[1].reshape(-1).tolist() if len(a) > 1 else attribute_axes
            rank = a[0].ndim + len(axes)
            return [np.expand_dims(a[0], tuple(sorted(int(i) % rank for i in axes)))]

        return unsqueeze
    if op == "Squeeze" and (len(node.input) == 2 or attribute_axes):

        def squeeze(a: list[Any]) -> list[Any]:
            axes = a[1].reshape(-1).tolist() if len(a) > 1 else attribute_axes
            return [np.squeeze(a[0], tuple(int(i) for i in axes))]

        return squeeze
    if op == "Reshape" and not int(_attr(node, "allowzero", 0)):

        def reshape(a: list[Any]) -> list[Any]:
            target = [a[0].shape[i] if v == 0 else int(v) for i, v in enumerate(a[1].tolist())]
            return [np.reshape(a[0], target)]

        return reshape
    if op == "Transpose":
        perm = list(_attr(node, "perm", [])) or None
        return lambda a: [np.transpose(a[0], perm)]
    if op == "Slice" and len(node.input) >= 3:

        def slice_(a: list[Any]) -> list[Any]:
            x, starts, ends = a[0], a[1].tolist(), a[2].tolist()
            axes = a[3].tolist() if len(a) > 3 and a[3] is not None else range(len(starts))
            steps = a[4].tolist() if len(a) > 4 and a[4] is not None else [1] * len(starts)
            index = [slice(None)] * x.ndim
            for k, b, e, t in zip(axes, starts, ends, steps, strict=True):
                index[k % x.ndim] = _onnx_slice(x.shape[k], b, e, t)
            return [x[tuple(index)]]

        return slice_
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(node)
    names = list(node.input)
    return lambda a: evaluator.run(None, {n: v for n, v in zip(names, a, strict=True) if n})


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    import numpy as np
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_ints":
            return np.asarray(list(a.ints), dtype=np.int64)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.asarray(a.i, dtype=np.int64)
        if a.name == "value_float":
            return np.asarray(a.f, dtype=np.float32)
    return None


def onnx_grid_graph(
    model: onnx.ModelProto,
    input_name: str,
    layout: str,
    *,
    inferred: onnx.ModelProto | None = None,
) -> GridGraph:
    """The :class:`GridGraph` of an ONNX model whose image input ``input_name`` has ``layout``
    (NCHW or NHWC). Names are tensor names. ``inferred``: the model after shape inference, when
    the caller already has it (ranks of Reshape outputs, kernel sizes from weight shapes)."""
    import onnx

    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:  # shape inference is a help, not a requirement
            inferred = model
    graph = model.graph
    dependent = {input_name}
    for node in graph.node:
        if any(i in dependent for i in node.input if i):
            dependent.update(o for o in node.output if o)
    facts = _OnnxGraphFacts(model, inferred, dependent)
    opset = next(
        (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        onnx.defs.onnx_opset_version(),
    )
    ranks = _onnx_ranks(graph, facts)  # (facts.ranks, from here on)
    # The batch size a replay sees: the input's static one, else a size equal only to itself.
    batch = (facts.dims.get(input_name) or [None])[0]
    batch = _BATCH if batch is None else batch
    steps = []
    public = {input_name: input_name}
    for index, node in enumerate(graph.node):
        if not any(i in dependent for i in node.input if i):
            continue
        label = f"{node.op_type} '{node.name or f'node {index}'}'"
        rule = _onnx_rule_with_tokens(node, facts, opset, label, batch)
        meta = node.op_type in _ONNX_META and node.domain in ("", "ai.onnx")
        unfolds = node.op_type in ("Reshape", "InstanceNormalization") and node.domain in (
            "",
            "ai.onnx",
        )
        reads = tuple(getattr(rule, "reads", ()))  # other tensors whose states the rule reads
        inputs = tuple(node.input) + reads
        tokens = bool(getattr(rule, "tokens", False))
        steps.append(
            _Step(label, inputs, tuple(node.output), rule, meta, unfolds, len(reads), tokens)
        )
        public.update({o: o for o in node.output if o})
    found = GridGraph(input_name, layout.upper(), steps, public, ranks=ranks)
    found.input_divisor = _onnx_input_divisor(graph, input_name, facts)
    return found


def _onnx_input_divisor(
    graph: onnx.GraphProto, input_name: str, facts: _OnnxGraphFacts
) -> float | None:
    """:attr:`GridGraph.input_divisor` of an ONNX graph: a Div by a constant scalar, or a Mul by
    one below 1, of the input itself (or of a Cast of it)."""
    sources = {input_name}
    for node in graph.node:
        if node.op_type in ("Cast", "Identity") and node.input and node.input[0] in sources:
            sources.update(node.output)
            continue
        if node.op_type not in ("Div", "Mul") or len(node.input) != 2:
            continue
        if node.input[0] not in sources and not (
            node.op_type == "Mul" and node.input[1] in sources
        ):
            continue
        other = node.input[1] if node.input[0] in sources else node.input[0]
        value = facts.value(other)
        if value is None or value.size != 1:
            continue
        constant = float(value.reshape(-1)[0])
        if node.op_type == "Div" and constant > 1:
            return constant
        if node.op_type == "Mul" and 0 < constant < 1:
            return 1 / constant
    return None


#: ONNX ops whose output has their first input's rank.
_RANK_KEEPING = {
    *[
        "Abs",
        "Acos",
        "Asin",
        "Atan",
        "Cast",
        "CastLike",
        "Ceil",
        "Celu",
        "Clip",
        "Cos",
        "Cosh",
        "CumSum",
        "Dropout",
        "Elu",
        "Erf",
        "Exp",
    ],
    *[
        "Floor",
        "Gelu",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "InstanceNormalization",
        "IsInf",
        "IsNaN",
    ],
    *[
        "LayerNormalization",
        "LeakyRelu",
        "Log",
        "LogSoftmax",
        "LpNormalization",
        "Mish",
        "Neg",
        "Not",
        "PRelu",
    ],
    *[
        "Reciprocal",
        "Relu",
        "Round",
        "Selu",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
    ],
    *[
        "Sqrt",
        "Tan",
        "Tanh",
        "ThresholdedRelu",
        "Trilu",
        "BatchNormalization",
        "Pad",
        "Resize",
        "Upsample",
        "Split",
    ],
}
#: ONNX ops whose output has the largest of their inputs' ranks (numpy broadcasting).
_RANK_BROADCASTING = {
    *[
        "Add",
        "And",
        "BitShift",
        "Div",
        "Equal",
        "Greater",
        "GreaterOrEqual",
        "Less",
        "LessOrEqual",
        "Max",
        "Mean",
    ],
    *["Min", "Mod", "Mul", "Or", "Pow", "Sub", "Sum", "Where", "Xor", "Concat"],
}


def _onnx_ranks(graph: onnx.GraphProto, facts: _OnnxGraphFacts) -> dict[str, int]:
    """Every tensor's rank that shape inference gave, and those it left out, propagated in node
    order through common ops: an older exporter's ``flatten(2)`` is a Reshape to a target
    built from Shape, Slice and Concat, whose rank inference does not know, and with it the
    ranks of every token tensor of a ViT after it. Sets them as ``facts.ranks`` (filled as
    they are found: the Shape of a tensor the pass has reached has its rank), and forgets the
    shape entries traced before."""
    ranks = {name: len(dims) for name, dims in facts.dims.items()}
    facts.ranks = ranks

    def rank(name: str) -> int | None:
        if name in ranks:
            return ranks[name]
        value = facts.value(name)
        return None if value is None else value.ndim

    for node in graph.node:
        op, ins = node.op_type, [i for i in node.input if i]
        if node.domain not in ("", "ai.onnx") or not ins:
            continue
        outs = [o for o in node.output if o and o not in ranks]
        if not outs:
            continue
        found: int | None = None
        if op in _RANK_KEEPING:
            found = rank(ins[0])
        elif op == "MatMul" and len(ins) == 2:
            a, b = rank(ins[0]), rank(ins[1])
            if a is not None and b is not None:  # (a 1-D operand's axis is summed away)
                found = max(a, b) - (a == 1 or b == 1)
        elif op in _RANK_BROADCASTING:
            known = [rank(i) for i in ins]
            found = max(known) if None not in known else None  # type: ignore[type-var]
        elif op == "Reshape":
            found = facts.rank(node.output[0])
        elif op == "Transpose":
            perm = _attr(node, "perm", None)
            found = len(perm) if perm is not None else rank(ins[0])
        elif op in ("Unsqueeze", "Squeeze"):
            axes, data = _onnx_axes(node, facts), rank(ins[0])
            if data is not None and axes:  # (a Squeeze of every unit axis: sizes decide)
                found = data + len(axes) if op == "Unsqueeze" else data - len(axes)
        elif op == "Gather":
            data, index = rank(ins[0]), rank(ins[1]) if len(ins) > 1 else None
            found = data - 1 + index if data is not None and index is not None else None
        elif op in ("Flatten", "Gemm"):
            found = 2
        elif op == "Einsum":
            equation = str(_attr(node, "equation", "")).replace(" ", "")
            if "->" in equation and "." not in equation:
                found = len(equation.split("->")[1])
        elif op == "Expand" and len(ins) == 2:  # (a class token expanded to the batch)
            data, entries = rank(ins[0]), facts.shape_entries(ins[1])
            if data is not None and entries is not None:
                found = max(data, len(entries))
        elif op in _ONNX_REDUCE:  # (a layer norm written out: ReduceMean over the channels)
            axes, data = _onnx_axes(node, facts), rank(ins[0])
            if data is not None and _attr(node, "keepdims", 1):
                found = data
            elif data is not None and axes:
                found = data - len(set(int(a) % data for a in axes))
        if found is not None:
            ranks.update(dict.fromkeys(outs, found))
    facts.forget_entries()  # (some traced before the ranks they read were known)
    return ranks


def _pair(values: Sequence[int] | None, default: int) -> list[int] | None:
    """Two per-axis values from an attribute list (None: the attribute is not 2-D)."""
    if values is None or len(values) == 0:
        return [default, default]
    values = [int(v) for v in values]
    return values if len(values) == 2 else None


#: onnxruntime's quantized ops (domain com.microsoft, written by its QOperator quantizer): the
#: input positions of their image tensors; each keeps its inputs' grid, as its float op does.
_ORT_QUANTIZED_POINTWISE = {
    "QLinearAdd": (0, 3),
    "QLinearMul": (0, 3),
    "QLinearLeakyRelu": (0,),
    "QLinearSigmoid": (0,),
    "QLinearSoftmax": (0,),
}


def _ort_quantized_rule(node: onnx.NodeProto, facts: _OnnxGraphFacts, label: str) -> _Rule:
    op = node.op_type
    if op in _ORT_QUANTIZED_POINTWISE:
        at = _ORT_QUANTIZED_POINTWISE[op]
        return lambda ins: _combine([ins[i] for i in at if i < len(ins)], label)
    if op == "QLinearGlobalAveragePool" and not _attr(node, "channels_last", 0):
        return lambda ins: _global_state(ins[0], label)
    if op == "QLinearAveragePool" and not _attr(node, "channels_last", 0):
        return _onnx_window_rule(node, facts, label)
    if op == "QLinearConcat":  # (Y_scale, Y_zero_point, then X, scale, zero point per input)
        axis = int(_attr(node, "axis", 1))
        rank = facts.rank(node.output[0])
        return lambda ins: _concat_state(ins[2::3], axis, label, rank)
    if op == "QGemm":
        return _onnx_matmul_rule(node, label)
    return _unsupported(f"{label} (domain '{node.domain}') is not understood")


def _onnx_rule(node: onnx.NodeProto, facts: _OnnxGraphFacts, opset: int, label: str) -> _Rule:
    op = node.op_type
    if node.domain == "com.microsoft":
        return _ort_quantized_rule(node, facts, label)
    if node.domain not in ("", "ai.onnx"):
        return _unsupported(f"{label} (domain '{node.domain}') is not understood")
    if op in _ONNX_WINDOW or op == "ConvTranspose":
        return _onnx_window_rule(node, facts, label)
    if op in _ONNX_GLOBAL:
        return lambda ins: _global_state(ins[0], label)
    if op == "Pad":
        return _onnx_pad_rule(node, facts, opset, label)
    if op == "Slice":
        return _onnx_slice_rule(node, facts, opset, label)
    if op in ("Resize", "Upsample"):
        return _onnx_resize_rule(node, facts, opset, label)
    if op == "Transpose":
        perm = list(_attr(node, "perm", []))
        if not perm:
            return _unsupported(f"{label} reverses every axis")
        return lambda ins: _permute_state(ins[0], perm, label)
    if op == "Concat":
        axis = int(_attr(node, "axis", 1))
        rank = facts.rank(node.output[0])
        return lambda ins: _concat_state(ins, axis, label, rank)
    if op == "Flatten":
        axis = int(_attr(node, "axis", 1))
        return lambda ins: (
            _Flat()
            if axis == 1 and ins[0] is not None
            else _Lost(f"{label} flattens from axis {axis}")
        )
    if op in ("Gemm", "MatMul"):
        return _onnx_matmul_rule(node, label)
    if op in ("Reshape", "Squeeze", "Unsqueeze"):
        return _onnx_reshape_rule(node, facts, label)
    if op in _ONNX_REDUCE:
        return _onnx_reduce_rule(node, facts, opset, label)
    if op in ("SpaceToDepth", "DepthToSpace"):
        block = int(_attr(node, "blocksize", 0))
        mode = str(_attr(node, "mode", "DCR"))
        if op == "SpaceToDepth":
            return lambda ins: _space_to_depth_state(_first(ins[0]), block, label)
        # Both DCR and CRD put every input cell's block at the same output cells.
        del mode
        return lambda ins: _depth_to_space_state(_first(ins[0]), block, label)
    if op == "Split":  # (each output: the same state)
        axis = int(_attr(node, "axis", 0))
        rank = facts.rank(node.input[0])
        return lambda ins: _split_state(_first(ins[0]), axis, rank, False, label)
    if op in ONNX_GRID_PRESERVING:
        axes = _onnx_statistics_axes(node, facts, opset)
        if axes is None:
            return lambda ins: _combine(ins, label)

        def normalise(ins: list[Any]) -> Any:
            folded = _first(ins[0])
            if isinstance(folded, _Folded):  # a GroupNorm: statistics over a group's cells
                return replace(folded, origin=_spread(folded.origin))
            state = _combine(ins, label)
            if not isinstance(state, _Map):
                return state
            # over channel axes only (softmax over NCHW channels, LayerNorm over NHWC ones):
            # each cell on its own
            local = axes != "space" and not set(axes) & set(_spatial_axes(state))
            return state if local else _spread(state)

        return normalise
    return _unsupported(f"{label} is not understood by the grid walk")


def _onnx_statistics_axes(
    node: onnx.NodeProto, facts: _OnnxGraphFacts, opset: int
) -> tuple[int, ...] | str | None:
    """For a grid-keeping op that takes statistics along axes (where those include H or W,
    each of its cells reads the whole map, and no cell is padding-free): the axes, or "space"
    (H and W whatever the layout); None for ops that act on each element alone."""
    op = node.op_type
    if op in ("InstanceNormalization", "GroupNormalization", "MeanVarianceNormalization"):
        return "space"
    if op not in ("LayerNormalization", "LpNormalization", "Softmax", "LogSoftmax"):
        return None
    rank = facts.rank(node.input[0]) or 4
    flattening = op == "LayerNormalization" or (op in ("Softmax", "LogSoftmax") and opset < 13)
    axis = int(_attr(node, "axis", 1 if flattening and op != "LayerNormalization" else -1)) % rank
    return tuple(range(axis, rank)) if flattening else (axis,)


def _unsupported(reason: str) -> _Rule:
    return lambda ins: _Lost(reason)


def _onnx_window_rule(node: onnx.NodeProto, facts: _OnnxGraphFacts, label: str) -> _Rule:
    op = node.op_type
    weight_index = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1}.get(op)
    kernel = list(_attr(node, "kernel_shape", []))
    if not kernel and weight_index is not None and len(node.input) > weight_index:
        dims = facts.dims.get(node.input[weight_index])
        kernel = list(dims[2:]) if dims and len(dims) == 4 else []
    if len(kernel) != 2 or any(not isinstance(k, int) for k in kernel):
        return _unsupported(f"{label} is not a 2-D window op with a known kernel")
    strides = _pair(_attr(node, "strides", None), 1)
    dilations = _pair(_attr(node, "dilations", None), 1)
    pads = [int(p) for p in _attr(node, "pads", [0, 0, 0, 0])]
    auto_pad = str(_attr(node, "auto_pad", "NOTSET"))
    if strides is None or dilations is None or len(pads) != 4:
        return _unsupported(f"{label} is not a 2-D window op")
    window = _Window.of(
        label,
        kernel,
        strides,
        dilations,
        pads[:2],
        pads[2:],
        ceil_mode=bool(_attr(node, "ceil_mode", 0)),
        auto_pad=auto_pad,
    )
    if op == "ConvTranspose":
        output_padding = _pair(_attr(node, "output_padding", None), 0)
        if _attr(node, "output_shape", None) or auto_pad not in ("NOTSET", "VALID"):
            return _unsupported(f"{label} sets output_shape or auto_pad (not understood)")
        if output_padding is None:
            return _unsupported(f"{label} is not 2-D")
        window = replace(
            window,
            transposed=True,
            auto_pad="NOTSET",
            output_padding=(output_padding[0], output_padding[1]),
        )
    return lambda ins: _window_state(_first(ins[0]), window)


def _onnx_pad_rule(node: onnx.NodeProto, facts: _OnnxGraphFacts, opset: int, label: str) -> _Rule:
    if opset < 11:
        pads = [int(p) for p in _attr(node, "pads", [])]
    else:
        pads = facts.ints(node.input[1]) if len(node.input) > 1 else None
    program = facts.shape_program(node.input[1]) if pads is None and opset >= 11 else None
    if pads is None and program is None:
        return _unsupported(f"{label} has pads that are not constant")
    rank = facts.rank(node.input[0]) or 4
    axes = list(range(rank))
    if opset >= 18 and len(node.input) > 3 and node.input[3]:
        given = facts.ints(node.input[3])
        if given is None:
            return _unsupported(f"{label} has axes that are not constant")
        axes = [a % rank for a in given]
    if program is not None:
        # Pads computed from the maps' shapes (TF-style "same" padding): at each replayed size.
        def computed(ins: list[Any]) -> Any:
            state = _first(ins[0])
            found = program.ints(
                dict(zip(program.reads, ins[len(ins) - len(program.reads) :], strict=True))
            )
            if found is None or None in found or len(found) != 2 * len(axes):
                if not isinstance(state, _Map):
                    return _Lost(f"{label} has pads computed from sizes that are not known")
                return _Map(state.layout, None, f"{label} has pads that are not known", state.rank)
            by_axis = {a: (found[i], found[i + len(axes)]) for i, a in enumerate(axes)}
            return _pad_state(state, by_axis, rank, label)

        computed.reads = program.reads  # type: ignore[attr-defined]
        return computed
    if len(pads) != 2 * len(axes):
        return _unsupported(f"{label} has {len(pads)} pads for {len(axes)} axes")
    by_axis = {a: (pads[i], pads[i + len(axes)]) for i, a in enumerate(axes)}
    return lambda ins: _pad_state(_first(ins[0]), by_axis, rank, label)


def _onnx_slice_rule(node: onnx.NodeProto, facts: _OnnxGraphFacts, opset: int, label: str) -> _Rule:
    if opset < 10:
        starts = [int(v) for v in _attr(node, "starts", [])]
        ends = [int(v) for v in _attr(node, "ends", [])]
        axes = [int(v) for v in _attr(node, "axes", [])] or None
        steps: list[int] | None = None
    else:
        inputs = list(node.input) + [""] * (5 - len(node.input))
        starts, ends = facts.ints(inputs[1]), facts.ints(inputs[2])
        axes = facts.ints(inputs[3]) if inputs[3] else None
        steps = facts.ints(inputs[4]) if inputs[4] else None
        if (inputs[3] and axes is None) or (inputs[4] and steps is None):
            return _unsupported(f"{label} has bounds that are not constant")
        if starts is None or ends is None:
            if axes is None:
                return _unsupported(f"{label} has bounds that are not constant")
            # (the exporters' chunk: bounds from Shape, on a constant channel axis)
            return _onnx_channel_slice_rule(node, facts, axes, label)
    rank = facts.rank(node.input[0])
    axes = list(axes if axes is not None else range(len(starts)))
    steps = steps or [1] * len(starts)

    def rule(ins: list[Any]) -> Any:
        state = _first(ins[0])
        for axis, start, end, step in zip(axes, starts, ends, steps, strict=False):
            state = _slice_state(state, axis, start, end, step, label, rank)
            if isinstance(state, _Lost):
                break
        return state

    return rule


def _onnx_channel_slice_rule(
    node: onnx.NodeProto, facts: _OnnxGraphFacts, axes: list[int], label: str
) -> _Rule:
    """A Slice whose bounds are computed (from Shapes) along constant axes: a map's grid is kept
    when they are all channel axes (or the batch axis), whatever the bounds; on a spatial axis
    (a U-Net's crop to its skip connection's size) the bounds are evaluated at each replayed
    size (:class:`_ShapeProgram`)."""
    rank = facts.rank(node.input[0])
    inputs = list(node.input) + [""] * (5 - len(node.input))
    steps = facts.ints(inputs[4]) if inputs[4] else [1] * len(axes)
    bounds = [facts.ints(inputs[1]), facts.ints(inputs[2])]
    programs = [
        None if b is not None else facts.shape_program(i)
        for b, i in zip(bounds, inputs[1:3], strict=True)
    ]
    reads = tuple(sorted({t for p in programs if p is not None for t in p.reads}))

    def evaluated(ins: list[Any], state: _Map, found: list[int]) -> Any:
        extra = dict(zip(reads, ins[len(ins) - len(reads) :], strict=True))
        starts, ends = (
            b if p is None else p.ints(extra) for b, p in zip(bounds, programs, strict=True)
        )
        known = starts is not None and ends is not None and None not in starts + ends
        if not known or not len(starts) == len(ends) == len(steps) == len(found):
            return _Map(state.layout, None, f"{label} has bounds that are not known", state.rank)
        for axis, start, end, step in zip(found, starts, ends, steps, strict=True):
            state = _slice_state(state, axis, start, end, step, label, rank)
        return state

    def rule(ins: list[Any]) -> Any:
        state = _first(ins[0])
        if not isinstance(state, _Map):
            return state
        found = _resolve_axes(state, axes, rank, label)
        if isinstance(found, _Lost):
            return found
        if not set(found) & set(_spatial_axes(state)):
            return state
        if any(b is None and p is None for b, p in zip(bounds, programs, strict=True)):
            return _Lost(f"{label} has bounds that are not constant on a spatial axis")
        return evaluated(ins, state, found)

    rule.reads = reads  # type: ignore[attr-defined]
    return rule


def _onnx_resize_rule(
    node: onnx.NodeProto, facts: _OnnxGraphFacts, opset: int, label: str
) -> _Rule:
    op = node.op_type
    mode = str(_attr(node, "mode", "nearest"))
    mode = "linear" if mode == "bilinear" else mode
    sizes: list[Any] | None = None
    program: _ShapeProgram | None = None
    if op == "Upsample" or opset < 11:
        coordinates = "asymmetric"
        rounding = "simple"  # opset < 11 nearest: x / scale, ceil when downsampling
        if op == "Upsample" and opset < 9:
            scales = [float(v) for v in _attr(node, "scales", [])]
        else:
            scales = facts.partial(node.input[1]) if len(node.input) > 1 else None
    else:
        coordinates = str(_attr(node, "coordinate_transformation_mode", "half_pixel"))
        rounding = str(_attr(node, "nearest_mode", "round_prefer_floor"))
        inputs = list(node.input) + [""] * (4 - len(node.input))
        # Exporters build sizes as Concat(Shape(x)[:2], constant H, W): only the spatial
        # entries need to be constant.
        scales = facts.partial(inputs[2]) if inputs[2] else None
        sizes = facts.partial(inputs[3]) if inputs[3] else None
        if inputs[3] and (sizes is None or None in sizes):
            # Sizes computed from maps' shapes (an interpolation to twice a map's size in a
            # dynamic export): evaluated at each replayed size.
            program = facts.shape_program(inputs[3])
            dims = facts.dims.get(inputs[3])
            if program is not None and sizes is None and dims and dims[0] is not None:
                sizes = [None] * dims[0]
        if (inputs[2] and scales is None) or (inputs[3] and sizes is None):
            return _unsupported(f"{label} has scales or sizes that are not constant")
        if sizes is not None and None in sizes and program is None:
            # Sizes read from another map's Shape (a U-Net's decoder exported with a dynamic
            # H and W): known at replay from that map's grid.
            entries = facts.shape_entries(inputs[3])
            if entries is not None and len(entries) == len(sizes):
                sizes = [
                    e if isinstance(e, tuple) else v for e, v in zip(entries, sizes, strict=True)
                ]
        if str(_attr(node, "keep_aspect_ratio_policy", "stretch")) != "stretch" and sizes:
            return _unsupported(f"{label} keeps the aspect ratio (not understood)")
    values = scales or sizes
    if not values:
        return _unsupported(f"{label} has neither scales nor sizes")
    rank = facts.rank(node.input[0]) or 4
    axes = [int(a) % rank for a in _attr(node, "axes", [])] or list(range(rank))
    if len(values) != len(axes):
        return _unsupported(f"{label} has {len(values)} scales/sizes for {len(axes)} axes")
    given = dict(zip(axes, values, strict=True))
    input_dims = facts.dims.get(node.input[0]) or [None] * rank
    use_scales = bool(scales)
    # the maps whose sizes the sizes read, as extra inputs of the step (_Step: reads)
    reads = sorted(
        {v[0] for v in values if isinstance(v, tuple)} | set(program.reads if program else ())
    )

    def size_of(entry: Any, states: dict[str, Any]) -> Any:
        """A size entry: an int, or a spatial size of another map (None: unknown)."""
        if not isinstance(entry, tuple):
            return entry
        source = _first(states.get(entry[0]))
        if not isinstance(source, _Map) or source.grid is None:
            return None
        h, w = _spatial_axes(source)
        return {h: source.grid.h.n, w: source.grid.w.n}.get(entry[1] % source.rank)

    def rule(ins: list[Any]) -> Any:
        extra = dict(zip(reads, ins[len(ins) - len(reads) :], strict=True)) if reads else {}
        by_axis = {a: size_of(v, extra) for a, v in given.items()}
        computed = program.ints(extra) if program is not None else None
        if computed is not None and len(computed) == len(given):
            by_axis = dict(zip(given, computed, strict=True))
        state = _first(ins[0])
        if state is None:  # a constant resized (to the size of a map it reads)
            return None
        if isinstance(state, _Flat):  # (a 1x1 map: as _resize_state says)
            return state if _constant_map(state) else _Lost(f"{label} resizes flat features")
        if state.rank != 4:
            return _not_rank4(state, label)
        spatial = _SPATIAL[state.layout]
        for axis in (a for a in by_axis if a not in spatial):
            kept = 1 if use_scales else input_dims[axis]
            if None not in (kept, by_axis[axis]) and by_axis[axis] != kept:
                return _Lost(f"{label} resizes a non-spatial axis")
        if any(a in by_axis and by_axis[a] is None for a in spatial):
            return _Map(state.layout, None, f"{label} has spatial sizes that are not constant")
        if state.grid is None:
            return state
        cells = (state.grid.h.n, state.grid.w.n)
        if use_scales:
            picked = tuple(float(by_axis.get(a, 1.0)) for a in spatial)
            return _resize_state(
                state, None, picked, mode, coordinates, rounding, label, runtime="onnxruntime"
            )
        picked = tuple(int(by_axis.get(a, n)) for a, n in zip(spatial, cells, strict=True))
        return _resize_state(
            state, picked, None, mode, coordinates, rounding, label, runtime="onnxruntime"
        )

    rule.reads = tuple(reads)  # type: ignore[attr-defined]
    return rule


def _onnx_matmul_rule(node: onnx.NodeProto, label: str) -> _Rule:
    def rule(ins: list[Any]) -> Any:
        if ins[0] is None or any(s is not None for s in ins[1:2]):
            return _Lost(f"{label} multiplies two image-dependent tensors")
        state = _first(ins[0])
        if isinstance(state, _Flat):
            return _Flat(state.layout if state.layout else None, False)
        if node.op_type == "MatMul" and state.layout == "NHWC":
            return state  # acts on the channel (last) axis only
        return _Lost(f"{label} multiplies along the width axis of a {state.layout} map")

    return rule


def _onnx_reshape_rule(node: onnx.NodeProto, facts: _OnnxGraphFacts, label: str) -> _Rule:
    """Reshape, Squeeze, Unsqueeze: a regrouping of a NCHW(-like) map's channel axes keeps its
    grid (:func:`_onnx_regroup_rank`); else as :func:`_reshape_state`."""
    data, op = node.input[0], node.op_type
    in_dims, out_dims = facts.dims.get(data), facts.dims.get(node.output[0])
    entries: list[_Entry] | None = None
    axes: list[int] | None = None
    if op == "Reshape":
        entries = facts.shape_entries(node.input[1]) if len(node.input) > 1 else None
        if entries is not None and not _attr(node, "allowzero", 0):
            # 0 copies the input's size at the same position (allowzero=0).
            entries = [(data, i) if e == 0 else e for i, e in enumerate(entries)]
    else:
        axes = _onnx_axes(node, facts)

    def rule(ins: list[Any]) -> Any:
        state = _first(ins[0])
        if isinstance(state, _Folded):  # back to the shape it was folded from, or lost
            sizes = facts.dims.get(state.source) or [None] * 4
            back = entries is not None and len(entries) == 4
            back = back and all(
                e == (state.source, i) or (sizes[i] is not None and e == sizes[i])
                for i, e in enumerate(entries)  # type: ignore[arg-type]
            )
            return state.origin if back else _Lost(state.reason)
        if isinstance(state, _Map) and state.layout == "NCHW":
            regroup = _onnx_regroup_rank(op, data, state.rank, in_dims, out_dims, entries, axes)
            if regroup is not None:
                return replace(state, rank=regroup)
            if state.rank == 4 and _folds_groups(entries, data, in_dims):
                return _Folded(
                    f"{label} folds each group of channels with H and W into one axis (a "
                    "GroupNorm's statistics)",
                    state,
                    data,
                )
        return _reshape_state(state, in_dims, out_dims, label)

    return rule


def _folds_groups(
    entries: Sequence[_Entry] | None, data: str, in_dims: Sequence[int | None] | None
) -> bool:
    """Is a Reshape target ``(B, G, -1)`` of tensor ``data``: its batch size (read from its
    shape, or a constant equal to its static size), a constant number of groups, the rest (each
    group's channels, H and W) in one axis?"""
    batch = in_dims[0] if in_dims else None
    return (
        entries is not None
        and len(entries) == 3
        and (entries[0] == (data, 0) or (batch is not None and entries[0] == batch))
        and isinstance(entries[1], int)
        and entries[1] >= 1
        and entries[2] == -1
    )


def _onnx_regroup_rank(
    op: str,
    data: str,
    rank: int,
    in_dims: Sequence[int | None] | None,
    out_dims: Sequence[int | None] | None,
    entries: Sequence[_Entry] | None,
    axes: Sequence[int] | None,
) -> int | None:
    """The output rank when a Reshape/Squeeze/Unsqueeze of a rank-``rank`` NCHW(-like) map only
    regroups its channel axes (batch axis first, H and W last, all three kept), else None.

    Squeeze/Unsqueeze: every named axis is a channel axis. Reshape (as
    :func:`_torch_regroup_rank`): the target's first entry is the input's batch size and its
    last two the input's H and W, each shown by the target itself (read from the input's shape,
    a 0 that copies it, or a constant equal to a static size) or by static sizes from shape
    inference; a ``-1`` first entry is the batch size when the constant entries between multiply
    to the input's static channel sizes. Sizes frozen at the exported size are assumed to stay.
    """
    if in_dims is not None and len(in_dims) != rank:
        return None
    if op == "Unsqueeze":
        if axes is None:
            return None
        out_rank = rank + len(axes)
        found = _normalised(axes, out_rank)
        ok = found is not None and all(1 <= a <= out_rank - 3 for a in found)
        return out_rank if ok else None
    if op == "Squeeze":
        found = None if axes is None else _normalised(axes, rank)
        if found is None or not found:  # no axes: every size-1 axis (sizes decide): never
            return None
        out_rank = rank - len(set(found))
        ok = out_rank >= 4 and all(1 <= a <= rank - 3 for a in found)
        return out_rank if ok else None
    out_rank = len(entries) if entries is not None else len(out_dims or ())
    if out_rank < 4:
        return None

    def static(dims: Sequence[int | None] | None, i: int) -> int | None:
        return dims[i] if dims is not None and -len(dims) <= i < len(dims) else None

    def kept(i: int, j: int) -> bool:
        """Whether output axis ``i`` provably has input axis ``j``'s size."""
        entry = entries[i] if entries is not None else None
        if isinstance(entry, tuple) and entry[0] == data:
            return entry[1] == j % rank  # another of its sizes: not this one at every size
        size_in = static(in_dims, j)
        if isinstance(entry, int) and entry > 0 and entry == size_in:
            return True
        size_out = static(out_dims, i) if len(out_dims or ()) == out_rank else None
        return size_in is not None and size_in == size_out

    if not (kept(-2, -2) and kept(-1, -1)):
        return None
    if kept(0, 0):
        return out_rank
    # A -1 batch entry: the batch size when the entries between give the channel count.
    if entries is None or entries[0] != -1:
        return None
    middle_in = [static(in_dims, j) for j in range(1, rank - 2)]
    middle_out = [e for e in entries[1:-2] if isinstance(e, int) and e > 0]
    if None in middle_in or len(middle_out) != out_rank - 3:
        return None
    channels = math.prod(d for d in middle_in if d is not None)
    return out_rank if math.prod(middle_out) == channels else None


def _onnx_reduce_rule(
    node: onnx.NodeProto, facts: _OnnxGraphFacts, opset: int, label: str
) -> _Rule:
    keepdims = bool(_attr(node, "keepdims", 1))
    rank = facts.rank(node.input[0])
    axes = _onnx_axes(node, facts)
    if axes is None:
        return _unsupported(f"{label} has axes that are not constant")
    noop = bool(_attr(node, "noop_with_empty_axes", 0))
    if not axes and noop:
        return lambda ins: _first(ins[0])
    chosen = list(axes) if axes else None
    return lambda ins: _reduce_state(_first(ins[0]), chosen, keepdims, rank, label)


# -- ONNX token sequences ------------------------------------------------------------------------
class _BatchSize:
    """The batch size of a replayed ONNX graph whose batch is dynamic: a size equal to itself
    alone (:func:`_same_size`), so that a Reshape can be seen to keep the batch axis."""

    def __repr__(self) -> str:
        return "batch"


_BATCH = _BatchSize()


def _replayed_dims(state: Any, dims: Sequence[int | None] | None, batch: Any) -> list[Any] | None:
    """A map's or token sequence's sizes at a replayed size: ``batch`` on its batch axis, its
    grid's cells (a sequence: its prefix tokens and cells), channel sizes from shape inference
    (None where it has none); None for any other state."""
    if not isinstance(state, (_Map, _Tokens)):
        return None
    shape: list[Any] = list(dims) if dims is not None and len(dims) == state.rank else []
    shape = shape or [None] * state.rank
    grid = state.grid
    if isinstance(state, _Map):
        shape[0] = batch
        if grid is not None:
            h, w = _spatial_axes(state)
            shape[h], shape[w] = grid.h.n, grid.w.n
        return shape
    merged = state.merged
    shape[state.batch] = (
        batch if merged == 1 else batch * merged if isinstance(batch, int) else None
    )
    cells = 0 if state.only_prefix else None if grid is None else grid.h.n * grid.w.n
    shape[state.token] = None if cells is None else state.prefix + cells
    return shape


def _resolved(in_dims: Sequence[Any] | None, out: list[Any]) -> list[Any]:
    """A Reshape target's ``-1`` entry as the size it stands for, where the input's sizes and
    the other entries give it (the batch size cancelling out, or being what is left); else
    None."""
    if out.count(-1) != 1:
        return out
    rest = [d for d in out if d != -1]
    at = out.index(-1)
    out = [*out[:at], None, *out[at + 1 :]]
    if in_dims is None or None in in_dims or None in rest:
        return out
    batches = sum(d is _BATCH for d in in_dims) - sum(d is _BATCH for d in rest)
    total = math.prod(d for d in in_dims if d is not _BATCH)
    known = math.prod(d for d in rest if d is not _BATCH)
    if batches == 0 and known > 0 and total % known == 0:
        out[at] = total // known
    elif batches == 1 and total == known:  # (the batch itself, a graph's -1 for it)
        out[at] = _BATCH
    return out


class _OnnxTarget:
    """A shape tensor (a Reshape's or an Expand's target) at each replayed size: constant
    entries, sizes read from tensors' shapes (the data's own batch, a sequence's token count),
    entries computed from shapes (:class:`_ShapeProgram`; None where they depend on a dynamic
    batch). ``zero_copies``: a 0 entry copies the size of ``data`` at its position (Reshape
    without ``allowzero``)."""

    def __init__(self, target: str, data: str, facts: _OnnxGraphFacts, zero_copies: bool) -> None:
        entries = facts.shape_entries(target)
        if entries is not None and zero_copies:
            entries = [(data, i) if e == 0 else e for i, e in enumerate(entries)]
        self.entries = entries
        self.program = facts.shape_program(target) if entries is None or None in entries else None
        read = {e[0] for e in entries or () if isinstance(e, tuple)}
        self.reads = tuple(sorted(read | set(self.program.reads if self.program else ())))
        self._facts = facts

    def dims(self, states: Mapping[str, Any], batch: Any) -> list[Any] | None:
        values = self.program.ints(states) if self.program is not None else None
        entries = self.entries if self.entries is not None else values
        if entries is None:
            return None
        out: list[Any] = []
        for i, entry in enumerate(entries):
            if isinstance(entry, tuple):
                name, axis = entry
                dims = _replayed_dims(_first(states.get(name)), self._facts.dims.get(name), batch)
                out.append(
                    dims[axis] if dims is not None and -len(dims) <= axis < len(dims) else None
                )
            elif entry is None and values is not None and len(values) == len(entries):
                out.append(values[i])
            else:
                out.append(entry)
        return out


def _onnx_constant_extent(
    name: str, axis: int, rank: int, facts: _OnnxGraphFacts
) -> tuple[Callable[[Mapping[str, Any], Any], int | None], tuple[str, ...]]:
    """The size along ``axis`` of a rank-``rank`` tensor that carries no image content (a class
    token, expanded to the batch), as a function of the replayed states, and the tensors whose
    states it reads: shape inference's static size, or an Expand of a constant to a shape
    computed from the image's."""

    def static(tensor: str) -> list[int | None] | None:
        dims = facts.dims.get(tensor)
        value = facts.value(tensor) if dims is None or None in dims else None
        return list(value.shape) if value is not None else dims

    dims = static(name)
    if dims is not None and len(dims) == rank and dims[axis] is not None:
        size = dims[axis]
        return (lambda states, batch: size), ()
    node = facts.producer(name)
    source = static(node.input[0]) if node is not None and node.op_type == "Expand" else None
    if node is None or source is None or len(node.input) < 2:
        return (lambda states, batch: None), ()
    target = _OnnxTarget(node.input[1], "", facts, zero_copies=False)
    inner = source[axis - rank + len(source)] if axis - rank + len(source) >= 0 else 1

    def extent(states: Mapping[str, Any], batch: Any) -> int | None:
        shape = target.dims(states, batch)
        if shape is None or len(shape) != rank or inner is None:
            return None
        wanted = shape[axis]
        if inner != 1:
            return inner if wanted in (1, inner) else None
        return wanted if isinstance(wanted, int) and wanted >= 1 else None

    return extent, target.reads


def _tokens_squeeze(state: _Tokens, axes: Sequence[int] | None, label: str) -> Any:
    found = None if axes is None else _normalised(axes, state.rank)
    if not found or state.batch in found or state.token in found:
        return _Lost(f"{label} removes the batch or token axis (or every unit axis) of a sequence")
    return _tokens_reduce(state, found, False, label)  # (channel axes of size 1 removed)


def _tokens_unsqueeze(state: _Tokens, axes: Sequence[int] | None, label: str) -> Any:
    rank = state.rank + len(axes or ())
    found = None if axes is None else _normalised(axes, rank)
    if not found:
        return _Lost(_token_reason(label))
    kept = [a for a in range(rank) if a not in found]  # where the input's axes went
    return state.moved(kept[state.batch], kept[state.token], rank)


def _onnx_heads_view(
    state: _Tokens, in_dims: Sequence[Any] | None, out_dims: Sequence[Any] | None, batch: Any
) -> _Tokens | None:
    """A Reshape that merges the axis after the batch axis (the heads) into it, ``(B, heads,
    N, d) -> (B * heads, N, d)``, or splits it back out (the dynamo exporter's keys for ``q @
    k^T``: Reshape, Transpose, Reshape back); None for any other. Every other size must be
    known on both sides and kept, so that the element count leaves the merged axis no other
    size than ``B * heads``."""
    if in_dims is None or out_dims is None:
        return None
    b, rank = state.batch, state.rank
    if len(out_dims) == rank - 1 and state.merged == 1:
        heads = in_dims[b + 1] if b + 1 < rank else None
        if b + 1 == state.token or not isinstance(heads, int):
            return None
        kept, rest = [*in_dims[:b], *in_dims[b + 2 :]], [*out_dims[:b], *out_dims[b + 1 :]]
        size, one = out_dims[b], heads == 1 and _same_size(out_dims[b], batch)
        if size is not None and not one and not (isinstance(batch, int) and size == batch * heads):
            return None
        token = state.token - (state.token > b)
        merged = replace(state, batch=b, token=token, rank=rank - 1, merged=heads)
    else:  # (one head: a sequence merged with an axis of 1, and split back out)
        if len(out_dims) != rank + 1 or out_dims[b + 1] != state.merged:
            return None
        if not (out_dims[b] is None or _same_size(out_dims[b], batch)):
            return None
        kept, rest = [*in_dims[:b], *in_dims[b + 1 :]], [*out_dims[:b], *out_dims[b + 2 :]]
        token = state.token + (state.token > b)
        merged = replace(state, batch=b, token=token, rank=rank + 1, merged=1)
    # (one size shape inference left unknown on the input side is its counterpart's, when the
    # merged axis's size is known: the element count decides it)
    unknown = sum(d is None for d in kept) + (out_dims[b] is None)
    if None in rest or len(kept) != len(rest) or unknown > 1:
        return None
    if any(k != r for k, r in zip(kept, rest, strict=True) if k is not None):
        return None
    return merged


def _onnx_token_rule(
    node: onnx.NodeProto, facts: _OnnxGraphFacts, opset: int, label: str, batch: Any
) -> _Rule | None:
    """The rule of an ONNX op on token sequences (see :class:`_Tokens`; the same rules as on a
    torch.export graph, with sizes read at each replayed size), or None for an op that never
    takes one. A rule that reads other tensors' states (a Reshape's target computed from
    shapes) names them in its ``reads``."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or not node.input:
        return None
    data, own = node.input[0], len(node.input)
    out_rank = facts.rank(node.output[0]) if node.output else None

    def on_tokens(apply: Callable[[_Tokens], Any]) -> _Rule:
        """A rule for ops whose first input must be a sequence, the others constant."""

        def rule(ins: list[Any]) -> Any:
            state = _first(ins[0])
            if not isinstance(state, _Tokens) or any(s is not None for s in ins[1:own]):
                return _Lost(_token_reason(label))
            return apply(state)

        return rule

    if op == "Reshape" and own >= 2:
        target = _OnnxTarget(node.input[1], data, facts, not _attr(node, "allowzero", 0))
        inputs = (*node.input, *target.reads)

        def reshape(ins: list[Any]) -> Any:
            states = dict(zip(inputs, ins, strict=True))
            state = _first(ins[0])
            in_dims = _replayed_dims(state, facts.dims.get(data), batch)
            found = target.dims(states, batch)
            out_dims = None if found is None else _resolved(in_dims, found)
            if isinstance(state, _Map):  # (a map flattened into a sequence, or None)
                return _map_to_tokens(state, in_dims, out_dims)
            if not isinstance(state, _Tokens) or ins[1] is not None:
                return _Lost(_token_reason(label))
            heads = _onnx_heads_view(state, in_dims, out_dims, batch)
            if heads is not None or state.merged != 1:
                return heads or _Lost(f"{label} reshapes a sequence whose heads are in its batch")
            return _tokens_view(state, in_dims, out_dims, label)

        reshape.reads = target.reads  # type: ignore[attr-defined]
        return reshape
    if op in ("Squeeze", "Unsqueeze"):
        axes = _onnx_axes(node, facts)
        change = _tokens_squeeze if op == "Squeeze" else _tokens_unsqueeze
        return on_tokens(lambda s: change(s, axes, label))
    if op == "Transpose":
        perm = [int(p) for p in _attr(node, "perm", [])]

        def permute(ins: list[Any]) -> Any:
            state = _first(ins[0])
            if not perm or not isinstance(state, (_Tokens, _Scores)):
                return _Lost(_token_reason(label))
            return _tokens_permute(state, perm, label)

        return permute
    if op == "MatMul":
        return lambda ins: _tokens_matmul(_first(ins[0]), _first(ins[1]), label)
    if op == "Einsum":
        equation = str(_attr(node, "equation", ""))
        return lambda ins: _tokens_einsum(equation, ins[:own], label)
    if op == "Concat" and out_rank is not None:
        axis = int(_attr(node, "axis", 0)) % out_rank
        pieces = [_onnx_constant_extent(name, axis, out_rank, facts) for name in node.input]
        reads = tuple(sorted({t for _, read in pieces for t in read}))
        inputs = (*node.input, *reads)

        def concat(ins: list[Any]) -> Any:
            states = dict(zip(inputs, ins, strict=True))
            found = [_first(s) for s in ins[:own]]
            sizes = []
            for state, (extent, _) in zip(found, pieces, strict=True):
                dims = _replayed_dims(state, None, batch)
                sizes.append(dims[axis] if dims is not None else extent(states, batch))
            return _tokens_cat(found, sizes, axis, label)

        concat.reads = reads  # type: ignore[attr-defined]
        return concat
    if op == "Gather":
        index = facts.value(node.input[1]) if own > 1 else None
        if index is None or index.ndim != 0:
            return None
        axis = int(_attr(node, "axis", 0))
        return on_tokens(lambda s: _tokens_select(s, axis, int(index), label))
    if op == "Slice" and opset >= 10:
        bounds = [facts.ints(name) if name else None for name in [*node.input[1:], "", ""][:4]]
        starts, ends, axes, steps = bounds
        if starts is None or ends is None or (own > 3 and node.input[3] and axes is None):
            return None
        if own > 4 and node.input[4] and steps is None:
            return None

        def cut(state: _Tokens) -> Any:
            out: Any = state
            chosen = axes if axes is not None else list(range(len(starts)))
            for axis, start, end, step in zip(
                chosen, starts, ends, steps or [1] * len(starts), strict=False
            ):
                if not isinstance(out, _Tokens):
                    break
                out = _tokens_slice(out, axis, start, end, step, label)
            return out

        return on_tokens(cut)
    if op == "Split":
        axis, pieces = int(_attr(node, "axis", 0)), len(node.output)

        def split(s: _Tokens) -> Any:
            where = axis % s.rank
            if where in (s.batch, s.token):
                return _Lost(f"{label} splits the {'token' if where == s.token else 'batch'} axis")
            return (s,) * pieces

        return on_tokens(split)
    if op in _ONNX_REDUCE:
        keepdims = bool(_attr(node, "keepdims", 1))
        axes = _onnx_axes(node, facts)
        if axes is None:
            return None
        if not axes and _attr(node, "noop_with_empty_axes", 0):
            return on_tokens(lambda s: s)
        return on_tokens(lambda s: _tokens_reduce(s, axes or None, keepdims, label))
    if op in ONNX_GRID_PRESERVING and op != "LRN":
        statistics = _onnx_statistics_axes(node, facts, opset)
        if statistics is None:
            return lambda ins: _tokens_combine(ins, label, out_rank)
        if statistics == "space":
            return None

        def normalise(ins: list[Any]) -> Any:
            state = _first(ins[0])
            if any(s is not None for s in ins[1:]) or not isinstance(state, (_Tokens, _Scores)):
                return _Lost(_token_reason(label))
            if isinstance(state, _Scores):
                last = tuple(a % state.rank for a in statistics) == (state.rank - 1,)  # type: ignore[union-attr]
                return state if last else _Lost(f"{label} normalises across queries")
            axes = {a % state.rank for a in statistics}  # type: ignore[union-attr]
            if axes & {state.token, state.batch}:
                return _Lost(f"{label} normalises across tokens")
            return state

        return normalise
    return None


def _onnx_rule_with_tokens(
    node: onnx.NodeProto, facts: _OnnxGraphFacts, opset: int, label: str, batch: Any
) -> _Rule:
    """The rule of an ONNX node (:func:`_onnx_rule`); for the ops a vision transformer is made
    of, one that also takes token sequences (:func:`_onnx_token_rule`) and flattens a map into
    one."""
    rule = _onnx_rule(node, facts, opset, label)
    if getattr(rule, "reads", ()):
        return rule  # (a Resize or a computed pad: never on a sequence)
    token_rule = _onnx_token_rule(node, facts, opset, label, batch)
    if token_rule is None:
        return rule
    own = len(node.input)
    reshape = node.op_type == "Reshape"
    ranks = [facts.rank(name) if name else None for name in node.output]

    def checked(out: Any) -> Any:
        """A sequence or scores of the rank the graph records (a MatMul by a 1-D constant
        removes an axis the token rules do not see), without a fold (:attr:`_Tokens.fold`)
        anywhere but on the output of the Reshape that flattened a map."""
        pieces = out if isinstance(out, tuple) else (out,)
        found = []
        for state, rank in zip(pieces, ranks, strict=False):
            if isinstance(state, (_Tokens, _Scores)) and rank is not None and rank != state.rank:
                state = _Lost(
                    f"{label} gives a rank-{rank} tensor where the walk has rank {state.rank}"
                )
            elif isinstance(state, _Tokens) and state.fold is not None:
                state = replace(state, fold=None)
            found.append(state)
        return tuple(found) + pieces[len(found) :] if isinstance(out, tuple) else found[0]

    moves_heads = node.op_type in ("Transpose", "Reshape")

    def either(ins: list[Any]) -> Any:
        mine = ins[:own]
        if any(isinstance(_first(s), (_Tokens, _Scores)) for s in mine):
            merged = any(isinstance(_first(s), _Tokens) and _first(s).merged != 1 for s in mine)
            if merged and not moves_heads:
                return _Lost(f"{label} takes a sequence whose heads are in its batch axis")
            return checked(token_rule(ins))
        out = rule(mine)
        if reshape and isinstance(out, _Lost) and isinstance(_first(mine[0]), _Map):
            tokens = checked(token_rule(ins))
            if isinstance(out, _Folded) and isinstance(tokens, _Tokens):
                # (B, C, -1): a GroupNorm's fold of C groups, or a sequence: the walk keeps
                # both until the next step says which
                return replace(tokens, fold=out)
            return tokens if isinstance(tokens, _Tokens) else out
        return out

    either.tokens = True  # type: ignore[attr-defined]
    either.reads = getattr(token_rule, "reads", ())  # type: ignore[attr-defined]
    return either


# -- PyTorch (torch.export) ----------------------------------------------------------------------
_TORCH_KEEP = {
    # Batch norms, dropouts, copies and dtype moves: the grid of their first input (norms that
    # take statistics over H and W have rules of their own, see _spread).
    "batch_norm",
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional",
    "cudnn_batch_norm",
    "dropout",
    "dropout_",
    "native_dropout",
    "feature_dropout",
    "feature_dropout_",
    "alpha_dropout",
    "alpha_dropout_",
    "feature_alpha_dropout",
    "clone",
    "contiguous",
    "alias",
    "detach",
    "detach_",
    "lift_fresh_copy",
    "_to_copy",
    "to",
    "type_as",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "channel_shuffle",
    "native_channel_shuffle",
}
# Element-wise ops without torch.Tag.pointwise.
_TORCH_POINTWISE = {
    "hardswish",
    "hardswish_",
    "prelu",
    "_prelu_kernel",
    "masked_fill",
    "masked_fill_",
    "where",
    "silu",
    "silu_",
    "gelu_",
    "mish_",
    "elu_",
    "leaky_relu_",
    "logit",
}
_TORCH_REDUCE = {
    "mean",
    "sum",
    "prod",
    "amax",
    "amin",
    "var",
    "std",
    "logsumexp",
    "nansum",
    "nanmean",
    "norm",
    "linalg_vector_norm",
}
# aten.max / aten.min overloads that reduce (max.other is element-wise); argmax/argmin give
# integer indices and stay unknown.
_BY_DIM = {"dim", "default"}
_TORCH_UPSAMPLE = {
    "upsample_nearest2d": ("nearest", "asymmetric", "floor"),
    "_upsample_nearest_exact2d": ("nearest", "tf_half_pixel_for_nn", "floor"),
    "upsample_bilinear2d": ("linear", None, ""),
    "_upsample_bilinear2d_aa": ("linear", None, ""),
    "upsample_bicubic2d": ("cubic", None, ""),
    "_upsample_bicubic2d_aa": ("cubic", None, ""),
}


def _bind(node: torch.fx.Node) -> dict[str, Any]:
    """An aten node's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _ints2(value: Any, default: int) -> list[int] | None:
    """Two ints from an int or an int list (one value stands for both axes)."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return [default, default]
    if isinstance(value, int):
        return [value, value]
    values = list(value)
    if not all(isinstance(v, int) for v in values):
        return None  # symbolic (an fx node): not a constant
    if len(values) == 1:
        return [values[0], values[0]]
    return values if len(values) == 2 else None


def _dims_of(node: Any) -> list[int | None] | None:
    """A node's static dims (None for symbolic ones), from its ``val`` metadata."""
    shape = _meta_shape(node)
    return None if shape is None else [d if isinstance(d, int) else None for d in shape]


def _meta_shape(node: Any) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else None


def _carries_tensor(node: torch.fx.Node) -> bool:
    """Whether a node's output holds tensors (image content), from its ``val`` metadata, else
    from its op's schema; an unknowable node counts as a tensor, so it is never skipped."""
    if "val" in node.meta:
        value = node.meta["val"]
        if isinstance(value, (tuple, list)):
            return any(isinstance(v, torch.Tensor) for v in value)
        return isinstance(value, torch.Tensor)
    if isinstance(node.target, torch._ops.OpOverload):
        return any(str(r.type).startswith("Tensor") for r in node.target._schema.returns)
    return True


def _torch_label(node: torch.fx.Node) -> str:
    target = node.target
    op = (
        target.name()
        if isinstance(target, torch._ops.OpOverload)
        else getattr(target, "__name__", str(target))
    )
    stack = node.meta.get("nn_module_stack") or {}
    paths = [re.sub(r"@\d+$", "", str(entry[0])) for entry in stack.values() if entry and entry[0]]
    where = f" in module '{paths[-1]}'" if paths else ""
    return f"{op} (node '{node.name}'{where})"


def torch_grid_graph(
    program: torch.export.ExportedProgram,
    layout: str = "NCHW",
    aliases: Mapping[str, str] | None = None,
) -> GridGraph:
    """The :class:`GridGraph` of a ``torch.export`` program with one image input in ``layout``
    (NHWC: a model that permutes channels-last images inside its forward).

    Names are module paths, as :class:`~eqaudit.models.torch_adapter.TorchAdapter` names layers:
    a module's output is the node inside its ``nn_module_stack`` call whose users are outside it;
    a module's second call is ``path:1``, its third ``path:2`` ... ``aliases``: another path of
    a module registered twice -> its first (the calls of ``blocks.1``, the ``blocks.0`` module
    listed again, are ``blocks.0:1`` ..., as the adapter counts them).
    """
    graph = program.graph
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ValueError(f"the program takes {len(user_inputs)} inputs; one image input expected")
    steps = []
    ranks: dict[str, int] = {}
    signature = program.graph_signature
    parameters = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    calls = _module_calls(graph, aliases or {})
    attention, attention_outputs = _attention_calls(calls, parameters)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node in attention:  # an attention module, read whole (its outputs from its inputs)
            if attention[node] is None:
                continue
            inputs, rule = attention[node]
        else:
            inputs = tuple(n.name for n in node.all_input_nodes)
            rule = _torch_rule(node, inputs)
        meta = not _carries_tensor(node)
        tokens = bool(getattr(rule, "tokens", False))
        steps.append(_Step(_torch_label(node), inputs, (node.name,), rule, meta, tokens=tokens))
        shape = _meta_shape(node)
        if shape is not None:
            ranks[node.name] = len(shape)
    public, missing = _module_outputs(graph, calls, attention_outputs)
    found = GridGraph(str(user_inputs[0]), layout, steps, public, missing, ranks)
    found.input_divisor = _torch_input_divisor(graph, str(user_inputs[0]))
    return found


def _own_parameter(name: str) -> bool:
    """Whether a qualified parameter name is one of nn.MultiheadAttention's own."""
    parts = name.split(".")
    own = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    return parts[-1] in (*own, "bias_k", "bias_v") or parts[-2:] in (
        ["out_proj", "weight"],
        ["out_proj", "bias"],
    )


#: Modules whose call the grid walk reads whole: attention over a token sequence, whose output
#: token i is the query's token i (``nn.MultiheadAttention`` splits and merges the batch axis
#: with the heads' and the tokens' axes inside, which the walk does not follow op by op).
_ATTENTION_MODULES = {"torch.nn.modules.activation.MultiheadAttention"}


def _attention_calls(
    calls: Mapping[str, tuple[str, str, list[torch.fx.Node]]], parameters: Mapping[str, str]
) -> tuple[dict[torch.fx.Node, tuple[tuple[str, ...], _Rule] | None], dict[str, torch.fx.Node]]:
    """The nodes of attention module calls (:data:`_ATTENTION_MODULES`): None for the inside
    ones (no step), and for a call's outputs their step's inputs and rule; and per call (its
    ``nn_module_stack`` key) its output node.

    Only self-attention is followed: the call reads one tensor besides the module's own
    parameters (``parameters``: placeholder -> qualified name), the query, key and value at
    once; its output, the one computed from ``out_proj``, is the query's sequence, every token
    reading every other, when the sequence's tokens are on the axis the module attends along
    (1 batch-first, which the call's first transpose of its input says, else 0). Attention
    weights, cross-attention (a learned query, another sequence), a mask are unknown."""
    found: dict[torch.fx.Node, tuple[tuple[str, ...], _Rule] | None] = {}
    outputs: dict[str, torch.fx.Node] = {}
    for key, (_, kind, members) in calls.items():
        if kind not in _ATTENTION_MODULES:
            continue
        inside = set(members)
        sources = list(
            dict.fromkeys(a for n in members for a in n.all_input_nodes if a not in inside)
        )
        # (its own parameters by their names: a module registered twice has one set of
        # placeholders, named after its first path; sizes read are not inputs)
        others = [
            a
            for a in sources
            if _carries_tensor(a) and not _own_parameter(parameters.get(a.name, ""))
        ]
        query = others[0] if len(others) == 1 else None
        projection = next(
            (
                n
                for n in members
                if any(
                    parameters.get(a.name, "").endswith("out_proj.weight")
                    for a in n.all_input_nodes
                )
            ),
            None,
        )
        after = _descendants(projection, inside) if projection is not None else set()
        batch_first = query is not None and any(
            user in inside and _transposes_first_axes(user) for user in query.users
        )
        found.update(dict.fromkeys(members))
        names = tuple(a.name for a in others)
        escaping = [n for n in members if any(user not in inside for user in n.users)]
        result = next((n for n in escaping if n in after), None)
        if result is not None:
            outputs[key] = result
        for out in escaping:
            label = _torch_label(out)
            if out is not result:
                found[out] = (names, _lost_rule(f"{label} gives attention weights"))
            elif query is None:
                found[out] = (names, _lost_rule(f"{label} attends across inputs"))
            else:
                shapes = (_meta_shape(query), _meta_shape(out))
                found[out] = (names, _attention_module_rule(label, *shapes, batch_first))
    return found, outputs


def _descendants(node: torch.fx.Node, within: set[torch.fx.Node]) -> set[torch.fx.Node]:
    found, pending = {node}, [node]
    while pending:
        for user in pending.pop().users:
            if user in within and user not in found:
                found.add(user)
                pending.append(user)
    return found


def _transposes_first_axes(node: torch.fx.Node) -> bool:
    target = node.target
    if (
        not isinstance(target, torch._ops.OpOverload)
        or target._overloadpacket.__name__ != "transpose"
    ):
        return False
    bound = _bind(node)
    return {bound.get("dim0"), bound.get("dim1")} == {0, 1}


def _lost_rule(reason: str) -> _Rule:
    def rule(ins: list[Any]) -> Any:
        return _Lost(reason) if any(s is not None for s in ins) else None

    rule.tokens = True  # type: ignore[attr-defined]
    return rule


def _attention_module_rule(
    label: str, query_shape: Any, out_shape: Any, batch_first: bool
) -> _Rule:
    axes = (0, 1) if batch_first else (1, 0)  # (batch, token) of the sequence it attends along

    def rule(ins: list[Any]) -> Any:
        state = _first(ins[0]) if len(ins) == 1 else None
        if state is None:
            return None
        if not isinstance(state, _Tokens) or state.rank != 3 or query_shape is None:
            return _Lost(f"{label} takes no token sequence the walk follows")
        if (state.batch, state.token) != axes:
            return _Lost(f"{label} attends along another axis than the sequence's tokens")
        if out_shape is None or not all(map(_same_size, query_shape, out_shape)):
            return _Lost(f"{label} gives another shape than its query's")
        return _spread(state)

    rule.tokens = True  # type: ignore[attr-defined]
    return rule


def _torch_input_divisor(graph: torch.fx.Graph, input_name: str) -> float | None:
    """:attr:`GridGraph.input_divisor` of a torch.export graph: a ``div`` by a constant, or a
    ``mul`` by one below 1, of the image input itself (or of a dtype conversion of it)."""
    sources = {input_name}
    for node in graph.nodes:
        if node.op != "call_function" or not node.args:
            continue
        name = getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")
        first = node.args[0]
        if not isinstance(first, torch.fx.Node) or first.name not in sources:
            continue
        if name in ("_to_copy", "to", "clone"):
            sources.add(node.name)
            continue
        constant = node.args[1] if len(node.args) > 1 else None
        if isinstance(constant, bool) or not isinstance(constant, (int, float)):
            continue
        if name == "div" and constant > 1:
            return float(constant)
        if name == "mul" and 0 < constant < 1:
            return 1 / float(constant)
    return None


def _module_aliases(module: torch.nn.Module) -> dict[str, str]:
    """Every path of a module registered under several (weight sharing) -> its first path, and
    so for the modules inside it."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        if not path:
            continue
        known = first.setdefault(id(sub), path)
        if known != path:
            aliases[path] = known
    return aliases


def _module_calls(
    graph: torch.fx.Graph, aliases: Mapping[str, str]
) -> dict[str, tuple[str, str, list[torch.fx.Node]]]:
    """Every module call of a torch.export graph: its ``nn_module_stack`` key -> (module path,
    module type, the call's nodes in graph order). ``aliases``: another path of a module
    registered twice -> its first (:func:`_module_aliases`)."""
    calls: dict[str, tuple[str, str, list[torch.fx.Node]]] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for key, entry in (node.meta.get("nn_module_stack") or {}).items():
            path = re.sub(r"@\d+$", "", str(entry[0]))
            path = aliases.get(path, path)
            if path:
                calls.setdefault(key, (path, str(entry[1]), []))[2].append(node)
    return calls


def _module_outputs(
    graph: torch.fx.Graph,
    calls: Mapping[str, tuple[str, str, list[torch.fx.Node]]],
    chosen: Mapping[str, torch.fx.Node],
) -> tuple[dict[str, str], dict[str, str]]:
    """Module call name (``path``, ``path:1`` ...) -> the node holding that call's output: the
    last node of the call used outside it, or the one ``chosen`` gives for the call (by its
    ``nn_module_stack`` key: an attention module's output, not the weights after it)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    by_path: dict[str, list[tuple[str, list[torch.fx.Node]]]] = {}
    for key, (path, _, nodes) in sorted(calls.items(), key=lambda item: order[item[1][2][0]]):
        by_path.setdefault(path, []).append((key, nodes))
    public: dict[str, str] = {}
    missing: dict[str, str] = {}
    for path, call_nodes in by_path.items():
        for index, (key, nodes) in enumerate(call_nodes):
            name = path if index == 0 else f"{path}:{index}"
            members = set(nodes)
            escaping = [
                n
                for n in nodes
                if _carries_tensor(n) and any(user not in members for user in n.users)
            ]
            if not escaping:
                missing[name] = f"module call '{name}' has no output node in the exported graph"
                continue
            public[name] = chosen.get(key, escaping[-1]).name
    return public, missing


def _torch_map_rule(node: torch.fx.Node, inputs: tuple[str, ...]) -> _Rule:
    """The rule of an aten node on maps, flat tensors and constants."""
    label = _torch_label(node)
    if not _carries_tensor(node):
        return lambda ins: None  # sizes, assertions: not image content (a meta step)
    target = node.target
    if target is operator.getitem:
        index = node.args[1]

        def getitem(ins: list[Any]) -> Any:
            state = ins[0]
            if isinstance(state, tuple) and isinstance(index, int) and index < len(state):
                return state[index]
            return _Lost(f"{label} picks from an output the walk does not understand")

        return getitem
    if not isinstance(target, torch._ops.OpOverload):
        return _unsupported(f"{label} is not understood by the grid walk")
    name = target._overloadpacket.__name__
    bound = _bind(node)
    first_arg = target._schema.arguments[0].name
    source = bound.get(first_arg)
    position = {n: i for i, n in enumerate(inputs)}

    def state_of(ins: list[Any], value: Any = source) -> Any:
        if isinstance(value, torch.fx.Node) and value.name in position:
            return _first(ins[position[value.name]])
        return None

    rank = len(_meta_shape(source) or ()) if isinstance(source, torch.fx.Node) else 0
    multi = isinstance(node.meta.get("val"), (tuple, list))

    def wrap(state: Any, copies: int = 1) -> Any:
        """Tuple outputs (values, indices / mean, rstd): the first carries the grid."""
        if not multi:
            return state
        count = len(node.meta["val"])
        return (state, *([state] * (copies - 1)), *([None] * (count - copies)))

    if name in ("conv2d", "convolution", "conv_transpose2d", "_convolution"):
        return _torch_conv_rule(node, name, bound, state_of, label)
    if name in ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d"):
        kernel = _ints2(bound["kernel_size"], 1)
        strides = _ints2(bound["stride"], 0)
        if strides == [0, 0]:
            strides = kernel  # stride [] means the kernel size
        padding = _ints2(bound["padding"], 0)
        dilation = _ints2(bound.get("dilation", 1), 1)
        ceil_mode = bool(bound["ceil_mode"])
        if None in (kernel, strides, padding, dilation) or rank != 4:
            return _unsupported(f"{label} is not a 2-D pool with constant arguments")
        window = _Window.of(label, kernel, strides, dilation, padding, ceil_mode=ceil_mode)
        copies = 2 if name == "max_pool2d_with_indices" else 1
        return lambda ins: wrap(_window_state(state_of(ins), window), copies)
    if name in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"):
        out = bound["output_size"]
        sizes = [out, out] if isinstance(out, int) else list(out)
        if len(sizes) == 1:
            sizes = sizes * 2
        copies = 2 if name == "adaptive_max_pool2d" else 1
        return lambda ins: wrap(_adaptive_state(state_of(ins), sizes, label), copies)
    if name in ("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d", "_pad_circular"):
        pad = list(bound["pad"] if "pad" in bound else bound["padding"])
        if not all(isinstance(p, int) for p in pad) or len(pad) % 2 or rank == 0:
            return _unsupported(f"{label} has pads that are not constant")
        # torch lists pads from the last axis backwards: (w_begin, w_end, h_begin, h_end, ...).
        by_axis = {rank - 1 - i: (pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)}
        return lambda ins: _pad_state(state_of(ins), by_axis, rank, label)
    if name == "slice":
        dim, start, end, step = bound["dim"], bound["start"], bound["end"], bound["step"]
        if not all(v is None or isinstance(v, int) for v in (dim, start, end, step)):
            return _unsupported(f"{label} has bounds that are not constant")
        return lambda ins: _slice_state(
            state_of(ins), int(dim), start, end, int(step or 1), label, rank
        )
    if name in _TORCH_UPSAMPLE:
        return _torch_upsample_rule(node, name, bound, state_of, label)
    if name in ("pixel_shuffle", "pixel_unshuffle"):
        factor = int(bound["upscale_factor" if name == "pixel_shuffle" else "downscale_factor"])
        if name == "pixel_shuffle":
            return lambda ins: _depth_to_space_state(state_of(ins), factor, label)
        return lambda ins: _space_to_depth_state(state_of(ins), factor, label)
    if name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze"):
        return _torch_view_rule(node, name, bound, state_of, rank, label)
    if name in ("linear", "addmm", "mm", "matmul"):
        data = (
            bound.get("input")
            if name == "linear"
            else (bound.get("mat1") if name == "addmm" else bound.get(first_arg))
        )

        def linear(ins: list[Any]) -> Any:
            others = [
                ins[i]
                for n, i in position.items()
                if not isinstance(data, torch.fx.Node) or n != data.name
            ]
            if any(o is not None for o in others):
                return _Lost(f"{label} multiplies two image-dependent tensors")
            state = state_of(ins, data)
            if state is None:
                return _Lost(f"{label} multiplies in an unexpected argument order")
            if isinstance(state, _Flat):
                return _Flat(state.layout, False)
            if state.layout == "NHWC":
                return state  # acts on the channel (last) axis only
            return _Lost(f"{label} multiplies along the width axis of a NCHW map")

        return linear
    if name in _TORCH_REDUCE or (name in ("max", "min") and target._overloadname in _BY_DIM):
        dims = bound.get("dim")
        keepdim = bool(bound.get("keepdim") or False)
        if isinstance(dims, int):
            dims = [dims]
        axes = None if not dims else [int(d) for d in dims]  # no dims (or []): every axis
        if multi:  # max.dim / min.dim: (values, indices); integer indices are not compared
            indices = _Lost(f"{label} gives integer indices")
            return lambda ins: (_reduce_state(state_of(ins), axes, keepdim, rank, label), indices)
        return lambda ins: _reduce_state(state_of(ins), axes, keepdim, rank, label)
    if name == "cat":
        dim = int(bound["dim"])
        tensors = [t for t in bound["tensors"] if isinstance(t, torch.fx.Node)]
        cat_rank = len(_meta_shape(tensors[0]) or ()) if tensors else None
        return lambda ins: _concat_state(
            [state_of(ins, t) for t in tensors], dim, label, cat_rank or None
        )
    if name == "permute":
        dims = [int(d) % max(rank, 1) for d in bound["dims"]]
        return lambda ins: _permute_state(state_of(ins), dims, label)
    if name == "transpose":  # (a ShuffleNet's channel shuffle swaps two channel axes)
        swap = [int(bound["dim0"]) % max(rank, 1), int(bound["dim1"]) % max(rank, 1)]
        dims = list(range(rank))
        dims[swap[0]], dims[swap[1]] = dims[swap[1]], dims[swap[0]]
        return lambda ins: _permute_state(state_of(ins), dims, label)
    if name in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split"):
        pieces = len(node.meta["val"]) if multi else 1
        dim = bound.get("dim", 0)
        if not isinstance(dim, int):
            return _unsupported(f"{label} splits an axis that is not constant")
        return lambda ins: (
            (_split_state(state_of(ins), dim, rank, name == "unbind", label),) * pieces
        )
    if name in ("instance_norm", "group_norm", "native_group_norm"):  # statistics over H, W
        return lambda ins: wrap(_spread(state_of(ins)))
    if name in ("layer_norm", "native_layer_norm"):
        # over the last len(normalized_shape) axes: channels only just for a NHWC map
        shape = bound.get("normalized_shape")
        local = shape is not None and len(shape) == 1

        def layer_norm(ins: list[Any]) -> Any:
            state = state_of(ins)
            keep = local and isinstance(state, _Map) and state.layout == "NHWC"
            return wrap(state if keep else _spread(state))

        return layer_norm
    if name in _TORCH_KEEP:
        return lambda ins: wrap(state_of(ins), 2 if name == "native_dropout" else 1)
    if torch.Tag.pointwise in target.tags or name in _TORCH_POINTWISE:
        out_shape = _meta_shape(node)
        out_rank = None if out_shape is None else len(out_shape)
        return lambda ins: _combine(ins, label, out_rank)
    return _unsupported(f"{label} is not understood by the grid walk")


# -- token sequences (torch.export and ONNX graphs) --------------------------------------------
@dataclass(frozen=True)
class _Tokens(_Lost):
    """A token sequence: a ViT's ``(B, C, H, W)`` patch map flattened to ``(B, H*W, C)``.

    Axis ``token`` of a rank-``rank`` tensor indexes ``prefix`` tokens that are not cells (a
    class token, distillation or register tokens) and then the cells of ``grid`` in row-major
    order; axis ``batch`` indexes the images; every other axis is a channel axis (a head, a
    head's features). Compared as the ``(B, C, H, W)`` map of its cells
    (:meth:`GridGraph.token_layouts`). Lost to every step but those whose rules say they take
    one (:attr:`_Step.tokens`: views, permutes, concatenations, element-wise ops, layer norms,
    linear layers, attention), so that no other rule ever sees one."""

    grid: Grid | None = None
    prefix: int = 0
    batch: int = 0
    token: int = 1
    rank: int = 3
    #: an ONNX Reshape of a map to ``(B, C, -1)`` is also a GroupNorm's fold of ``C`` groups
    #: (:class:`_Folded`): an InstanceNormalization takes the fold, token steps the sequence
    fold: Any = None
    #: the prefix tokens alone (``x[:, :1]``, the class token cut off its cells): no cells, not
    #: compared, prefix tokens again where they are concatenated in front of a sequence's cells
    only_prefix: bool = False
    #: the size of a channel axis merged into the batch axis, batch-major (``(B * heads, N,
    #: d)``, as the dynamo exporter writes an attention's keys): followed through Transpose
    #: and back out by a Reshape, never compared (:func:`_onnx_heads_view`); 1: none
    merged: int = 1

    def same_cells(self, other: _Tokens) -> bool:
        """Whether two sequences index the same tokens (grid and prefix)."""
        if self.grid is None or other.grid is None or self.prefix != other.prefix:
            return False
        return _same_grid(self.grid, other.grid)

    def moved(self, batch: int, token: int, rank: int) -> _Tokens:
        return replace(self, batch=batch, token=token, rank=rank)


@dataclass(frozen=True)
class _Scores(_Lost):
    """Attention scores ``(..., queries, keys)``: the last two axes index the tokens of two
    sequences (``rows``, ``cols``), axis ``batch`` the images. Not compared (no image grid), but
    followed: the scores times the values' sequence give a sequence on the rows' tokens."""

    rows: _Tokens | None = None
    cols: _Tokens | None = None
    batch: int = 0
    rank: int = 4


def _token_reason(label: str) -> str:
    return f"{label} is not understood on a token sequence"


def _map_to_tokens(state: Any, in_dims: Any, out_dims: Any) -> _Tokens | None:
    """A rank-4 map flattened to a token sequence: NCHW ``(B, C, H, W) -> (B, C, H*W)`` (token
    axis last), NHWC ``(B, H, W, C) -> (B, H*W, C)``; None for any other view."""
    if not isinstance(state, _Map) or state.rank != 4 or in_dims is None or out_dims is None:
        return None
    if len(in_dims) != 4 or len(out_dims) != 3 or None in (*in_dims[1:], *out_dims[1:]):
        return None
    b, *rest = in_dims
    if not _same_size(b, out_dims[0]) and not (b is None and out_dims[0] is None):
        return None
    if state.layout == "NCHW" and out_dims[1:] == [rest[0], rest[1] * rest[2]]:
        token = 2
    elif state.layout == "NHWC" and out_dims[1:] == [rest[0] * rest[1], rest[2]]:
        token = 1
    else:
        return None
    return _Tokens(state.reason or "a token sequence", state.grid, 0, 0, token, 3)


def _tokens_view(state: _Tokens, in_dims: Any, out_dims: Any, label: str) -> Any:
    """A view of a token sequence: channel axes regrouped after the batch and token axes
    (``(B, N, C) -> (B, N, heads, C // heads)``, and back), or, without prefix tokens, the
    sequence folded back into its map (``(B, C, H*W) -> (B, C, H, W)``, ``(B, H*W, C) -> (B, H,
    W, C)``); anything else is lost."""
    if in_dims is None or out_dims is None or len(in_dims) != state.rank:
        return _Lost(_token_reason(label))
    lead = max(state.batch, state.token) + 1
    if len(out_dims) >= lead and all(
        _same_size(a, b) for a, b in zip(in_dims[:lead], out_dims[:lead], strict=True)
    ):
        return state.moved(state.batch, state.token, len(out_dims))
    grid = state.grid
    if state.prefix == 0 and grid is not None and state.rank == 3 and state.batch == 0:
        cells = [grid.h.n, grid.w.n]
        if state.token == 2 and out_dims[2:] == cells and _same_size(in_dims[1], out_dims[1]):
            return _Map("NCHW", grid)
        if state.token == 1 and out_dims[1:3] == cells and _same_size(in_dims[2], out_dims[3]):
            return _Map("NHWC", grid)
    last = state.token == state.rank - 1 and state.batch == 0 and len(out_dims) >= 2
    if last and _same_size(in_dims[0], out_dims[0]) and _same_size(in_dims[-1], out_dims[-1]):
        # channel axes regrouped before a last token axis: (B, C, N) -> (B, heads, C', N)
        return state.moved(0, len(out_dims) - 1, len(out_dims))
    return _Lost(f"{label} reshapes a token sequence across its token axis")


def _tokens_permute(state: Any, dims: Sequence[int], label: str) -> Any:
    if isinstance(state, _Scores):
        fixed = list(dims[-2:]) == [state.rank - 2, state.rank - 1]
        moved = dims.index(state.batch) if state.batch in dims else -1
        return replace(state, batch=moved) if fixed and moved >= 0 else _Lost(_token_reason(label))
    if sorted(dims) != list(range(state.rank)):
        return _Lost(_token_reason(label))
    return state.moved(list(dims).index(state.batch), list(dims).index(state.token), state.rank)


def _tokens_combine(ins: Sequence[Any], label: str, out_rank: int | None) -> Any:
    """An element-wise op on token sequences and constants (a position embedding added, a
    residual sum): one sequence, layout and rank; on scores and constants (a relative position
    bias, a scale): the scores. Image features broadcast over a sequence: lost."""
    states = [_first(s) for s in ins if s is not None]
    scores = [s for s in states if isinstance(s, _Scores)]
    if scores:
        if len(states) == 1 and out_rank in (None, scores[0].rank):
            return scores[0]
        return _Lost(f"{label} combines attention scores with image features")
    tokens = [s for s in states if isinstance(s, _Tokens)]
    if len(tokens) != len(states):
        return _Lost(f"{label} combines a token sequence with other image features")
    first = tokens[0]
    for other in tokens[1:]:
        axes = (other.batch, other.token, other.rank) == (first.batch, first.token, first.rank)
        if not axes or not first.same_cells(other):
            return _Lost(f"{label} combines token sequences of different tokens or axes")
    if out_rank is not None and out_rank != first.rank:
        return _Lost(f"{label} broadcasts a token sequence to rank {out_rank}")
    if len(tokens) == 1 or first.grid is None:
        return first
    grids = [t.grid for t in tokens]
    h = replace(first.grid.h, free=_intersect([g.h.free for g in grids]))  # type: ignore[union-attr]
    w = replace(first.grid.w, free=_intersect([g.w.free for g in grids]))  # type: ignore[union-attr]
    return replace(first, grid=Grid(h, w))


def _tokens_matmul(a: Any, b: Any, label: str) -> Any:
    """``a @ b``: a sequence times a constant weight (a linear layer on its channels); queries
    times transposed keys (scores); scores times values (a sequence on the queries' tokens)."""
    if isinstance(a, _Tokens) and b is None:
        if a.token == a.rank - 1:
            return _Lost(f"{label} multiplies along the token axis")
        return a
    if isinstance(a, _Tokens) and isinstance(b, _Tokens):
        rank = a.rank
        if (b.rank, a.batch, a.token, b.token) == (rank, b.batch, rank - 2, rank - 1):
            return _Scores("attention scores", rows=a, cols=b, batch=a.batch, rank=rank)
        return _Lost(f"{label} multiplies two token sequences that are not queries and keys")
    if isinstance(a, _Scores) and isinstance(b, _Tokens) and a.rows is not None:
        rank = a.rank
        values = (b.rank, b.batch, b.token) == (rank, a.batch, rank - 2)
        if values and a.cols is not None and a.cols.same_cells(b):
            return _spread(a.rows.moved(a.batch, rank - 2, rank))
        return _Lost(f"{label} multiplies attention scores by another sequence than the keys'")
    return _Lost(_token_reason(label))


def _tokens_attention(q: Any, k: Any, v: Any, mask: Any, label: str) -> Any:
    """Scaled dot-product attention: a sequence on the queries' tokens, every token reading
    every key's."""
    if mask is not None:
        return _Lost(f"{label} takes an attention mask computed from the image")
    if not all(isinstance(t, _Tokens) for t in (q, k, v)):
        return _Lost(_token_reason(label))
    rank = q.rank
    if any((t.rank, t.batch, t.token) != (rank, q.batch, rank - 2) for t in (k, v)):
        return _Lost(f"{label} takes sequences whose tokens are not on the second-last axis")
    if not k.same_cells(v):
        return _Lost(f"{label} takes keys and values of different tokens")
    return _spread(q)


def _tokens_einsum(equation: str, operands: Sequence[Any], label: str) -> Any:
    """An einsum with a sequence among its operands, read as the matmuls it writes: a sequence
    times constants (a linear layer, a per-token scale) keeping its batch and token letters;
    queries and keys contracted over channels into scores whose last two letters are their
    tokens; scores and values contracted over the keys' tokens into the queries' sequence.
    Anything else (an ellipsis, a repeated letter, tokens contracted against a constant: a
    Mixer's token mixing) is lost."""
    states = [_first(s) for s in operands]
    eq = equation.replace(" ", "")
    unread = _Lost(f"{label} has an einsum equation the walk does not read ({equation})")
    if "->" not in eq or "." in eq:
        return unread
    terms, out = eq.split("->")[0].split(","), eq.split("->")[1]
    if len(terms) != len(states) or len(set(out)) != len(out):
        return unread
    if any(len(set(t)) != len(t) for t in terms):
        return unread
    for term, state in zip(terms, states, strict=True):
        if isinstance(state, (_Tokens, _Scores)) and len(term) != state.rank:
            return unread
        if state is not None and not isinstance(state, (_Tokens, _Scores)):
            return _Lost(f"{label} multiplies a token sequence by other image features")
    tokens = [(t, s) for t, s in zip(terms, states, strict=True) if isinstance(s, _Tokens)]
    scores = [(t, s) for t, s in zip(terms, states, strict=True) if isinstance(s, _Scores)]
    if len(tokens) == 1 and not scores:  # by constants
        ((term, seq),) = tokens
        batch, token = term[seq.batch], term[seq.token]
        constants = [t for t, s in zip(terms, states, strict=True) if s is None]
        if batch in out and token in out and not any(batch in t for t in constants):
            return seq.moved(out.index(batch), out.index(token), len(out))
        return _Lost(
            f"{label} contracts a sequence's tokens, or weighs its batch by a constant ({equation})"
        )
    if len(tokens) == 2 and not scores:  # queries and keys
        (ta, a), (tb, b) = tokens
        batch, rows, cols = ta[a.batch], ta[a.token], tb[b.token]
        paired = tb[b.batch] == batch and batch in out and out[-2:] == rows + cols
        if paired and rows != cols and rows not in tb and cols not in ta:
            return _Scores(
                "attention scores", rows=a, cols=b, batch=out.index(batch), rank=len(out)
            )
        return _Lost(f"{label} multiplies two sequences that are not queries and keys")
    if len(tokens) == 1 and len(scores) == 1 and states.index(scores[0][1]) == 0:
        (ts, sc), (tv, v) = scores[0], tokens[0]
        batch, rows, cols = ts[sc.batch], ts[-2], ts[-1]
        values = sc.cols is not None and sc.cols.same_cells(v) and tv[v.batch] == batch
        contracted = tv[v.token] == cols and cols not in out and batch in out and rows in out
        if values and contracted and sc.rows is not None:
            return _spread(sc.rows.moved(out.index(batch), out.index(rows), len(out)))
        return _Lost(f"{label} multiplies attention scores by another sequence than the keys'")
    return unread


def _tokens_select(state: _Tokens, dim: int, index: int, label: str) -> Any:
    """``x[:, i]``: a prefix token (the class token: flat features when the batch axis leads);
    an index on a channel axis (the query, key or value of a fused projection)."""
    dim %= state.rank
    if dim == state.token:
        if 0 <= index < state.prefix and state.batch == 0 and state.rank == 3:
            return _Flat(None, False, 2)
        return _Lost(f"{label} picks one token of a sequence")
    if dim == state.batch:
        return _Lost(f"{label} picks one image of the batch")
    shift = [a - (a > dim) for a in (state.batch, state.token)]
    return state.moved(shift[0], shift[1], state.rank - 1)


def _tokens_slice(state: _Tokens, dim: int, start: Any, end: Any, step: Any, label: str) -> Any:
    """``x[:, prefix:]`` (the cells alone); a slice of a channel axis, or a whole axis, keeps
    the sequence."""
    dim %= state.rank
    whole = (step or 1) == 1 and not start and (end is None or end >= 2**62)
    if dim not in (state.token, state.batch) or whole:
        return state
    grid = state.grid
    if dim == state.token and grid is not None and (step or 1) == 1 and not state.only_prefix:
        total = state.prefix + grid.h.n * grid.w.n
        stop = total if end is None else min(int(end), total) if end >= 0 else total + int(end)
        if int(start or 0) == state.prefix and stop == total:
            return replace(state, prefix=0)
        if not start and 0 < stop <= state.prefix:  # x[:, :1]: the class token, kept apart
            reason = f"{label} keeps the tokens in front of the patches alone (no patch grid)"
            return replace(state, reason=reason, grid=None, prefix=stop, only_prefix=True)
    return _Lost(f"{label} slices the {'token' if dim == state.token else 'batch'} axis")


def _tokens_reduce(state: _Tokens, dims: Any, keepdim: bool, label: str) -> Any:
    """A mean (max, sum ...) over the tokens: flat features (a pooled ViT); over channel axes
    only: the sequence."""
    axes = range(state.rank) if dims is None else [int(d) % state.rank for d in dims]
    if state.batch in axes:
        return _Lost(f"{label} reduces over the batch axis")
    if state.token in axes:
        rank = state.rank if keepdim else state.rank - len(set(axes))
        return _Flat(None, False, rank) if state.batch == 0 else _Lost(_token_reason(label))
    if keepdim:
        return state
    shift = [a - sum(1 for r in set(axes) if r < a) for a in (state.batch, state.token)]
    return state.moved(shift[0], shift[1], state.rank - len(set(axes)))


def _tokens_cat(states: Sequence[Any], sizes: Sequence[Any], dim: int, label: str) -> Any:
    """``cat([cls_token, x], 1)``: constant tokens in front of a sequence are prefix tokens;
    sequences of the same tokens side by side on a channel axis stay one."""
    tokens = [s for s in states if isinstance(s, _Tokens)]
    if not tokens or any(s is not None and not isinstance(s, _Tokens) for s in states):
        return _Lost(_token_reason(label))
    first = tokens[0]
    dim %= first.rank
    if dim == first.token:
        last = states[-1]
        # in front of the cells: constants (a class token, registers) and image tokens that
        # are not cells (the class token sliced off: DINOv2's cat(x[:, :1], registers, x[:, 1:]))
        front = [s for s in states[:-1] if s is not None]
        axes = (last.batch, last.token, last.rank) if isinstance(last, _Tokens) else None
        apart = all(s.only_prefix and (s.batch, s.token, s.rank) == axes for s in front)
        if not isinstance(last, _Tokens) or last.only_prefix or not apart or None in sizes:
            return _Lost(f"{label} concatenates image tokens along the token axis")
        return replace(last, prefix=last.prefix + sum(int(s) for s in sizes[:-1]))
    if dim == first.batch:
        return _Lost(f"{label} concatenates along the batch axis")
    return _tokens_combine(tokens, label, first.rank)


_TORCH_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze"}
_TORCH_ATTENTION = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
}


def _torch_rule(node: torch.fx.Node, inputs: tuple[str, ...]) -> _Rule:
    """The rule of an aten node (:func:`_torch_map_rule`); for the ops a vision transformer is
    made of, one that also takes token sequences (:func:`_torch_token_rule`)."""
    rule = _torch_map_rule(node, inputs)
    if not _carries_tensor(node) or not isinstance(node.target, torch._ops.OpOverload):
        return rule
    name = node.target._overloadpacket.__name__
    token_rule = _torch_token_rule(node, name, inputs)
    if token_rule is None:
        return rule
    source = _bind(node).get(node.target._schema.arguments[0].name)
    in_dims, out_dims = _dims_of(source), _dims_of(node)
    first = inputs.index(source.name) if isinstance(source, torch.fx.Node) else None

    def either(ins: list[Any]) -> Any:
        if any(isinstance(_first(s), (_Tokens, _Scores)) for s in ins):
            return token_rule(ins)
        out = rule(ins)
        if name in _TORCH_VIEWS and type(out) is _Lost and first is not None:
            return _map_to_tokens(_first(ins[first]), in_dims, out_dims) or out
        return out

    either.tokens = True  # type: ignore[attr-defined]
    return either


def _torch_token_rule(node: torch.fx.Node, name: str, inputs: tuple[str, ...]) -> _Rule | None:
    """The rule of an aten op on token sequences (see :class:`_Tokens`), or None for an op that
    never takes one."""
    label = _torch_label(node)
    bound = _bind(node)
    position = {n: i for i, n in enumerate(inputs)}
    source = bound.get(node.target._schema.arguments[0].name)  # type: ignore[union-attr]
    rank = len(_meta_shape(source) or ()) if isinstance(source, torch.fx.Node) else 0
    out_shape = _meta_shape(node)
    multi = isinstance(node.meta.get("val"), (tuple, list))

    def of(ins: list[Any], value: Any = source) -> Any:
        if isinstance(value, torch.fx.Node) and value.name in position:
            return _first(ins[position[value.name]])
        return None

    def wrap(state: Any, copies: int = 1) -> Any:
        if not multi:
            return state
        count = len(node.meta["val"])
        return (state, *([state] * (copies - 1)), *([None] * (count - copies)))

    def on_tokens(apply: Callable[[_Tokens], Any]) -> _Rule:
        """A rule for ops whose first argument must be a sequence (anything else: lost)."""

        def rule(ins: list[Any]) -> Any:
            state = of(ins)
            others = [
                s for n, s in zip(inputs, ins, strict=True) if n != getattr(source, "name", "")
            ]
            if not isinstance(state, _Tokens) or any(s is not None for s in others):
                return _Lost(_token_reason(label))
            return apply(state)

        return rule

    if name in _TORCH_VIEWS:
        in_dims, out_dims = _dims_of(source), _dims_of(node)
        return on_tokens(lambda s: _tokens_view(s, in_dims, out_dims, label))
    if name in ("permute", "transpose"):
        if name == "permute":
            dims = [int(d) % max(rank, 1) for d in bound["dims"]]
        else:
            dims = list(range(rank))
            a, b = int(bound["dim0"]) % max(rank, 1), int(bound["dim1"]) % max(rank, 1)
            dims[a], dims[b] = dims[b], dims[a]

        def permute(ins: list[Any]) -> Any:
            state = of(ins)
            if not isinstance(state, (_Tokens, _Scores)):
                return _Lost(_token_reason(label))
            return _tokens_permute(state, dims, label)

        return permute
    if name == "linear":
        weight = bound.get("weight")
        return lambda ins: (
            _tokens_matmul(of(ins), None, label)
            if of(ins, weight) is None and of(ins, bound.get("bias")) is None
            else _Lost(f"{label} multiplies two image-dependent tensors")
        )
    if name in ("matmul", "bmm"):
        other = bound.get("other", bound.get("mat2"))
        return lambda ins: _tokens_matmul(of(ins), of(ins, other), label)
    if name in ("layer_norm", "native_layer_norm", "rms_norm"):
        shape = bound.get("normalized_shape")
        local = shape is not None and len(shape) == 1
        # (the normalised last axis must be a channel axis, neither the tokens nor the batch)
        return on_tokens(
            lambda s: wrap(
                s if local and s.rank - 1 not in (s.token, s.batch) else _Lost(_token_reason(label))
            )
        )
    if name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        dim = int(bound["dim"]) % max(rank, 1)

        def softmax(ins: list[Any]) -> Any:
            state = of(ins)
            if isinstance(state, _Scores) and dim == state.rank - 1:
                return state
            if isinstance(state, _Tokens) and dim not in (state.token, state.batch):
                return state
            return _Lost(f"{label} normalises across tokens")

        return softmax
    if name in _TORCH_KEEP:
        return lambda ins: wrap(of(ins), 2 if name == "native_dropout" else 1)
    if name in _TORCH_ATTENTION:
        q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
        mask = bound.get("attn_mask", bound.get("attn_bias"))
        return lambda ins: wrap(
            _tokens_attention(of(ins, q), of(ins, k), of(ins, v), of(ins, mask), label)
        )
    if name == "select":
        dim, index = bound["dim"], bound["index"]
        if not isinstance(dim, int) or not isinstance(index, int):
            return None
        return on_tokens(lambda s: _tokens_select(s, dim, index, label))
    if name == "slice":
        dim, start, end, step = bound["dim"], bound["start"], bound["end"], bound["step"]
        if not all(v is None or isinstance(v, int) for v in (dim, start, end, step)):
            return None
        return on_tokens(lambda s: _tokens_slice(s, int(dim), start, end, step, label))
    if name in ("unbind", "split", "split_with_sizes", "chunk", "tensor_split"):
        dim = bound.get("dim", 0)
        if not isinstance(dim, int):
            return None
        pieces = len(node.meta["val"]) if multi else 1

        def split(s: _Tokens) -> Any:
            axis = dim % s.rank
            if axis in (s.batch, s.token):
                return _Lost(f"{label} splits the {'token' if axis == s.token else 'batch'} axis")
            if name != "unbind":
                return (s,) * pieces
            shift = [a - (a > axis) for a in (s.batch, s.token)]
            return (s.moved(shift[0], shift[1], s.rank - 1),) * pieces

        return on_tokens(split)
    if name in _TORCH_REDUCE:
        dims = bound.get("dim")
        dims = [dims] if isinstance(dims, int) else (list(dims) if dims else None)
        keepdim = bool(bound.get("keepdim") or False)
        return on_tokens(lambda s: _tokens_reduce(s, dims, keepdim, label))
    if name == "einsum":
        equation, operands = str(bound.get("equation", "")), list(bound.get("tensors") or ())
        return lambda ins: _tokens_einsum(equation, [of(ins, t) for t in operands], label)
    if name == "cat":
        tensors = list(bound["tensors"])
        dim = int(bound["dim"])
        shapes = [_meta_shape(t) for t in tensors]
        sizes = [s[dim] if s is not None and isinstance(s[dim], int) else None for s in shapes]
        return lambda ins: _tokens_cat([of(ins, t) for t in tensors], sizes, dim, label)
    if torch.Tag.pointwise in node.target.tags or name in _TORCH_POINTWISE:  # type: ignore[union-attr]
        out_rank = None if out_shape is None else len(out_shape)
        return lambda ins: _tokens_combine(ins, label, out_rank)
    return None


def _same_size(a: Any, b: Any) -> bool:
    """Whether two sizes from ``val`` metadata are equal: ints by value, symbolic sizes by
    expression (a size the export kept dynamic); an ONNX replay's dynamic batch size
    (:data:`_BATCH`) only to itself."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a is _BATCH or b is _BATCH:
        return a is b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        try:
            return bool(a.node.expr == b.node.expr)
        except Exception:  # an unusual symbolic size: not provably equal
            return False
    return False


def _torch_regroup_rank(
    name: str, bound: Mapping[str, Any], source: Any, node: torch.fx.Node
) -> int | None:
    """The output rank when a view-like op only splits, merges, inserts or removes channel axes
    of a NCHW(-like) tensor, else None.

    The test is on the sizes the export saw: the batch axis and the last two axes keep their
    sizes, and the output has rank >= 4. Then every element keeps its batch, H and W index
    (row-major order, and the sizes between them multiply to the same count). A view's target
    is frozen at the exported size anyway; ops that name axes (flatten, unflatten, squeeze,
    unsqueeze) must also name channel axes only, so that at another input size they still
    leave H and W alone (``squeeze()`` without axes depends on which sizes are 1: never).
    """
    src, out = _meta_shape(source), _meta_shape(node)
    if src is None or out is None or len(src) < 4 or len(out) < 4:
        return None
    if not all(_same_size(src[i], out[i]) for i in (0, -2, -1)):
        return None
    r, q = len(src), len(out)
    if name == "unsqueeze":
        axes, limit = [int(bound["dim"]) % q], q  # the new axis, in the output
    elif name == "squeeze":
        dims = bound.get("dim")
        if dims is None:
            return None
        axes, limit = [int(d) % r for d in ([dims] if isinstance(dims, int) else dims)], r
    elif name == "flatten":
        axes, limit = [int(bound["start_dim"]) % r, int(bound["end_dim"]) % r], r
    elif name == "unflatten":
        axes, limit = [int(bound["dim"]) % r], r
    else:
        axes, limit = [], r
    return q if all(1 <= a <= limit - 3 for a in axes) else None


def _torch_view_rule(
    node: torch.fx.Node,
    name: str,
    bound: Mapping[str, Any],
    state_of: Callable[..., Any],
    rank: int,
    label: str,
) -> _Rule:
    """view, reshape, _unsafe_view, flatten, unflatten, squeeze, unsqueeze: a regrouping of a
    NCHW(-like) map's channel axes keeps its grid (:func:`_torch_regroup_rank`); else as
    :func:`_reshape_state` (flatten: flat when it takes every axis after the batch one)."""
    source = bound.get(node.target._schema.arguments[0].name)  # type: ignore[union-attr]
    regroup = _torch_regroup_rank(name, bound, source, node)
    in_dims, out_dims = _dims_of(source), _dims_of(node)
    start = int(bound["start_dim"]) % max(rank, 1) if name == "flatten" else 0
    end = int(bound["end_dim"]) % max(rank, 1) if name == "flatten" else 0

    def view(ins: list[Any]) -> Any:
        state = state_of(ins)
        if isinstance(state, _Map) and state.layout == "NCHW" and regroup is not None:
            if state.rank != rank:
                return _Lost(
                    f"{label} sees a rank-{rank} tensor where the walk has rank {state.rank}"
                )
            return replace(state, rank=regroup)
        if name == "flatten":
            if isinstance(state, _Flat) or (start == 1 and end == rank - 1):
                return _Flat(None, False, rank - (end - start))
            return _Lost(f"{label} flattens axes {start}..{end} of a map")
        return _reshape_state(state, in_dims, out_dims, label)

    return view


def _adaptive_state(state: Any, sizes: Sequence[int | None], label: str) -> Any:
    """An adaptive pool to ``sizes`` cells: flat at 1x1. Its ``i``-th window spans cells
    ``floor(i n / m)`` to ``ceil((i + 1) n / m)``: a plain window ``k = s = n/m`` when ``m``
    divides ``n``, and a regular one of other ``k`` and ``s`` for some sizes that do not (8
    cells into 7: width 2, stride 1); else unknown (windows of uneven sizes or spacing)."""
    if isinstance(state, _Flat):
        return state
    if state.layout != "NCHW":
        return _Lost(f"{label} is applied to a {state.layout} map")
    if state.rank != 4:
        return _not_rank4(state, label)
    if list(sizes) == [1, 1]:
        return _Flat("NCHW", True)
    if state.grid is None:
        return state
    axes = []
    for g, m, axis in zip((state.grid.h, state.grid.w), sizes, _AXES, strict=True):
        if m is None or m == g.n:
            axes.append(g)
        else:
            window = _adaptive_window(g.n, m)
            if window is None:
                return _Map(
                    "NCHW",
                    None,
                    f"{label} pools {g.n} cells into {m} on the {axis} axis: uneven windows",
                )
            k, s = window
            axes.append(_window_axis(g, k, s, 1, 0, 0, False, "NOTSET", label, axis))
    return _Map("NCHW", Grid(axes[0], axes[1]))


def _adaptive_window(n: int, m: int) -> tuple[int, int] | None:
    """``(kernel, stride)`` when adaptive pooling of ``n`` cells into ``m`` has windows of one
    size at one spacing (PyTorch's bounds: ``floor(i n / m)`` to ``ceil((i + 1) n / m)``)."""
    if n < m:  # (cells repeated, not pooled: several windows start at one cell)
        return None
    starts = [i * n // m for i in range(m)]
    ends = [-(-(i + 1) * n // m) for i in range(m)]
    sizes = {e - b for b, e in zip(starts, ends, strict=True)}
    steps = {b - a for a, b in itertools.pairwise(starts)} or {1}
    if len(sizes) != 1 or len(steps) != 1:
        return None
    return sizes.pop(), steps.pop()


def _torch_conv_rule(
    node: torch.fx.Node,
    name: str,
    bound: dict[str, Any],
    state_of: Callable[..., Any],
    label: str,
) -> _Rule:
    weight = _meta_shape(bound["weight"])
    if weight is None or len(weight) != 4:
        return _unsupported(f"{label} is not a 2-D convolution")
    kernel = [int(weight[2]), int(weight[3])]
    transposed = name == "conv_transpose2d" or bool(bound.get("transposed"))
    strides = _ints2(bound["stride"], 1)
    dilation = _ints2(bound["dilation"], 1)
    padding = bound["padding"]
    auto_pad = "NOTSET"
    if isinstance(padding, str):
        # padding='same' puts the odd pad at the end, as SAME_UPPER does (stride 1 only).
        auto_pad = {"same": "SAME_UPPER", "valid": "VALID"}.get(padding, "")
        pads = [0, 0]
        if not auto_pad:
            return _unsupported(f"{label} has padding '{padding}'")
    else:
        pads = _ints2(padding, 0)
    if None in (strides, dilation, pads):
        return _unsupported(f"{label} has arguments that are not constant")
    window = _Window.of(label, kernel, strides, dilation, pads, auto_pad=auto_pad)
    if transposed:
        output_padding = _ints2(bound.get("output_padding"), 0)
        if output_padding is None or auto_pad != "NOTSET":
            return _unsupported(f"{label} has arguments that are not understood")
        window = replace(
            window, transposed=True, output_padding=(output_padding[0], output_padding[1])
        )
    return lambda ins: _window_state(state_of(ins), window)


def _torch_upsample_rule(
    node: torch.fx.Node,
    name: str,
    bound: dict[str, Any],
    state_of: Callable[..., Any],
    label: str,
) -> _Rule:
    mode, coordinates, rounding = _TORCH_UPSAMPLE[name]
    if coordinates is None:
        coordinates = "align_corners" if bound.get("align_corners") else "half_pixel"
    output_size = bound.get("output_size")
    factors = bound.get("scale_factors")
    if factors is None and None not in (bound.get("scales_h"), bound.get("scales_w")):
        factors = [bound["scales_h"], bound["scales_w"]]
    sizes = None if output_size is None else list(output_size)
    scales = None if factors is None else [float(f) for f in factors]
    if sizes is not None and not all(isinstance(s, int) for s in sizes):
        return _unsupported(f"{label} has an output size that is not constant")
    if (sizes is not None and len(sizes) != 2) or (scales is not None and len(scales) != 2):
        return _unsupported(f"{label} is not a 2-D resize")
    if sizes is None and scales is None:
        return _unsupported(f"{label} has neither an output size nor scale factors")

    def rule(ins: list[Any]) -> Any:
        state = state_of(ins)
        if isinstance(state, _Map) and state.layout != "NCHW":
            return _Lost(f"{label} is applied to a {state.layout} map")
        if coordinates == "align_corners":
            # align_corners ignores the scale factor: cell j at j*(n-1)/(n_out-1).
            return _resize_state(
                state,
                tuple(sizes) if sizes else _scaled_sizes(state, scales),
                None,
                mode,
                coordinates,
                rounding,
                label,
            )
        # A given scale factor is used as is (torch's recompute_scale_factor=False);
        # without one the ratio is n_out / n.
        return _resize_state(
            state,
            tuple(sizes) if sizes else None,
            tuple(scales) if scales else None,
            mode,
            coordinates,
            rounding,
            label,
        )

    return rule


def _scaled_sizes(state: Any, scales: Sequence[float] | None) -> tuple[int, int] | None:
    if not isinstance(state, _Map) or state.grid is None or scales is None:
        return None
    return (math.floor(state.grid.h.n * scales[0]), math.floor(state.grid.w.n * scales[1]))


@contextmanager
def _quiet_export_logs() -> Iterator[None]:
    """torch logs a full traceback (fake-tensor and export internals) before raising, and
    prints the partial graph's code to stderr (a data-dependent branch); the exception says
    the same, and its first line reaches the user as the reason."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stderr(_MutedForThisThread(sys.stderr)):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _MutedForThisThread:
    """``sys.stderr`` while an export runs: the exporting thread's writes are dropped, other
    threads' (a progress bar's refresh) still reach the stream, which a plain redirect would
    swallow, leaving a live display's cursor moves out of step with what the terminal shows."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._muted = threading.get_ident()

    def write(self, text: str) -> int:
        if threading.get_ident() == self._muted:
            return len(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_EXPORT_LOGGERS = (
    "torch.export",
    "torch._export",
    "torch._subclasses.fake_tensor",
    "torch._dynamo",
    # (A data-dependent branch: "Unable to find user code", then the whole graph's code.)
    "torch.fx.experimental.symbolic_shapes",
)


def export_grid_graph(
    module: torch.nn.Module, example: torch.Tensor, layout: str = "NCHW"
) -> tuple[GridGraph | None, str | None]:
    """``torch.export.export(module, (example,), strict=False)``, then :func:`torch_grid_graph`;
    ``(None, reason)`` when the export (or the walk) fails.

    Arguments the module computes from the input size in Python (``x.shape[-1] // 2``) are
    frozen at ``example``'s size in the exported graph: replaying other sizes assumes they do not
    change.
    """
    try:
        with torch.no_grad(), _quiet_export_logs():
            program = torch.export.export(module, (example,), strict=False)
    except Exception as exc:
        return None, f"torch.export failed ({type(exc).__name__}: {cause_line(exc, 200)})"
    try:
        return torch_grid_graph(program, layout, aliases=_module_aliases(module)), None
    except Exception as exc:
        return None, f"the exported graph could not be walked ({type(exc).__name__}: {exc})"

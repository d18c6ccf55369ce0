"""Lie derivatives: infinitesimal equivariance of a model's outputs, and each layer's share of it.

For a one-parameter family of transforms ``T_t`` (``T_0`` the identity) the Lie derivative of a
model at an image is ``d/dt f(T_t x)`` at ``t = 0``: how fast the output moves under an
infinitesimal rotation or translation (Gruver et al. 2023, "The Lie Derivative for Measuring
Learned Equivariance"). It is a local, per-image number with units, next to the finite-angle
scores of the rest of the audit.

Generators (``GENERATORS``):

* ``rotation``: counter-clockwise, in radians, about the true image centre
  ``((H - 1) / 2, (W - 1) / 2)``: the same sense and interpolant as
  :func:`eqaudit.transforms.elements.rotate` (cubic convolution, zero fill). Units: per radian.
* ``translate_x`` / ``translate_y``: content moves right / down by ``t`` pixels, as
  :class:`~eqaudit.transforms.elements.Shift`; a fractional shift there is the band-limited
  circular :func:`~eqaudit.transforms.elements.fourier_shift`. Units: per pixel.

``T_t x`` is the *unclamped* transform of the pixel-space image (``apply_image`` also clamps to
[0, 1], which has no derivative at black or white pixels).

Image tangent ``v = d/dt T_t x`` at ``t = 0``, the derivative of the interpolant the finite
transforms use, so that ``(T_h x - T_-h x) / 2h -> v`` as ``h -> 0``:

* rotation: ``v = -(y - cy) d_x x + (x - cx) d_y x`` where ``d`` is the slope of the cubic
  interpolant of ``rotate`` (Keys cubic convolution, ``a = -0.5``, Catmull-Rom) at the pixel
  centres: ``d f[n] = (f[n + 1] - f[n - 1]) / 2``, the central difference, with zeros outside the
  image (zero fill). The kernel reproduces quadratics, so a ramp ``x(i, j) = j`` has the exact
  continuous tangent ``-(i - cy)`` away from the border. (torch's bicubic ``grid_sample``, ``a =
  -0.75``, would give 1.5 times that: the reason eqaudit resamples with its own kernel.)
* translations: ``v = -D x`` with ``D`` the band-limited (Fourier) derivative along the axis,
  ``D = F^-1 diag(2 pi i f) F`` with the Nyquist bin of an even axis set to zero (``fourier_shift``
  keeps only the real part, ``cos(pi t)``, of its phase, whose slope at 0 is 0). Circular: content
  leaving one edge enters at the other, as for the fractional ``Shift``.

Both ``d`` (with zero fill) and ``D`` are antisymmetric matrices, so the generator ``X`` of each
family is antisymmetric: ``||x||^2`` is exactly invariant under all three (a known-answer oracle).

Transforms act in pixel space *before* normalisation: the model input is
``preprocessing.normalise(T_t x)``, affine per channel, so the input tangent is its linear part
(channel reorder, ``* scale / std``) applied to ``v``.

Output Lie derivative, per image, with ``z`` the scores and ``z' = d/dt z(T_t x)``:

* logits: ``L = ||c(z')|| / ||c(z)||``, ``c`` = subtract the mean over classes; the normalised
  logit error of the audit at a small ``t`` is then ``~ |t| L``;
* probabilities: ``L = ||z'||``.

Per-layer attribution (PyTorch modules only; forward hooks). For a layer with input ``u``, output
``h_l = f_l(u)`` and the generator ``X`` acting on each map's own grid, the layer's own Lie
derivative is ``e_l = J_l(u) X_in u - X_out h_l`` and its contribution to the output derivative is
``c_l = J_{>l} e_l``. Each is one forward-mode pass: the image gets no tangent, layer ``l``'s input
gets ``X_in u`` (pre-hook) and its output's tangent has ``X_out h_l`` subtracted (forward hook).
For a chain ``f = f_n . ... . f_1`` whose every link is audited the contributions telescope:
``sum_l c_l = z'``. A layer's value is the same normalised norm as the output's, applied to
``c_l``. ``X`` on a map of grid ``(stride_h, stride_w, offset_h, offset_w)`` (cell ``(i, j)``
centred at input pixel ``(offset_h + stride_h i, offset_w + stride_w j)``) is the same motion in
cell units: a rotation about the true image centre expressed in cell coordinates (cubic slope,
zero outside), a translation of 1 px = ``1 / stride`` cells (Fourier); ``X = 0`` on flat features
and 1 x 1 maps. A layer fed directly by the model input uses the input tangent itself, so the
zero fill is counted in pixel space. The input's grid is the model input's, or the output grid of
the audited layer that produced that very tensor, or follows from the output grid for convolutions
and pooling (and pointwise modules); otherwise the layer is skipped with a reason. A map the
model holds channels-last, ``(B, H, W, C)`` (a ConvNeXt block's between its permutes:
:meth:`~eqaudit.models.base.ModelAdapter.channels_last`), gets ``X`` on its axes 1 and 2; there
a ``Linear`` or a ``LayerNorm`` over the channels keeps its input's grid too.

Methods: forward-mode AD (``torch.autograd.forward_ad``) for PyTorch modules; central differences
``D(h) = (f(T_h x) - f(T_-h x)) / 2h`` through the adapter's ``run`` for other backends (ONNX,
TorchScript) and as the fallback when an op has no forward-mode formula. The default step moves
the farthest pixel by ``DEFAULT_DISPLACEMENT_PX`` = 0.05 px (rotation ``h = 0.05 / r_max`` rad,
``r_max`` the half diagonal). Translations: the truncation error is ``(h w)^2 / 6`` relative for
content of angular frequency ``w`` (0.4% at the Nyquist frequency ``pi``), while float32 round-off
in the scores, ``~1e-6 ||c(z)|| / (2 h ||c(z')||)``, grows below that step. Rotation: the cubic
kernel is only C1 at the nodes, where every pixel sits at ``t = 0``, so ``D(h)`` errs by ``O(h)``;
it is extrapolated, ``2 D(h) - D(2h)`` (Richardson), which cancels that term.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from eqaudit.data.preprocess import Preprocessing, channel_constant
from eqaudit.errors import cause_line
from eqaudit.metrics.accumulators import _Mergeable
from eqaudit.metrics.exact import ExactSum, exact_mean
from eqaudit.metrics.functional import EPS, two_classes
from eqaudit.models.base import ModelAdapter
from eqaudit.transforms.elements import CUBIC_A, fourier_shift, rotate

__all__ = [
    "DEFAULT_DISPLACEMENT_PX",
    "GENERATORS",
    "UNITS",
    "LieAccumulator",
    "LieBatch",
    "LieStats",
    "default_steps",
    "feature_tangent",
    "image_tangent",
    "lie_batch",
    "normalised_derivative",
    "transform_pixels",
]

GENERATORS: tuple[str, ...] = ("rotation", "translate_x", "translate_y")
#: The unit of ``t`` per generator: values are "per radian" and "per pixel".
UNITS: dict[str, str] = {"rotation": "rad", "translate_x": "px", "translate_y": "px"}
#: Largest pixel displacement of a default central-difference step (see the module docstring).
DEFAULT_DISPLACEMENT_PX = 0.05
#: ``(stride_h, stride_w, offset_h, offset_w)`` of a feature map's cells in input pixels.
Grid = tuple[float, float, float, float]
IMAGE_GRID: Grid = (1.0, 1.0, 0.0, 0.0)
AD_METHOD = "forward-mode AD"


# -- tangents -------------------------------------------------------------------------------------
def _check_generator(generator: str) -> None:
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator '{generator}': choose one of {', '.join(GENERATORS)}")


def as_grid(grid: Any) -> Grid | None:
    """``(stride_h, stride_w, offset_h, offset_w)`` from a tuple or an ``eqaudit.grids.Grid``-like
    object (``grid.h.stride``, ``grid.h.offset``, ...); None stays None."""
    if grid is None:
        return None
    if hasattr(grid, "h") and hasattr(grid, "w"):
        return (
            float(grid.h.stride),
            float(grid.w.stride),
            float(grid.h.offset),
            float(grid.w.offset),
        )
    stride_h, stride_w, offset_h, offset_w = (float(v) for v in grid)
    return (stride_h, stride_w, offset_h, offset_w)


def _pad_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """One zero on each side of axis ``dim`` (-1 or -2)."""
    return F.pad(x, (1, 1) if dim == -1 else (0, 0, 1, 1))


def cubic_slope(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Slope of :func:`rotate`'s cubic interpolant (zero fill) at the nodes along ``dim`` (-1 or
    -2): ``-a (f[n + 1] - f[n - 1])`` with Keys' ``a`` (``-0.5``: the central difference)."""
    padded = _pad_axis(x, dim)
    n = x.shape[dim]
    ahead = padded.narrow(dim, 2, n)
    behind = padded.narrow(dim, 0, n)
    return -CUBIC_A * (ahead - behind)


def fourier_derivative(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Band-limited (circular) derivative along ``dim``, per cell, computed in float64: the
    derivative of :func:`fourier_shift`'s interpolant, Nyquist bin of an even axis zeroed."""
    n = x.shape[dim]
    spectrum = torch.fft.rfft(x.to(torch.float64), dim=dim)
    freq = torch.fft.rfftfreq(n, dtype=torch.float64, device=x.device)
    if n % 2 == 0:
        freq[-1] = 0.0  # fourier_shift keeps cos(pi t) there: slope 0 at t = 0
    factor = 2j * math.pi * freq
    shape = [1] * spectrum.ndim
    shape[dim] = -1
    return torch.fft.irfft(spectrum * factor.view(shape), n=n, dim=dim).to(x.dtype)


def feature_tangent(
    fmap: torch.Tensor,
    generator: str,
    grid: Grid | Any,
    input_size: tuple[int, int],
    channels_last: bool = False,
) -> torch.Tensor:
    """``X h``: the generator acting on a feature map's own grid, same shape as ``fmap``.

    ``fmap`` is ``(B, C, n_h, n_w)``, or ``(B, n_h, n_w, C)`` with ``channels_last`` (flat
    ``(B, D)`` features and ``1 x 1`` maps give zeros);
    ``grid`` is ``(stride_h, stride_w, offset_h, offset_w)`` (or a Grid-like object): cell
    ``(i, j)`` sits at input pixel ``(offset_h + stride_h i, offset_w + stride_w j)``;
    ``input_size`` is the model's ``(H, W)``, whose true centre the rotation turns about.

    * rotation: ``-((y_i - cy) / s_w) d_j h + ((x_j - cx) / s_h) d_i h`` with ``d`` the cubic
      slope per cell (zero outside the map);
    * translate_x / translate_y: ``-(1 / s) D h`` with ``D`` the Fourier derivative per cell.
    """
    _check_generator(generator)
    if channels_last and fmap.ndim == 4:
        moved = feature_tangent(fmap.permute(0, 3, 1, 2), generator, grid, input_size)
        return moved.permute(0, 2, 3, 1)
    if fmap.ndim != 4 or fmap.shape[-2:] == (1, 1):
        return torch.zeros_like(fmap)
    stride_h, stride_w, offset_h, offset_w = as_grid(grid)  # type: ignore[misc]
    if generator == "translate_x":
        return -fourier_derivative(fmap, -1) / stride_w
    if generator == "translate_y":
        return -fourier_derivative(fmap, -2) / stride_h
    n_h, n_w = fmap.shape[-2:]
    height, width = input_size
    y = offset_h + stride_h * torch.arange(n_h, dtype=torch.float64, device=fmap.device)
    y = y - (height - 1) / 2
    x = offset_w + stride_w * torch.arange(n_w, dtype=torch.float64, device=fmap.device)
    x = x - (width - 1) / 2
    coeff_j = (-y / stride_w).to(fmap.dtype)[:, None]
    coeff_i = (x / stride_h).to(fmap.dtype)[None, :]
    return coeff_j * cubic_slope(fmap, -1) + coeff_i * cubic_slope(fmap, -2)


def image_tangent(pixels: torch.Tensor, generator: str) -> torch.Tensor:
    """``v = d/dt T_t x`` at ``t = 0`` for a pixel-space batch ``(B, C, H, W)`` (same shape).

    Convention: see the module docstring (rotation counter-clockwise about
    ``((H - 1) / 2, (W - 1) / 2)`` with the cubic slope; translations move content right/down
    with the Fourier derivative).
    """
    return feature_tangent(pixels, generator, IMAGE_GRID, tuple(pixels.shape[-2:]))


def transform_pixels(pixels: torch.Tensor, generator: str, t: float) -> torch.Tensor:
    """``T_t x`` (unclamped): ``rotate`` by ``t`` radians or ``fourier_shift`` by ``t`` pixels."""
    _check_generator(generator)
    if generator == "rotation":
        return rotate(pixels, math.degrees(t))
    if generator == "translate_x":
        return fourier_shift(pixels, 0.0, t)
    return fourier_shift(pixels, t, 0.0)


def input_tangent(preprocessing: Preprocessing, tangent: torch.Tensor) -> torch.Tensor:
    """The linear part of ``preprocessing.normalise`` applied to a pixel-space tangent (the mean
    is a constant: it has no tangent)."""
    v = tangent.to(torch.float32)
    if preprocessing.channels == "bgr":
        v = v.flip(1)
    return v * preprocessing.scale / channel_constant(preprocessing.std, v.device)


def default_steps(input_size: tuple[int, int]) -> dict[str, float]:
    """Central-difference steps that move the farthest pixel by ``DEFAULT_DISPLACEMENT_PX``."""
    height, width = input_size
    radius = max(math.hypot((height - 1) / 2, (width - 1) / 2), 1.0)
    return {
        "rotation": DEFAULT_DISPLACEMENT_PX / radius,
        "translate_x": DEFAULT_DISPLACEMENT_PX,
        "translate_y": DEFAULT_DISPLACEMENT_PX,
    }


def normalised_derivative(scores: torch.Tensor, tangent: torch.Tensor, kind: str) -> torch.Tensor:
    """Per image, float64: ``||c(z')|| / ||c(z)||`` for logits, ``||z'||`` for probabilities.
    One score per image (a binary classifier) is read as two classes, as the audit reads it:
    a logit ``z`` as ``[0, z]``, a probability ``p`` as ``[1 - p, p]``."""
    z = scores.to("cpu", torch.float64)
    dz = tangent.to("cpu", torch.float64)
    if z.shape[1] == 1:
        z, dz = two_classes(z, kind), two_classes(dz, kind, derivative=True)
    if kind == "probs":
        return dz.norm(dim=1)
    z = z - z.mean(dim=1, keepdim=True)
    dz = dz - dz.mean(dim=1, keepdim=True)
    return dz.norm(dim=1) / z.norm(dim=1).clamp_min(EPS)


# -- accumulators ---------------------------------------------------------------------------------
_BINS_PER_DECADE = 50
_LOW_EXP, _HIGH_EXP = -12, 6
#: Upper bin edges of :class:`LieStats`' histogram; bin 0 holds values below 1e-12 (read as 0).
LIE_HIST_EDGES = np.logspace(_LOW_EXP, _HIGH_EXP, (_HIGH_EXP - _LOW_EXP) * _BINS_PER_DECADE + 1)


@dataclass
class LieStats(_Mergeable):
    """Mergeable summary of per-image Lie derivatives: count, exact sum and sum of squares,
    maximum and a log-spaced histogram (50 bins per decade, 1e-12 to 1e6) for the 95th
    percentile, read as its bin's upper edge (at most 4.7% above the order statistic, never
    above the maximum). Sums are exact, so ``merge(a, b).compute() == whole.compute()``.
    ``nonfinite`` counts the NaN or Inf values left out (a layer whose maps are not finite)."""

    _max_fields = ("maximum",)
    _added_fields = ("nonfinite",)

    n: int = 0
    total: ExactSum = field(default_factory=ExactSum)
    total_sq: ExactSum = field(default_factory=ExactSum)
    maximum: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(LIE_HIST_EDGES), dtype=np.int64))
    nonfinite: int = 0

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().to(torch.float64).cpu().numpy().reshape(-1)
        finite = np.isfinite(v)
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            v = v[finite]
        if v.size == 0:
            return
        self.n += int(v.size)
        self.total.add(v)
        self.total_sq.add(v * v)
        self.maximum = max(self.maximum, float(v.max()))
        index = np.minimum(np.searchsorted(LIE_HIST_EDGES, v, side="left"), len(self.hist) - 1)
        self.hist = self.hist + np.bincount(index, minlength=len(self.hist))

    def quantile(self, q: float) -> float:
        if self.n == 0:
            return math.nan
        rank = math.ceil(q * self.n)  # nearest-rank definition
        index = int(np.searchsorted(np.cumsum(self.hist), rank, side="left"))
        return 0.0 if index == 0 else min(float(LIE_HIST_EDGES[index]), self.maximum)

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            nan = math.nan
            return {"n": 0, "mean": nan, "std": nan, "p95": nan, "max": nan}
        mean = exact_mean(self.total, self.n)
        var = max(exact_mean(self.total_sq, self.n) - mean * mean, 0.0)
        return {
            "n": self.n,
            "mean": mean,
            "std": math.sqrt(var),
            "p95": self.quantile(0.95),
            "max": self.maximum,
        }


@dataclass
class LieBatch:
    """Lie derivatives of one batch.

    ``tangents[g]`` is ``d/dt z`` ``(B, K)`` and ``output[g]`` the normalised value ``(B,)`` per
    generator; ``contributions[g][layer]`` / ``layers[g][layer]`` the same for each audited layer's
    contribution ``c_l`` (PyTorch only); ``skipped`` says why a requested layer has none.
    ``method`` is ``"forward-mode AD"`` or ``"central differences, step ..."``; ``steps`` holds the
    steps used (empty for AD).
    """

    kind: str
    method: str
    generators: tuple[str, ...]
    scores: torch.Tensor
    tangents: dict[str, torch.Tensor]
    output: dict[str, torch.Tensor]
    contributions: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)


@dataclass
class LieAccumulator:
    """Per generator and per (layer, generator) :class:`LieStats` over the whole image set."""

    method: str = ""
    output: dict[str, LieStats] = field(default_factory=dict)
    layers: dict[str, dict[str, LieStats]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def update(self, batch: LieBatch) -> None:
        self.method = self.method or batch.method
        for generator, values in batch.output.items():
            self.output.setdefault(generator, LieStats()).update(values)
        for generator, per_layer in batch.layers.items():
            for layer, values in per_layer.items():
                self.layers.setdefault(layer, {}).setdefault(generator, LieStats()).update(values)
        for layer, reason in batch.skipped.items():
            self.skipped.setdefault(layer, reason)

    def merge(self, other: LieAccumulator) -> LieAccumulator:
        def join(a: dict[str, LieStats], b: dict[str, LieStats]) -> dict[str, LieStats]:
            return {k: a[k].merge(b[k]) if k in a and k in b else a.get(k) or b[k] for k in a | b}

        layers = {
            name: join(self.layers.get(name, {}), other.layers.get(name, {}))
            for name in self.layers | other.layers
        }
        return LieAccumulator(
            method=self.method or other.method,
            output=join(self.output, other.output),
            layers=layers,
            skipped={**other.skipped, **self.skipped},
        )

    def output_rows(self) -> list[dict]:
        """One row per generator: ``generator, unit, n, mean, std, p95, max, method``."""
        return [
            {"generator": g, "unit": f"per {_UNIT_WORD[g]}", **s.compute(), "method": self.method}
            for g, s in self.output.items()
        ]

    def layer_rows(self) -> list[dict]:
        """One row per (layer, generator), execution order, for layers.csv and the bar chart:
        ``layer, generator, unit, n, mean, std, p95, max``; skipped layers carry ``reason``."""
        rows = []
        for layer, per_generator in self.layers.items():
            for g, s in per_generator.items():
                rows.append(
                    {
                        "layer": layer,
                        "generator": g,
                        "unit": f"per {_UNIT_WORD[g]}",
                        **s.compute(),
                        "reason": None,
                    }
                )
        for layer, reason in self.skipped.items():
            if layer not in self.layers:
                rows.append(
                    {
                        "layer": layer,
                        "generator": None,
                        "unit": None,
                        "n": 0,
                        "mean": math.nan,
                        "std": math.nan,
                        "p95": math.nan,
                        "max": math.nan,
                        "reason": reason,
                    }
                )
        return rows


_UNIT_WORD = {"rotation": "radian", "translate_x": "pixel", "translate_y": "pixel"}


# -- running the model ----------------------------------------------------------------------------
def _torch_module(adapter: ModelAdapter) -> nn.Module | None:
    """The adapter's module when it can be differentiated and hooked (not TorchScript)."""
    module = getattr(adapter, "module", None)
    if not isinstance(module, nn.Module) or isinstance(module, torch.jit.ScriptModule):
        return None
    return module


def _score_tensor(output: Any, pick: str | None = None) -> torch.Tensor:
    """Class scores ``(B, K)`` from a module output, picked as the adapter picks them
    (``--output-name``), keeping forward-mode tangents (the adapter's own extraction
    detaches)."""
    from eqaudit.models.torch_adapter import pick_scores

    value = pick_scores(output, pick)
    if value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value.flatten(1)
    if value.ndim == 1:
        value = value[None]
    return value


def _to_model(adapter: ModelAdapter, x: torch.Tensor) -> torch.Tensor:
    """Canonical ``(B, C, H, W)`` -> the module's own layout and dtype."""
    if adapter.input_spec.layout == "NHWC":
        x = x.permute(0, 2, 3, 1)
    device = getattr(adapter, "device", None) or "cpu"
    return x.contiguous().to(device=device, dtype=getattr(adapter, "_input_dtype", torch.float32))


def _chunked(
    adapter: ModelAdapter, tensors: Sequence[torch.Tensor], fn: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``fn(*chunks)`` over the adapter's batch chunks (a fixed batch size is padded), joined."""
    parts = []
    split = [adapter._chunks(t) for t in tensors]
    for pieces in zip(*split, strict=True):
        keep = pieces[0][1]
        parts.append(fn(*(p[0] for p in pieces))[:keep])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@contextmanager
def _call_hooks(
    adapter: ModelAdapter,
    paths: set[str],
    pre: Callable[[str, int, tuple], tuple | None] | None = None,
    post: Callable[[str, int, tuple, Any], Any] | None = None,
) -> Iterator[None]:
    """Pre- and forward hooks on the modules at ``paths`` calling ``pre(path, call, args)`` and
    ``post(path, call, args, output)`` (a non-None return replaces the args / output). Calls are
    counted per path as the adapter counts them (``name:1`` is the second call)."""
    candidates = getattr(adapter, "_candidates", {})
    counter: dict[str, int] = {}
    stack: dict[str, list[int]] = {}
    handles = []

    def make(path: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        def pre_hook(_module: nn.Module, args: tuple) -> tuple | None:
            index = counter.get(path, 0)
            counter[path] = index + 1
            stack.setdefault(path, []).append(index)
            return pre(path, index, args) if pre is not None else None

        def post_hook(_module: nn.Module, args: tuple, output: Any) -> Any:
            index = stack[path].pop()
            return post(path, index, args, output) if post is not None else None

        return pre_hook, post_hook

    try:
        for path in paths:
            pre_hook, post_hook = make(path)
            for sub in candidates[path][0]:
                handles.append(sub.register_forward_pre_hook(pre_hook))
                handles.append(sub.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replace_first_tensor(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return tensor
    items = list(output)
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            items[i] = tensor
            break
    return type(output)(items) if isinstance(output, tuple) else items


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _is_flat(t: torch.Tensor, channels_last: bool = False) -> bool:
    return t.ndim == 2 or (t.ndim == 4 and _cells(t, channels_last) == (1, 1))


def _cells(t: torch.Tensor, channels_last: bool) -> tuple[int, ...]:
    """A rank-4 map's spatial size ``(n_h, n_w)`` in its layout."""
    return tuple(t.shape[1:3] if channels_last else t.shape[-2:])


# -- which grid a layer's input lives on ----------------------------------------------------------
#: Modules whose output lies on their input's grid, in the same layout (either).
_POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Identity, nn.Dropout,
)  # fmt: skip
#: The same for channels-first maps only (their channel axis is 1).
_CHANNELS_FIRST_SAME_GRID = (nn.Dropout2d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return (int(value[0]), int(value[1]))
    return None


def _input_grid_from_module(
    module: nn.Module, out_grid: Grid, same_size: bool, channels_last: bool = False
) -> Grid | None:
    """The input grid that a conv / pool / pointwise module maps onto ``out_grid``: output cell
    ``i`` reads input cells centred at ``stride i - pad + dilation (k - 1) / 2``. With
    ``channels_last`` (the output is ``(B, H, W, C)``, and the input then too), only modules
    that act on the last axis keep the grid: pointwise ones, a ``Linear`` and a ``LayerNorm``
    over the channels (a ConvNeXt block's)."""
    if channels_last:
        over_channels = isinstance(module, nn.Linear) or (
            isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
        )
        keeps = isinstance(module, _POINTWISE) or over_channels
        return out_grid if keeps and same_size else None
    if isinstance(module, (*_POINTWISE, *_CHANNELS_FIRST_SAME_GRID)):
        return out_grid if same_size else None
    if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return None
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    dilation = _pair(getattr(module, "dilation", 1))
    padding: Any = module.padding
    if padding == "valid":
        padding = 0
    if padding == "same" and kernel and dilation:
        if any((d * (k - 1)) % 2 for k, d in zip(kernel, dilation, strict=True)):
            return None  # torch pads an even 'same' kernel asymmetrically
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    padding = _pair(padding)
    if getattr(module, "ceil_mode", False) or None in (kernel, stride, dilation, padding):
        return None
    grid = []
    for axis in range(2):
        s_out, o_out = out_grid[axis], out_grid[2 + axis]
        s_in = s_out / stride[axis]
        centre = dilation[axis] * (kernel[axis] - 1) / 2 - padding[axis]
        grid.append((s_in, o_out - s_in * centre))
    return (grid[0][0], grid[1][0], grid[0][1], grid[1][1])


@dataclass(frozen=True)
class _Plan:
    """How one layer's contribution is computed: which call, which argument, which grids."""

    name: str
    path: str
    call: int
    arg: int  # position of the single tensor argument
    source: str  # "image", "flat" or "grid"
    input_grid: Grid | None
    output_grid: Grid | None  # None: flat output
    #: maps held (B, H, W, C), as a ConvNeXt block's between its permutes
    input_channels_last: bool = False
    output_channels_last: bool = False


def _plan_layers(
    adapter: ModelAdapter,
    x: torch.Tensor,
    layers: Sequence[tuple[str, Any]],
) -> tuple[list[_Plan], dict[str, str]]:
    """One plain forward with hooks on the requested layers: learn each layer's single tensor
    input, whether it is the model input or another audited layer's output, and its grids."""
    from eqaudit.models.torch_adapter import _split_call_name

    candidates = getattr(adapter, "_candidates", {})
    grids = {name: as_grid(grid) for name, grid in layers}
    wanted: dict[tuple[str, int], str] = {}
    skipped: dict[str, str] = {}
    for name in grids:
        path, call = _split_call_name(name, candidates)
        if path not in candidates:
            skipped[name] = "not a hookable module of this model"
        else:
            wanted[(path, call)] = name
    seen: dict[str, dict[str, Any]] = {}
    keep_alive: list[Any] = []
    produced: dict[int, str] = {}

    def pre(path: str, call: int, args: tuple) -> None:
        name = wanted.get((path, call))
        if name is not None:
            keep_alive.append(args)
            tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            # Which audited layer produced the (first) tensor input: the latest one, since an
            # in-place op returns its own input.
            producer = produced.get(id(args[tensors[0]])) if tensors else None
            seen[name] = {"args": args, "tensor_args": tensors, "producer": producer}

    def post(path: str, call: int, args: tuple, output: Any) -> None:
        name = wanted.get((path, call))
        if name is not None:
            keep_alive.append(output)
            seen[name]["output"] = _first_tensor(output)
            seen[name]["module"] = candidates[path][0][0]
            tensor = seen[name]["output"]
            if tensor is not None:
                produced[id(tensor)] = name

    model_input = _to_model(adapter, adapter._chunks(x)[0][0])
    with torch.no_grad(), _call_hooks(adapter, {p for p, _ in wanted}, pre, post):
        _forward(adapter, model_input)

    plans = []
    for (path, call), name in wanted.items():
        info = seen.get(name)
        reason, plan = _plan_one(name, path, call, info, grids, model_input, adapter.channels_last)
        if plan is None and adapter.token_layout(name) is not None:
            reason = "a token sequence: contributions are computed on maps and flat features only"
        if plan is None:
            skipped[name] = reason
        else:
            plans.append(plan)
    order = {name: i for i, name in enumerate(grids)}
    plans.sort(key=lambda p: order[p.name])
    return plans, skipped


def _plan_one(
    name: str,
    path: str,
    call: int,
    info: dict[str, Any] | None,
    grids: Mapping[str, Grid | None],
    model_input: torch.Tensor,
    channels_last: Callable[[str], bool] = lambda name: False,
) -> tuple[str, _Plan | None]:
    """``channels_last(layer)``: whether the layer's maps are ``(B, H, W, C)``
    (:meth:`~eqaudit.models.base.ModelAdapter.channels_last`)."""
    if info is None or "output" not in info:
        return "not called in a forward pass", None
    out = info["output"]
    if out is None or not out.is_floating_point():
        return "its output is not a float tensor", None
    if out.ndim not in (2, 4):
        return f"its output has shape {tuple(out.shape)}, neither a map nor flat features", None
    out_last = out.ndim == 4 and channels_last(name)
    flat_out = _is_flat(out, out_last)
    out_grid = None if flat_out else grids[name]
    if not flat_out and out_grid is None:
        return "its output grid (stride, offset) is unknown", None
    if len(info["tensor_args"]) != 1:
        n = len(info["tensor_args"])
        return f"it takes {n} tensor inputs; a contribution needs exactly one", None
    arg = info["tensor_args"][0]
    u = info["args"][arg]
    if u.ndim not in (2, 4):
        return f"its input has shape {tuple(u.shape)}, neither a map nor flat features", None
    plan = functools.partial(_Plan, name, path, call, arg, output_channels_last=out_last)
    if u is model_input:
        return "", plan("image", IMAGE_GRID, out_grid)
    producer = info["producer"]
    if producer is not None:
        in_last = u.ndim == 4 and channels_last(producer)
        in_grid = grids.get(producer)
    else:  # read from the module: the input is in the output's layout, if the grid is kept
        in_last = out_last
        in_grid = None
    if _is_flat(u, in_last):
        return "", plan("flat", None, out_grid)
    if in_grid is None and out_grid is not None and in_last == out_last:
        # (a producer of unknown grid too: the module says it, in the output's layout)
        same_size = u.ndim == 4 and _cells(u, in_last) == _cells(out, out_last)
        in_grid = _input_grid_from_module(info["module"], out_grid, same_size, out_last)
    if in_grid is None:
        return (
            "the grid of its input is unknown: also audit the layer that produces its input",
            None,
        )
    return "", plan("grid", in_grid, out_grid, input_channels_last=in_last)


def _forward(adapter: ModelAdapter, model_input: torch.Tensor) -> torch.Tensor:
    return _score_tensor(adapter.module(model_input), adapter.output_name)  # type: ignore[attr-defined]


# -- forward-mode AD and central differences ------------------------------------------------------
@contextmanager
def _dual_level() -> Iterator[None]:
    """``fwAD.dual_level()``; torch compiles its jvp decompositions with ``torch.jit.script`` on
    the first ``make_dual`` of a process (about a second), warning that jit is deprecated: that
    note is about torch's internals, not the user's model."""
    with warnings.catch_warnings(), fwAD.dual_level():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script`", category=DeprecationWarning
        )
        yield


def _ad_total(adapter: ModelAdapter, x: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``J(x) tangent`` for canonical normalised ``x``: one forward-mode pass per chunk."""

    def one(xc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        with _dual_level():
            dual = fwAD.make_dual(_to_model(adapter, xc), _to_model(adapter, tc))
            scores = _forward(adapter, dual)
            out_tangent = fwAD.unpack_dual(scores).tangent
        if out_tangent is None:  # the scores do not depend on the input
            return torch.zeros(scores.shape, dtype=torch.float64)
        return out_tangent.detach().to(torch.float64)

    with torch.no_grad():
        return _chunked(adapter, (x, tangent), one)


def _layer_pass(
    adapter: ModelAdapter,
    plan: _Plan,
    generator: str,
    x: torch.Tensor,
    tangent: torch.Tensor,
    eps: float | None,
) -> torch.Tensor:
    """``c_l = J_{>l} (J_l X_in u - X_out h_l)`` per image ``(B, K)`` float64: forward-mode AD
    (``eps`` None) or central differences of ``s(eps) = f_{>l}(f_l(u + eps X_in u) - eps X_out h)``."""
    size = adapter.input_spec.size

    def in_tangent(u: torch.Tensor, image_tangent_: torch.Tensor) -> torch.Tensor:
        if plan.source == "image":
            return image_tangent_
        if plan.source == "flat":
            return torch.zeros_like(u)
        return feature_tangent(u, generator, plan.input_grid, size, plan.input_channels_last)

    def out_tangent(h: torch.Tensor) -> torch.Tensor:
        if plan.output_grid is None:
            return torch.zeros_like(h)
        return feature_tangent(h, generator, plan.output_grid, size, plan.output_channels_last)

    def run(xc: torch.Tensor, tc: torch.Tensor, scale: float, dual: bool) -> torch.Tensor:
        target = (plan.path, plan.call)

        def pre(path: str, call: int, args: tuple) -> tuple | None:
            if (path, call) != target:
                return None
            u = args[plan.arg]
            tu = in_tangent(u, tc)
            new = list(args)
            new[plan.arg] = fwAD.make_dual(u, tu) if dual else u + scale * tu
            return tuple(new)

        def post(path: str, call: int, _args: tuple, output: Any) -> Any:
            if (path, call) != target:
                return None
            h = _first_tensor(output)
            if dual:
                primal, t = fwAD.unpack_dual(h)
                t = torch.zeros_like(primal) if t is None else t
                new = fwAD.make_dual(primal, t - out_tangent(primal))
            else:
                new = h - scale * out_tangent(h)
            return _replace_first_tensor(output, new)

        with _call_hooks(adapter, {plan.path}, pre, post):
            scores = _forward(adapter, xc)
        if not dual:
            return scores.to(torch.float64)
        t = fwAD.unpack_dual(scores).tangent
        return torch.zeros(scores.shape, dtype=torch.float64) if t is None else t.to(torch.float64)

    def one(xc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        xm, tm = _to_model(adapter, xc), _to_model(adapter, tc)
        if eps is None:
            with _dual_level():
                return run(xm, tm, 1.0, True)
        evaluate = lambda steps: [run(xm, tm, s, False) for s in steps]  # noqa: E731
        return _central(evaluate, eps, _richardson(generator))

    with torch.no_grad():
        return _chunked(adapter, (x, tangent), one)


def _richardson(generator: str) -> bool:
    """Rotation differences are extrapolated: the cubic kernel is only C1 at the nodes,
    where every pixel sits at ``t = 0``, so ``t -> f(T_t x)`` has a jump in its second
    derivative there and a central difference errs by ``O(h)``; ``2 D(h) - D(2h)`` cancels it."""
    return generator == "rotation"


def _central(
    evaluate: Callable[[Sequence[float]], Sequence[torch.Tensor]], h: float, richardson: bool
) -> torch.Tensor:
    """``D(h) = (f(h) - f(-h)) / 2h``, or ``2 D(h) - D(2h)``; ``evaluate`` maps steps to outputs
    (all at once, so a backend can run them as one batch)."""
    steps = (h, -h, 2 * h, -2 * h) if richardson else (h, -h)
    values = [v.to(torch.float64) for v in evaluate(steps)]
    d1 = (values[0] - values[1]) / (2 * h)
    return 2 * d1 - (values[2] - values[3]) / (4 * h) if richardson else d1


def _fd_total(
    adapter: ModelAdapter,
    pixels: torch.Tensor,
    preprocessing: Preprocessing,
    generator: str,
    step: float,
) -> torch.Tensor:
    """Central differences of ``z(T_t x)`` through the adapter's ``run`` (any backend)."""
    x64 = pixels.to(torch.float64)
    n = pixels.shape[0]

    def evaluate(steps: Sequence[float]) -> list[torch.Tensor]:
        batch = torch.cat([transform_pixels(x64, generator, s) for s in steps])
        scores = adapter.run(preprocessing.normalise(batch)).scores
        return list(scores.split(n))

    return _central(evaluate, step, _richardson(generator))


def _fd_method(steps: dict[str, float], generators: Sequence[str], why: str = "") -> str:
    parts = [
        f"{steps[g]:.3g} {UNITS[g]} ({g}{', Richardson h/2h' if _richardson(g) else ''})"
        for g in generators
    ]
    return f"central differences, step {', '.join(parts)}{why}"


def lie_batch(
    adapter: ModelAdapter,
    pixels: torch.Tensor,
    preprocessing: Preprocessing,
    kind: str,
    generators: Sequence[str] = GENERATORS,
    layers: Sequence[tuple[str, Any]] = (),
    step: Mapping[str, float] | None = None,
    method: str = "auto",
) -> LieBatch:
    """Lie derivatives of one batch of pixel-space images ``(B, C, H, W)`` in [0, 1] at the
    model's input size (see the module docstring for definitions and units).

    ``kind`` is ``"logits"`` or ``"probs"``. ``layers`` lists ``(name, grid)`` pairs (adapter
    layer names; grid ``(stride_h, stride_w, offset_h, offset_w)``, a Grid-like object, or None
    for flat outputs) whose contributions to the output derivative are wanted: PyTorch modules
    only. ``step`` overrides the central-difference step per generator (radians / pixels).
    ``method``: ``"auto"`` (AD where possible), ``"ad"`` (fail unless AD runs) or ``"fd"``.
    PyTorch modules are differentiated by forward-mode AD and fall back to central differences
    when an op has no forward-mode formula; other backends always use central differences.
    """
    if kind not in ("logits", "probs"):
        raise ValueError(f"kind must be 'logits' or 'probs', not {kind!r}")
    if method not in ("auto", "ad", "fd"):
        raise ValueError(f"method must be 'auto', 'ad' or 'fd', not {method!r}")
    generators = tuple(generators)
    for g in generators:
        _check_generator(g)
    size = tuple(pixels.shape[-2:])
    steps = {**default_steps(size), **(step or {})}
    x = preprocessing.normalise(pixels)
    module = _torch_module(adapter)
    scores = adapter.run(x).scores
    tangents_in = {g: input_tangent(preprocessing, image_tangent(pixels, g)) for g in generators}

    requested, method = method, AD_METHOD
    tangents: dict[str, torch.Tensor] = {}
    why = ""
    if module is None and requested == "ad":
        raise ValueError("forward-mode AD needs a PyTorch module (not TorchScript, not ONNX)")
    if module is not None and requested != "fd":
        try:
            tangents = {g: _ad_total(adapter, x, tangents_in[g]) for g in generators}
        except Exception as exc:  # an op without a forward-mode formula, typically
            if requested == "ad":
                raise
            why = f" (forward-mode AD failed: {cause_line(exc, 200)})"
            tangents = {}
    if not tangents:
        tangents = {g: _fd_total(adapter, pixels, preprocessing, g, steps[g]) for g in generators}
        method = _fd_method(steps, generators, why)

    contributions: dict[str, dict[str, torch.Tensor]] = {g: {} for g in generators}
    skipped: dict[str, str] = {}
    if layers and module is None:
        note = "per-layer attribution needs a PyTorch module with forward hooks"
        skipped = {name: note for name, _ in layers}
    elif layers:
        plans, skipped = _plan_layers(adapter, x, layers)
        eps = None if method == AD_METHOD else steps
        for g in generators:
            for plan in plans:
                contributions[g][plan.name] = _layer_pass(
                    adapter, plan, g, x, tangents_in[g], None if eps is None else eps[g]
                )
    layer_values = {
        g: {name: normalised_derivative(scores, c, kind) for name, c in per.items()}
        for g, per in contributions.items()
    }
    return LieBatch(
        kind=kind,
        method=method,
        generators=generators,
        scores=scores,
        tangents=tangents,
        output={g: normalised_derivative(scores, tangents[g], kind) for g in generators},
        contributions=contributions if layers else {},
        layers=layer_values if layers else {},
        skipped=skipped,
        steps={} if method == AD_METHOD else {g: steps[g] for g in generators},
    )

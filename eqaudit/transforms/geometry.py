"""How a transform element acts on a feature map, given the map's sampling grid.

Convention: a spatial layer's cells are centred at input pixel coordinate ``o + s * i`` on each
axis (``o`` the offset, ``s`` the cumulative stride, ``i = 0 .. n - 1``; input pixel centres at
integers, see :mod:`eqaudit.grids`). An element moves content at input point ``p = (y, x)`` to
``A p + t`` (:meth:`Transform.point_map`). In cell coordinates ``u`` (``p = o + S u``,
``S = diag(s_h, s_w)``) the same motion is

    u' = M u + b,    M = S^-1 A S,    b = S^-1 (A o + t - o).

* When ``M`` is a signed permutation and ``b`` is integral, the element maps cells onto cells: the
  comparison ``h(T_g x)`` vs ``T'_g h(x)`` is **exact**. For a D4 element it is *aligned* when the
  map is also a bijection of the whole map (``o + s (n - 1) / 2 = (N - 1) / 2`` on each reversed
  axis, equal grids on swapped axes: DESIGN.md section 4); a shift is aligned when every moved cell
  lands on a cell (``s`` divides ``k``), the cells that move in from outside are masked.
* Otherwise no exact comparison exists. A D4 element or integer shift whose motion does not land
  on cells is **misaligned**: the map's grid is not symmetric about the image centre, so comparing
  on the map's own grid (what a naive check does) measures the grid, not the model. It can be
  compared **approximately** by resampling the reference map at the true source positions
  (cubic convolution, cells whose stencil leaves the map masked).
* Resampled elements (arbitrary rotations, sub-pixel shifts) are always compared that way: the map
  is rotated about the true image centre expressed in cell coordinates (not the map's own centre)
  and compared inside a disk around it, so a misaligned grid does not add a spurious shift.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

from eqaudit.metrics.functional import relative_error
from eqaudit.transforms.elements import (
    DISK_FRACTION,
    D4Element,
    FeatureAction,
    NotMeasurable,
    Shift,
    Transform,
    cubic_operator,
    cubic_sample,
    fourier_shift,
    rotation_operator,
)

_TOL = 1e-6


class _Axis(Protocol):
    n: int
    stride: float
    offset: float
    free: tuple[int, int] | None


class GridLike(Protocol):
    """``eqaudit.grids.Grid``: per-axis ``(n, stride, offset)``."""

    h: _Axis
    w: _Axis


@dataclass(frozen=True)
class CellMap:
    """``u' = M u + b`` in cell coordinates (see the module docstring)."""

    M: np.ndarray
    b: np.ndarray
    shape: tuple[int, int]

    @property
    def on_cells(self) -> bool:
        """True when every cell moves exactly onto a cell position (signed permutation, integral
        translation)."""
        m, b = self.M, self.b
        integral = np.allclose(m, np.round(m), atol=_TOL) and np.allclose(b, np.round(b), atol=_TOL)
        if not integral:
            return False
        r = np.round(m)
        return bool(
            np.all(np.abs(r).sum(axis=0) == 1)
            and np.all(np.abs(r).sum(axis=1) == 1)
            and np.all(np.isin(r, (-1, 0, 1)))
        )

    def sources(self) -> tuple[np.ndarray, np.ndarray]:
        """Source cell coordinates ``u = M^-1 (u' - b)`` of every output cell ``u'``."""
        n_h, n_w = self.shape
        ii, jj = np.meshgrid(np.arange(n_h, dtype=np.float64), np.arange(n_w), indexing="ij")
        inverse = np.linalg.inv(self.M)
        dy, dx = ii - self.b[0], jj - self.b[1]
        return inverse[0, 0] * dy + inverse[0, 1] * dx, inverse[1, 0] * dy + inverse[1, 1] * dx

    @property
    def is_bijection(self) -> bool:
        """On cells and onto the whole map: nothing moves in from outside."""
        if not self.on_cells:
            return False
        sy, sx = self.sources()
        n_h, n_w = self.shape
        return bool(
            np.all((sy > -_TOL) & (sy < n_h - 1 + _TOL) & (sx > -_TOL) & (sx < n_w - 1 + _TOL))
        )

    def true_centre(self, input_size: tuple[int, int], grid: GridLike) -> tuple[float, float]:
        """The image centre in cell coordinates."""
        height, width = input_size
        return (
            ((height - 1) / 2 - grid.h.offset) / grid.h.stride,
            ((width - 1) / 2 - grid.w.offset) / grid.w.stride,
        )


def cell_map(element: Transform, grid: GridLike, input_size: tuple[int, int]) -> CellMap:
    """The element's motion in the grid's cell coordinates."""
    a, t = element.point_map(*input_size)
    s = np.array([grid.h.stride, grid.w.stride], dtype=np.float64)
    o = np.array([grid.h.offset, grid.w.offset], dtype=np.float64)
    m = (a * s[None, :]) / s[:, None]
    b = (a @ o + t - o) / s
    return CellMap(m, b, (grid.h.n, grid.w.n))


def aligned(element: Transform, grid: GridLike, input_size: tuple[int, int]) -> bool:
    """Does the element map the grid onto itself (cells onto cells)?

    D4 elements need a bijection of the whole map; shifts need every cell to land on a cell
    (cells moving in from outside are masked, as at the input); resampled elements never map a
    grid onto itself.
    """
    if not element.exact:
        return False
    cm = cell_map(element, grid, input_size)
    return cm.is_bijection if isinstance(element, D4Element) else cm.on_cells


#: Index, position and mask tensors of the cell maps, per device, made once: the same for every
#: batch, and on a GPU each copy from host memory would make the host wait for the device.
#: Read-only (never written in place); cleared when it grows past _PLANS_MAX entries.
_DEVICE_PLANS: dict[tuple, tuple] = {}
_PLANS_MAX = 4096


#: Bytes the cached sparse resampling operators may hold (16 taps of 12 bytes a cell: ~19 MB
#: per kind and rotation for a ResNet-18 at 224); past it, an operator is made again at each
#: use (the same operator: which ones are kept, an order of threads may decide, not a number).
CUBIC_OPERATOR_BYTES = 256 << 20
_cubic_bytes = 0
_BUDGET_LOCK = threading.Lock()


def drop_device_plans() -> None:
    """Forget the cached cell-map tensors and the images' rotation operators (at the end of an
    audit: they hold memory)."""
    global _cubic_bytes
    _DEVICE_PLANS.clear()
    _cubic_bytes = 0
    rotation_operator.cache_clear()


def _device_plan(kind: str, cm: CellMap, extra: tuple, device: torch.device, make) -> tuple:
    """``make()`` (host arrays -> tensors on ``device``) for this cell map, cached by value."""
    key = (kind, cm.M.tobytes(), cm.b.tobytes(), cm.shape, extra, str(device))
    plan = _DEVICE_PLANS.get(key)
    if plan is None:
        if len(_DEVICE_PLANS) >= _PLANS_MAX:
            _DEVICE_PLANS.clear()
        plan = _DEVICE_PLANS[key] = make()
    return plan


def _gather(fmap: torch.Tensor, cm: CellMap) -> FeatureAction:
    """Exact action: move every cell to its destination; cells with no source are masked."""
    n_h, n_w = fmap.shape[-2:]

    def make() -> tuple[torch.Tensor, torch.Tensor | None]:
        sy, sx = cm.sources()
        iy, ix = np.round(sy).astype(np.int64), np.round(sx).astype(np.int64)
        valid = (iy >= 0) & (iy < n_h) & (ix >= 0) & (ix < n_w)
        flat = torch.from_numpy(np.where(valid, iy * n_w + ix, 0).reshape(-1)).to(fmap.device)
        mask = None if valid.all() else torch.from_numpy(valid)[None, None].to(fmap.device)
        return flat, mask

    flat, mask = _device_plan("gather", cm, (n_h, n_w), fmap.device, make)
    moved = fmap.flatten(-2)[..., flat].reshape(fmap.shape)
    if mask is None:
        return FeatureAction(moved)
    return FeatureAction(moved * mask.to(fmap.dtype), mask)


_Span = tuple[int, int]

#: In the reason of a rotation that finds no padding-free cell (summary.geometry counts them).
NO_FREE_CELLS = "out of reach of the padding"


def _no_free_cells(n_h: int, n_w: int) -> NotMeasurable:
    return NotMeasurable(
        f"no cell of the {n_h}x{n_w} feature map is {NO_FREE_CELLS} or of the rotated image's "
        "zero fill (its receptive field is too wide for this input size): a rotation is not "
        "compared there (--padding-border include compares the disk all the same)"
    )


@dataclass(frozen=True)
class FreeRegion:
    """Where a rotation by another angle may compare a map without reading any padding.

    ``rows``, ``cols``: the padding-free cells ``(lo, hi)`` of each axis (:mod:`eqaudit.grids`).
    The rotated image is zero outside the turned square (and cubic samples within a pixel of
    its edge read that zero), so a cell whose receptive field reaches there reads the fill in
    ``h(T x)`` and real content in ``h(x)``: the fill is padding too. ``reach``: the receptive
    field's half-width ``rho`` per axis (pixels), bounded by the free cells themselves (the
    first one's field starts inside the image: ``rho <= offset + stride*lo``, likewise from
    the end; exact for a stack of padded windows, larger otherwise). ``offset``, ``stride``:
    the grid; ``size``: the input; ``inverse``, ``shift``: where output pixel ``q`` of the
    rotated image takes its content, ``inverse @ (q - shift)``.
    """

    rows: _Span
    cols: _Span
    reach: tuple[float, float]
    offset: tuple[float, float]
    stride: tuple[float, float]
    size: tuple[int, int]
    inverse: tuple[float, float, float, float]
    shift: tuple[float, float]

    def off_the_fill(self, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
        """Cells whose receptive field (all four corners: the square is convex) maps inside
        ``[1, N-2]`` of the source on both axes."""
        (o_h, o_w), (s_h, s_w), (r_h, r_w) = self.offset, self.stride, self.reach
        a, b, c, d = self.inverse
        height, width = self.size
        ok = np.ones(ii.shape, dtype=bool)
        for dy in (-r_h, r_h):
            for dx in (-r_w, r_w):
                qy = o_h + s_h * ii + dy - self.shift[0]
                qx = o_w + s_w * jj + dx - self.shift[1]
                y, x = a * qy + b * qx, c * qy + d * qx
                ok &= (y >= 1 - _TOL) & (y <= height - 2 + _TOL)
                ok &= (x >= 1 - _TOL) & (x <= width - 2 + _TOL)
        return ok


def padding_free(
    element: Transform, grid: GridLike | None, padding_border: str, input_size: tuple[int, int]
) -> FreeRegion | None:
    """The region a rotation is compared on, or None for the disk on the whole map
    (``--padding-border include``, or padding-free cells not known)."""
    if padding_border == "include" or grid is None:
        return None
    if grid.h.free is None or grid.w.free is None:
        return None
    return _free_region(element, grid, (grid.h.free, grid.w.free), input_size)


@lru_cache(maxsize=4096)
def _free_region(
    element: Transform, grid: GridLike, spans: tuple[_Span, _Span], input_size: tuple[int, int]
) -> FreeRegion:
    """:func:`padding_free`'s region, made once per (element, grid): every batch asks again.
    ``spans`` are part of the key (a grid's equality leaves its free cells out)."""
    reach = []
    for axis, (lo, hi), size in zip((grid.h, grid.w), spans, input_size, strict=True):
        first, last = axis.offset + axis.stride * lo, axis.offset + axis.stride * hi
        reach.append(max(0.0, min(first, size - 1 - last)) if lo <= hi else 0.0)
    linear, shift = element.point_map(*input_size)
    inverse = np.linalg.inv(linear)
    return FreeRegion(
        spans[0],
        spans[1],
        (reach[0], reach[1]),
        (float(grid.h.offset), float(grid.w.offset)),
        (float(grid.h.stride), float(grid.w.stride)),
        (int(input_size[0]), int(input_size[1])),
        tuple(float(v) for v in inverse.reshape(-1)),  # type: ignore[arg-type]
        (float(shift[0]), float(shift[1])),
    )


def _resampled(
    fmap: torch.Tensor,
    cm: CellMap,
    centre: tuple[float, float] | None,
    masked: bool = True,
    free: FreeRegion | None = None,
) -> FeatureAction:
    """Approximate action by resampling; compared where the bicubic stencil stays inside the map
    (and, for rotations, inside a disk about the true centre, within ``free``: the cells that
    read no padding, whose values the stencil alone may read). ``masked``: the samples outside
    that region are zeroed (for a comparison), else kept (for a round trip: see
    :func:`resampled_floor`)."""
    n_h, n_w = fmap.shape[-2:]

    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (lo_h, hi_h), (lo_w, hi_w) = (
            (free.rows, free.cols) if free else ((0, n_h - 1), (0, n_w - 1))
        )
        if lo_h > hi_h or lo_w > hi_w:
            raise _no_free_cells(n_h, n_w)
        sy, sx = cm.sources()
        inside = (
            (sy >= lo_h + 1 - _TOL)
            & (sy <= hi_h - 1 + _TOL)
            & (sx >= lo_w + 1 - _TOL)
            & (sx <= hi_w - 1 + _TOL)
        )
        if centre is not None:
            cy, cx = centre
            radius = DISK_FRACTION * min(cy, n_h - 1 - cy, cx, n_w - 1 - cx)
            if free is not None:  # and no cell that reads the padding
                radius = min(radius, cy - lo_h, hi_h - cy, cx - lo_w, hi_w - cx)
            ii, jj = np.meshgrid(np.arange(n_h), np.arange(n_w), indexing="ij")
            inside &= (ii - cy) ** 2 + (jj - cx) ** 2 <= radius**2
            if free is not None:  # nor the rotated image's zero fill
                inside &= free.off_the_fill(ii, jj)
        if not inside.any():  # (not cached: the engine records the reason and asks no more)
            if free is not None:
                raise _no_free_cells(n_h, n_w)
            raise NotMeasurable(
                f"feature map {n_h}x{n_w} leaves no cell to compare after resampling"
            )
        device = fmap.device
        mask = torch.from_numpy(inside)[None, None].to(device)
        return torch.from_numpy(sy).to(device), torch.from_numpy(sx).to(device), mask

    sy, sx, mask = _device_plan("resample", cm, (n_h, n_w, centre, free), fmap.device, make)
    operator = None
    if fmap.device.type == "cpu":  # one sparse product per map instead of 16 gathers
        (operator,) = _device_plan(
            "cubic",
            cm,
            (n_h, n_w, centre, free, fmap.dtype),
            fmap.device,
            lambda: (_budgeted(cubic_operator(sy, sx, n_h, n_w, fmap.dtype)),),
        )
        if operator is None:  # (over the budget, or a dtype without sparse products)
            operator = cubic_operator(sy, sx, n_h, n_w, fmap.dtype)
    # Cubic samples (the interpolant of rotate), zero outside.
    samples = cubic_sample(fmap, sy, sx, operator)
    return FeatureAction(samples * mask.to(fmap.dtype) if masked else samples, mask)


def _budgeted(operator: torch.Tensor | None) -> torch.Tensor | None:
    """``operator`` to cache while the cached ones fit :data:`CUBIC_OPERATOR_BYTES`, else None
    (made again at each use)."""
    global _cubic_bytes
    if operator is None:
        return None
    size = sum(
        t.numel() * t.element_size()
        for t in (operator.crow_indices(), operator.col_indices(), operator.values())
    )
    with _BUDGET_LOCK:  # (layers are compared on several threads)
        if _cubic_bytes + size > CUBIC_OPERATOR_BYTES:
            return None
        _cubic_bytes += size
    return operator


@dataclass(frozen=True)
class GridComparison:
    """How one (layer, element) pair is compared.

    ``comparison``: ``exact`` (cells onto cells), ``resampled`` (approximate: resampled elements,
    or misaligned pairs under ``--misaligned resample``), ``naive`` (misaligned pair compared on
    the map's own grid, ``--misaligned flag``). ``aligned`` is None when the grid is unknown.
    """

    action: FeatureAction
    comparison: str
    aligned: bool | None


@lru_cache(maxsize=4096)
def comparison_plan(
    element: Transform, grid: GridLike, input_size: tuple[int, int]
) -> tuple[CellMap, str]:
    """The element's cell map on this grid and how to compare (cached: the same for every
    batch): ``aligned`` (shifts that land on cells, D4 bijections), ``overlap`` (a D4 element
    moving cells onto cells with some falling off the map), ``off-cells``."""
    cm = cell_map(element, grid, input_size)
    if not (element.exact and cm.on_cells):
        return cm, "off-cells"
    if isinstance(element, Shift) or cm.is_bijection:
        return cm, "aligned"
    return cm, "overlap"


def compare_on_grid(
    element: Transform,
    fmap: torch.Tensor,
    grid: GridLike | None,
    input_size: tuple[int, int],
    stride: tuple[float, float] | None,
    misaligned: str = "flag",
    padding_border: str = "exclude",
) -> GridComparison:
    """``T'_g h`` for one reference map ``(B, C, n_h, n_w)``; raises :class:`NotMeasurable`."""
    if grid is None:  # offset unknown: the map's own grid is all there is (a rotation by
        # another angle turns about the map's centre): naive, whatever the element
        return GridComparison(element.feature_action(fmap, stride), "naive", None)
    if isinstance(element, D4Element) and element.k % 2 and fmap.shape[-1] != fmap.shape[-2]:
        raise NotMeasurable(f"feature map is {fmap.shape[-2]}x{fmap.shape[-1]}, not square")
    cm, plan = comparison_plan(element, grid, input_size)
    if plan != "off-cells":
        own = (float(grid.h.stride), float(grid.w.stride))
        if plan == "aligned":  # the plain action on the map's own grid is the true one
            return GridComparison(element.feature_action(fmap, own), "exact", True)
        # Off-centre by whole cells: every cell still lands on a cell; compare on the overlap
        # (misaligned all the same: the border cells left out are where the asymmetry is).
        if misaligned == "skip":
            raise NotMeasurable(misaligned_reason(element, grid, input_size))
        return GridComparison(_gather(fmap, cm), "exact", False)
    if element.exact:  # a D4 element or integer shift whose motion misses the cells
        if misaligned == "skip":
            raise NotMeasurable(misaligned_reason(element, grid, input_size))
        if misaligned == "resample":
            return GridComparison(_resampled(fmap, cm, None), "resampled", False)
        if isinstance(element, Shift):  # no naive comparison exists for a fraction of a cell
            raise NotMeasurable(misaligned_reason(element, grid, input_size))
        return GridComparison(element.feature_action(fmap, stride), "naive", False)
    if isinstance(element, Shift):  # sub-pixel shift: band-limited, border cells masked
        return GridComparison(_fractional_shift(element, fmap, grid), "resampled", False)
    centre = cm.true_centre(input_size, grid)
    free = padding_free(element, grid, padding_border, input_size)
    return GridComparison(_resampled(fmap, cm, centre, free=free), "resampled", False)


def _fractional_shift(element: Shift, fmap: torch.Tensor, grid: GridLike) -> FeatureAction:
    cy, cx = element.dy / grid.h.stride, element.dx / grid.w.stride
    shifted = fourier_shift(fmap, cy, cx)
    if element.mode == "circular":
        return FeatureAction(shifted)
    # Cells within reach of the wrapped-around border are not defined by the shift itself.
    n_h, n_w = fmap.shape[-2:]
    reach_y, reach_x = int(np.ceil(abs(cy))) + 1, int(np.ceil(abs(cx))) + 1
    # Decided on the host: mask.any() would make it wait for the device.
    if not (n_h > 2 * reach_y and n_w > 2 * reach_x):
        raise NotMeasurable(f"feature map {n_h}x{n_w} is too small for a shift of that size")
    mask = torch.zeros(1, 1, n_h, n_w, dtype=torch.bool, device=fmap.device)
    mask[..., reach_y : n_h - reach_y, reach_x : n_w - reach_x] = True
    return FeatureAction(shifted * mask.to(fmap.dtype), mask)


def resampled_floor(
    element: Transform,
    fmap: torch.Tensor,
    grid: GridLike | None,
    input_size: tuple[int, int],
    padding_border: str = "exclude",
) -> torch.Tensor | None:
    """Interpolation floor of a resampled comparison: ``T'^-1 T' h`` against ``h``, per image,
    where both trips' stencils stay inside the map (and the disk). The way out is not zeroed
    outside its comparison region: the way back reads cells just outside it, and zeros there
    doubled the floor of a 12x12 map (0.114 for 0.053) and made a 6x6 one's 20 times too big."""
    if grid is None:
        return element.feature_floor(fmap)
    if isinstance(element, Shift):
        if element.integer:
            return None
        return element.feature_floor(fmap)
    cm = cell_map(element, grid, input_size)
    centre = cm.true_centre(input_size, grid) if not element.exact else None
    free = padding_free(element, grid, padding_border, input_size) if centre is not None else None
    there = _resampled(fmap, cm, centre, masked=False, free=free)
    inverse = CellMap(np.linalg.inv(cm.M), -np.linalg.inv(cm.M) @ cm.b, cm.shape)
    back = _resampled(there.transformed, inverse, centre, masked=False, free=free)
    mask = there.mask & back.mask if there.mask is not None and back.mask is not None else None
    return relative_error(back.transformed, fmap, mask)


def misaligned_reason(element: Transform, grid: GridLike, input_size: tuple[int, int]) -> str:
    """One line saying why a grid is not mapped onto itself by the element."""
    height, width = input_size
    parts = []
    for axis, size, name in ((grid.h, height, "h"), (grid.w, width, "w")):
        centre = axis.offset + axis.stride * (axis.n - 1) / 2
        parts.append(f"{name}: centre {centre:g} vs {(size - 1) / 2:g}")
    if isinstance(element, Shift):
        return (
            f"a shift of ({element.dy:g}, {element.dx:g}) px is "
            f"({element.dy / grid.h.stride:g}, {element.dx / grid.w.stride:g}) cells at stride "
            f"({grid.h.stride:g}, {grid.w.stride:g}): no exact comparison exists"
        )
    return f"grid not symmetric about the image centre ({'; '.join(parts)})"


# --------------------------------------------------------------------------------------------
# Choosing an aligned input size
# --------------------------------------------------------------------------------------------


def alignment_elements(elements: list[Transform], square: bool) -> list[D4Element]:
    """The D4 elements whose alignment an input size must give (rot180 when the battery has
    none: a grid symmetric about the centre also keeps rotations and flips of the input exact
    on the feature maps)."""
    chosen = [e for e in elements if isinstance(e, D4Element) and not e.is_identity]
    if not square:
        chosen = [e for e in chosen if e.k % 2 == 0]
    return chosen or [D4Element(2, False)]


class _GridGraph(Protocol):
    def grids(self, height: int, width: int) -> dict[str, object]: ...

    def invalid_reason(self, height: int, width: int) -> str | None: ...

    def unknown_reason(self, name: str, height: int, width: int) -> str | None: ...


def misaligned_tensors(
    graph: _GridGraph, size: tuple[int, int], elements: list[D4Element]
) -> list[str] | None:
    """Names of the graph's spatial tensors that some element does not map onto themselves at
    this input size (None when the graph cannot take the size)."""
    if graph.invalid_reason(*size) is not None:
        return None
    bad = []
    for name, grid in graph.grids(*size).items():
        if grid is None or isinstance(grid, str):
            continue
        if any(not aligned(e, grid, size) for e in elements):  # type: ignore[arg-type]
            bad.append(name)
    return bad


@dataclass(frozen=True)
class SizeChoice:
    """The outcome of ``--input-size aligned``: the size chosen and why."""

    requested: tuple[int, int]
    chosen: tuple[int, int] | None
    misaligned_at_requested: list[str]
    elements: list[str]
    unknown: int
    fixed: bool = False
    #: why the first tensor of unknown grid has none (an op the walk does not read, maps on
    #: different grids combined ...)
    unknown_reason: str | None = None

    def note(self) -> str:
        why = f"the first: {self.unknown_reason}" if self.unknown_reason else "see inspect"
        unknown = (
            f"; {self.unknown} tensors' grids are unknown ({why}): their alignment is not checked"
            if self.unknown
            else ""
        )
        return self._choice() + unknown

    def _choice(self) -> str:
        h, w = self.requested
        count = len(self.misaligned_at_requested)
        what = ", ".join(self.elements)
        first = ", ".join(self.misaligned_at_requested[:3])
        more = f" and {count - 3} more" if count > 3 else ""
        if self.fixed and count:
            return (
                f"the model's input is fixed at {h}x{w}, where {count} tensors are misaligned "
                f"under {what} ({first}{more}): their per-layer comparisons are not exact; "
                "--misaligned resample compares them approximately about the true grid centre"
            )
        if self.chosen is None:
            return (
                f"no input size near {h}x{w} aligns every strided layer under {what}; "
                f"kept {h}x{w} ({count} tensors misaligned)"
            )
        ch, cw = self.chosen
        if self.chosen == self.requested:
            return f"input {h}x{w}: every strided layer is already aligned under {what}"
        return (
            f"input size {ch}x{cw} chosen: the nearest to {h}x{w} at which every layer's sampling "
            f"grid is symmetric about the image centre under {what} (at {h}x{w}, {count} tensors "
            f"are misaligned: {first}{more})"
        )

    def to_dict(self) -> dict:
        return {
            "requested": list(self.requested),
            "chosen": list(self.chosen) if self.chosen else None,
            "misaligned_at_requested": self.misaligned_at_requested,
            "elements": self.elements,
            "unknown_grids": self.unknown,
            "fixed": self.fixed,
            "note": self.note(),
        }


def search_reach(requested: tuple[int, int]) -> int:
    """How far from the requested size the aligned search goes: a quarter of it, 16 to 64
    pixels (see :func:`choose_aligned_size`)."""
    return min(64, max(16, max(requested) // 4))


def choose_aligned_size(
    graph: _GridGraph,
    requested: tuple[int, int],
    elements: list[Transform],
    max_distance: int | None = None,
    runs: Callable[[tuple[int, int]], bool] | None = None,
    graph_at: Callable[[tuple[int, int]], _GridGraph | None] | None = None,
) -> SizeChoice:
    """The nearest input size to ``requested`` at which every spatial tensor of the graph is
    aligned under the battery's D4 elements (ties: the larger size, which drops no content),
    and ``runs(size)`` says the model runs (the graph cannot: sizes it froze at the export
    size, a U-Net's pads computed in Python, would say that a U-Net cannot run where it does,
    and an FPN's upsampled sums at odd sizes look like any sum of misaligned maps).

    Square inputs stay square; for non-square ones each axis is searched on its own (a flip
    reverses one axis; rot90 is not defined there), then the pair is checked together. Sizes
    within ``max_distance`` of the requested one are searched: by default a quarter of it, 16
    to 64 pixels (a network of total stride 32 has an aligned size every 32 pixels; an FPN that
    runs at even sizes only is aligned at 1x1 alone, which is no audit of it). ``graph_at``: the
    graph each size is judged on, instead of ``graph`` replayed there (a module traced at each
    size, whose sizes computed in Python a single trace freezes).
    """
    h0, w0 = requested
    if max_distance is None:
        max_distance = search_reach(requested)
    square = h0 == w0
    needed = alignment_elements(elements, square)
    at_requested = misaligned_tensors(graph, requested, needed) or []
    unknown_names = [name for name, g in graph.grids(h0, w0).items() if g is None]
    unknown = len(unknown_names)
    reason = graph.unknown_reason(unknown_names[0], h0, w0) if unknown_names else None
    names = [e.name for e in needed]

    ran: dict[tuple[int, int], bool] = {}

    def ok(size: tuple[int, int], which: list[D4Element], whole: bool = True) -> bool:
        judged = graph if graph_at is None else graph_at(size)
        if judged is None or misaligned_tensors(judged, size, which) != []:
            return False
        if whole and runs is not None and size not in ran:
            ran[size] = runs(size)
        return not whole or runs is None or ran[size]

    def nearest(start: int, make: object, which: list[D4Element], whole: bool) -> int | None:
        for d in range(max_distance + 1):
            for n in (start + d, start - d) if d else (start,):
                if n >= 1 and ok(make(n), which, whole):  # type: ignore[operator]
                    return n
        return None

    if square:
        n = nearest(h0, lambda v: (v, v), needed, True)
        chosen = (n, n) if n is not None else None
    else:  # (each axis on its own, then the pair, run)
        h = nearest(h0, lambda v: (v, w0), [D4Element(2, True)], False)  # flip_v: the h axis
        w = nearest(w0, lambda v: (h0, v), [D4Element(0, True)], False)  # flip_h: the w axis
        chosen = (h, w) if h is not None and w is not None and ok((h, w), needed) else None
    return SizeChoice(requested, chosen, at_requested, names, unknown, unknown_reason=reason)

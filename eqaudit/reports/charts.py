"""Charts of the HTML report, drawn with matplotlib and returned as inline SVG text.

Output is deterministic (a fixed ``svg.hashsalt`` per chart, no date in the metadata) so that
re-rendering a saved summary gives the same bytes. Text stays text (``svg.fonttype = "none"``):
smaller files, selectable labels, and every string goes through matplotlib's XML escaping, so a
layer called ``<script>`` is drawn as those characters. Mathtext is off: a ``$`` in a layer name
is a dollar sign, not a formula that could fail to parse.

Only :class:`matplotlib.figure.Figure` is used, never pyplot, so rendering a report does not
touch the caller's global backend or figures.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter
from matplotlib.transforms import blended_transform_factory

from eqaudit.results import is_scored

IDENTITY = "id"
#: At most this many layer names under an axis; the others get a minor tick only.
MAX_TICK_LABELS = 56
#: Above this many layers the curve drops its per-point markers (except flat layers'): with
#: hundreds of points per line, markers only hide the lines.
MAX_MARKED_LAYERS = 60
#: How many of the least equivariant layers are numbered on the charts.
WORST_LAYERS = 3
#: Layers are numbered only above this error: a float32 model that is exactly equivariant shows
#: ~1e-7 everywhere, and numbering its noise would point the reader at nothing.
WORST_MIN_ERROR = 1e-4
#: Layer names longer than this are shortened in the middle on the charts (never in tables).
LABEL_CHARS = 38
FIG_WIDTH = 11.0  # inches; the page scales the SVG to its column width

_RC = {
    "svg.fonttype": "none",
    "svg.image_inline": True,
    "text.parse_math": False,
    "text.usetex": False,
    "font.family": "sans-serif",
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8.0,
    "legend.frameon": False,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 8.0,
    "path.simplify": False,
}
_NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
_SVG_START = re.compile(r"<svg\b")
_XMLNS = re.compile(r'\s+xmlns(:xlink)?="[^"]*"')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WORST_COLOUR = "#b42318"
_FLAT_SHADE = "#eef2f7"


@dataclass(frozen=True)
class LayerGrid:
    """The ``layers`` rows of a summary as arrays: elements x layers in execution order."""

    names: list[str]  # (L,) layer names, by execution index
    kinds: list[str]  # (L,) "spatial" | "flat"
    elements: list[str]  # (E,) non-identity elements, battery order
    error: np.ndarray  # (E, L) mean relative error; NaN where not measurable or absent
    unmeasurable: np.ndarray  # (E, L) bool: a row exists and says measurable = false
    #: (E, L) relative error of pairs measured but kept out of scores (misaligned grid, or an
    #: unknown grid): drawn apart, never ranked; NaN elsewhere
    flagged: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not self.names or not self.elements

    def worst(self, count: int = WORST_LAYERS) -> list[tuple[int, int]]:
        """``(element, layer)`` positions of the ``count`` least equivariant layers (each
        layer once, at its worst element, and only above :data:`WORST_MIN_ERROR`), worst first."""
        if self.empty or np.all(np.isnan(self.error)):
            return []
        per_layer = np.where(np.isnan(self.error), -np.inf, self.error)
        best_element = per_layer.argmax(axis=0)
        peak = per_layer.max(axis=0)
        order = sorted(
            (i for i in range(len(self.names)) if peak[i] > WORST_MIN_ERROR),
            key=lambda i: (-peak[i], i),
        )
        return [(int(best_element[i]), i) for i in order[:count]]


def layer_grid(summary: dict) -> LayerGrid:
    """Collect the per-layer rows of ``summary`` (schema of :mod:`eqaudit.results`)."""
    rows = summary.get("layers") or []
    layers: dict[str, tuple[int, str]] = {}
    for row in rows:
        layers.setdefault(row["layer"], (int(row.get("index") or 0), row.get("kind") or "spatial"))
    names = sorted(layers, key=lambda n: (layers[n][0], n))
    present = {row["transform"] for row in rows}
    declared = [e["name"] for e in summary.get("transforms", {}).get("elements", [])]
    elements = [n for n in declared if n in present and n != IDENTITY]
    elements += sorted(present - set(elements) - {IDENTITY})
    error = np.full((len(elements), len(names)), np.nan)
    flagged = np.full((len(elements), len(names)), np.nan)
    unmeasurable = np.zeros((len(elements), len(names)), dtype=bool)
    e_index = {n: i for i, n in enumerate(elements)}
    l_index = {n: i for i, n in enumerate(names)}
    for row in rows:
        e = e_index.get(row["transform"])
        if e is None:
            continue
        col = l_index[row["layer"]]
        if row.get("measurable") is False:
            unmeasurable[e, col] = True
        elif row.get("relative_error") is not None:
            target = error if is_scored(row) else flagged
            target[e, col] = float(row["relative_error"])
    kinds = [layers[n][1] for n in names]
    return LayerGrid(names, kinds, elements, error, unmeasurable, flagged)


def short_label(name: str, limit: int = LABEL_CHARS) -> str:
    """A layer name fit for an axis: control characters replaced, long names cut in the
    middle (the end of an ONNX or module path is the informative part)."""
    name = _CONTROL.sub("?", name)
    if len(name) <= limit:
        return name
    head = limit // 3
    return name[:head] + "…" + name[-(limit - head - 1) :]


def _colour(i: int, count: int = 10) -> str:
    """The ``i``-th of ``count`` series' colours: tab10, or for more than 10 series tab20 (then
    tab20b), so that no two of up to 40 share one where line styles cannot tell them apart."""
    if count <= 10:
        palette = matplotlib.colormaps["tab10"].colors
    else:
        palette = matplotlib.colormaps["tab20"].colors + matplotlib.colormaps["tab20b"].colors
    return matplotlib.colors.to_hex(palette[i % len(palette)])


def _linestyle(name: str, i: int) -> str | tuple:
    """Rotations solid, reflections dashed, shifts dash-dot; repeats of a colour differ in style."""
    if name.startswith(("flip", "transpose", "antitranspose")):
        return "--"
    if name.startswith("shift") or name.startswith("sub"):
        return "-."
    return "-" if i < 10 else ":"


def _tick_positions(count: int, forced: list[int]) -> list[int]:
    """Evenly thinned positions, plus the ``forced`` ones (the numbered worst layers); a thinned
    tick too close to a forced one is dropped so their labels cannot overlap."""
    step = max(1, math.ceil(count / MAX_TICK_LABELS))
    ticks = set(range(0, count, step))
    kept: list[int] = []
    for f in forced:  # best first: a lower-ranked layer too close to a better one loses its label
        if all(abs(f - k) >= step for k in kept):
            kept.append(f)
    for f in kept:
        ticks = {t for t in ticks if abs(t - f) >= step}
        ticks.add(f)
    return sorted(ticks)


def _layer_axis(ax, grid: LayerGrid, worst: list[tuple[int, int]], labels: bool) -> None:
    rank = {layer: n for n, (_, layer) in enumerate(worst, start=1)}
    ticks = _tick_positions(len(grid.names), list(rank))
    ax.set_xticks(ticks)
    if len(ticks) < len(grid.names):
        ax.set_xticks(range(len(grid.names)), minor=True)
        ax.tick_params(axis="x", which="minor", length=2)
    if not labels:
        ax.set_xticklabels([])
        return
    texts = [(f"#{rank[t]} " if t in rank else "") + short_label(grid.names[t]) for t in ticks]
    ax.set_xticklabels(texts, rotation=90, ha="center")
    for tick, label in zip(ticks, ax.get_xticklabels(), strict=True):
        if tick in rank:
            label.set_color(_WORST_COLOUR)
            label.set_fontweight("bold")


def _shade_flat(ax, grid: LayerGrid) -> None:
    for i, kind in enumerate(grid.kinds):
        if kind == "flat":
            ax.axvspan(i - 0.5, i + 0.5, color=_FLAT_SHADE, zorder=0, lw=0)


def _to_svg(fig: Figure, salt: str) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": f"eqaudit-{salt}"}):
        fig.savefig(buffer, format="svg", metadata=_NO_METADATA)
    text = buffer.getvalue()
    # Inline SVG in HTML needs neither the XML prolog, the DTD nor the namespace declarations
    # (the HTML parser puts <svg> and xlink:href in their namespaces itself).
    match = _SVG_START.search(text)
    if match is None:
        raise RuntimeError("matplotlib wrote no <svg> element")
    text = text[match.start() :]
    head, _, rest = text.partition(">")
    text = _XMLNS.sub("", head) + ">" + rest
    if re.search(r"<\s*(script|foreignobject)\b", text, re.IGNORECASE):
        raise RuntimeError("unexpected active content in a chart")
    return text.strip() + "\n"


def _figure(height: float) -> Figure:
    with matplotlib.rc_context(_RC):
        return Figure(figsize=(FIG_WIDTH, height), layout="constrained")


def _label_room(grid: LayerGrid) -> float:
    """Inches below the axes for rotated layer names."""
    longest = max(len(short_label(n)) + 4 for n in grid.names)
    return 0.35 + 0.075 * longest


def layer_curve_svg(grid: LayerGrid) -> str:
    """Relative error against depth, one line per element: a linear and a log panel.

    Spatial layers are circles, flat (invariance-checked) layers squares on a shaded band;
    (element, layer) pairs without an exact comparison are hollow triangles in a band at the
    top of each panel; the worst layers are numbered on the points and their axis labels.
    """
    with matplotlib.rc_context(_RC):
        fig = _figure(2 * 2.9 + _label_room(grid))
        linear, log = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1])
        worst = grid.worst()
        x = np.arange(len(grid.names))
        shown = grid.error if grid.flagged is None else np.fmax(grid.error, grid.flagged)
        positive = shown[np.isfinite(shown) & (shown > 0)]
        top = float(np.nanmax(shown)) if np.isfinite(shown).any() else 0.0
        floor = _log_floor(positive)
        any_flagged = grid.flagged is not None and bool(np.isfinite(grid.flagged).any())
        any_unmeasurable = bool(grid.unmeasurable.any())
        exact_zeros = bool((grid.error <= 0).any())
        band = 0.8 if any_unmeasurable else 0.95  # data stays below this axes fraction
        dense = len(grid.names) > MAX_MARKED_LAYERS
        marks = (("flat", "s"),) if dense else (("spatial", "o"), ("flat", "s"))
        for ax, scale in ((linear, "linear"), (log, "log")):
            _shade_flat(ax, grid)
            for e, name in enumerate(grid.elements):
                values = grid.error[e]
                if scale == "log":
                    values = np.where(values <= floor, floor, values)
                style = {"color": _colour(e), "lw": 1.0 if dense else 1.3, "ms": 4.0}
                ax.plot(x, values, ls=_linestyle(name, e), label=name, **style)
                for kind, marker in marks:
                    mask = np.array([k == kind for k in grid.kinds])
                    ax.plot(x[mask], values[mask], ls="none", marker=marker, **style)
            if any_flagged:
                _draw_flagged(ax, grid, floor if scale == "log" else None)
            if any_unmeasurable:
                _draw_unmeasurable(ax, grid)
            ax.set_yscale(scale)
            if scale == "linear":
                ax.set_ylim(0, max(top, 0.02) * 1.04 / band)
                ax.set_ylabel("relative error")
                ax.set_title("Per-layer equivariance error (linear scale)")
            else:
                low = math.log10(floor) - 0.3
                high = math.log10(max(top, floor * 10)) + 0.05
                ax.set_ylim(10**low, 10 ** (low + (high - low) / band))
                _log_axis(ax.yaxis)
                ax.set_ylabel("relative error (log)")
                note = f" (exact zeros drawn at {_log_label(floor)})" if exact_zeros else ""
                ax.set_title(f"Same, log scale{note}")
            ax.grid(axis="y", color="#e4e7ec", lw=0.6)
            ax.set_xlim(-0.6, len(grid.names) - 0.4)
            previous: list[int] = []
            for n, (e, layer) in enumerate(worst, start=1):
                value = grid.error[e, layer]
                # Numbers of neighbouring layers are stacked instead of printed over each other.
                lift = sum(abs(layer - p) < len(grid.names) / 30 for p in previous)
                previous.append(layer)
                ax.annotate(
                    f"#{n}",
                    (layer, max(value, floor) if scale == "log" else value),
                    xytext=(0, 5 + 10 * lift),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    color=_WORST_COLOUR,
                    fontweight="bold",
                    fontsize=8.5,
                )
        _layer_axis(linear, grid, worst, labels=False)
        _layer_axis(log, grid, worst, labels=True)
        log.set_xlabel("layer, in execution order (#n: the least equivariant layers)")
        linear.legend(
            loc="upper left", bbox_to_anchor=(1.005, 1.0), title="transform", title_fontsize=8
        )
        log.legend(
            handles=_marker_legend(grid, any_unmeasurable, dense, any_flagged),
            loc="upper left",
            bbox_to_anchor=(1.005, 1.0),
            title="marks",
            title_fontsize=8,
        )
        return _to_svg(fig, "curve")


def _log_label(value: float, _position: float | None = None) -> str:
    """Decades as plain text (``0.01``, ``1e-5``): mathtext is off, so no ``$10^{-5}$``."""
    if value <= 0:
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) > 1e-6:
        return ""
    exponent = round(exponent)
    return {0: "1", -1: "0.1", -2: "0.01", -3: "0.001"}.get(exponent, f"1e{exponent}")


def _log_axis(axis) -> None:
    axis.set_major_formatter(FuncFormatter(_log_label))
    axis.set_minor_formatter(NullFormatter())


def _log_floor(positive: np.ndarray) -> float:
    if positive.size == 0:
        return 1e-8
    return float(max(1e-12, 10 ** math.floor(math.log10(float(positive.min())))))


def _draw_flagged(ax, grid: LayerGrid, floor: float | None) -> None:
    """Pairs kept out of the scores (misaligned or unknown grids): grey crosses, no line, so
    the curve of each element joins only the comparisons that mean something."""
    assert grid.flagged is not None
    for e in range(len(grid.elements)):
        values = grid.flagged[e]
        cols = np.flatnonzero(np.isfinite(values))
        if not cols.size:
            continue
        y = values[cols] if floor is None else np.maximum(values[cols], floor)
        ax.plot(cols, y, ls="none", marker="x", ms=5.0, mew=1.1, color=_colour(e), alpha=0.55)


def _draw_unmeasurable(ax, grid: LayerGrid) -> None:
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    ax.add_patch(
        Rectangle((0, 0.86), 1, 0.14, transform=ax.transAxes, color="#f2f4f7", zorder=0, lw=0)
    )
    rows = [e for e in range(len(grid.elements)) if grid.unmeasurable[e].any()]
    levels = min(len(rows), 4)
    for k, e in enumerate(rows):
        cols = np.flatnonzero(grid.unmeasurable[e])
        y = 0.965 - 0.025 * (k % levels)
        ax.plot(
            cols,
            np.full(cols.shape, y),
            transform=transform,
            ls="none",
            marker="v",
            ms=5.5,
            mfc="white",
            mec=_colour(e),
            mew=1.2,
            clip_on=False,
        )


def _marker_legend(grid: LayerGrid, unmeasurable: bool, dense: bool, flagged: bool = False) -> list:
    spatial = "spatial layer" + (" (lines only)" if dense else "")
    handles: list = [
        Line2D(
            [],
            [],
            ls="-" if dense else "none",
            marker="" if dense else "o",
            color="#344054",
            ms=4,
            label=spatial,
        ),
    ]
    if "flat" in grid.kinds:
        handles.append(
            Line2D(
                [],
                [],
                ls="none",
                marker="s",
                color="#344054",
                ms=4,
                label="flat layer\n(invariance checked)",
            )
        )
        handles.append(Patch(color=_FLAT_SHADE, label="flat layers' band"))
    if flagged:
        handles.append(
            Line2D(
                [],
                [],
                ls="none",
                marker="x",
                color="#667085",
                ms=5,
                label="not scored: grid\nmisaligned or unknown",
            )
        )
    if unmeasurable:
        handles.append(
            Line2D(
                [],
                [],
                ls="none",
                marker="v",
                mfc="white",
                mec="#344054",
                ms=5.5,
                label="not measurable\n(no exact comparison)",
            )
        )
    return handles


def layer_heatmap_svg(grid: LayerGrid) -> str:
    """Layers (x, execution order) by transform elements (y), log colour scale; pairs that
    cannot be compared exactly are hatched grey, exact zeros take the lightest colour."""
    with matplotlib.rc_context(_RC):
        rows = len(grid.elements)
        fig = _figure(0.9 + 0.24 * rows + _label_room(grid))
        ax = fig.subplots()
        positive = grid.error[np.isfinite(grid.error) & (grid.error > 0)]
        floor = _log_floor(positive)
        high = max(1.0, float(positive.max()) if positive.size else 1.0)
        cmap = matplotlib.colormaps["YlOrRd"].with_extremes(under="#fffbe6", bad=(0, 0, 0, 0))
        data = np.ma.masked_invalid(grid.error)
        ax.add_patch(
            Rectangle(
                (-0.5, -0.5),
                len(grid.names),
                rows,
                facecolor="#e4e7ec",
                edgecolor="#98a2b3",
                hatch="////",
                lw=0,
                zorder=0,
            )
        )
        image = ax.imshow(
            np.ma.where(data <= 0, floor * 0.5, data),
            aspect="auto",
            interpolation="none",
            cmap=cmap,
            norm=LogNorm(vmin=floor, vmax=high),
            zorder=1,
        )
        if grid.flagged is not None and np.isfinite(grid.flagged).any():
            ys, xs = np.nonzero(np.isfinite(grid.flagged))
            for y, x in zip(ys, xs, strict=True):  # plain grey: compared, but not scored
                ax.add_patch(
                    Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor="#f2f4f7", lw=0, zorder=0.5)
                )
            ax.plot(xs, ys, ls="none", marker="x", ms=4.5, color="#475467", mew=0.9, zorder=2)
        ax.set_yticks(range(rows), [short_label(e, 24) for e in grid.elements])
        ax.spines[:].set_visible(False)
        ax.tick_params(axis="y", length=0)
        worst = grid.worst()
        wide_cells = len(grid.names) <= 40  # room for "#n" inside a cell
        for n, (e, layer) in enumerate(worst, start=1):
            ax.add_patch(
                Rectangle(
                    (layer - 0.5, e - 0.5), 1, 1, fill=False, edgecolor="#101828", lw=1.4, zorder=3
                )
            )
            if wide_cells:
                ax.text(
                    layer,
                    e,
                    f"#{n}",
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=7.5,
                    fontweight="bold",
                    zorder=4,
                )
        _layer_axis(ax, grid, worst, labels=True)
        ax.set_xlabel("layer, in execution order (#n: the least equivariant layers)")
        ax.set_title("Relative error by layer and transform (log colour scale)")
        bar = fig.colorbar(image, ax=ax, extend="min", pad=0.01, fraction=0.04, aspect=12)
        bar.set_label("relative error")
        _log_axis(bar.ax.yaxis)
        handles = [
            Patch(facecolor="#e4e7ec", edgecolor="#98a2b3", hatch="////", label="not measurable")
        ]
        if grid.flagged is not None and np.isfinite(grid.flagged).any():
            handles.append(
                Line2D(
                    [], [], ls="none", marker="x", color="#475467", label="misaligned/unknown grid"
                )
            )
        if "flat" in grid.kinds:
            handles.append(Patch(facecolor="none", edgecolor="#344054", label="flat layer"))
            for i, kind in enumerate(grid.kinds):
                if kind == "flat":
                    ax.add_patch(
                        Rectangle(
                            (i - 0.5, -0.5),
                            1,
                            rows,
                            fill=False,
                            edgecolor="#344054",
                            lw=0.9,
                            zorder=2,
                        )
                    )
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(handles))
        return _to_svg(fig, "heatmap")


# -- Lie derivatives: each layer's contribution ----------------------------------------------------
LIE_PANELS = (
    ("rotation", "per radian"),
    ("translate_x", "per pixel"),
    ("translate_y", "per pixel"),
)


def lie_bars_svg(rows: list[dict]) -> str | None:
    """Bars of each layer's mean contribution to the output Lie derivative (summary.lie.layers),
    layers in execution order; one panel per generator, since units differ (per radian, per
    pixel). None when no layer has a value."""
    names: list[str] = []
    values: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("generator") is None or row.get("mean") is None:
            continue
        if row["layer"] not in values:
            names.append(row["layer"])
            values[row["layer"]] = {}
        values[row["layer"]][row["generator"]] = float(row["mean"])
    panels = [(g, unit) for g, unit in LIE_PANELS if any(g in v for v in values.values())]
    if not names or not panels:
        return None
    with matplotlib.rc_context(_RC):
        longest = max(len(short_label(n)) for n in names)
        fig = _figure(1.0 + 1.7 * len(panels) + 0.075 * longest)
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        x = np.arange(len(names))
        for k, (ax, (generator, unit)) in enumerate(zip(axes, panels, strict=True)):
            heights = np.array([values[n].get(generator, np.nan) for n in names])
            ax.bar(x, np.nan_to_num(heights), width=0.7, color=_colour(k))
            missing = np.flatnonzero(np.isnan(heights))
            if missing.size:
                ax.plot(missing, np.zeros(missing.size), ls="none", marker="x", color="#667085")
            ax.set_ylabel(f"{unit}")
            ax.set_title(f"{generator}: each layer's contribution (mean over images)")
            ax.grid(axis="y", color="#e4e7ec", lw=0.6)
            ax.set_xlim(-0.6, len(names) - 0.4)
        ticks = _tick_positions(len(names), [])
        axes[-1].set_xticks(ticks, [short_label(names[t]) for t in ticks], rotation=90)
        axes[-1].set_xlabel("layer, in execution order")
        return _to_svg(fig, "lie")


# -- eqaudit compare: A and B overlaid ---------------------------------------------------------------
@dataclass(frozen=True)
class PairGrid:
    """The ``layers`` rows of compare.json as arrays: elements x matched layer pairs, the pairs in
    A's execution order (the order of compare.json)."""

    names_a: list[str]  # (L,) layer names in A
    names_b: list[str]  # (L,) the layer of B matched to each
    elements: list[str]  # (E,) non-identity elements
    error_a: np.ndarray  # (E, L) relative error of A; NaN where not measured
    error_b: np.ndarray  # (E, L) the same for B

    @property
    def empty(self) -> bool:
        return not self.names_a or not self.elements


def pair_grid(layers: list[dict], elements: list[str]) -> PairGrid:
    """Collect compare.json's ``layers`` rows (one per matched pair and element)."""
    pairs: dict[str, str] = {}
    for row in layers:
        pairs.setdefault(str(row["layer_a"]), str(row["layer_b"]))
    names_a = list(pairs)
    present = {str(row["transform"]) for row in layers}
    order = [e for e in elements if e in present and e != IDENTITY]
    order += sorted(present - set(order) - {IDENTITY})
    error_a = np.full((len(order), len(names_a)), np.nan)
    error_b = np.full((len(order), len(names_a)), np.nan)
    e_index = {n: i for i, n in enumerate(order)}
    l_index = {n: i for i, n in enumerate(names_a)}
    for row in layers:
        e = e_index.get(str(row["transform"]))
        if e is None:
            continue
        col = l_index[str(row["layer_a"])]
        for target, key in ((error_a, "relative_error_a"), (error_b, "relative_error_b")):
            if row.get(key) is not None:
                target[e, col] = float(row[key])
    return PairGrid(names_a, [pairs[n] for n in names_a], order, error_a, error_b)


def compare_curve_svg(grid: PairGrid, label_a: str = "A", label_b: str = "B") -> str:
    """Relative error against depth for A (solid lines, filled points) and B (dashed lines,
    hollow points) over the matched layers, one colour per element: a linear and a log panel."""
    with matplotlib.rc_context(_RC):
        longest = max(len(short_label(n)) for n in grid.names_a)
        fig = _figure(2 * 2.9 + 0.35 + 0.075 * longest)
        linear, log = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1])
        both = np.concatenate([grid.error_a.ravel(), grid.error_b.ravel()])
        finite = both[np.isfinite(both)]
        positive = finite[finite > 0]
        top = float(finite.max()) if finite.size else 0.0
        floor = _log_floor(positive)
        exact_zeros = bool((finite <= 0).any())
        count = len(grid.names_a)
        x = np.arange(count)
        dense = count > MAX_MARKED_LAYERS
        for ax, scale in ((linear, "linear"), (log, "log")):
            for e in range(len(grid.elements)):
                colour = _colour(e, len(grid.elements))  # A solid, B dashed: colour alone
                for values, dashed in ((grid.error_a[e], False), (grid.error_b[e], True)):
                    if scale == "log":
                        values = np.where(values <= floor, floor, values)
                    ax.plot(
                        x,
                        values,
                        color=colour,
                        ls="--" if dashed else "-",
                        lw=1.0 if dense else 1.3,
                        marker="" if dense else "o",
                        ms=4.0,
                        mfc="white" if dashed else colour,
                        mec=colour,
                    )
            ax.set_yscale(scale)
            if scale == "linear":
                # A little room below 0, so that a line at exactly 0 is not hidden by the axis.
                span = max(top, 0.02) * 1.06
                ax.set_ylim(-0.025 * span, span)
                ax.set_ylabel("relative error")
                ax.set_title("Per-layer equivariance error, A solid and B dashed (linear scale)")
            else:
                low = math.log10(floor) - 0.3
                high = math.log10(max(top, floor * 10)) + 0.15
                ax.set_ylim(10**low, 10**high)
                _log_axis(ax.yaxis)
                ax.set_ylabel("relative error (log)")
                note = f" (exact zeros drawn at {_log_label(floor)})" if exact_zeros else ""
                ax.set_title(f"Same, log scale{note}")
            ax.grid(axis="y", color="#e4e7ec", lw=0.6)
            ax.set_xlim(-0.6, count - 0.4)
        ticks = _tick_positions(count, [])
        for ax in (linear, log):
            ax.set_xticks(ticks)
            if len(ticks) < count:
                ax.set_xticks(range(count), minor=True)
                ax.tick_params(axis="x", which="minor", length=2)
        linear.set_xticklabels([])
        log.set_xticklabels([short_label(grid.names_a[t]) for t in ticks], rotation=90)
        log.set_xlabel("matched layer, in A's execution order (A's layer name)")
        colours = [
            Line2D(
                [], [], color=_colour(e, len(grid.elements)), lw=2.0, label=short_label(name, 24)
            )
            for e, name in enumerate(grid.elements)
        ]
        linear.legend(
            handles=colours,
            loc="upper left",
            bbox_to_anchor=(1.005, 1.0),
            title="transform",
            title_fontsize=8,
        )
        styles = [
            Line2D(
                [],
                [],
                color="#344054",
                ls=ls,
                marker="" if dense else "o",
                ms=4.0,
                mfc=mfc,
                label=f"{side}: {short_label(label, 24)}",
            )
            for side, label, ls, mfc in (
                ("A", label_a, "-", "#344054"),
                ("B", label_b, "--", "white"),
            )
        ]
        log.legend(
            handles=styles,
            loc="upper left",
            bbox_to_anchor=(1.005, 1.0),
            title="model",
            title_fontsize=8,
        )
        return _to_svg(fig, "compare-curve")

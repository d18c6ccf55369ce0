"""report.html: one self-contained page that reads an :class:`AuditResult`.

No JavaScript and nothing fetched from the network: the stylesheet is inlined, the charts are
inline SVG drawn by matplotlib (:mod:`eqaudit.reports.charts`) and the thumbnails are PNG data
URIs from ``gallery.json``. The template is rendered by Jinja2 with autoescaping, so every string
that comes from the model or the user (layer and class names, paths, metadata) is text; the
only markup inserted unescaped is the SVG that matplotlib itself wrote and escaped.

Rendering is deterministic: the page shows the run's own date (``run.started_at``), never the
time of rendering, so ``eqaudit report DIR`` reproduces the page that ``eqaudit check`` wrote.
"""

from __future__ import annotations

import base64
import io
import re
import shlex
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape

from eqaudit.errors import DataError, UsageError
from eqaudit.gate import evaluated_nothing, shown
from eqaudit.reports.files import check_writable, replace_text
from eqaudit.results import AuditResult, batch_text, check_saved_summary, is_scored

if TYPE_CHECKING:
    from eqaudit.reports.charts import LayerGrid

IDENTITY = "id"
TEMPLATE = "report.html.j2"
FILE_NAME = "report.html"
#: Rows of the "least equivariant layers" and "not measurable" tables on the page (the CSV
#: files hold all of them).
MAX_WORST_ROWS = 12
MAX_UNMEASURABLE_ROWS = 16
#: Flips shown in the gallery (the audit keeps at most this many by default).
MAX_FLIPS = 24
MAX_ORBITS = 4
#: Colour cues (reading aids, stated in the page's methods section).
GOOD_AGREEMENT, FAIR_AGREEMENT = 0.98, 0.90
GOOD_SCORE, FAIR_SCORE = 95.0, 80.0

#: Characters of thumbnail data URIs kept as they are. Above it (large photographs, not small
#: pixel-art inputs) the PNG thumbnails are re-encoded as JPEG, so the page stays under 2 MB.
THUMBNAIL_BUDGET = 1_000_000
JPEG_QUALITY = 85

_THUMBNAIL = re.compile(r"^data:image/(png|jpeg);base64,[A-Za-z0-9+/=\s]+$")


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("eqaudit.reports", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(pct=pct, num=num, breakable=breakable)
    return env


# -- number formatting ---------------------------------------------------------------------------
def pct(value: float | None, digits: int = 1) -> str:
    """0.4286 -> "42.9%"; undefined -> an em dash. A share that is not exactly 0 or 1 never
    reads as 0.0% or 100.0%: it gets more digits (0.99996 -> "99.996%")."""
    if value is None:
        return "—"
    text = f"{100 * value:.{digits}f}"
    while 0 < value < 1 and float(text) in (0.0, 100.0) and digits < 4:
        digits += 1
        text = f"{100 * value:.{digits}f}"
    return text + "%"


def num(value: float | None, digits: int = 3) -> str:
    """Three significant digits; very small numbers in scientific notation; exact zero as 0."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def fixed(value: float | None, decimals: int = 4) -> str:
    """A number with fixed decimals, so the digits of a column line up; exact zero as 0
    and a tiny non-zero value as "<0.0001" rather than a misleading 0.0000."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    if abs(value) < 0.5 * 10**-decimals:
        return f"<{10**-decimals:.{decimals}f}"
    return f"{value:.{decimals}f}"


def breakable(text: Any) -> Markup:
    """Escaped text with line-break opportunities after ``/ . _ :`` so that long layer names
    wrap at their separators instead of widening a table (escaping first: none of those
    characters occurs in an entity that escaping produces)."""
    escaped = str(escape(str(text)))
    return Markup(re.sub(r"([/._:])", r"\1<wbr>", escaped))


def _level(value: float | None, good: float, fair: float) -> str:
    if value is None:
        return "none"
    return "good" if value >= good else "fair" if value >= fair else "poor"


def _join(values: Any) -> str:
    if values is None:
        return "—"
    if isinstance(values, (list, tuple)):
        return ", ".join(num(v) if isinstance(v, float) else str(v) for v in values)
    return str(values)


# -- context ----------------------------------------------------------------------------------------
def _class_namer(summary: dict):
    names = summary.get("model", {}).get("class_names") or []

    def name(index: Any) -> str:
        try:
            i = int(index)
        except (TypeError, ValueError):
            return str(index)
        if i < 0:
            return "—"
        return str(names[i]) if i < len(names) else str(i)

    return name


def _fact(label: str, value: Any, *, mono: bool = False, wide: bool = False) -> dict:
    return {"label": label, "value": str(value), "mono": mono, "wide": wide}


def _expected_class(summary: dict):
    """``expected(transform, top1_of_original)``: the class a declared label action
    (``label_action.permutations``, entry i = class of the transformed image of class i)
    expects; the same class when the element acts trivially or nothing was declared."""
    permutations = (summary.get("label_action") or {}).get("permutations") or {}

    def expected(transform: str, top1: Any) -> Any:
        perm = permutations.get(transform)
        try:
            return perm[int(top1)] if perm else top1
        except (TypeError, ValueError, IndexError):
            return top1

    return expected


def _equivariant(summary: dict) -> bool:
    return (summary.get("label_action") or {}).get("mode") == "equivariance" or any(
        row.get("mode") == "equivariance" for row in summary.get("outputs") or []
    )


def _header(summary: dict) -> list[dict]:
    """The facts that identify the run, in reading order; ``wide`` ones take a whole row."""
    model = summary.get("model", {})
    spec = model.get("input") or {}
    pre = summary.get("preprocessing", {})
    transforms = summary.get("transforms", {})
    data = summary.get("data", {})
    versions = summary.get("eqaudit", {})
    run = summary.get("run", {})
    backend = [str(model.get("backend", "—"))]
    if model.get("format") and model.get("format") != model.get("backend"):
        backend.append(f"format {model['format']}")
    if isinstance(model.get("opset"), dict):
        backend.append("opset " + ", ".join(f"{k} {v}" for k, v in model["opset"].items()))
    if model.get("producer"):
        backend.append(f"producer {model['producer']}")
    if model.get("providers"):
        backend.append(_join(model["providers"]))
    facts = [
        _fact("Model", model.get("name", "—")),
        _fact("Backend", " · ".join(backend)),
        _fact("SHA-256", model.get("sha256", "—"), mono=True, wide=True),
        _fact("Path", model.get("path", "—"), mono=True, wide=True),
    ]
    if spec:
        size = f"{spec.get('channels', '?')}×{spec.get('height', '?')}×{spec.get('width', '?')}"
        text = f"{spec.get('name', 'input')}: {size} {spec.get('layout', '')}"
        text += f" {spec.get('dtype', '')}".rstrip()
        if spec.get("layout_source"):
            text += f" (layout {spec['layout_source']})"
        text += ", " + batch_text(spec.get("batch"), model.get("fixed_batch"))
        facts.append(_fact("Input", text))
    outputs = str(model.get("output_kind", "—"))
    if model.get("output_kind_source"):
        outputs += f" ({'detected' if model['output_kind_source'] == 'auto' else 'as given'})"
    if model.get("num_classes") is not None:
        outputs += f", {model['num_classes']} classes"
    if model.get("binary"):
        outputs += " (one score per image, read as " + (
            "[1 − p, p])" if model["binary"] == "probs" else "[0, z])"
        )
    outputs += ", class names known" if model.get("class_names") else ", no class names"
    facts.append(_fact("Outputs", outputs))
    if pre:
        parts = [
            f"{key} {_join(pre[key])}"
            for key in ("preset", "resize", "channels", "scale", "mean", "std")
            if pre.get(key) is not None
        ]
        parts += [str(note) for note in pre.get("notes") or []]
        facts.append(_fact("Preprocessing", " · ".join(parts) or "—", wide=True))
    if transforms:
        elements = transforms.get("elements") or []
        text = f"{transforms.get('spec', '—')} (shift mode {transforms.get('shift_mode', '—')}): "
        text += f"{len(elements)} elements, " + ", ".join(str(e["name"]) for e in elements)
        facts.append(_fact("Transforms", text, wide=True))
    action = summary.get("label_action") or {}
    if action:
        text = str(action.get("mode", "invariance"))
        declared = action.get("declared") or {}
        if declared:
            text += ": " + ", ".join(f"{k}={v}" for k, v in declared.items())
        if text == "invariance":
            text += " (every class should stay the same under every transform)"
        facts.append(_fact("Label action", text, wide=True))
    if data:
        text = f"{data.get('count', '?')} images from {data.get('source', '?')}"
        if data.get("path"):
            text += f" {data['path']}"
        text += ", labelled" if data.get("labelled") else ", no labels"
        if data.get("synthetic"):
            text += " · SYNTHETIC"
        if data.get("skipped"):
            text += f" · {len(data['skipped'])} files skipped (unreadable)"
        parts = [text, *(str(note) for note in data.get("notes") or [])]
        facts.append(_fact("Data", " · ".join(parts), wide=True))
    facts.append(_fact("Seed", summary.get("seed", "—")))
    if (summary.get("options") or {}).get("layers") is False:
        facts.append(_fact("Layers audited", "none (outputs only: --no-layers)"))
    elif model.get("layers_audited") == 0:
        # Why none, where the engine said (a TorchScript archive, only token sequences).
        notes = (summary.get("geometry") or {}).get("notes") or []
        why = next((n for n in map(str, notes) if n.startswith("no layer is audited: ")), None)
        why = why or next((n for n in map(str, notes) if " not audited: " in n), None)
        text = f"none ({why.removeprefix('no layer is audited: ')})" if why else "none"
        facts.append(_fact("Layers audited", text, wide=bool(why)))
    elif model.get("layers_audited") is not None:
        facts.append(_fact("Layers audited", model["layers_audited"]))
    if run:
        text = str(run.get("started_at", "—"))
        if run.get("duration_s") is not None:
            text += f", ran {float(run['duration_s']):.1f} s"
        if run.get("host"):
            text += f" on {run['host']}"
        facts.append(_fact("Date", text))
    facts.append(_fact("Schema", summary.get("schema_version", "—")))
    if versions:
        text = " · ".join(
            f"{'eqaudit' if k == 'version' else k} {v}" for k, v in versions.items() if v
        )
        facts.append(_fact("Versions", text, wide=True))
    if run.get("argv"):
        facts.append(
            # Quoted as a shell reads it: a path with spaces, a glob, pasted back as it ran.
            _fact("Command", shlex.join(["eqaudit", *map(str, run["argv"])]), mono=True, wide=True)
        )
    return facts


def _output_rows(summary: dict) -> list[dict]:
    rows = []
    for row in summary.get("outputs") or []:
        identity = row["transform"] == IDENTITY
        agreement = row.get("agreement")
        low, high = row.get("agreement_low"), row.get("agreement_high")
        rows.append(
            {
                "transform": row["transform"],
                "mode": row.get("mode") or "invariance",
                "exact": "exact" if row.get("exact") else "resampled",
                "n": row.get("n"),
                "agreement": pct(agreement),
                "agreement_width": 0 if agreement is None else round(100 * agreement, 1),
                "interval": "—" if low is None or high is None else f"{pct(low)} – {pct(high)}",
                "js": fixed(row.get("js_divergence")),
                "logit": fixed(row.get("logit_error"), 3),
                "accuracy": pct(row.get("accuracy")),
                "floor": num(row.get("interpolation_floor")),
                "level": "ref" if identity else _level(agreement, GOOD_AGREEMENT, FAIR_AGREEMENT),
                "skipped": row.get("skipped"),
                "note": "reference" if identity else "",
            }
        )
    return rows


def _scores(summary: dict) -> dict:
    scores = summary.get("scores") or {}
    score = scores.get("robustness_score")
    worst = scores.get("worst_transform")
    worst_agreement = scores.get("worst_agreement")
    if worst_agreement is None and worst:
        for row in summary.get("outputs") or []:
            if row["transform"] == worst:
                worst_agreement = row.get("agreement")
    items = [
        (
            "mean agreement",
            pct(scores.get("mean_agreement")),
            "share of top-1 kept, mean over elements",
        ),
        ("mean JS divergence", fixed(scores.get("mean_js_divergence")), "0 = same probabilities"),
        (
            "orbit consistency",
            pct(scores.get("orbit_consistency")),
            "top-1 the same under every element",
        ),
    ]
    for key, label in (
        ("clean_accuracy", "clean accuracy"),
        ("worst_accuracy", "worst-case accuracy"),
        ("orbit_accuracy", "orbit accuracy"),
    ):
        if scores.get(key) is not None:
            items.append((label, pct(scores[key]), ""))
    return {
        "value": "—" if score is None else shown(score),  # as the console and the gate
        "level": _level(score, GOOD_SCORE, FAIR_SCORE),
        "worst": worst or "—",
        "worst_agreement": pct(worst_agreement),
        "metrics": items,
    }


def _lie(summary: dict) -> dict | None:
    """The Lie-derivative section: one row per generator and the per-layer bar chart."""
    lie = summary.get("lie")
    if not lie:
        return None
    rows = [
        {
            "generator": r["generator"],
            "unit": r["unit"],
            "mean": num(r.get("mean")),
            "p95": num(r.get("p95")),
            "max": num(r.get("max")),
        }
        for r in lie.get("outputs") or []
    ]
    from eqaudit.reports import charts  # matplotlib: imported only when a report is drawn

    bars = charts.lie_bars_svg(lie.get("layers") or [])
    skipped = [r for r in lie.get("layers") or [] if r.get("reason")]
    steps = lie.get("steps") or {}
    return {
        "method": str(lie.get("method") or ""),
        "steps": ", ".join(f"{g} {v:.3g}" for g, v in steps.items()),
        "rows": rows,
        "bars": Markup(bars) if bars else None,
        "skipped": len(skipped),
        "kind": summary.get("model", {}).get("output_kind"),
    }


def _gate(summary: dict) -> dict | None:
    """The gate's verdict in one line (its checks are in junit.xml and summary.md); None
    without thresholds."""
    gate = summary.get("gate") or {}
    checks = gate.get("checks") or []
    if not checks:
        return None
    counts = gate.get("counts") or {}
    failed = [c for c in checks if c.get("status") == "failed"]
    text = (
        f"{len(checks)} checks: {counts.get('passed', 0)} passed, {len(failed)} failed, "
        f"{counts.get('skipped', 0)} skipped"
    )
    if evaluated_nothing(gate):
        text += " (no check evaluated: thresholds none of which applies gate nothing)"
    shown = "; ".join(str(c.get("message", c.get("name"))) for c in failed[:3])
    more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    return {"passed": bool(gate.get("passed")), "text": text, "failures": shown + more}


def _geometry_notes(summary: dict) -> list[str]:
    """Input-size choice, misaligned and unknown-grid counts, and the engine's notes."""
    geometry = summary.get("geometry") or {}
    notes = []
    choice = geometry.get("size_choice")
    if choice and choice.get("note"):
        notes.append(str(choice["note"]))
    misaligned, unknown = geometry.get("misaligned_pairs"), geometry.get("unknown_pairs")
    mode = geometry.get("misaligned_mode", "flag")
    if misaligned:
        how = {
            "flag": "compared on the map's own grid and drawn apart",
            "resample": "compared approximately, resampled about the true grid centre",
            "skip": "not compared",
        }.get(mode, mode)
        notes.append(
            f"{misaligned} (layer, transform) pairs are misaligned ({how}); they are kept out of "
            "the layer scores. --input-size aligned picks an input size where every grid is "
            "symmetric, when the model accepts other sizes."
        )
    if unknown:
        notes.append(
            f"{unknown} (layer, transform) pairs have an unknown sampling grid (an operation "
            "eqaudit does not follow); they are compared on the map's own grid and not scored."
        )
    notes.extend(str(n) for n in geometry.get("notes") or [])
    return notes


def _grid_text(row: dict) -> str:
    """``stride 2x2 · offset 0.5x0.5`` (the sampling grid), or the stride alone."""
    stride = row.get("stride") or "—"
    if row.get("offset_h") is None or row.get("offset_w") is None:
        return stride
    return f"{stride} @ {row['offset_h']:g},{row['offset_w']:g}"


def _layer_tables(summary: dict, grid: LayerGrid) -> tuple[list[dict], list[dict], int]:
    rank = {(grid.elements[e], grid.names[i]): n for n, (e, i) in enumerate(grid.worst(), 1)}
    measured = [
        r for r in summary.get("layers") or [] if r["transform"] != IDENTITY and is_scored(r)
    ]
    measured.sort(key=lambda r: (-r["relative_error"], r.get("index") or 0, r["transform"]))
    worst = [
        {
            "rank": rank.get((r["transform"], r["layer"])),
            "layer": r["layer"],
            "op": r.get("op") or "",
            "kind": r.get("kind") or "",
            "shape": r.get("shape") or "—",
            "stride": _grid_text(r),
            "transform": r["transform"],
            "comparison": r.get("comparison") or "",
            "error": num(r["relative_error"]),
            "p95": num(r.get("relative_error_p95")),
            "cosine": num(r.get("cosine_distance")),
            "fitted": num(r.get("fitted_relative_error")),
            "permutes": bool(r.get("channel_map_permutation")),
        }
        for r in measured[:MAX_WORST_ROWS]
    ]
    groups: dict[str, dict] = {}
    for r in summary.get("layers") or []:
        flagged = r.get("measurable") is not False and not is_scored(r)
        if r.get("measurable") is False or (flagged and r["transform"] != IDENTITY):
            group = groups.setdefault(
                r["layer"],
                {
                    "layer": r["layer"],
                    "stride": _grid_text(r),
                    "elements": [],
                    "reason": r.get("reason") or "—",
                },
            )
            group["elements"].append(r["transform"])
    unmeasurable = list(groups.values())
    return worst, unmeasurable[:MAX_UNMEASURABLE_ROWS], len(unmeasurable)


def _thumbnail(uri: Any) -> str | None:
    """Only image data URIs reach an ``src`` attribute (gallery.json is a file on disk)."""
    return uri if isinstance(uri, str) and _THUMBNAIL.match(uri) else None


def _as_jpeg(uri: str) -> str:
    """A PNG data URI re-encoded as JPEG when that is smaller (deterministic for a given Pillow)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        image = image.convert("L" if image.mode in ("L", "LA", "I;16") else "RGB")
    except (OSError, ValueError):
        return uri
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    jpeg = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return jpeg if len(jpeg) < len(uri) else uri


def _fit_budget(flips: list[dict], orbits: list[dict]) -> None:
    """Re-encode the thumbnails in place when together they would exceed the page budget."""
    holders = [side for flip in flips for side in flip["sides"]]
    holders += [item for orbit in orbits for item in orbit["elements"]]
    if sum(len(h["thumbnail"] or "") for h in holders) <= THUMBNAIL_BUDGET:
        return
    cache: dict[str, str] = {}
    for holder in holders:
        uri = holder["thumbnail"]
        if uri and uri.startswith("data:image/png"):
            holder["thumbnail"] = cache.setdefault(uri, _as_jpeg(uri))


def _gallery(summary: dict, gallery: dict) -> dict:
    name = _class_namer(summary)
    expected = _expected_class(summary)
    flips = []
    for flip in (gallery.get("flips") or [])[:MAX_FLIPS]:
        transform = str(flip.get("transform", ""))
        original = flip.get("original") or {}
        transformed = flip.get("transformed") or {}
        wanted = expected(transform, original.get("top1"))
        flips.append(
            {
                "image": str(flip.get("image", "")),
                "transform": transform,
                "label": name(flip.get("label", -1)),
                "js": num(flip.get("js_divergence")),
                "sides": [
                    {
                        "caption": caption,
                        "thumbnail": _thumbnail(side.get("thumbnail")),
                        "top1": name(side.get("top1")),
                        "confidence": pct(side.get("confidence")),
                        "expected": None,
                    }
                    for caption, side in (("original", original), (transform, transformed))
                ],
            }
        )
        if wanted != original.get("top1"):  # a label action moves this class: say where to
            flips[-1]["sides"][1]["expected"] = name(wanted)
    orbits = []
    for orbit in (gallery.get("orbits") or [])[:MAX_ORBITS]:
        elements = orbit.get("elements") or []
        reference = elements[0].get("top1") if elements else None
        orbits.append(
            {
                "image": str(orbit.get("image", "")),
                "label": name(orbit.get("label", -1)),
                "elements": [
                    {
                        "transform": str(e.get("transform", "")),
                        "thumbnail": _thumbnail(e.get("thumbnail")),
                        "top1": name(e.get("top1")),
                        "confidence": pct(e.get("confidence")),
                        "changed": e.get("top1")
                        != expected(str(e.get("transform", "")), reference),
                    }
                    for e in elements
                ],
            }
        )
    _fit_budget(flips, orbits)
    total = 0
    for row in summary.get("outputs") or []:
        if row["transform"] != IDENTITY and row.get("agreement") is not None:
            total += round((1 - row["agreement"]) * (row.get("n") or 0))
    return {"flips": flips, "orbits": orbits, "total_flips": total}


def build_context(result: AuditResult) -> dict:
    """Everything the template shows, as plain strings and lists (formatting happens here)."""
    # matplotlib is imported only when a page is drawn, not whenever the CLI starts.
    from eqaudit.reports import charts

    summary = result.summary
    data = summary.get("data", {})
    synthetic = bool(data.get("synthetic"))
    warnings = [str(w) for w in summary.get("warnings") or []]
    if synthetic:
        warnings = [w for w in warnings if not w.startswith("SYNTHETIC INPUTS")]
    grid = charts.layer_grid(summary)
    curve = heatmap = None
    if not grid.empty:
        # Safe to mark up: matplotlib wrote and escaped every byte (see charts._to_svg).
        curve = Markup(charts.layer_curve_svg(grid))
        heatmap = Markup(charts.layer_heatmap_svg(grid))
    worst, unmeasurable, unmeasurable_total = _layer_tables(summary, grid)
    elements = summary.get("transforms", {}).get("elements") or []
    return {
        "title": str(summary.get("model", {}).get("name", "model")),
        "schema": str(summary.get("schema_version", "?")),
        "header": _header(summary),
        "synthetic": synthetic,
        "data_count": data.get("count"),
        "warnings": warnings,
        "scores": _scores(summary),
        "outputs": _output_rows(summary),
        "resampled": any(not e.get("exact", True) for e in elements),
        "labelled": bool(data.get("labelled")),
        "equivariant": _equivariant(summary),
        "has_layers": not grid.empty,
        "layer_count": len(grid.names),
        "numbered": len(grid.worst()),
        "worst_min_error": num(charts.WORST_MIN_ERROR),
        "curve": curve,
        "heatmap": heatmap,
        "worst_layers": worst,
        "fitted": any("fitted_relative_error" in r for r in summary.get("layers") or []),
        "unmeasurable": unmeasurable,
        "unmeasurable_total": unmeasurable_total,
        "geometry_notes": _geometry_notes(summary),
        "gate": _gate(summary),
        "binary_logit": (summary.get("model") or {}).get("binary") == "logits",
        "lie": _lie(summary),
        "gallery": _gallery(summary, result.gallery or {}),
        "thresholds": {
            "good_agreement": pct(GOOD_AGREEMENT, 0),
            "fair_agreement": pct(FAIR_AGREEMENT, 0),
            "good_score": f"{GOOD_SCORE:.0f}",
            "fair_score": f"{FAIR_SCORE:.0f}",
        },
    }


def render_html(result: AuditResult) -> str:
    """The page as a string (deterministic for a given result)."""
    return _environment().get_template(TEMPLATE).render(**build_context(result))


def write_html_report(result: AuditResult, folder: Path) -> list[str]:
    """Writer for :data:`eqaudit.reports.WRITERS`: ``report.html`` in the staging ``folder``."""
    (Path(folder) / FILE_NAME).write_text(render_html(result), encoding="utf-8")
    return [FILE_NAME]


def save_html(result: AuditResult, path: Path, page: str | None = None) -> Path:
    """Write the page to ``path`` atomically (a temporary file beside it, then renamed), for
    re-rendering next to a saved summary without touching the other report files."""
    path = Path(path)
    check_writable(path, "--out", folder=False, example="report.html")
    page = render_html(result) if page is None else page
    try:
        replace_text(path, page)
    except OSError as exc:
        raise UsageError(
            f"cannot write '{path}': {exc.strerror or exc}; choose another --out"
        ) from None
    return path


def load_saved_result(source: Path) -> tuple[AuditResult, Path]:
    """A saved report (its folder or its ``summary.json``) and the folder holding it; a missing
    or unreadable summary is the user's error, said in one line."""
    source = Path(source)
    summary_path = source / "summary.json" if source.is_dir() else source
    if not summary_path.is_file():
        where = f"no summary.json in '{source}'" if source.is_dir() else f"'{source}' not found"
        raise UsageError(
            f"{where}: pass a folder written by eqaudit check (or eqaudit demo) or its summary.json"
        )
    # (from_json names the file it cannot read: summary.json, predictions.csv or gallery.json)
    result = AuditResult.from_json(summary_path)
    check_saved_summary(result.summary, summary_path)
    if not isinstance(result.gallery, dict):
        raise DataError(
            f"gallery.json beside '{summary_path}' is not a gallery; delete it or rerun"
        )
    return result, summary_path.parent


def rerender(source: Path, out: Path | None = None) -> Path:
    """``eqaudit report``: the page of a saved report, written to ``out`` (default: report.html
    beside the summary) without running the model."""
    result, folder = load_saved_result(source)
    summary_path = Path(source) if Path(source).is_file() else folder / "summary.json"
    broken = (KeyError, TypeError, AttributeError, ValueError)
    try:
        page = render_html(result)
    except broken as exc:
        # Blame the file at fault: the page renders without the gallery when gallery.json is.
        what, path = "summary", summary_path
        try:
            render_html(replace(result, gallery={"flips": [], "orbits": []}))
        except broken:
            pass
        else:
            what, path = "gallery", folder / "gallery.json"
        raise DataError(
            f"'{path}' does not follow the {what} schema ({type(exc).__name__}: {exc}); "
            "rerun eqaudit check to write it again"
        ) from None
    return save_html(result, Path(out) if out is not None else folder / FILE_NAME, page)

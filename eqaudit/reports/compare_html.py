"""report.html of ``eqaudit compare``: one self-contained page that reads compare.json.

The same machinery as the single-audit page (:mod:`eqaudit.reports.html`): the Jinja2 environment
with autoescaping, the inlined stylesheet, matplotlib charts as inline SVG, no JavaScript and
nothing fetched. Every model, layer and element name is text. The page depends only on the
content of compare.json (which holds no date), so rendering the same compare.json twice gives the
same bytes, and the page written by ``eqaudit compare`` is the one compare.json reproduces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from markupsafe import Markup

from eqaudit.gate import shown
from eqaudit.reports.html import (
    FAIR_AGREEMENT,
    GOOD_AGREEMENT,
    _environment,
    _level,
    fixed,
    num,
    pct,
)

TEMPLATE = "compare.html.j2"
FILE_NAME = "report.html"
#: Rows of the "largest per-layer changes" table (compare.csv holds every pair).
MAX_CHANGE_ROWS = 12
#: Names listed per model in the unmatched-layer table (compare.json holds all of them).
MAX_UNMATCHED_ROWS = 40
MINUS = "\u2212"
#: compare.json's verdicts as the table shows them (a short column).
VERDICTS = {"no significant difference": "not significant"}


def _plain(data: dict) -> dict:
    """compare.json's content as JSON would give it back (NaN -> null, numpy -> Python), so the
    page of a fresh comparison and the page of its saved compare.json are the same bytes."""
    from eqaudit.results import json_ready

    return json.loads(json.dumps(json_ready(data), allow_nan=False))


# -- number formatting ---------------------------------------------------------------------------
def _signed(text: str) -> str:
    """A sign in front of a formatted number (a true minus); none for a zero."""
    if text.lstrip("-").strip("0.") == "" or text == "—":
        return text.lstrip("-")
    return MINUS + text[1:] if text.startswith("-") else "+" + text


def points(value: float | None, digits: int = 1) -> str:
    """A difference of two shares in percentage points: -0.25 -> "−25.0 pp"."""
    if value is None:
        return "—"
    if value == 0:
        return "0 pp"
    return _signed(f"{100 * value:.{digits}f}") + " pp"


def _interval(low: float | None, high: float | None) -> str:
    """An interval of a difference of shares, in percentage points (the unit is in the header)."""
    if low is None or high is None:
        return "—"
    return f"[{points(low)[:-3]}, {points(high)[:-3]}]"


def _signed_fixed(value: float | None, decimals: int = 4) -> str:
    if value is None:
        return "—"
    text = fixed(abs(value), decimals)
    if text == "0":
        return text
    return ("+" if value > 0 else MINUS) + text


# -- context ----------------------------------------------------------------------------------------
def _models(data: dict) -> list[dict]:
    """The rows of the A/B table in the header."""
    a, b = data.get("a") or {}, data.get("b") or {}
    scores = data.get("scores") or {}

    def score(value: Any) -> str:  # as the console and the check report print it
        return "—" if value is None else shown(float(value))

    rows = [
        ("Model", a.get("model", "—"), b.get("model", "—"), False),
        ("Backend", a.get("backend", "—"), b.get("backend", "—"), False),
        ("SHA-256", a.get("sha256") or "—", b.get("sha256") or "—", True),
        ("Source", a.get("source", "—"), b.get("source", "—"), True),
        (
            "Robustness score",
            score(scores.get("robustness_score_a", a.get("robustness_score"))),
            score(scores.get("robustness_score_b", b.get("robustness_score"))),
            False,
        ),
        (
            "Orbit consistency",
            pct(scores.get("orbit_consistency_a", a.get("orbit_consistency"))),
            pct(scores.get("orbit_consistency_b", b.get("orbit_consistency"))),
            False,
        ),
    ]
    return [{"label": k, "a": str(va), "b": str(vb), "mono": mono} for k, va, vb, mono in rows]


def _shared(data: dict) -> list[dict]:
    """Facts that hold for both models (dl.facts of the single report)."""
    elements = [str(e) for e in (data.get("data") or {}).get("elements") or []]
    info = data.get("data") or {}
    method = data.get("method") or {}
    boot = method.get("bootstrap") or {}
    facts = [
        {
            "label": "Transforms",
            "value": (
                f"{info['transforms']} (shift mode {info.get('shift_mode')}): "
                if info.get("transforms")
                else ""
            )
            + f"{len(elements)} elements, the same for A and B: "
            + ", ".join(elements),
            "mono": False,
            "wide": True,
        },
        {
            "label": "Data",
            "value": f"{info.get('count', '?')} "
            + ("synthetic " if info.get("synthetic") else "")
            + f"images{' from ' + info['path'] if info.get('path') else ''}, the same for A "
            f"and B (paired), sampling seed {info.get('seed', '?')}; "
            f"SHA-256 of the image ids {info.get('image_ids_sha256', '—')}",
            "mono": False,
            "wide": True,
        },
        {
            "label": "Significance",
            "value": f"alpha {float(data.get('alpha', 0.05)):g}, family-wise over the "
            f"{len(elements)} elements (Holm)",
            "mono": False,
            "wide": False,
        },
        {
            "label": "Bootstrap",
            "value": f"{boot.get('resamples', '?')} resamples, seed {boot.get('seed', '?')}, "
            f"{pct(boot.get('confidence'), 0)} interval",
            "mono": False,
            "wide": False,
        },
        {
            "label": "Gate",
            "value": (
                ("PASSED" if data.get("passed") else "FAILED") + " (--fail-on-regression)"
                if data.get("fail_on_regression")
                else "not gated (add --fail-on-regression to exit 1 on a regression)"
            ),
            "mono": False,
            "wide": False,
        },
        {
            "label": "Schema",
            "value": f"{data.get('kind', 'eqaudit-compare')} {data.get('schema_version', '?')}",
            "mono": False,
            "wide": False,
        },
    ]
    a, b = data.get("a") or {}, data.get("b") or {}
    if a.get("sha256") and a.get("sha256") == b.get("sha256"):
        facts.insert(
            0,
            {
                "label": "Files",
                "value": "A and B are the same file (same SHA-256)",
                "mono": False,
                "wide": True,
            },
        )
    return facts


def _verdict(data: dict) -> dict:
    rows = data.get("outputs") or []
    worse = [str(r["transform"]) for r in rows if r.get("verdict") == "B worse"]
    better = [str(r["transform"]) for r in rows if r.get("verdict") == "B better"]
    top1 = data.get("top1_agreement") or {}
    scores = data.get("scores") or {}
    alpha = float(data.get("alpha", 0.05))
    metrics = [
        (
            "A and B agree (untransformed)",
            pct(top1.get("untransformed")),
            f"same top-1 class on {top1.get('same', '?')} of {top1.get('n', '?')} images",
            _level(top1.get("untransformed"), GOOD_AGREEMENT, FAIR_AGREEMENT),
        ),
    ]
    a_score, b_score = scores.get("robustness_score_a"), scores.get("robustness_score_b")
    if a_score is not None and b_score is not None:
        metrics.append(
            (
                "robustness score, A → B",
                f"{shown(a_score)} → {shown(b_score)}",
                "difference " + _signed(f"{b_score - a_score:.2f}"),
                "none",
            )
        )
    if scores.get("orbit_consistency_a") is not None:
        metrics.append(
            (
                "orbit consistency, A → B",
                f"{pct(scores['orbit_consistency_a'])} → {pct(scores.get('orbit_consistency_b'))}",
                f"exact McNemar p {num(scores.get('orbit_mcnemar_p'))} (not adjusted)",
                "none",
            )
        )
    if better:
        metrics.append(
            (
                "B significantly better",
                f"{len(better)} of {len(rows)}",
                ", ".join(better),
                "none",
            )
        )
    return {
        "regressed": bool(worse),
        "level": "poor" if worse else "good",
        "headline": f"Yes, on {len(worse)} of {len(rows)} elements" if worse else "No",
        "worse": worse,
        "alpha": f"{alpha:g}",
        "elements": len(rows),
        "gated": bool(data.get("fail_on_regression")),
        "passed": bool(data.get("passed", True)),
        "metrics": metrics,
    }


def _output_rows(data: dict) -> list[dict]:
    rows = []
    for r in data.get("outputs") or []:
        verdict = str(r.get("verdict", ""))
        rows.append(
            {
                "transform": str(r["transform"]),
                "n": r.get("n"),
                "agreement_a": pct(r.get("agreement_a")),
                "agreement_b": pct(r.get("agreement_b")),
                "difference": points(r.get("agreement_difference")),
                "interval": _interval(r.get("difference_low"), r.get("difference_high")),
                "only_a": r.get("only_a", "—"),
                "only_b": r.get("only_b", "—"),
                "mcnemar_p": num(r.get("mcnemar_p")),
                "holm_p": num(r.get("holm_p")),
                "js_a": fixed(r.get("js_divergence_a")),
                "js_b": fixed(r.get("js_divergence_b")),
                "js_difference": _signed_fixed(r.get("js_difference")),
                "verdict": VERDICTS.get(verdict, verdict),
                "level": {"B worse": "worse", "B better": "better"}.get(verdict, "same"),
            }
        )
    return rows


#: compare.csv's ``match`` as the page says it
_MATCHED = {"name": "by name", "module": "module path", "order+shape": "order + shape"}


def _changes(data: dict) -> list[dict]:
    """The matched (layer, element) pairs whose error grew most from A to B."""
    measured = [
        r
        for r in data.get("layers") or []
        if r.get("relative_error_difference") is not None and r["relative_error_difference"] > 0
    ]
    order = {name: i for i, name in enumerate(dict.fromkeys(r["layer_a"] for r in measured))}
    measured.sort(key=lambda r: (-r["relative_error_difference"], order[r["layer_a"]]))
    return [
        {
            "layer_a": str(r["layer_a"]),
            "layer_b": str(r["layer_b"]),
            "match": _MATCHED.get(r.get("match") or "", "order + shape"),
            "shape": str(r.get("shape") or "—"),
            "transform": str(r["transform"]),
            "error_a": num(r.get("relative_error_a")),
            "error_b": num(r.get("relative_error_b")),
            "difference": _signed(num(r["relative_error_difference"])),
        }
        for r in measured[:MAX_CHANGE_ROWS]
    ]


def _unmatched(matching: dict) -> dict:
    sides = []
    for side, key in (("A", "unmatched_a"), ("B", "unmatched_b")):
        names = [str(n) for n in matching.get(key) or []]
        sides.append(
            {
                "side": side,
                "names": names[:MAX_UNMATCHED_ROWS],
                "total": len(names),
            }
        )
    return {"sides": sides, "any": any(s["total"] for s in sides)}


def _bootstrap(data: dict) -> dict:
    boot = (data.get("method") or {}).get("bootstrap") or {}
    return {
        "resamples": str(boot.get("resamples", "?")),
        "seed": str(boot.get("seed", "?")),
        "confidence": pct(boot.get("confidence"), 0),
    }


def build_compare_context(data: dict) -> dict:
    """Everything the template shows, as plain strings and lists."""
    from eqaudit.reports import charts

    data = _plain(data)
    a, b = data.get("a") or {}, data.get("b") or {}
    elements = [str(e) for e in (data.get("data") or {}).get("elements") or []]
    grid = charts.pair_grid(data.get("layers") or [], elements)
    curve = None
    if not grid.empty:
        # Safe to mark up: matplotlib wrote and escaped every byte (see charts._to_svg).
        curve = Markup(
            charts.compare_curve_svg(grid, str(a.get("model", "A")), str(b.get("model", "B")))
        )
    matching = data.get("layer_matching") or {}
    n = {r.get("n") for r in data.get("outputs") or []}
    return {
        "title": f"{a.get('model', 'A')} vs {b.get('model', 'B')}",
        "name_a": str(a.get("model", "A")),
        "name_b": str(b.get("model", "B")),
        "schema": str(data.get("schema_version", "?")),
        "models": _models(data),
        "shared": _shared(data),
        "notes": [str(note) for note in data.get("notes") or []],
        "verdict": _verdict(data),
        "outputs": _output_rows(data),
        "images": n.pop() if len(n) == 1 else None,
        "curve": curve,
        "pairs": len(grid.names_a),
        "by_name": matching.get("matched_by_name", 0),
        "by_module": matching.get("matched_by_module", 0),
        "by_order": matching.get("matched_by_order", 0),
        "changes": _changes(data),
        "unmatched": _unmatched(matching),
        "bootstrap": _bootstrap(data),
        "thresholds": {"good": pct(GOOD_AGREEMENT, 0), "fair": pct(FAIR_AGREEMENT, 0)},
    }


def render_compare_html(data: dict) -> str:
    """The page of a comparison (``data``: compare.json's content), deterministic."""
    return _environment().get_template(TEMPLATE).render(**build_compare_context(data))


def write_compare_html(data: dict, folder: Path) -> list[str]:
    """``report.html`` in ``folder`` (the staging folder of :func:`eqaudit.compare.write_comparison`,
    whose moves make it atomic); returns the file name."""
    (Path(folder) / FILE_NAME).write_text(render_compare_html(data), encoding="utf-8")
    return [FILE_NAME]

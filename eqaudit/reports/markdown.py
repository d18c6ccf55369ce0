"""summary.md: a compact Markdown summary for CI (e.g. GitHub's job summary page).

The verdict, the gate checks (failed first), one row per transform element and the least
equivariant layers. Numbers are printed with 4 significant figures, as the gate compares them.
Tables are capped so the file stays far below GitHub's 1 MiB step-summary limit
(:data:`MAX_BYTES`); the full tables are in the CSV files and junit.xml.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from eqaudit.gate import evaluated_nothing, threshold_text
from eqaudit.results import AuditResult, is_scored, output_title

FILE_NAME = "summary.md"
#: Hard cap on the file (GitHub accepts up to 1 MiB per step summary).
MAX_BYTES = 64 * 1024
MAX_CHECK_ROWS = 40
MAX_OUTPUT_ROWS = 40
MAX_LAYER_ROWS = 8
MAX_WARNINGS = 5
MAX_CELL = 80

_SPECIAL = re.compile(r"([\\`*_\[\]|#])")
STATUS = {"passed": "✅ pass", "failed": "❌ **FAIL**", "skipped": "⚪ skip"}


def cell(value: object, limit: int = MAX_CELL) -> str:
    """Text safe inside a table cell: one line, Markdown punctuation escaped, no raw HTML."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _SPECIAL.sub(r"\\\1", text)


def num(value: float | None) -> str:
    return "—" if value is None else f"{value:#.4g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A GitHub-flavoured Markdown table; ``right``: indexes of right-aligned columns."""
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def capped(rows: list, limit: int, what: str) -> tuple[list, str]:
    """At most ``limit`` rows, and a note saying how many were left out and where they are."""
    if len(rows) <= limit:
        return rows, ""
    return rows[:limit], f"\n\n… and {len(rows) - limit} more {what}."


def fit(text: str, max_bytes: int = MAX_BYTES) -> str:
    """Cut at a line boundary when over ``max_bytes`` (UTF-8), saying so."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    cut = data[: max_bytes - 200].decode("utf-8", errors="ignore").rsplit("\n", 1)[0]
    return cut + "\n\n… (cut to stay within the size limit; see the CSV files)\n"


def check_rows(checks: list[dict]) -> tuple[str, str]:
    """The gate table (failed first, then passed, then skipped) and its overflow note."""
    order = {"failed": 0, "passed": 1, "skipped": 2}
    ranked = sorted(checks, key=lambda c: order.get(c["status"], 3))
    rows = []
    for c in ranked:
        if c["status"] == "skipped":
            rows.append([STATUS["skipped"], cell(c["name"]), "", "", cell(c.get("reason") or "")])
            continue
        rows.append(
            [
                STATUS[c["status"]],
                cell(c["name"]),
                c["shown"],
                f"{c['comparison']} {threshold_text(c['threshold'])}",
                cell(c["description"]),
            ]
        )
    shown_rows, note = capped(rows, MAX_CHECK_ROWS, "checks in junit.xml")
    text = table(["", "check", "value", "threshold", "what"], shown_rows, right=(2, 3))
    return text, note


def render_audit(summary: dict) -> str:
    """summary.md of one audit (with its gate block when the gate ran)."""
    scores, model, data = summary["scores"], summary["model"], summary["data"]
    gate = summary.get("gate")
    if gate is None or not gate.get("checks"):
        title = "eqaudit audit"  # (not "gate: PASSED": nothing was gated)
    elif evaluated_nothing(gate):
        title = "eqaudit gate: FAILED, no check evaluated (all skipped)"
    else:
        title = "eqaudit gate: " + ("PASSED" if gate["passed"] else "FAILED")
    images = "synthetic" if data["synthetic"] else data["source"]
    parts = [
        f"## {title}",
        "",
        f"**{cell(model['name'])}** ({cell(model['backend'])}, input "
        f"{model['input']['height']}x{model['input']['width']}) on {data['count']} {images} "
        f"images, transforms `{cell(summary['transforms']['spec'])}`: robustness score "
        f"**{num(scores['robustness_score'])}** / 100, mean agreement "
        f"{num(scores['mean_agreement'])}, orbit consistency {num(scores['orbit_consistency'])}, "
        f"worst element {cell(scores['worst_transform'])}.",
    ]
    for warning in summary.get("warnings", [])[:MAX_WARNINGS]:
        parts += ["", f"> ⚠️ {cell(warning, 300)}"]
    if gate is not None:
        counts = gate["counts"]
        parts += [
            "",
            f"### Gate: {counts['failed']} failed, {counts['passed']} passed, "
            f"{counts['skipped']} skipped",
            "",
        ]
        if gate["checks"]:
            text, note = check_rows(gate["checks"])
            parts += [text + note, "", f"_{cell(gate['rule'], 200)}._"]
        else:
            parts.append("No thresholds configured.")
    rows = []
    for r in summary["outputs"]:
        if r["skipped"]:
            rows.append([cell(r["transform"]), "", "", "", "", cell(f"skipped: {r['skipped']}")])
            continue
        interval = f"{num(r['agreement_low'])}–{num(r['agreement_high'])}"
        rows.append(
            [
                cell(r["transform"]),
                num(r["agreement"]),
                interval,
                num(r["js_divergence"]),
                num(r.get("accuracy")),
                "",
            ]
        )
    rows, note = capped(rows, MAX_OUTPUT_ROWS, "elements in outputs.csv")
    parts += [
        "",
        f"### {output_title(summary)}",
        "",
        table(
            ["transform", "agreement", "95% interval", "JS divergence", "accuracy", "note"],
            rows,
            right=(1, 2, 3, 4),
        )
        + note,
    ]
    measurable = [r for r in summary.get("layers") or [] if is_scored(r) and r["transform"] != "id"]
    if measurable:
        worst = sorted(measurable, key=lambda r: -r["relative_error"])[:MAX_LAYER_ROWS]
        parts += [
            "",
            "### Least equivariant layers",
            "",
            table(
                ["layer", "transform", "relative error", "p95"],
                [
                    [
                        cell(r["layer"]),
                        cell(r["transform"]),
                        num(r["relative_error"]),
                        num(r["relative_error_p95"]),
                    ]
                    for r in worst
                ],
                right=(2, 3),
            ),
        ]
    return fit("\n".join(parts) + "\n")


def render_compare(data: dict) -> str:
    """summary.md of ``eqaudit compare`` (compare.json content)."""
    a, b = data["a"], data["b"]
    worse = data["regressions"]
    if data["fail_on_regression"]:
        title = "eqaudit compare: " + ("PASSED" if data["passed"] else "FAILED")
    else:
        title = "eqaudit compare"
    top1 = data["top1_agreement"]
    scores = data["scores"]
    parts = [
        f"## {title}",
        "",
        f"A **{cell(a['model'])}** ({cell(a['backend'])}) against B **{cell(b['model'])}** "
        f"({cell(b['backend'])}) on the same {data['data']['count']} images: robustness score "
        f"{num(scores['robustness_score_a'])} → {num(scores['robustness_score_b'])}; top-1 "
        f"agreement of A and B on untransformed images {num(top1['untransformed'])} "
        f"({top1['same']}/{top1['n']}).",
        "",
        (
            f"B is significantly less invariant than A on {len(worse)} element(s): "
            f"{cell(', '.join(worse))}"
            if worse
            else "No element where B is significantly less invariant than A"
        )
        + f" (exact McNemar, Holm-adjusted, alpha {data['alpha']:g}).",
    ]
    for note in data.get("notes", [])[:MAX_WARNINGS]:
        parts += ["", f"> ⚠️ {cell(note, 300)}"]
    rows = [
        [
            cell(r["transform"]),
            num(r["agreement_a"]),
            num(r["agreement_b"]),
            num(r["agreement_difference"]),
            f"{num(r['difference_low'])} to {num(r['difference_high'])}",
            num(r["holm_p"]),
            num(r["js_divergence_a"]),
            num(r["js_divergence_b"]),
            cell(r["verdict"]),
        ]
        for r in data["outputs"]
    ]
    rows, note = capped(rows, MAX_OUTPUT_ROWS, "elements in compare.csv")
    parts += [
        "",
        table(
            [
                "transform",
                "agreement A",
                "agreement B",
                "B − A",
                "95% bootstrap",
                "McNemar p (Holm)",
                "JS A",
                "JS B",
                "verdict",
            ],
            rows,
            right=(1, 2, 3, 4, 5, 6, 7),
        )
        + note,
    ]
    changed = [r for r in data["layers"] if r["relative_error_difference"]]
    if not changed and data["layers"]:
        parts += ["", "Per-layer relative errors are the same for A and B."]
    if changed:
        biggest = sorted(changed, key=lambda r: -abs(r["relative_error_difference"]))
        rows = [
            [
                cell(r["layer_a"]),
                cell(r["layer_b"]),
                cell(r["transform"]),
                num(r["relative_error_a"]),
                num(r["relative_error_b"]),
            ]
            for r in biggest[:MAX_LAYER_ROWS]
        ]
        parts += [
            "",
            "### Layers that changed most (relative error)",
            "",
            table(["layer A", "layer B", "transform", "A", "B"], rows, right=(3, 4)),
        ]
    matching = data["layer_matching"]
    unmatched = len(matching["unmatched_a"]) + len(matching["unmatched_b"])
    if unmatched:
        parts += [
            "",
            f"{len(matching['unmatched_a'])} layer(s) of A and {len(matching['unmatched_b'])} "
            "of B have no counterpart (listed in compare.json).",
        ]
    return fit("\n".join(parts) + "\n")


def write_markdown(result: AuditResult, folder: Path) -> list[str]:
    (Path(folder) / FILE_NAME).write_text(render_audit(result.summary), encoding="utf-8")
    return [FILE_NAME]


def append_step_summary(text: str, path: str | None) -> str | None:
    """Append ``text`` to ``$GITHUB_STEP_SUMMARY`` (``path``); returns a warning on failure."""
    if not path:
        return None
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")
    except OSError as exc:
        return f"could not append to GITHUB_STEP_SUMMARY '{path}': {exc.strerror or exc}"
    return None

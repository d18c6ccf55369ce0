"""Console output: the summary tables and the progress bar. The only module that imports rich."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from eqaudit.results import AuditResult, batch_text, is_flagged, is_scored, output_title

# Piped output (CI logs, files) is not cut at rich's default 80 columns; a terminal keeps its own
# width, and COLUMNS still wins when set.
_PIPE_WIDTH = None if os.environ.get("COLUMNS") else 120
stdout = Console(
    highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else _PIPE_WIDTH
)
stderr = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else _PIPE_WIDTH)


def _table(title: str, caption: str | None = None) -> Table:
    """A table for a terminal as narrow as 80 columns: no vertical rules or edge padding; its
    cells fold rather than being cut (:func:`_name_columns` for layer names)."""
    return Table(
        title=title,
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )


def _name_columns(table: Table, names: Iterable[str]) -> None:
    """A table of layers' ``layer`` and ``op`` columns: the name, what --layers takes, whole
    where the width allows, else folded, never cut; the op gives way first (with an ellipsis:
    the name usually says it again)."""
    widest = max([len("layer"), *map(len, names)])
    table.add_column("layer", overflow="fold", min_width=_floor(widest, 18))
    table.add_column("op", overflow="ellipsis", max_width=10)


def _floor(widest: int, floor: int) -> int | None:
    """A column's minimum width: its content up to ``floor`` on a terminal of 80 columns or
    more; none below, where a minimum the row cannot hold would make rich crop the row's end."""
    return min(widest, floor) if stdout.width >= 80 else None


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


# Messages carry names and paths ("pip install 'eqaudit[ray]'", "agreement[rot90]"): escaped,
# or rich would read their brackets as markup and drop them.
def error(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    stderr.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int | None], None]]:
    """A progress callback ``(done, total)``; a rich bar on stderr only when it is a terminal.
    A None total leaves the total as it was (unknown at first)."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_summary(result: AuditResult, out_dir: str | None = None, max_layers: int = 8) -> None:
    s = result.summary
    scores = s["scores"]
    for message in s["warnings"]:
        warn(message)
    model, data = s["model"], s["data"]
    stdout.print(
        f"[bold]{escape(model['name'])}[/] ({model['backend']}, input {model['input']['height']}x"
        f"{model['input']['width']} {model['input']['layout']}, {model['output_kind']}) on "
        f"{data['count']} {'synthetic' if data['synthetic'] else data['source']} images, "
        f"transforms {escape(s['transforms']['spec'])}"
    )
    for note in [*data.get("notes", []), *s["preprocessing"].get("notes", [])]:
        stdout.print(f"[dim]note: {escape(note)}[/]")
    table = _table(escape(output_title(s)))
    labelled = any(row.get("accuracy") is not None for row in s["outputs"])
    columns = ("transform", "agreement", "95% CI", "JS div", "logit err")
    for column in (*columns, "accuracy") if labelled else columns:
        table.add_column(
            column, justify="left" if column == "transform" else "right", overflow="fold"
        )
    notes = []  # below the table, whole at any width
    for row in s["outputs"]:
        if row["skipped"]:
            table.add_row(row["transform"], "skipped", style="dim")
            notes.append(f"{row['transform']} skipped: {row['skipped']}")
            continue
        if row["interpolation_floor"] is not None:
            floor = _num(row["interpolation_floor"], 3)
            notes.append(f"{row['transform']} resampled: interpolation floor {floor}")
        cells = [
            row["transform"],
            _pct(row["agreement"]),
            f"{_pct(row['agreement_low'])}–{_pct(row['agreement_high'])}",
            _num(row["js_divergence"], 3),
            _num(row["logit_error"], 3),
        ]
        table.add_row(*cells, *([_pct(row["accuracy"])] if labelled else []))
    stdout.print(table)
    for note in notes:
        stdout.print(f"[dim]note: {escape(note)}[/]")
    measurable = [r for r in s["layers"] if is_scored(r) and r["transform"] != "id"]
    if measurable:
        worst = sorted(measurable, key=lambda r: -r["relative_error"])[:max_layers]
        layers = _table("Least equivariant layers (relative error, mean over images)")
        _name_columns(layers, (r["layer"] for r in worst))
        layers.add_column("transform", overflow="fold")  # (kind: in layers.csv and the report)
        for column in ("rel err", "p95", "cos dist"):
            layers.add_column(column, justify="right", overflow="fold")
        for r in worst:
            layers.add_row(
                escape(r["layer"]),  # a name may hold brackets ("stage[/]1"): not markup
                escape(r["op"]),
                r["transform"],
                _num(r["relative_error"], 3),
                _num(r["relative_error_p95"], 3),
                _num(r["cosine_distance"], 3),
            )
        stdout.print(layers)
    choice = (s.get("geometry") or {}).get("size_choice")
    if choice and choice.get("note"):
        stdout.print(choice["note"], markup=False, highlight=False, soft_wrap=True)
    lie = s.get("lie")
    if lie and lie.get("outputs"):
        parts = [f"{r['generator']} {_num(r['mean'], 3)} {r['unit']}" for r in lie["outputs"] if r]
        stdout.print(
            f"Lie derivative of the outputs (mean over images; {lie.get('method')}): "
            + "; ".join(parts)
        )
    misaligned = [r for r in s["layers"] if is_flagged(r)]
    if misaligned:
        names = sorted({r["layer"] for r in misaligned})
        resampled = (s.get("options") or {}).get("misaligned") == "resample"
        # (not after --input-size aligned: the note above says why no size would do)
        tried = ((s.get("geometry") or {}).get("size_choice") or {}).get("requested")
        what = (
            "compared by resampling (approximate), flagged and kept out of the layer scores"
            + ("" if tried else " (try --input-size aligned for exact comparisons)")
            if resampled
            else "flagged and kept out of the layer scores ("
            + ("" if tried else "try --input-size aligned, or ")
            + "--misaligned resample compares them approximately)"
        )
        stdout.print(
            f"[yellow]{len(misaligned)} (layer, transform) pairs on {len(names)} layers are "
            "misaligned: the sampling grid is not symmetric about the image centre, so no exact "
            f"comparison exists; {what}[/]"
        )
    unknown = sum(
        1
        for r in s["layers"]
        if r.get("comparison") == "naive" and r.get("aligned") is None and r["transform"] != "id"
    )
    if unknown:
        stdout.print(
            f"[dim]{unknown} (layer, transform) pairs have unknown sampling grids: compared on "
            "the map's own grid and kept out of the layer scores[/]"
        )
    for note in (s.get("geometry") or {}).get("notes") or []:  # (layer coverage, grids)
        stdout.print(f"[dim]note: {escape(note)}[/]")
    unmeasurable = sum(1 for r in s["layers"] if not r["measurable"])
    if unmeasurable:
        stdout.print(
            f"[dim]{unmeasurable} (layer, transform) pairs not measurable exactly "
            "(see the reason column of layers.csv)[/]"
        )
    orbit = scores["orbit_consistency"]
    stdout.print(
        f"Robustness score [bold]{_num(scores['robustness_score'], 4)}[/] / 100 "
        f"(mean agreement {_pct(scores['mean_agreement'])}, mean JS "
        f"{_num(scores['mean_js_divergence'], 3)}; orbit consistency {_pct(orbit)}; "
        f"worst: {scores['worst_transform']})"
    )
    if out_dir:
        stdout.print(
            f"Report written to {out_dir}", soft_wrap=True, markup=False
        )  # a path to copy, whole


def print_inspection(info: dict) -> None:
    spec = info["input"]
    digest = f", sha256 {info['sha256'][:12]}…" if info.get("sha256") else ""  # (a file's)
    stdout.print(f"[bold]{escape(info['model'])}[/] ({info['backend']}{digest})")
    size = f"{spec['height'] or '?'}x{spec['width'] or '?'}"
    batch = batch_text(spec["batch"], info.get("fixed_batch"))
    stdout.print(
        f"input '{spec['name']}': {spec['layout']} ({spec['layout_source']}), {spec['channels']} "
        f"channels, size {size}, {batch}, {spec['dtype']}",
        markup=False,
    )
    if info.get("output"):
        stdout.print(
            f"output '{escape(info['output'])}'"
            + (f": {info['num_classes']} classes" if info.get("num_classes") else "")
        )
    elif info.get("num_classes"):
        stdout.print(f"output: {info['num_classes']} classes")
    if info.get("class_names"):
        stdout.print(
            f"class names: {escape(', '.join(info['class_names'][:20]))}"
            + (" …" if len(info["class_names"]) > 20 else "")
        )
    if info.get("layers_note"):  # how layers are read: information, not a warning
        stdout.print(f"[dim]layers: {escape(info['layers_note'])}[/]")
    if info.get("note"):
        warn(info["note"])
    if info.get("size_note"):
        stdout.print(info["size_note"], markup=False, highlight=False)
    if info.get("grid_note"):
        warn(info["grid_note"])
    skipped = info.get("unauditable") or []
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        stdout.print(
            f"[dim]not auditable ({len(skipped)}): outputs neither image maps nor per-image "
            f"features, such as a transformer's attention scores, token sequences whose tokens "
            f"the grid walk cannot follow (windows, a subset), or a "
            f"batch's statistics: {escape(shown)}[/]"
        )
    with_grids = any("grid" in layer for layer in info["layers"])
    off_centre = any(layer.get("centred") is False for layer in info["layers"])
    sequences = [layer for layer in info["layers"] if "token_sequence" in layer]
    caption = "grid: stride @ offset in input pixels (cells)"
    if sequences:
        prefix = max(layer["token_sequence"]["prefix_tokens"] for layer in sequences)
        caption += "; tokens: a token sequence, compared as the map of its patch tokens" + (
            f" (its first {prefix} token(s), a class token, left out)" if prefix else ""
        )
    if off_centre:
        caption += (
            "; *: off-centre, the grid is not symmetric about the image centre, so rotations "
            "and flips have no exact comparison there (try --input-size aligned)"
        )
    table = _table(f"Auditable layers ({len(info['layers'])})", caption if with_grids else None)
    rows = []
    for i, layer in enumerate(info["layers"]):
        shape = "x".join(str(d) for d in layer["shape"]) if layer["shape"] else "?"
        kind = "tokens" if "token_sequence" in layer else layer["kind"]
        row = [str(i), layer["name"], layer["op"], kind, shape]
        if with_grids:
            row.append(layer.get("grid", "") + ("*" if layer.get("centred") is False else ""))
        rows.append(row)
    table.add_column("#", overflow="fold")
    _name_columns(table, (row[1] for row in rows))
    table.add_column("kind", overflow="fold")
    table.add_column("shape", overflow="fold")
    if with_grids:  # whole where the width allows; folded, never cut
        widest = max([len("grid"), *(len(row[5]) for row in rows)])
        table.add_column("grid", overflow="fold", min_width=_floor(widest, 12))
    for row in rows:
        cells = [escape(cell) for cell in row]
        if with_grids and cells[-1].endswith("*"):  # the mark, where it cannot be cut off
            cells[-1] = cells[-1][:-1] + "[bold yellow]*[/]"
        table.add_row(*cells)
    stdout.print(table)


def print_families(families: list) -> None:
    table = Table(title="Transform families (--transforms, comma-separated)", title_justify="left")
    table.add_column("family")
    table.add_column("example")
    table.add_column("what it does")
    for f in families:
        table.add_row(f.name, f.example, f.summary)
    stdout.print(table)
    stdout.print(
        "Conventions: rot90 is counter-clockwise as torch.rot90(x, 1, (-2, -1)); flip_h "
        "mirrors left-right; shift_x+N moves content N px right. The identity is always "
        "run as the reference."
    )


def print_label_suggestions(result: AuditResult) -> None:
    """The class permutation each D4 element most often induces on the top-1 class."""
    suggested = result.summary.get("label_action", {}).get("suggested", {})
    names = result.summary["model"].get("class_names") or []
    if not suggested:
        stdout.print("No D4 element was audited: no label action to suggest.")
        return
    table = Table(
        title="Induced label action: top-1 class of x -> most frequent top-1 class of g x",
        title_justify="left",
    )
    for column in ("element", "class -> new class (share of its images)", "--label-action"):
        table.add_column(column)
    for element, info in suggested.items():
        parts, fixed = [], 0
        for i, (j, n, share) in enumerate(
            zip(info["mapping"], info["support"], info["share"], strict=True)
        ):
            if j < 0:
                continue
            if j == i and share == 1.0:
                fixed += 1
                continue
            src = names[i] if i < len(names) else str(i)
            dst = names[j] if j < len(names) else str(j)
            parts.append(f"{src}->{dst} ({100 * share:.0f}% of {n})")
        if fixed:
            parts.append(f"{fixed} class{'es' if fixed > 1 else ''} always kept")
        spec = info["spec"] or "not a permutation (classes unseen or merged)"
        table.add_row(element, "; ".join(parts), spec)
    stdout.print(table)

"""Compare two models (or two saved audits) on the same images and transform elements.

A and B are paired: every image is seen by both under every element, so each element gives two
0/1 outcomes per image (top-1 kept or not, ``agrees`` in predictions.csv). Per element:

* both agreements and the difference ``B - A``;
* the **exact McNemar test** on the discordant images (A keeps the class and B does not, or the
  reverse): two-sided binomial p-value (:func:`eqaudit.stats.mcnemar_exact`), and the
  Holm-adjusted p-value over the elements compared, so that "B is worse somewhere" holds at the
  family-wise level ``alpha`` however many elements there are;
* a seeded **paired bootstrap** interval of ``B - A`` (images resampled);
* both JS divergences and their difference, and the top-1 agreement of A with B.

Layers are matched by name, then by the module path torch's ONNX exporter writes into tensor
names (an ONNX export against its PyTorch module), then (for the rest) by execution order and
shape; unmatched layers are listed. A layer difference is taken only where
both rows are scored (compared exactly or resampled about a known grid): a pair on a misaligned
or unknown grid keeps its two errors but no difference. ``B`` is a **regression** on an element
when it agrees less often than ``A`` and the Holm-adjusted p-value is below ``alpha``.

The comparison reads two :class:`~eqaudit.results.AuditResult` objects; :func:`compare` runs the
two audits first (with one configuration) when given models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.markup import escape

from eqaudit.config import AuditConfig
from eqaudit.errors import DataError, UsageError
from eqaudit.gate import FAILED, PASSED, SKIPPED, Check, shown
from eqaudit.results import AuditResult, check_saved_summary, is_scored, json_ready
from eqaudit.stats import BOOTSTRAP_RESAMPLES, mcnemar_exact, paired_bootstrap_interval

IDENTITY = "id"
SCHEMA_VERSION = "1.0"
FILES = ("compare.json", "compare.csv", "summary.md", "junit.xml", "report.html")
CSV_COLUMNS = [
    "section",
    "transform",
    "layer_a",
    "layer_b",
    "match",
    "shape",
    "n",
    "agreement_a",
    "agreement_b",
    "agreement_difference",
    "difference_low",
    "difference_high",
    "only_a",
    "only_b",
    "mcnemar_p",
    "holm_p",
    "js_divergence_a",
    "js_divergence_b",
    "js_difference",
    "top1_agreement",
    "relative_error_a",
    "relative_error_b",
    "relative_error_difference",
    "scored",
    "verdict",
]


# -- inputs ----------------------------------------------------------------------------------------
def is_saved_report(source: Any) -> bool:
    """A folder holding summary.json, or a .json file: a saved audit rather than a model."""
    if not isinstance(source, (str, Path)):
        return False
    path = Path(source)
    return (path.is_dir() and (path / "summary.json").is_file()) or (
        path.is_file() and path.suffix.lower() == ".json"
    )


def load_saved(source: str | Path) -> AuditResult:
    """A saved audit with its predictions.csv (needed to pair the images)."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    summary_path = folder / "summary.json" if path.is_dir() else path
    result = AuditResult.from_json(path)  # (names the file it cannot read)
    check_saved_summary(result.summary, summary_path)
    predictions = folder / "predictions.csv"
    if not predictions.is_file():
        raise DataError(
            f"'{predictions}' is missing: compare pairs the images one by one, so "
            "it needs the predictions.csv that eqaudit check writes beside summary.json"
        )
    problem = _predictions_problem(result.predictions, result.summary["model"])
    if problem:
        raise DataError(
            f"'{predictions}' {problem}: rerun eqaudit check to write it again (compare pairs "
            "its rows image by image)"
        )
    return result


#: The predictions.csv columns compare reads.
_PAIRED_COLUMNS = ("image", "transform", "top1", "agrees")


def _predictions_problem(frame: pd.DataFrame, model: dict) -> str | None:
    """What makes a saved predictions.csv unusable for pairing, or None. Rows are numbered
    from 1 after the header."""
    missing = [c for c in _PAIRED_COLUMNS if c not in frame.columns]
    if missing:
        return (
            f"lacks the column(s) {', '.join(missing)} (it has: "
            f"{', '.join(map(str, frame.columns[:10])) or 'none'})"
        )
    if not len(frame):
        return "has a header but no rows"
    keys = frame[["image", "transform"]].astype(str)
    repeated = keys.duplicated(keep=False)
    if repeated.any():
        first = keys[repeated].iloc[0]
        rows = [str(i + 1) for i in np.flatnonzero((keys == first).all(axis=1).to_numpy())[:3]]
        return (
            f"lists image '{first['image']}' under {first['transform']} more than once "
            f"(rows {', '.join(rows)})"
        )
    top1 = pd.to_numeric(frame["top1"], errors="coerce")
    classes = model.get("num_classes") if isinstance(model, dict) else None
    bad = top1.isna() | (top1 % 1 != 0) | (top1 < 0)
    if isinstance(classes, int):
        bad |= top1 >= classes
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        wanted = f"0 to {classes - 1}" if isinstance(classes, int) else "0 or more"
        return f"has top1 '{frame['top1'].iloc[i]}' on row {i + 1}, not a class index ({wanted})"
    agrees = frame["agrees"].astype(str).str.lower()
    bad = ~agrees.isin(["true", "false"])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        return f"has agrees '{frame['agrees'].iloc[i]}' on row {i + 1}, not True or False"
    return None


def _is_onnx(model: Any) -> bool:
    suffix = Path(model).suffix.lower() if isinstance(model, (str, Path)) else ""
    return suffix == ".onnx" or type(model).__name__ == "ModelProto"


def _resets(model: Any, layout: str | None, other: Any = None) -> dict[str, Any]:
    """Options the model's backend would refuse, reset: ``--factory``/``--trust-pickle`` for an
    ONNX model, ``--input-name`` (and an NCHW ``--layout``, the default) for PyTorch, and
    ``--output-name`` for a PyTorch model compared with an ONNX one (it names a graph output
    then, not a tuple index or dict key)."""
    if _is_onnx(model):
        return {"factory": None, "trust_pickle": False}
    resets: dict[str, Any] = {"input_name": None}
    if other is not None and _is_onnx(other):
        resets["output_name"] = None
    if layout is not None and layout.upper() == "NCHW":
        resets["layout"] = None
    return resets


def config_for(model: Any, config: AuditConfig, other: Any = None) -> AuditConfig:
    """The shared configuration, minus what this model's backend would refuse (``other``: the
    model it is compared with)."""
    return replace(config, **_resets(model, config.layout, other))


def run_both(
    a: Any,
    b: Any,
    config: AuditConfig | None,
    progress: Callable[[str], Callable[[int, int], None] | None] | None = None,
    **options: Any,
) -> tuple[AuditResult, AuditResult]:
    """Audit both models with the same configuration (same images, elements, preprocessing):
    ``config``, or the :func:`eqaudit.audit` keyword ``options``."""
    from eqaudit.audit import audit

    data = options.pop("data", None)
    if config is not None and options:
        raise UsageError(
            f"compare() takes the audit options in config= or as keyword arguments, not both: "
            f"{', '.join(options)} would be ignored; put them in the AuditConfig"
        )
    results = []
    for label, model, other in (("A", a, b), ("B", b, a)):
        callback = progress(label) if progress else None
        if config is not None:
            config_here = config_for(model, config, other)
            results.append(audit(model, data=data, config=config_here, progress=callback))
            continue
        resets = _resets(model, options.get("layout"), other)
        mine = {**options, **{k: v for k, v in resets.items() if k in options}}
        results.append(audit(model, data=data, progress=callback, **mine))
    return results[0], results[1]


# -- pairing ---------------------------------------------------------------------------------------
def _measured(result: AuditResult) -> list[str]:
    return [r["transform"] for r in result.outputs if not r["skipped"]]


def _sample(names: set[str]) -> str:
    items = sorted(names)
    return ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")


def pair_predictions(a: AuditResult, b: AuditResult) -> pd.DataFrame:
    """One row per (image, element) with both models' outcomes; refuses unpaired inputs."""
    pa, pb = a.predictions.copy(), b.predictions.copy()
    for frame in (pa, pb):
        frame["image"] = frame["image"].astype(str)
    ids_a, ids_b = set(pa["image"]), set(pb["image"])
    hashes = [r.summary["data"].get("sha256") for r in (a, b)]
    if ids_a == ids_b and None not in hashes and hashes[0] != hashes[1]:
        # (An array's ids are its positions, array[3], whatever it holds.)
        raise DataError(
            "A and B were audited on different image arrays (their images' SHA-256 differ, "
            "though their ids are the same positions): a paired comparison needs the same "
            "--data, --num-images and --seed for both"
        )
    if ids_a != ids_b:
        raise DataError(
            f"A and B were audited on different images ({len(ids_a - ids_b)} only in A, e.g. "
            f"{_sample(ids_a - ids_b) or '-'}; {len(ids_b - ids_a)} only in B, e.g. "
            f"{_sample(ids_b - ids_a) or '-'}): a paired comparison needs the same --data, "
            "--num-images and --seed for both"
        )
    classes = [(r.summary.get("model") or {}).get("num_classes") for r in (a, b)]
    if None not in classes and classes[0] != classes[1]:
        # Class k of A is not class k of B: "A and B predict the same class" has no meaning.
        raise UsageError(
            f"A gives {classes[0]} class scores and B {classes[1]}: compare pairs their top-1 "
            "classes image by image, which is meaningless across different class sets; compare "
            "two checkpoints of one classifier (the same classes), or audit each with eqaudit "
            "check"
        )
    ta, tb = a.summary["transforms"], b.summary["transforms"]
    ea, eb = set(_measured(a)), set(_measured(b))
    if ea != eb:
        raise UsageError(
            f"A and B were audited under different transform elements (only in A: "
            f"{_sample(ea - eb) or '-'}; only in B: {_sample(eb - ea) or '-'}): audit both with "
            "the same --transforms and input size"
        )
    if ta.get("shift_mode") != tb.get("shift_mode"):
        raise UsageError(
            f"A and B used different --shift-mode ({ta.get('shift_mode')} and "
            f"{tb.get('shift_mode')}): the same element names mean different transforms"
        )
    pa_, pb_ = (_permutations(r) for r in (a, b))
    moved = [g for g in _measured(a) if pa_.get(g) != pb_.get(g)]
    if moved:
        shown = ", ".join(moved[:3]) + (" ..." if len(moved) > 3 else "")
        raise UsageError(
            f"A and B were measured against different label actions (under {shown}): agreement means 'the same class' for one and 'the permuted class' for the "
            "other; audit both with the same --label-action"
        )
    keep = list(_PAIRED_COLUMNS)  # (JS divergences come from the summaries)
    merged = pa[keep].merge(
        pb[keep], on=["image", "transform"], suffixes=("_a", "_b"), validate="one_to_one"
    )
    if not len(merged) == len(pa) == len(pb):
        # (An image missing under one element only: the inner merge dropped it silently.)
        raise DataError(
            f"the predictions of A and B do not pair row for row ({len(pa)} rows in A, "
            f"{len(pb)} in B, {len(merged)} of the same image and element): rerun eqaudit "
            "check for both with the same --data, --num-images and --seed"
        )
    for side in ("a", "b"):
        merged[f"agrees_{side}"] = merged[f"agrees_{side}"].astype(str).str.lower() == "true"
    return merged


def _permutations(result: AuditResult) -> dict[str, list[int] | None]:
    """Each element's class permutation (None: the identity, as with no label action)."""
    action = result.summary.get("label_action") or {}
    table = action.get("permutations") or {}
    return {g: (p if p != sorted(p) else None) for g, p in table.items()}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# -- layers ----------------------------------------------------------------------------------------
def _layer_table(result: AuditResult) -> tuple[list[dict], dict[tuple[str, str], dict]]:
    infos: dict[str, dict] = {}
    rows: dict[tuple[str, str], dict] = {}
    for r in result.layers:
        infos.setdefault(r["layer"], {"name": r["layer"], "index": r["index"], "shape": r["shape"]})
        rows[(r["layer"], r["transform"])] = r
    return sorted(infos.values(), key=lambda i: i["index"]), rows


def exported_module_path(name: str) -> str | None:
    """The module path that torch's ONNX exporter wrote into a tensor's name, or None:
    ``/layer1/layer1.0/conv1/Conv_output_0`` -> ``layer1.0.conv1`` (each scope is named by its
    path when a container numbers it, else by its attribute)."""
    if not name.startswith("/"):
        return None
    path = ""
    for scope in name.split("/")[1:-1]:
        path = scope if not path or scope.startswith(path + ".") else f"{path}.{scope}"
    return path or None


def _module_outputs(layers: list[dict]) -> dict[str, dict]:
    """Module path -> the last of ``layers`` (execution order) in that module or below it: the
    module's output, as a forward hook sees it. A path whose tensors do not follow one another
    is left out: a module called twice, or two modules under one name (the exporter names a
    module's second call ``act_1``, as it names a module called ``act_1``)."""
    last: dict[str, dict] = {}
    seen_at: dict[str, int] = {}
    split: set[str] = set()
    scoped = [(info, exported_module_path(info["name"])) for info in layers]
    for position, (info, path) in enumerate([(i, p) for i, p in scoped if p is not None]):
        parts = path.split(".")  # type: ignore[union-attr]
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix in seen_at and seen_at[prefix] != position - 1:
                split.add(prefix)
            seen_at[prefix] = position
            last[prefix] = info
    return {path: info for path, info in last.items() if path not in split}


def match_layers(
    layers_a: list[dict], layers_b: list[dict]
) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """Pairs ``(name in A, name in B, how)`` with ``how`` "name", "module" or "order+shape", in
    A's order, and the unmatched names of A and of B.

    Same names pair first. Then a module's path against the tensor that torch's ONNX exporter
    named after it (:func:`exported_module_path`; the module's last one, of the same shape): a
    .pt2 or state dict against its ONNX export. The rest pair in execution order: each unmatched
    A layer takes the next unmatched B layer (after the previous pair) with the same shape, so
    a pair never crosses another.
    """
    names_b = {i["name"] for i in layers_b}
    by_name = {i["name"] for i in layers_a} & names_b
    module: dict[str, str] = {}  # A name -> B name
    for side, other, forward in ((layers_a, layers_b, True), (layers_b, layers_a, False)):
        outputs = _module_outputs([i for i in other if i["name"] not in by_name])
        for info in side:
            found = outputs.get(info["name"])
            if info["name"] in by_name or found is None or found["shape"] != info["shape"]:
                continue
            a, b = (info["name"], found["name"]) if forward else (found["name"], info["name"])
            if a not in module and b not in module.values():
                module[a] = b
    taken_b = by_name | set(module.values())
    place = {info["name"]: j for j, info in enumerate(layers_b)}
    pairs: list[tuple[str, str, str]] = []
    unmatched_a: list[str] = []
    cursor = 0  # B's layers before it are behind the last pair: an order pair goes after them
    for info in layers_a:
        paired = info["name"] if info["name"] in by_name else module.get(info["name"])
        if paired is not None:
            pairs.append((info["name"], paired, "name" if paired == info["name"] else "module"))
            cursor = max(cursor, place[paired] + 1)
            continue
        for j in range(cursor, len(layers_b)):
            other = layers_b[j]
            if other["name"] not in taken_b and other["shape"] == info["shape"]:
                pairs.append((info["name"], other["name"], "order+shape"))
                taken_b.add(other["name"])
                cursor = j + 1
                break
        else:
            unmatched_a.append(info["name"])
    matched_b = {b for _, b, _ in pairs}
    unmatched_b = [i["name"] for i in layers_b if i["name"] not in matched_b]
    return pairs, unmatched_a, unmatched_b


# -- the comparison --------------------------------------------------------------------------------
def _side(result: AuditResult, source: Any) -> dict:
    s = result.summary
    return {
        "source": str(source) if isinstance(source, (str, Path)) else s["model"]["name"],
        "model": s["model"]["name"],
        "backend": s["model"]["backend"],
        "sha256": s["model"].get("sha256"),
        "robustness_score": s["scores"]["robustness_score"],
        "orbit_consistency": s["scores"]["orbit_consistency"],
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare_results` found; ``data`` is exactly compare.json."""

    data: dict
    checks: tuple[Check, ...]
    gated: bool

    @property
    def regressions(self) -> list[str]:
        return [r["transform"] for r in self.data["outputs"] if r["verdict"] == "B worse"]

    @property
    def passed(self) -> bool:
        return not (self.gated and self.regressions)

    def to_json(self) -> str:
        return json.dumps(json_ready(self.data), indent=2, allow_nan=False) + "\n"

    def to_frame(self) -> pd.DataFrame:
        """compare.csv: ``section`` "output" rows (one per element), then "layer" rows (one per
        matched layer pair and element)."""
        rows = [{"section": "output", **r} for r in self.data["outputs"]]
        for r in self.data["layers"]:
            rows.append({"section": "layer", **r})
        frame = pd.DataFrame(rows, columns=CSV_COLUMNS)
        for column in ("n", "only_a", "only_b"):  # counts (blank on layer rows), not 16.0
            frame[column] = frame[column].astype("Int64")
        return frame

    def verdict(self, seconds: float) -> str:
        """The last console line."""
        alpha = self.data["alpha"]
        worse = self.regressions
        total = len(self.data["outputs"])
        if worse:
            found = (
                f"B is significantly less invariant than A on {len(worse)} of {total} elements "
                f"({', '.join(worse[:5])}{' ...' if len(worse) > 5 else ''}) at alpha {alpha:g}"
            )
        else:
            found = f"no element where B is significantly worse than A at alpha {alpha:g}"
        if not self.gated:
            return f"{found} (not gated: add --fail-on-regression) ({seconds:.1f} s)"
        return f"{'PASSED' if self.passed else 'FAILED'} {found} ({seconds:.1f} s)"

    def lines(self) -> list[Any]:
        """What the console prints: lines, and the per-element table as a rich table that
        folds its cells to the terminal (80 columns; it was 119 characters of plain text)."""
        from eqaudit.reports.console import _table

        d = self.data
        a, b = d["a"], d["b"]
        top1 = d["top1_agreement"]
        out: list[Any] = [
            f"A: {a['model']} ({a['backend']}), score {_num(a['robustness_score'])}   "
            f"B: {b['model']} ({b['backend']}), score {_num(b['robustness_score'])}   "
            f"on {d['data']['count']} images",
            f"top-1 agreement of A and B on untransformed images: {_num(top1['untransformed'])} "
            f"({top1['same']}/{top1['n']})",
        ]
        level = f"{d['method']['bootstrap']['confidence']:.0%}"
        table = _table(
            f"Per transform: agreement of A and B, B - A with its paired bootstrap {level} "
            "interval",
            caption=f"n.s.: no significant difference at alpha {d['alpha']:g} (Holm-adjusted "
            "McNemar p; the intervals are per element, not adjusted); JS divergences and "
            "per-layer errors are in compare.csv",
        )
        widest = max([len("transform"), *(len(r["transform"]) for r in d["outputs"])])
        table.add_column("transform", overflow="fold", min_width=min(widest, 13))
        for header in ("agr. A", "agr. B", "B - A"):
            table.add_column(header, no_wrap=True)
        table.add_column(f"{level} interval", min_width=7)  # wraps after its comma when narrow
        table.add_column("Holm p", no_wrap=True)
        table.add_column("verdict", no_wrap=True, min_width=len("B better"))
        short = {"no significant difference": "n.s."}
        for r in d["outputs"]:
            table.add_row(
                escape(r["transform"]),
                _num(r["agreement_a"]),
                _num(r["agreement_b"]),
                _num(r["agreement_difference"]),
                f"{_num(r['difference_low'])}, {_num(r['difference_high'])}",
                _num(r["holm_p"]),
                short.get(r["verdict"], r["verdict"]),
            )
        out.append(table)
        lay = d["layer_matching"]
        out.append(
            f"layers: {lay['matched_by_name']} matched by name, {lay['matched_by_module']} by "
            f"exported module path, {lay['matched_by_order']} by order and shape; unmatched: "
            f"{len(lay['unmatched_a'])} in A, "
            f"{len(lay['unmatched_b'])} in B (per-layer errors in compare.csv)"
        )
        out += [f"note: {n}" for n in d["notes"]]
        return out


def _num(value: float | None) -> str:
    return "—" if value is None else shown(value)


def compare_results(
    a: AuditResult,
    b: AuditResult,
    *,
    alpha: float = 0.05,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    fail_on_regression: bool = False,
    sources: tuple[Any, Any] = (None, None),
) -> Comparison:
    """Compare two audits of the same images and elements (see the module docstring)."""
    if not 0 < alpha < 1:
        raise UsageError(f"--alpha is a significance level between 0 and 1, not {alpha:g}")
    if not 0 < confidence < 1:
        raise UsageError(f"confidence is a level between 0 and 1 (0.95), not {confidence:g}")
    paired = pair_predictions(a, b)
    notes = _notes(a, b)
    elements = [g for g in _measured(a) if g != IDENTITY]
    js_a = {r["transform"]: r["js_divergence"] for r in a.outputs}
    js_b = {r["transform"]: r["js_divergence"] for r in b.outputs}

    rows = []
    for g in elements:
        part = paired[paired["transform"] == g].sort_values("image")
        ka, kb = part["agrees_a"].to_numpy(), part["agrees_b"].to_numpy()
        n = len(part)
        only_a, only_b = int(np.sum(ka & ~kb)), int(np.sum(~ka & kb))
        low, high = paired_bootstrap_interval(
            ka, kb, confidence=confidence, resamples=resamples, seed=seed
        )
        agreement_a, agreement_b = float(ka.mean()), float(kb.mean())
        rows.append(
            {
                "transform": g,
                "n": n,
                "agreement_a": agreement_a,
                "agreement_b": agreement_b,
                "agreement_difference": agreement_b - agreement_a,
                "difference_low": low,
                "difference_high": high,
                "only_a": only_a,
                "only_b": only_b,
                "mcnemar_p": mcnemar_exact(only_a, only_b),
                "js_divergence_a": js_a.get(g),
                "js_divergence_b": js_b.get(g),
                "js_difference": _difference(js_a.get(g), js_b.get(g)),
                "top1_agreement": float((part["top1_a"] == part["top1_b"]).mean()),
            }
        )
    for row, adjusted in zip(rows, holm([r["mcnemar_p"] for r in rows]), strict=True):
        row["holm_p"] = adjusted
        if adjusted < alpha:
            row["verdict"] = "B worse" if row["agreement_difference"] < 0 else "B better"
        else:
            row["verdict"] = "no significant difference"

    identity = paired[paired["transform"] == IDENTITY]
    same = int((identity["top1_a"] == identity["top1_b"]).sum())
    layer_rows, matching = _compare_layers(a, b, elements)
    formats = [r.summary["model"].get("format") or r.summary["model"]["backend"] for r in (a, b)]
    across = matching["matched_by_order"] + matching["matched_by_module"]
    if across and formats[0] != formats[1]:
        # (seen: a ResNet's .pt2 against its ONNX export, whose Conv outputs are conv+bn)
        kinds = [_FORMATS.get(f, f"a {f} model") for f in formats]
        how = [
            f"{count} by {what}"
            for count, what in (
                (matching["matched_by_module"], "exported module path"),
                (matching["matched_by_order"], "order and shape"),
            )
            if count
        ]
        notes.append(
            f"A is {kinds[0]} and B {kinds[1]}: {across} layer pairs are matched by other "
            f"than their names ({', '.join(how)}), and an exporter that folds a BatchNorm into "
            "its Conv or splits an op shifts them; per-layer differences across formats are not "
            "like for like (compare.csv lists each pair)"
        )
    orbit = _orbit(paired, elements)
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": "eqaudit-compare",
        "a": _side(a, sources[0]),
        "b": _side(b, sources[1]),
        "data": {
            "count": int(paired["image"].nunique()),
            "image_ids_sha256": hashlib.sha256(
                "\n".join(sorted(paired["image"].unique())).encode("utf-8")
            ).hexdigest(),
            "elements": elements,
            # How both audits were run (the same for A and B: compare refuses otherwise).
            "transforms": a.summary["transforms"]["spec"],
            "shift_mode": a.summary["transforms"]["shift_mode"],
            "source": a.summary["data"]["source"],
            "path": a.summary["data"].get("path"),
            "synthetic": a.summary["data"]["synthetic"],
            "seed": a.summary["seed"],
        },
        "method": {
            "test": "exact McNemar (two-sided binomial on discordant images), Holm-adjusted "
            "over the elements",
            "alpha": alpha,
            "bootstrap": {"resamples": resamples, "seed": seed, "confidence": confidence},
        },
        "alpha": alpha,
        "fail_on_regression": fail_on_regression,
        "top1_agreement": {
            "untransformed": same / len(identity) if len(identity) else None,
            "same": same,
            "n": len(identity),
        },
        "scores": {
            "robustness_score_a": a.score,
            "robustness_score_b": b.score,
            "robustness_score_difference": _difference(a.score, b.score),
            **orbit,
        },
        "outputs": rows,
        "layers": layer_rows,
        "layer_matching": matching,
        "notes": notes,
    }
    checks = tuple(_regression_check(r, alpha, fail_on_regression) for r in rows)
    data["regressions"] = [r["transform"] for r in rows if r["verdict"] == "B worse"]
    data["passed"] = not (fail_on_regression and data["regressions"])
    data["checks"] = [c.to_dict() for c in checks]
    return Comparison(data=data, checks=checks, gated=fail_on_regression)


def _orbit(paired: pd.DataFrame, elements: list[str]) -> dict:
    """Orbit consistency of A and B (an image counts when it agrees under every element), with
    the exact McNemar test on the images where they differ."""
    part = paired[paired["transform"].isin(elements)]
    per_image = part.groupby("image")[["agrees_a", "agrees_b"]].all()
    ka, kb = per_image["agrees_a"].to_numpy(), per_image["agrees_b"].to_numpy()
    if not len(per_image):
        return {}
    return {
        "orbit_consistency_a": float(ka.mean()),
        "orbit_consistency_b": float(kb.mean()),
        "orbit_consistency_difference": float(kb.mean() - ka.mean()),
        "orbit_mcnemar_p": mcnemar_exact(int(np.sum(ka & ~kb)), int(np.sum(~ka & kb))),
    }


def _regression_check(row: dict, alpha: float, gated: bool) -> Check:
    name = f"regression[{row['transform']}]"
    # Evidence that B is *worse*: the adjusted p-value when B agrees less often, else none (1).
    p = row["holm_p"] if row["agreement_difference"] < 0 else 1.0
    description = (
        f"Holm-adjusted exact McNemar p that B agrees less often than A "
        f"(B - A = {shown(row['agreement_difference'])}, discordant images: A only "
        f"{row['only_a']}, B only {row['only_b']})"
    )
    text = shown(p)
    ok = float(text) >= alpha
    check = Check(
        name,
        "--fail-on-regression",
        PASSED if ok else FAILED,
        description,
        value=p,
        shown=text,
        comparison=">=",
        threshold=alpha,
    )
    if not ok and not gated:
        return replace(
            check, status=SKIPPED, reason=f"{check.message} — not gated: add --fail-on-regression"
        )
    return check


def _compare_layers(a: AuditResult, b: AuditResult, elements: list[str]) -> tuple[list, dict]:
    infos_a, rows_a = _layer_table(a)
    infos_b, rows_b = _layer_table(b)
    pairs, unmatched_a, unmatched_b = match_layers(infos_a, infos_b)
    shapes = {i["name"]: i["shape"] for i in infos_a}
    table = []
    for name_a, name_b, how in pairs:
        for g in elements:
            ra, rb = rows_a.get((name_a, g)), rows_b.get((name_b, g))
            ea = ra["relative_error"] if ra else None
            eb = rb["relative_error"] if rb else None
            # A pair compared on a misaligned or unknown grid on either side is not a fair
            # comparison of the two models' equivariance: no difference is taken.
            scored = bool(ra and rb and is_scored(ra) and is_scored(rb))
            table.append(
                {
                    "transform": g,
                    "layer_a": name_a,
                    "layer_b": name_b,
                    "match": how,
                    "shape": shapes[name_a],
                    "relative_error_a": ea,
                    "relative_error_b": eb,
                    "relative_error_difference": _difference(ea, eb) if scored else None,
                    "scored": scored,
                }
            )
    matching = {
        "matched_by_name": sum(1 for *_, how in pairs if how == "name"),
        "matched_by_module": sum(1 for *_, how in pairs if how == "module"),
        "matched_by_order": sum(1 for *_, how in pairs if how == "order+shape"),
        "unmatched_a": unmatched_a,
        "unmatched_b": unmatched_b,
    }
    return table, matching


#: How a model's format reads in a note (``summary.model.format``).
_FORMATS = {
    "onnx": "an ONNX graph",
    "export": "a torch.export archive",
    "state_dict": "a PyTorch state dict",
    "torchscript": "a TorchScript archive",
    "module": "an in-memory module",
    "pickle": "a pickled module",
}


def _notes(a: AuditResult, b: AuditResult) -> list[str]:
    notes = []
    sa, sb = a.summary, b.summary
    # (A label action that differs is refused by pair_predictions: it changes what agreement is.)
    left, right = ({k: v for k, v in s["preprocessing"].items() if k != "notes"} for s in (sa, sb))
    if left != right:
        notes.append("A and B differ in preprocessing: check that this is intended")
    ia, ib = sa["model"]["input"], sb["model"]["input"]
    if (ia["height"], ia["width"]) != (ib["height"], ib["width"]):
        notes.append(
            f"input sizes differ: A {ia['height']}x{ia['width']}, B {ib['height']}x{ib['width']}"
        )
    if sa["data"].get("synthetic") or sb["data"].get("synthetic"):
        notes.append("synthetic images: the comparison says little about real inputs")
    return notes


def compare(
    a: Any,
    b: Any,
    *,
    config: AuditConfig | None = None,
    alpha: float = 0.05,
    fail_on_regression: bool = False,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    progress: Callable[[str], Callable[[int, int], None] | None] | None = None,
    **options: Any,
) -> tuple[Comparison, AuditResult, AuditResult]:
    """Compare A and B: two models (audited here with one configuration: ``config`` or the
    :func:`eqaudit.audit` keyword ``options``, e.g. ``transforms="d4"``), two saved audits (folders or summary.json
    files), or two :class:`AuditResult` objects. Returns the comparison and both results."""
    for source in (a, b):
        if isinstance(source, (str, Path)) and (Path(source) / "compare.json").is_file():
            raise UsageError(
                f"'{source}' holds a comparison (compare.json), not an audit: pass the folders "
                "eqaudit check wrote (a comparison keeps its two audits in its a/ and b/)"
            )
    saved = [isinstance(x, AuditResult) or is_saved_report(x) for x in (a, b)]
    if saved[0] != saved[1]:
        raise UsageError(
            "compare two models or two saved audits, not one of each: audit the model with "
            "eqaudit check (same options) and compare the two report folders"
        )
    if all(saved):
        if config is not None or options:
            raise UsageError(
                "audit options do not apply to saved audits: their numbers are already computed"
            )
        ra = a if isinstance(a, AuditResult) else load_saved(a)
        rb = b if isinstance(b, AuditResult) else load_saved(b)
    else:
        ra, rb = run_both(a, b, config, progress, **options)
    comparison = compare_results(
        ra,
        rb,
        alpha=alpha,
        resamples=resamples,
        seed=seed if seed is not None else 0,
        fail_on_regression=fail_on_regression,
        sources=(a, b),
    )
    return comparison, ra, rb


def refuse_out_in_sources(out_dir: Path, sources: tuple[Any, Any]) -> None:
    """Refuse an output folder that holds one of the saved audits being compared: the
    comparison would replace it (review: ``compare new old -o new`` deleted audit A)."""
    if Path(out_dir).resolve() in _saved_folders(sources):
        raise UsageError(
            f"--out '{out_dir}' holds one of the audits being compared: writing the "
            "comparison there would replace it; choose another --out"
        )


def _saved_folders(sources: tuple[Any, Any]) -> set[Path]:
    """The resolved folders of the sources that are saved audits (a folder, or the folder of a
    summary.json)."""
    return {
        (Path(src) if Path(src).is_dir() else Path(src).parent).resolve()
        for src in sources
        if isinstance(src, (str, Path)) and is_saved_report(src)
    }


def write_comparison(
    comparison: Comparison,
    out_dir: Path,
    sources: tuple[Any, Any] = (None, None),
    *,
    audits: tuple[AuditResult, AuditResult] | None = None,
) -> list[Path]:
    """compare.json, compare.csv, summary.md, junit.xml and report.html, and with ``audits``
    (the two audits this run made) their summary.json and CSVs in ``a/`` and ``b/``, so that the
    pair can be compared again: all written into ``out_dir`` as one (an interrupt or a failed
    write leaves the previous comparison or this one). A check report there is removed (one
    folder, one report), so ``out_dir`` must not be one of the compared audits' folders
    (``sources``); without ``audits``, an earlier comparison's ``a/`` and ``b/`` there are
    removed (they would describe other audits than ``compare.json``)."""
    refuse_out_in_sources(out_dir, sources)
    from eqaudit.reports import COMPARE_FOLDERS, KNOWN_FILES, WRITERS, write_folder
    from eqaudit.reports.compare_html import write_compare_html
    from eqaudit.reports.junit import junit_xml
    from eqaudit.reports.markdown import render_compare
    from eqaudit.reports.tables import neutralise_formulas

    data = comparison.data

    def produce(staging: Path) -> list[str]:
        (staging / "compare.json").write_text(comparison.to_json(), encoding="utf-8")
        neutralise_formulas(comparison.to_frame()).to_csv(
            staging / "compare.csv", index=False, na_rep=""
        )
        (staging / "summary.md").write_text(render_compare(data), encoding="utf-8")
        suite = f"eqaudit compare {data['a']['model']} vs {data['b']['model']}"
        xml = junit_xml(
            suite,
            data["checks"],
            classname="eqaudit.compare",
            properties={"a": data["a"]["model"], "b": data["b"]["model"], "alpha": data["alpha"]},
        )
        (staging / "junit.xml").write_text(xml, encoding="utf-8")
        write_compare_html(data, staging)
        if audits is None:
            return list(FILES)
        for name, result in zip(COMPARE_FOLDERS, audits, strict=True):
            (staging / name).mkdir()
            for writer in (WRITERS["json"], WRITERS["csv"]):
                writer(result, staging / name)
        return [*FILES, *COMPARE_FOLDERS]

    # (Never a folder that holds an audit being compared: 'compare out/a out/b -o out'
    # re-compares the audits an earlier comparison kept there.)
    sources_at = _saved_folders(sources)
    stale = tuple(
        name
        for name in ([] if audits is not None else COMPARE_FOLDERS)
        if not any(at.is_relative_to((Path(out_dir) / name).resolve()) for at in sources_at)
    )
    return write_folder(Path(out_dir), produce, set(FILES) | KNOWN_FILES, stale)  # (a check's too)

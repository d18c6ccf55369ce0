"""The release gate: thresholds and baseline regressions checked against an audit's result.

The gate reads a result (or its summary.json); it never runs a model. Each threshold becomes one
:class:`Check` (one JUnit test case).

Comparison rule (documented in README.md and docs/ci.md): every gated number is printed with
4 significant figures, and **the printed number is the one compared** with the threshold, as
given, inclusively (``>=`` for minimums, ``<=`` for maximums). A value shown as passing therefore
never fails, and a value shown as failing really is on the wrong side of the threshold.
Comparisons use exact decimal arithmetic on the printed digits, so ``0.9000 >= 0.9`` holds.

Checks (names as in junit.xml and summary.md):

* ``score``: robustness score >= ``--fail-under``;
* ``agreement[g]``: agreement of element g >= its ``--min-agreement``; with ``--confidence c``
  the lower bound of the two-sided Wilson interval at level c (recomputed from the row's counts)
  is compared instead of the point estimate;
* ``js[g]``: JS divergence of g <= its ``--max-js``;
* ``layer_error[pattern][g]``: the largest mean relative error of g over the measurable layers
  assigned to ``pattern`` <= its ``--max-layer-error``; with ``--channel-map``, where the
  fitted channel map permutes the channels, a layer's error is the smaller of that and its
  ``fitted_relative_error`` (equivariant up to a permutation of its channels);
* ``regression.*`` with ``--baseline``: how much worse the score, orbit consistency and each
  element's agreement and JS divergence got, computed from the printed values of both runs,
  <= ``--max-regression`` (X on the 0-1 scale; the 0-100 score may drop by 100 X points).

Per-element and per-layer thresholds are ``pattern=value`` maps (see :func:`assign`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from eqaudit.config import GateConfig
from eqaudit.errors import ConfigError, UsageError
from eqaudit.results import AuditResult, is_flagged, is_scored
from eqaudit.stats import successes, wilson_bounds

#: Significant figures of every gated number as printed (and compared).
FIGURES = 4
IDENTITY = "id"
BASELINE_FORMAT = "eqaudit-baseline/1"

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


# -- numbers as printed ----------------------------------------------------------------------------
def shown(value: float) -> str:
    """``value`` with 4 significant figures, trailing zeros kept: 0.9 -> "0.9000"."""
    return f"{value:#.{FIGURES}g}"


def threshold_text(value: float) -> str:
    """A threshold as the user gave it (shortest round-trip form): 0.9 -> "0.9"."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _decimal(text: str) -> Decimal:
    return Decimal(text)


@dataclass(frozen=True)
class Check:
    """One gate check: what was measured, what it was compared with, and the outcome."""

    name: str
    option: str  # the command-line option that set the threshold
    status: str  # passed | failed | skipped
    description: str  # what the value is, in words
    value: float | None = None  # full precision (for the record)
    shown: str | None = None  # the printed value: the one compared
    comparison: str = ">="
    threshold: float | None = None
    reason: str | None = None  # why skipped

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def message(self) -> str:
        if self.status == SKIPPED:
            return f"{self.name} skipped: {self.reason}"
        bound = f"{self.comparison} {threshold_text(self.threshold)}"  # type: ignore[arg-type]
        if self.status == PASSED:
            return f"{self.name} = {self.shown} {bound} ({self.description})"
        return f"{self.name} = {self.shown}, needs {bound} ({self.description}; {self.option})"

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


def _compare(
    name: str,
    option: str,
    description: str,
    value: float | None,
    comparison: str,
    threshold: float,
    text: str | None = None,
) -> Check:
    """A check of ``value`` (printed as ``text``, default 4 significant figures)."""
    if value is None:
        return Check(name, option, SKIPPED, description, reason="the value is not defined")
    text = text if text is not None else shown(value)
    printed, limit = _decimal(text), _decimal(repr(float(threshold)))
    ok = printed >= limit if comparison == ">=" else printed <= limit
    return Check(
        name,
        option,
        PASSED if ok else FAILED,
        description,
        value=float(value),
        shown=text,
        comparison=comparison,
        threshold=float(threshold),
    )


@dataclass(frozen=True)
class GateReport:
    """Every check of one gate run."""

    checks: tuple[Check, ...]
    thresholds: dict | None = None  # GateConfig.to_dict() of the run, for the record

    @property
    def passed(self) -> bool:
        """No check failed, and one was evaluated at least: thresholds none of which applies
        (a rot90 threshold on a non-square input, rot90 skipped) gate nothing, which CI must
        not read as a pass."""
        return not any(c.failed for c in self.checks) and not self.nothing_evaluated

    @property
    def nothing_evaluated(self) -> bool:
        return bool(self.checks) and self.count(SKIPPED) == len(self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.failed]

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "rule": (
                f"values printed with {FIGURES} significant figures are compared with the "
                "thresholds as given, inclusively"
            ),
            "counts": {s: self.count(s) for s in (PASSED, FAILED, SKIPPED)},
            "thresholds": self.thresholds,
            "checks": [c.to_dict() for c in self.checks],
        }

    def attach(self, result: AuditResult) -> AuditResult:
        """The result with this report as its summary's ``gate`` block (read by the writers)."""
        return replace(result, summary={**result.summary, "gate": self.to_dict()})

    def lines(self) -> list[str]:
        """Console lines: one per failed check, then a count."""
        lines = [f"FAILED {c.message}" for c in self.failures]
        total = len(self.checks)
        if total:
            lines.append(
                f"gate: {_checks(total)}, {self.count(PASSED)} passed, {self.count(FAILED)} "
                f"failed, {self.count(SKIPPED)} skipped (all in junit.xml and summary.md)"
            )
        return lines

    def verdict(self, score: float | None, seconds: float) -> str:
        """The last console line: ``PASSED``/``FAILED``, the score and the run time."""
        score_text = "score —" if score is None else f"score {shown(score)} / 100"
        if not self.checks:
            detail = "no gate checks configured"
        elif self.nothing_evaluated:
            # Nothing was verified: a failure, not "0 checks passed".
            detail = (
                f"no check evaluated ({_checks(len(self.checks))} skipped: see junit.xml; drop "
                "thresholds that cannot apply to this model)"
            )
        elif self.passed:
            detail = f"{_checks(len(self.checks) - self.count(SKIPPED))} passed"
        else:
            names = ", ".join(c.name for c in self.failures[:5])
            more = f" and {len(self.failures) - 5} more" if len(self.failures) > 5 else ""
            detail = f"{len(self.failures)} of {_checks(len(self.checks))} failed: {names}{more}"
        return f"{'PASSED' if self.passed else 'FAILED'} {score_text}, {detail} ({seconds:.1f} s)"


def evaluated_nothing(block: dict | None) -> bool:
    """Whether a summary's ``gate`` block (:meth:`GateReport.to_dict`) has checks and all of
    them were skipped: :attr:`GateReport.nothing_evaluated`, for the report writers."""
    checks = (block or {}).get("checks") or []
    return bool(checks) and all(c.get("status") == SKIPPED for c in checks)


def _checks(count: int) -> str:
    return f"{count} check" + ("" if count == 1 else "s")


# -- pattern maps ----------------------------------------------------------------------------------
def _specificity(pattern: str, name: str) -> int | None:
    """2 for an exact name, 1 for another matching glob, 0 for ``*``; None when it does not match."""
    if pattern == name:
        return 2
    if not fnmatch.fnmatchcase(name, pattern):
        return None
    return 0 if pattern == "*" else 1


def assign(
    thresholds: Iterable[tuple[str, float]], names: Iterable[str]
) -> dict[str, tuple[str, float]]:
    """Give each name the threshold of its most specific pattern: exact name > other glob >
    ``*``; among equally specific globs the one given last wins (command line over environment
    over file). Names no pattern matches are left out."""
    pairs = list(thresholds)
    chosen: dict[str, tuple[str, float]] = {}
    for name in names:
        best: tuple[int, int] | None = None
        for order, (pattern, value) in enumerate(pairs):
            rank = _specificity(pattern, name)
            if rank is not None and (best is None or (rank, order) >= best):
                best = (rank, order)
                chosen[name] = (pattern, value)
    return chosen


def _unmatched(
    thresholds: Iterable[tuple[str, float]], names: list[str], option: str, what: str
) -> None:
    example = "'layer3.*'" if what == "layer" else "'rot*'"
    for pattern, value in thresholds:
        if pattern != "*" and not any(_specificity(pattern, n) is not None for n in names):
            sample = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            raise UsageError(
                f"{option} {pattern}={threshold_text(value)}: no {what} matches '{pattern}' "
                f"(audited: {sample or 'none'}); check the name or use a glob such as {example}"
            )


# -- evaluation ------------------------------------------------------------------------------------
def _output_checks(summary: dict, gate: GateConfig) -> list[Check]:
    rows = [r for r in summary["outputs"] if r["transform"] != IDENTITY]
    names = [r["transform"] for r in rows]
    checks: list[Check] = []
    _unmatched(gate.min_agreement, names, "--min-agreement", "transform element")
    _unmatched(gate.max_js, names, "--max-js", "transform element")
    agreement = assign(gate.min_agreement, names)
    js = assign(gate.max_js, names)
    for row in rows:
        if row["transform"] in agreement:
            threshold = agreement[row["transform"]][1]
            checks.append(_agreement_check(row, threshold, gate.confidence))
    for row in rows:
        name = row["transform"]
        if name not in js:
            continue
        check_name = f"js[{name}]"
        if row["skipped"]:
            checks.append(Check(check_name, "--max-js", SKIPPED, "", reason=row["skipped"]))
            continue
        checks.append(
            _compare(
                check_name,
                "--max-js",
                "mean JS divergence",
                row["js_divergence"],
                "<=",
                js[name][1],
            )
        )
    return checks


def _agreement_check(row: dict, threshold: float, confidence: float | None) -> Check:
    name = f"agreement[{row['transform']}]"
    if row["skipped"]:
        return Check(name, "--min-agreement", SKIPPED, "", reason=row["skipped"])
    if confidence is None or row["agreement"] is None:
        return _compare(
            name, "--min-agreement", "top-1 agreement", row["agreement"], ">=", threshold
        )
    n = int(row["n"])
    k = successes(row["agreement"], n)
    low, _ = wilson_bounds(k, n, confidence)
    description = (
        f"lower bound of the {100 * confidence:g}% Wilson interval of the agreement {k}/{n}"
    )
    return _compare(name, "--min-agreement", description, low, ">=", threshold)


def _layer_checks(summary: dict, gate: GateConfig) -> list[Check]:
    if not gate.max_layer_error:
        return []
    layers = summary.get("layers") or []
    names = list(dict.fromkeys(r["layer"] for r in layers))
    if not names:
        raise UsageError(
            "--max-layer-error needs per-layer results, but no layer was audited: drop "
            "--no-layers (or --max-layer-error)"
        )
    _unmatched(gate.max_layer_error, names, "--max-layer-error", "layer")
    owner = assign(gate.max_layer_error, names)
    transforms = [r["transform"] for r in summary["outputs"] if r["transform"] != IDENTITY]
    checks = []
    patterns = list(dict.fromkeys(pattern for pattern, _ in owner.values()))
    for pattern in patterns:
        threshold = next(v for p, v in owner.values() if p == pattern)
        mine = [r for r in layers if owner.get(r["layer"], ("",))[0] == pattern]
        for transform in transforms:
            rows = [r for r in mine if r["transform"] == transform]
            name = f"layer_error[{pattern}][{transform}]"
            measured = [r for r in rows if is_scored(r)]
            misaligned = sum(1 for r in rows if is_flagged(r))
            if not measured:
                reason = next((r["reason"] for r in rows if r.get("reason")), None)
                if misaligned:
                    reason = f"{misaligned} misaligned layer(s), kept out of layer checks"
                checks.append(
                    Check(
                        name,
                        "--max-layer-error",
                        SKIPPED,
                        "",
                        reason=f"no measurable layer ({reason or 'element skipped'})",
                    )
                )
                continue
            worst = max(measured, key=_layer_error)
            fitted = " (after the fitted channel map)" if _fitted(worst) else ""
            description = (
                f"largest mean relative error over {len(measured)} layer(s), at {worst['layer']}"
                + fitted
                + (f"; {misaligned} misaligned layer(s) left out" if misaligned else "")
            )
            checks.append(
                _compare(
                    name, "--max-layer-error", description, _layer_error(worst), "<=", threshold
                )
            )
    return checks


def _fitted(row: dict) -> bool:
    """With --channel-map: the fitted channel map is a permutation of the channels (a group
    convolution's), and the layer is closer to equivariant with its channels so permuted than
    as they are. A general fitted map is not enough: a conv with as many filters as its patch
    has values fits any rotation of its filters by a linear mix of them."""
    fitted = row.get("fitted_relative_error")
    permutes = row.get("channel_map_permutation") is True
    return permutes and fitted is not None and fitted < row["relative_error"]


def _layer_error(row: dict) -> float:
    """A layer row's gated error: its relative error, or with --channel-map, where the fitted
    map permutes the channels, the smaller of that and the error after the permutation."""
    return row["fitted_relative_error"] if _fitted(row) else row["relative_error"]


def evaluate_gate(
    result: AuditResult | dict, gate: GateConfig, baseline: dict | None = None
) -> GateReport:
    """Run every configured check on a result (or a summary.json dict).

    Raises :class:`~eqaudit.errors.UsageError` for a threshold pattern that matches nothing and
    :class:`~eqaudit.errors.ConfigError` for a baseline made under other conditions.
    """
    summary = result.summary if isinstance(result, AuditResult) else result
    checks: list[Check] = []
    if gate.fail_under is not None:
        checks.append(
            _compare(
                "score",
                "--fail-under",
                "robustness score, 0-100",
                summary["scores"]["robustness_score"],
                ">=",
                gate.fail_under,
            )
        )
    checks += _output_checks(summary, gate)
    checks += _layer_checks(summary, gate)
    if baseline is not None:
        if not isinstance(result, AuditResult):
            raise UsageError("a baseline is checked against a result with its predictions")
        check_fingerprint(baseline, result, gate.baseline or "the baseline")
        checks += _regression_checks(summary, baseline, gate.max_regression or 0.0)
    return GateReport(tuple(checks), gate.to_dict())


# -- baselines -------------------------------------------------------------------------------------
def image_ids_sha256(result: AuditResult) -> str | None:
    """SHA-256 of the sorted audited image ids (predictions.csv ``image`` column)."""
    frame = result.predictions
    if frame is None or not len(frame):
        return None
    ids = sorted({str(i) for i in frame["image"]})
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def fingerprint(result: AuditResult) -> dict:
    """What a baseline and a run must share for their numbers to be comparable."""
    s = result.summary
    spec = s["model"]["input"]
    preprocessing = {k: v for k, v in s["preprocessing"].items() if k != "notes"}
    data = s["data"]
    label_action = (s.get("label_action") or {}).get("declared") or {}
    return {
        "transforms": [e["name"] for e in s["transforms"]["elements"]],
        "shift_mode": s["transforms"]["shift_mode"],
        "label_action": label_action,
        "preprocessing": preprocessing,
        "input": {k: spec[k] for k in ("height", "width", "layout", "channels")},
        "data": {
            "source": data["source"],
            "count": data["count"],
            "synthetic": data["synthetic"],
            "labelled": data["labelled"],
            "image_ids_sha256": image_ids_sha256(result),
            **({"sha256": data["sha256"]} if data.get("sha256") else {}),
        },
        "seed": s["seed"],
    }


def make_baseline(result: AuditResult) -> dict:
    """The baseline of a run: its fingerprint and the numbers later runs are compared with."""
    s = result.summary
    outputs = {
        r["transform"]: {"agreement": r["agreement"], "js_divergence": r["js_divergence"]}
        for r in s["outputs"]
        if r["transform"] != IDENTITY and not r["skipped"]
    }
    return {
        "format": BASELINE_FORMAT,
        "eqaudit": s["eqaudit"]["version"],
        "model": {"name": s["model"]["name"], "sha256": s["model"]["sha256"]},
        "fingerprint": fingerprint(result),
        "metrics": {
            "robustness_score": s["scores"]["robustness_score"],
            "orbit_consistency": s["scores"]["orbit_consistency"],
            "outputs": outputs,
        },
    }


def baseline_json(result: AuditResult) -> str:
    """Deterministic, diff-friendly: sorted keys, one value per line, no timestamps."""
    return json.dumps(make_baseline(result), indent=2, sort_keys=True, allow_nan=False) + "\n"


def check_baseline_path(path: str | Path) -> None:
    """Refuse a ``--save-baseline`` path that cannot take a file, before the audit runs (and
    before its report replaces the previous one); creates nothing."""
    from eqaudit.reports.files import check_writable

    check_writable(Path(path), "--save-baseline", folder=False, example="base.json")


def save_baseline(result: AuditResult, path: str | Path) -> Path:
    """Write the baseline atomically (a temporary file beside it, then ``os.replace``)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--save-baseline '{path}' is a folder: give a file name, e.g. base.json")
    from eqaudit.reports.files import replace_text

    try:
        replace_text(path, baseline_json(result))
    except OSError as exc:
        raise UsageError(
            f"cannot write the baseline '{path}': {exc.strerror or exc}; choose another path"
        ) from None
    return path


def load_baseline(path: str | Path) -> dict:
    """Read and validate a baseline file (before the audit, so a bad path or a damaged file
    fails at once, not after minutes of auditing)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"baseline '{path}' is a folder: give the baseline file, e.g. {path / 'base.json'}"
        )
    if not path.is_file():
        raise ConfigError(
            f"baseline '{path}' does not exist: create one with 'eqaudit check ... "
            f"--save-baseline {path}'"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"baseline '{path}' is not readable JSON ({exc}): re-create it") from None
    found = data.get("format") if isinstance(data, dict) else None
    if isinstance(found, str) and _newer_format(found):
        raise ConfigError(
            f"baseline '{path}' was written by a newer eqaudit (format {found}, this one reads "
            f"{BASELINE_FORMAT}): upgrade eqaudit"
        )
    if found != BASELINE_FORMAT:
        raise ConfigError(
            f"'{path}' is not an eqaudit baseline (format {BASELINE_FORMAT}): create one with "
            "--save-baseline"
        )
    for key in ("fingerprint", "metrics"):
        if not isinstance(data.get(key), dict):
            raise ConfigError(f"baseline '{path}' lacks its '{key}' block: re-create it")
    problem = _baseline_problem(data)
    if problem:
        raise ConfigError(
            f"baseline '{path}' is damaged: {problem}; re-create it with --save-baseline"
        )
    return data


def _newer_format(found: str) -> bool:
    """Whether ``found`` is ``eqaudit-baseline/N`` with N above the version this one reads."""
    prefix, _, version = BASELINE_FORMAT.partition("/")
    name, _, major = found.partition("/")
    return name == prefix and major.isdigit() and int(major) > int(version)


#: The numbers of a baseline, with their range; null is allowed (a value a run did not define).
_BASELINE_SCORES = {"robustness_score": 100.0, "orbit_consistency": 1.0}
_BASELINE_ROW = {"agreement": 1.0, "js_divergence": 1.0}


def _number_problem(where: str, value: Any, top: float) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{where} is {json.dumps(value)[:40]}, not a number"
    if not 0.0 <= value <= top:  # (NaN fails this too: Python's json reads NaN)
        return f"{where} is {value}, not a number from 0 to {top:g}"
    return None


def _numbers_problem(
    values: dict, ranges: dict[str, float], where: str, lacks: Callable[[str], str]
) -> str | None:
    """The first of ``ranges``' keys missing from ``values`` (``lacks(key)`` says so) or holding
    no number in its range, or None."""
    for key, top in ranges.items():
        if key not in values:
            return lacks(key)
        problem = _number_problem(f"{where}.{key}", values[key], top)
        if problem:
            return problem
    return None


def _baseline_problem(data: dict) -> str | None:
    """What is wrong with the numbers of a baseline (``metrics``), or None: each must be a
    number in its range or null, and there must be per-element numbers to compare with."""
    metrics = data["metrics"]
    problem = _numbers_problem(
        metrics, _BASELINE_SCORES, "metrics", lambda key: f"it lacks metrics.{key}"
    )
    if problem:
        return problem
    outputs = metrics.get("outputs")
    if not isinstance(outputs, dict):
        return f"metrics.outputs is {json.dumps(outputs)[:40]}, not an object of elements"
    for element, row in outputs.items():
        if not isinstance(row, dict):
            return f"metrics.outputs.{element} is {json.dumps(row)[:40]}, not an object"
        where = f"metrics.outputs.{element}"
        problem = _numbers_problem(
            row, _BASELINE_ROW, where, lambda key, at=where: f"{at} lacks '{key}'"
        )
        if problem:
            return problem
    listed = data["fingerprint"].get("transforms")
    if isinstance(listed, list):
        unknown = [str(e) for e in outputs if e not in listed or e == IDENTITY]
        if unknown:
            return (
                f"metrics.outputs has {', '.join(unknown)}, which its fingerprint's transforms "
                "do not list (or the identity)"
            )
        if not outputs and any(e != IDENTITY for e in listed):
            # Every per-element regression check would be dropped: the gate would pass while
            # comparing nothing but the score.
            return (
                "metrics.outputs is empty, so no element's agreement or JS divergence could be "
                "compared"
            )
    return None


def _short(value: Any) -> str:
    if isinstance(value, list):
        text = ",".join(str(v) for v in value)
    else:
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    if old == new:
        return []
    if prefix.endswith("image_ids_sha256"):
        return [f"{prefix}: the audited images differ (other files, names or --num-images)"]
    if isinstance(old, list) and isinstance(new, list):
        # Long lists (transform elements) cut to 60 characters would print as equal: name
        # what each side has that the other lacks.
        only_old = [str(v) for v in old if v not in new]
        only_new = [str(v) for v in new if v not in old]
        if only_old or only_new:
            sides = [("the baseline", only_old), ("this run", only_new)]
            return [
                f"{prefix}: " + "; ".join(f"only {who} has {_short(v)}" for who, v in sides if v)
            ]
        return [f"{prefix}: the same entries in another order"]
    return [f"{prefix}: baseline {_short(old)} vs this run {_short(new)}"]


def check_fingerprint(baseline: dict, result: AuditResult, name: str | Path) -> None:
    """Refuse (exit 2) a baseline made with other transforms, preprocessing, input or images.

    The order of the transform elements does not matter (every number is per element or a
    mean over them), nor does the seed of a run on real images: which images it sampled is in
    ``data.image_ids_sha256``; synthetic images are made from the seed."""
    old, new = dict(baseline["fingerprint"]), fingerprint(result)
    for side in (old, new):
        if isinstance(side.get("transforms"), list):
            side["transforms"] = sorted(map(str, side["transforms"]))
    if not new["data"]["synthetic"]:
        old.pop("seed", None)
        new.pop("seed", None)
    if "sha256" not in (old.get("data") or {}):  # (a baseline from before arrays were hashed)
        new["data"] = {k: v for k, v in new["data"].items() if k != "sha256"}
    differences = _differences(old, new, "")
    if differences:
        made_by, running = baseline.get("eqaudit"), result.summary["eqaudit"]["version"]
        other = (
            f" It was made by eqaudit {made_by} and this is {running}: with the same options, "
            "a difference in element names or in the images sampled comes from the version"
            if made_by and made_by != running
            else ""
        )
        raise ConfigError(
            f"baseline '{name}' was made under other conditions, so its numbers are not "
            f"comparable: {'; '.join(differences)}. Audit with the options it was made with, "
            f"or re-create it with --save-baseline.{other}"
        )


def _regression_checks(summary: dict, baseline: dict, allowed: float) -> list[Check]:
    metrics = baseline["metrics"]
    option = "--max-regression"

    def worse_by(name: str, old: float | None, new: float | None, higher_is_better: bool, limit):
        if old is None or new is None:
            return Check(name, option, SKIPPED, "", reason="not defined in both runs")
        change = _decimal(shown(old)) - _decimal(shown(new))
        if not higher_is_better:
            change = -change
        description = f"how much worse: {shown(old)} in the baseline, {shown(new)} now"
        return _compare(name, option, description, float(change), "<=", limit, text=str(change))

    scores = summary["scores"]
    checks = [
        worse_by(
            "regression.score",
            metrics.get("robustness_score"),
            scores["robustness_score"],
            True,
            float(Decimal(repr(float(allowed))) * 100),  # 0.07 -> 7.0, not 7.000000000000001
        ),
        worse_by(
            "regression.orbit_consistency",
            metrics.get("orbit_consistency"),
            scores["orbit_consistency"],
            True,
            allowed,
        ),
    ]
    old_outputs = metrics.get("outputs") or {}
    for row in summary["outputs"]:
        name = row["transform"]
        if name == IDENTITY or (row["skipped"] and name not in old_outputs):
            continue  # (skipped in both runs: nothing measured on either side)
        if row["skipped"] or name not in old_outputs:
            # One side has numbers, the other none: said, never dropped silently.
            reason = row["skipped"] or "the baseline has no number for it (skipped when made)"
            for check in (f"regression.agreement[{name}]", f"regression.js[{name}]"):
                checks.append(Check(check, option, SKIPPED, "", reason=reason))
            continue
        old = old_outputs[name]
        checks.append(
            worse_by(
                f"regression.agreement[{name}]",
                old.get("agreement"),
                row["agreement"],
                True,
                allowed,
            )
        )
        checks.append(
            worse_by(
                f"regression.js[{name}]",
                old.get("js_divergence"),
                row["js_divergence"],
                False,
                allowed,
            )
        )
    return checks

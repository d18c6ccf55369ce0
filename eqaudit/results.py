"""The result of an audit: one immutable object that every writer and gate reads.

Schema (``summary.json``, ``schema_version`` below; additive changes keep the major version):

``schema_version``   "MAJOR.MINOR"
``eqaudit``          {"version", "torch", "onnxruntime", "onnx", "numpy", "python"}
``model``            {"path", "name", "sha256" (of the file; an ONNX model's with its external
                      data files), "backend", "format", "input": InputSpec,
                      "output_kind", "output_kind_source", "num_classes", "class_names",
                      ONNX: "opset", "producer", "output", "providers"; PyTorch: "factory",
                      "output" (--output-name); for an ONNX graph or a .pt2 fixed at batch 1
                      "fixed_batch": {"size", "run": "batched" | "one image at a time", "why"}}
``preprocessing``    Preprocessing.to_dict()
``transforms``       {"spec", "shift_mode", "margin", "elements": [{"name", "family", "exact",
                      "skipped": reason | null, ...}]}
``label_action``     {"mode": "invariance"|"equivariance", "declared": {element: spec},
                      "permutations": {element: [P_g(0), ...]}, "suggested": {element: {"mapping",
                      "support", "share", "is_permutation", "spec"}}} (see transforms/labels.py)
``data``             DataDescription.to_dict()  (``synthetic: true`` marks numbers that do not
                      reflect real inputs)
``seed``, ``options`` the resolved AuditConfig
``warnings``         list of one-line strings shown to the user
``scores``           {"robustness_score", "mean_agreement", "mean_js_divergence",
                      "orbit_consistency", "worst_transform", "worst_agreement",
                      "worst_accuracy", "orbit_accuracy",
                      "clean_accuracy", "layer_relative_error" (mean over scored non-identity
                      layer rows), "worst_layer"}
``outputs``          one row per element (identity first): transform, family, mode, exact, n,
                      agreement, agreement_low, agreement_high, js_divergence, logit_error,
                      accuracy, interpolation_floor, skipped
``layers``           one row per (layer, element): layer, op, index, kind (spatial|flat),
                      transform, shape, stride, stride_source (graph|shape|unknown|n/a),
                      stride_h, stride_w, offset_h, offset_w (the sampling grid: cells centred
                      at input pixel offset + stride * i; null when unknown), aligned (does the
                      element map the grid onto itself; null: unknown grid or flat layer),
                      comparison (exact|resampled|naive|invariance), scored (the row enters
                      layer scores: measured, and exact, resampled about a known grid, or flat),
                      relative_error, relative_error_p95, relative_error_max, cosine_distance,
                      interpolation_floor, measurable, reason, [channel map, with
                      --channel-map: fitted_relative_error, pooled_relative_error,
                      channel_map_permutation], [lie_rotation, lie_translate_x,
                      lie_translate_y: the layer's contribution to the output Lie derivative
                      (with --lie, PyTorch models; on the identity row)]
``geometry``         {"input_size", "size_choice", "misaligned_mode", "grid_source",
                      "aligned_pairs", "misaligned_pairs", "unknown_pairs", "notes",
                      "not_audited" (every candidate layer of neither kind: tokens, scores)}
``lie``              with --lie: {"method", "steps": {generator: step}, "outputs": [one row per
                      generator: generator, unit, n, mean, std, p95, max, method], "layers":
                      [per-layer contributions]}
``run``              {"started_at", "duration_s", "host"}: the only block that changes between
                      two identical runs

Per-image predictions (``predictions.csv``) and the report's thumbnails (``gallery.json``, see
:mod:`eqaudit.gallery`) are kept beside the summary, not inside it.
Numbers that are not defined are ``null`` in JSON and empty cells in CSV, never NaN.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from eqaudit.errors import DataError

SCHEMA_VERSION = "1.1"

OUTPUT_COLUMNS = [
    "transform",
    "family",
    "mode",
    "exact",
    "n",
    "agreement",
    "agreement_low",
    "agreement_high",
    "js_divergence",
    "logit_error",
    "accuracy",
    "interpolation_floor",
    "skipped",
]
LAYER_COLUMNS = [
    "layer",
    "op",
    "index",
    "kind",
    "transform",
    "shape",
    "stride",
    "stride_source",
    "stride_h",
    "stride_w",
    "offset_h",
    "offset_w",
    "aligned",
    "comparison",
    "scored",
    "relative_error",
    "relative_error_p95",
    "relative_error_max",
    "cosine_distance",
    "interpolation_floor",
    "measurable",
    "reason",
]
PREDICTION_COLUMNS = [
    "image",
    "transform",
    "top1",
    "expected",
    "confidence",
    "label",
    "agrees",
    "js_divergence",
]


def is_scored(row: dict) -> bool:
    """Does a layer row enter layer scores, worst-layer lists and layer gates? (Summaries
    written before the ``scored`` column count every measurable row.)"""
    if row.get("relative_error") is None:
        return False
    return bool(row.get("scored", row.get("measurable", False)))


def is_flagged(row: dict) -> bool:
    """A layer row compared although its grid is not mapped onto itself by the element (naive
    or resampled): shown apart, kept out of layer scores."""
    return row.get("aligned") is False and row.get("measurable", True) and not is_scored(row)


def output_title(summary: dict) -> str:
    """The heading of the output table: invariance, or equivariance against a declared label
    action (with the declaration)."""
    action = summary.get("label_action") or {}
    if action.get("mode") == "equivariance":
        declared = "; ".join(f"{k}={v}" for k, v in action.get("declared", {}).items())
        return f"Output equivariance against the declared label action ({declared})"
    return "Output invariance"


def skipped_images_warning(data: dict) -> str | None:
    """The warning for the unreadable images a folder audit skipped (``data.skipped``)."""
    skipped = data.get("skipped") or []
    if not skipped:
        return None
    shown = "; ".join(skipped[:3]) + (
        f"; ... ({len(skipped) - 3} more)" if len(skipped) > 3 else ""
    )
    return f"{len(skipped)} unreadable image(s) skipped: {shown}"


def batch_text(batch: int | None, fixed: dict | None) -> str:
    """How the model takes its batch, in words: ``input.batch`` and ``model.fixed_batch``."""
    if fixed and fixed.get("run") == "batched":
        return f"batch fixed at {fixed['size']} in the graph, run batched"
    if fixed and fixed.get("why"):
        # (Its first clause: the runtime's own error, after a colon, stays in summary.json.)
        why = str(fixed["why"]).split(": ", 1)[0]
        return f"batch fixed at {fixed['size']}, run one image at a time ({why})"
    return f"batch fixed at {batch}" if batch else "any batch"


def clean_number(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, so JSON holds only defined numbers."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_ready(obj: Any) -> Any:
    """Nested dicts/lists with every number cleaned by :func:`clean_number` (NaN -> null)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return clean_number(obj)


@dataclass(frozen=True, repr=False)
class AuditResult:
    """What an audit measured. ``summary`` is exactly the content of summary.json."""

    summary: dict
    predictions: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=PREDICTION_COLUMNS)
    )
    #: Thumbnails for the report (see :mod:`eqaudit.gallery`): {"flips": [...], "orbits": [...]}.
    gallery: dict = field(default_factory=lambda: {"flips": [], "orbits": []})
    #: ``eqaudit check --shard``: the mergeable state (JSON payload, arrays), see eqaudit.shard
    shard_state: tuple[dict, dict] | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        # (The dataclass repr printed the whole summary: some 50k characters in a notebook.)
        s = self.summary
        model, data = s.get("model") or {}, s.get("data") or {}
        return (
            f"AuditResult(model={model.get('name')!r}, transforms="
            f"{(s.get('transforms') or {}).get('spec')!r}, images={data.get('count')}, "
            f"score={(s.get('scores') or {}).get('robustness_score')}, "
            f"layers={len({r['layer'] for r in s.get('layers') or []})})"
        )

    # -- convenient views --------------------------------------------------------------------
    @property
    def score(self) -> float | None:
        return self.summary["scores"]["robustness_score"]

    @property
    def scores(self) -> dict:
        return self.summary["scores"]

    @property
    def outputs(self) -> list[dict]:
        return self.summary["outputs"]

    @property
    def layers(self) -> list[dict]:
        return self.summary["layers"]

    @property
    def warnings(self) -> list[str]:
        return self.summary["warnings"]

    def output(self, transform: str) -> dict:
        """The output row of one element, by name."""
        for row in self.outputs:
            if row["transform"] == transform:
                return row
        raise KeyError(transform)

    def layer(self, layer: str, transform: str) -> dict:
        for row in self.layers:
            if row["layer"] == layer and row["transform"] == transform:
                return row
        raise KeyError((layer, transform))

    def to_frame(self, which: str = "outputs") -> pd.DataFrame:
        """``outputs``, ``layers`` or ``predictions`` as a pandas DataFrame."""
        if which == "outputs":
            return pd.DataFrame(self.outputs, columns=OUTPUT_COLUMNS)
        if which == "layers":
            # Optional measurements (--channel-map, --lie) add columns after the standard ones.
            extra = [k for row in self.layers[:1] for k in row if k not in LAYER_COLUMNS]
            return pd.DataFrame(self.layers, columns=LAYER_COLUMNS + extra)
        if which == "predictions":
            return self.predictions.copy()
        raise ValueError(f"unknown table '{which}': use outputs, layers or predictions")

    def to_json(self) -> str:
        return (
            json.dumps(json_ready(self.summary), indent=2, sort_keys=False, allow_nan=False) + "\n"
        )

    @classmethod
    def from_json(cls, path: str | Path) -> AuditResult:
        """Load a saved report: ``summary.json`` (a file, or the folder holding it) with its
        ``predictions.csv`` and ``gallery.json`` when they are beside it.

        A file that cannot be read raises :class:`~eqaudit.errors.DataError` naming that file
        (a broken gallery.json is not a broken summary.json)."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        summary_path = folder / "summary.json" if path.is_dir() else path
        summary = _read_file(summary_path, lambda p: json.loads(p.read_text(encoding="utf-8")))
        predictions_path = folder / "predictions.csv"
        predictions = (
            _read_file(predictions_path, pd.read_csv)
            if predictions_path.is_file()
            else pd.DataFrame(columns=PREDICTION_COLUMNS)
        )
        gallery_path = folder / "gallery.json"
        gallery = (
            _read_file(gallery_path, lambda p: json.loads(p.read_text(encoding="utf-8")))
            if gallery_path.is_file()
            else {"flips": [], "orbits": []}
        )
        return cls(summary=summary, predictions=predictions, gallery=gallery)


def _read_file(path: Path, read: Any) -> Any:
    """``read(path)``; a file that cannot be read or parsed is a DataError naming it."""
    try:
        return read(path)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad CSV, bad encoding
        cause = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"cannot read '{path}': {cause}; rerun eqaudit check to write it again"
        ) from None


def _major(version: Any) -> int | None:
    """The MAJOR of a ``"MAJOR.MINOR"`` schema version (a bare integer too), or None when it
    is not one."""
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return version if version >= 0 else None
    if isinstance(version, str) and re.fullmatch(r"\d+(\.\d+)*", version):
        return int(version.split(".")[0])
    return None


def check_schema_version(document: dict, path: str | Path, current: str = SCHEMA_VERSION) -> None:
    """Refuse a saved file whose ``schema_version`` this eqaudit cannot read: a higher MAJOR
    (additive changes keep the major version, so only a newer eqaudit knows what changed), a
    lower one, or one that is missing or malformed."""
    found = document.get("schema_version")
    major, mine = _major(found), _major(current)
    if found is None:
        raise DataError(
            f"'{path}' has no schema_version, so eqaudit cannot tell whether it reads it: "
            "pass a file written by eqaudit, or rerun eqaudit check to write it again"
        )
    if major is None:
        raise DataError(
            f"'{path}' has schema_version {json.dumps(found)[:30]}, not MAJOR.MINOR such as "
            f'"{current}": rerun eqaudit check to write it again'
        )
    if major > mine:  # type: ignore[operator]
        raise DataError(
            f"'{path}' was written by a newer eqaudit (schema {found}, this one reads "
            f"{current}): upgrade eqaudit"
        )
    if major < mine:  # type: ignore[operator]
        raise DataError(
            f"'{path}' has schema {found}, older than this eqaudit reads ({current}): rerun "
            "eqaudit check to write it again"
        )


def check_saved_summary(summary: Any, path: str | Path) -> None:
    """Refuse a loaded summary.json that is not one, or whose schema this eqaudit does not
    read (:func:`check_schema_version`). A newer schema is said first: it may lack blocks."""
    if isinstance(summary, dict) and "schema_version" in summary:
        check_schema_version(summary, path)
    missing = [
        key
        for key in ("model", "scores", "outputs")
        if not isinstance(summary, dict) or key not in summary
    ]
    if missing:
        raise DataError(
            f"'{path}' is not an eqaudit summary (no {', '.join(missing)}); "
            "pass the summary.json that eqaudit check wrote"
        )
    check_schema_version(summary, path)


def make_summary(**parts: Any) -> dict:
    """Assemble summary.json in schema order with undefined numbers as None."""
    order = [
        "schema_version",
        "eqaudit",
        "model",
        "preprocessing",
        "transforms",
        "label_action",
        "data",
        "seed",
        "options",
        "warnings",
        "scores",
        "outputs",
        "layers",
        "geometry",
        "lie",
        "run",
    ]
    optional = {"geometry", "lie"}
    summary = {"schema_version": SCHEMA_VERSION}
    for key in order[1:]:
        if key in parts or key not in optional:
            summary[key] = parts[key]
    return json_ready(summary)

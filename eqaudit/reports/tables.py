"""summary.json and the CSV tables (outputs.csv, layers.csv, predictions.csv)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from eqaudit.results import AuditResult

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Prefix text cells that a spreadsheet would run as a formula with a quote."""
    frame = frame.copy()
    for column in frame.columns:
        # pandas >= 3 gives text columns the "str" dtype (a StringDtype), not object.
        dtype = frame[column].dtype
        if pd.api.types.is_object_dtype(dtype) or isinstance(dtype, pd.StringDtype):
            frame[column] = frame[column].map(
                lambda v: "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v
            )
    return frame


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    # Undefined numbers are empty cells; floats keep full precision (repr round-trips).
    neutralise_formulas(frame).to_csv(path, index=False, na_rep="", float_format=None)


def write_summary_json(result: AuditResult, folder: Path) -> list[str]:
    (folder / "summary.json").write_text(result.to_json(), encoding="utf-8")
    names = ["summary.json"]
    if result.gallery.get("flips") or result.gallery.get("orbits"):
        gallery = json.dumps(result.gallery, indent=1, allow_nan=False) + "\n"
        (folder / "gallery.json").write_text(gallery, encoding="utf-8")
        names.append("gallery.json")
    return names


def write_csv_tables(result: AuditResult, folder: Path) -> list[str]:
    _write_csv(result.to_frame("outputs"), folder / "outputs.csv")
    names = ["outputs.csv"]
    if result.layers:
        _write_csv(result.to_frame("layers"), folder / "layers.csv")
        names.append("layers.csv")
    if len(result.predictions):
        _write_csv(result.to_frame("predictions"), folder / "predictions.csv")
        names.append("predictions.csv")
    return names

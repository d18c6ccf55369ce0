"""Report writers, looked up by name. Every writer reads an :class:`AuditResult`; none runs a model.

All files of one report are written to a temporary folder beside the output folder and then moved
into place one by one with ``os.replace`` (atomic on one filesystem), so an error or interruption
never leaves a half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from eqaudit.errors import UsageError
from eqaudit.reports.tables import write_csv_tables, write_summary_json
from eqaudit.results import AuditResult

Writer = Callable[[AuditResult, Path], list[str]]

WRITERS: dict[str, Writer] = {
    "json": write_summary_json,
    "csv": write_csv_tables,
}


#: Every file a writer may produce (removed when a new report in the same folder lacks it).
KNOWN_FILES = {"summary.json", "outputs.csv", "layers.csv", "predictions.csv", "report.html"}


def list_writers() -> list[str]:
    return list(WRITERS)


def write_report(
    result: AuditResult, out_dir: Path, formats: list[str] | None = None
) -> list[Path]:
    """Write the report files into ``out_dir``; return their final paths."""
    out_dir = Path(out_dir)
    formats = formats or list(WRITERS)
    for name in formats:
        if name not in WRITERS:
            raise UsageError(f"unknown report format '{name}': use {', '.join(WRITERS)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out '{out_dir}' is a file, not a folder: choose a folder path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".eqaudit-", dir=out_dir.parent))
    except OSError as exc:
        raise UsageError(
            f"cannot write to '{out_dir}': {exc.strerror or exc}; choose another --out"
        ) from None
    try:
        names: list[str] = []
        for name in formats:
            names += WRITERS[name](result, staging)
        final = []
        for name in names:
            os.replace(staging / name, out_dir / name)
            final.append(out_dir / name)
        # A file of an earlier run that this run does not write would describe another audit.
        for stale in KNOWN_FILES - set(names):
            (out_dir / stale).unlink(missing_ok=True)
        return final
    except OSError as exc:
        raise UsageError(
            f"cannot write to '{out_dir}': {exc.strerror or exc}; choose another --out"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)

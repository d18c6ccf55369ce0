"""Report writers, looked up by name. Every writer reads an :class:`AuditResult`; none runs a model.

All files of one report are written to a hidden temporary folder inside the output folder and then
moved into place one by one with ``os.replace`` (atomic on one filesystem), so an error or
interruption never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from eqaudit.errors import UsageError
from eqaudit.reports.files import check_writable
from eqaudit.reports.html import write_html_report
from eqaudit.reports.junit import write_junit
from eqaudit.reports.markdown import write_markdown
from eqaudit.reports.tables import write_csv_tables, write_summary_json
from eqaudit.results import AuditResult

Writer = Callable[[AuditResult, Path], list[str]]

WRITERS: dict[str, Writer] = {
    "json": write_summary_json,
    "csv": write_csv_tables,
    "html": write_html_report,
    "junit": write_junit,
    "markdown": write_markdown,
}


#: Every file a writer may produce (removed when a new report in the same folder lacks it).
KNOWN_FILES = {
    "summary.json",
    "gallery.json",
    "outputs.csv",
    "layers.csv",
    "predictions.csv",
    "report.html",
    "junit.xml",
    "summary.md",
    "shard-state.json",
    "shard-state.npz",
}
#: The files only ``eqaudit compare`` writes (it also writes report.html, summary.md and
#: junit.xml), and the folders it writes each model's audit into. A check report written into
#: a compare folder removes them, and the other way round (:func:`write_folder`): a folder
#: holding halves of two reports reads as one, and ``eqaudit report`` re-rendered the wrong one.
COMPARE_FILES = frozenset({"compare.json", "compare.csv"})
COMPARE_FOLDERS = ("a", "b")


def list_writers() -> list[str]:
    return list(WRITERS)


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that cannot receive a report; creates nothing.

    Called before the audit runs, so a bad ``--out`` fails at once instead of after the audit.
    """
    check_writable(out_dir, "--out", folder=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no POSIX signal masks here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_report(
    result: AuditResult, out_dir: Path, formats: list[str] | None = None
) -> list[Path]:
    """Write the report files into ``out_dir``; return their final paths. A shard with no
    images (more shards than images) has nothing to report: only its state is written, which
    merges as zero."""
    out_dir = Path(out_dir)
    shard = result.summary.get("shard")
    if shard is not None and not shard["images"]:
        from eqaudit.shard import write_state

        return write_folder(
            out_dir,
            lambda staging: write_state(staging, result.shard_state),
            KNOWN_FILES | COMPARE_FILES,
            COMPARE_FOLDERS,
        )
    formats = formats or list(WRITERS)
    for name in formats:
        if name not in WRITERS:
            raise UsageError(f"unknown report format '{name}': use {', '.join(WRITERS)}")

    def produce(staging: Path) -> list[str]:
        files = [file for name in formats for file in WRITERS[name](result, staging)]
        if result.shard_state is not None:  # eqaudit check --shard: what eqaudit merge reads
            from eqaudit.shard import write_state

            files += write_state(staging, result.shard_state)
        return files

    return write_folder(out_dir, produce, KNOWN_FILES | COMPARE_FILES, COMPARE_FOLDERS)


def write_folder(
    out_dir: Path,
    produce: Callable[[Path], list[str]],
    known: set[str] | frozenset[str],
    known_folders: tuple[str, ...] = (),
) -> list[Path]:
    """Let ``produce(staging)`` write files (or folders of report files, a comparison's ``a/``
    and ``b/``) into a temporary folder and return their names, then move them into ``out_dir``
    as one: files in ``known`` that this run did not write are removed, and folders in
    ``known_folders`` that hold report files only (a user's own files stay). If a move fails,
    the moves already made are undone: the folder holds the previous report or the new one."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    created = not out_dir.exists()
    staging: Path | None = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Staged inside out_dir itself: same filesystem for os.replace, and only out_dir needs
        # to be writable (its parent may not be, e.g. --out $HOME).
        staging = Path(tempfile.mkdtemp(prefix=".eqaudit-", dir=out_dir))
        names = produce(staging)
        _refuse_to_replace(out_dir, staging, names)
        # A file of an earlier run that this run does not write would describe another audit.
        # A comparison's a/ and b/ are its audits: removed with it (report files only), never
        # folders of a folder that held no comparison (a merge's shards, say).
        held_comparison = (out_dir / "compare.json").is_file()
        stale = [n for n in sorted(set(known) - set(names)) if (out_dir / n).is_file()]
        stale += [
            name
            for name in known_folders
            if name not in names and held_comparison and _holds_report_files_only(out_dir / name)
        ]
        _move_into_place(out_dir, staging, names, stale)
        return [out_dir / name for name in names]
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            staging = None
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when still empty
        where = Path(exc.filename) if exc.filename else out_dir
        raise UsageError(
            f"cannot write to '{where}': {exc.strerror or exc}; choose another --out"
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _holds_report_files_only(folder: Path) -> bool:
    return (
        folder.is_dir()
        and not folder.is_symlink()
        and all(f.name in KNOWN_FILES and f.is_file() for f in folder.iterdir())
    )


def _refuse_to_replace(out_dir: Path, staging: Path, names: list[str]) -> None:
    """Refuse, before anything moves, a report name taken by something that is not an earlier
    report's (see :func:`check_report_names`)."""
    folders = [name for name in names if (staging / name).is_dir()]
    check_report_names(out_dir, [name for name in names if name not in folders], folders)
    for name in folders:  # (a/ and b/ are replaced file by file: their names too)
        check_report_names(out_dir / name, [p.name for p in (staging / name).iterdir()])


def check_report_names(out_dir: Path, files: Iterable[str], folders: Iterable[str] = ()) -> None:
    """Refuse an output folder where a report file's name is taken by a folder, or a report
    folder's (a comparison's ``a/``) by a file; creates nothing. Called before an audit runs
    too, so that it does not fail after it."""
    for name in files:
        target = Path(out_dir) / name
        if target.is_dir() and not target.is_symlink():
            raise UsageError(
                f"'{target}' is a folder where the report writes its {name} file: move it, or "
                "choose another --out"
            )
    for name in folders:
        target = Path(out_dir) / name
        if (target.exists() or target.is_symlink()) and (
            not target.is_dir() or target.is_symlink()
        ):
            raise UsageError(
                f"'{target}' is a file or a link where the report writes its {name}/ folder: "
                "move it, or choose another --out"
            )


def _move_into_place(out_dir: Path, staging: Path, names: list[str], stale: list[str]) -> None:
    """Move ``names`` from ``staging`` into ``out_dir``, and ``stale`` out of it, as one: what
    they replace is set aside in the staging folder (deleted with it) until every move is done,
    and put back if one fails. SIGINT and SIGTERM wait until the moves are over, so an
    interrupt leaves either the previous report or the new one, never a mix of the two."""
    previous = staging / ".previous"
    previous.mkdir()
    undo: list[tuple[Path, Path]] = []  # moves made, in order: (from, to)

    def move(source: Path, target: Path) -> None:
        try:
            os.replace(source, target)
        except OSError as exc:  # named by the report's path, not the staging folder's
            report_path = source if staging in target.parents else target
            raise OSError(exc.errno, exc.strerror, str(report_path)) from exc
        undo.append((source, target))

    def place(into: Path, source: Path, names: list[str], stale: list[str], aside: Path) -> None:
        for name in names:
            new, target = source / name, into / name
            if new.is_dir() and target.is_dir():
                # A report folder there already (a comparison's a/): its report files are
                # replaced one by one, files of the user's own stay.
                inner = sorted(p.name for p in new.iterdir())
                old = sorted(
                    f.name
                    for f in target.iterdir()
                    if f.name in KNOWN_FILES and f.is_file() and f.name not in inner
                )
                (aside / name).mkdir()
                place(target, new, inner, old, aside / name)
                continue
            if target.exists() or target.is_symlink():
                move(target, aside / name)
            move(new, target)
        for name in stale:
            move(into / name, aside / name)

    with _signals_held():
        try:
            place(out_dir, staging, names, stale, previous)
        except OSError:
            for source, target in reversed(undo):
                with contextlib.suppress(OSError):
                    os.replace(target, source)
            raise

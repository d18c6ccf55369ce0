"""One file written atomically, with the permissions any other report file gets; and the check,
before an audit, that a path can take what will be written there."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from eqaudit.errors import UsageError


def _umask() -> int:
    """The process's umask, read once at import (setting it to read it would race with threads
    that create files meanwhile)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _umask()


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a
    reader sees the old file or the new one, never half of one. The file gets the mode a plain
    ``open`` would give it under the process's umask (``mkstemp``'s 0600 would keep a baseline
    from the CI user that reads it). Creates missing parent folders; raises ``OSError``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def check_writable(path: Path, option: str, *, folder: bool, example: str = "") -> None:
    """Refuse (``UsageError``, naming ``option``) a path that cannot take a folder (``folder``)
    or a file: one of the other kind already there, a path inside a file (the OS says "File
    exists" or "Not a directory"), or a nearest existing folder this process cannot write to.
    Creates nothing: called before an audit, so that a bad path fails at once."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{option} '{path}' is a file, not a folder: choose a folder path")
    if not folder and path.is_dir():
        raise UsageError(f"{option} '{path}' is a folder: give a file name, e.g. {example}")
    existing = path if folder else path.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"{option} '{path}' lies inside '{existing}', which is a file: choose a path in a "
            "folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write to '{path}': permission denied on '{existing}'; choose another {option}"
        )

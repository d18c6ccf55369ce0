"""One file written atomically, with the permissions any other report file gets."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


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

"""eqaudit: audit image classifiers for invariance and per-layer equivariance.

Python API::

    import eqaudit
    result = eqaudit.audit("model.onnx", transforms="d4", data="images/")
    result.score, result.to_frame("layers")
"""

import os as _os
import sys as _sys
from importlib import metadata as _metadata


def _interrupted(kind, value, traceback) -> None:  # type: ignore[no-untyped-def]
    """The ``eqaudit`` script's excepthook while it starts: Ctrl-C during the seconds that
    importing torch takes gives the CLI's one line, not a traceback from inside torch (the
    interpreter still ends by SIGINT: exit status 130 in a shell)."""
    if issubclass(kind, KeyboardInterrupt):
        _sys.stderr.write("error: interrupted (SIGINT): no new report was written\n")
        return
    _sys.__excepthook__(kind, value, traceback)


# Only the console script itself (its name), never a program that imports eqaudit.
if _sys.argv and _os.path.basename(_sys.argv[0]) in ("eqaudit", "eqaudit.exe"):
    _sys.excepthook = _interrupted

from eqaudit.audit import audit  # noqa: E402
from eqaudit.compare import compare  # noqa: E402
from eqaudit.config import AuditConfig  # noqa: E402
from eqaudit.errors import EqauditError  # noqa: E402
from eqaudit.reports import write_report  # noqa: E402
from eqaudit.results import AuditResult  # noqa: E402

try:
    __version__ = _metadata.version("eqaudit")
except _metadata.PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "AuditConfig",
    "AuditResult",
    "EqauditError",
    "__version__",
    "audit",
    "compare",
    "write_report",
]

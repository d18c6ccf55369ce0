"""Errors eqaudit raises, and the exit code each one maps to.

A user mistake (bad option, unreadable data, a model that cannot be loaded) raises a subclass of
:class:`EqauditError`. Its message is one line that says what went wrong *and what to do*; the CLI
prints it without a traceback and exits with the class's ``exit_code``. Anything else escaping the
library is a bug in eqaudit and is reported as such (exit code 4, with a traceback).

Exit codes (documented in README.md):

==  =====================================================================
0   success (and, for gates, every check passed)
1   a gate failed (threshold, baseline regression)
2   usage, option, configuration or input-data error
3   the model cannot be loaded or run (corrupt file, unsupported graph,
    refused pickle, runtime failure, NaN/Inf outputs)
4   internal error: a bug in eqaudit, please report it
==  =====================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_INTERNAL = 4


class EqauditError(Exception):
    """Base class of every error caused by the user's input; carries its exit code."""

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str) -> None:
        # One line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))


class UsageError(EqauditError):
    """An option or option combination that cannot work."""


class ConfigError(EqauditError):
    """A configuration file or value that is malformed."""


class TransformSpecError(UsageError):
    """A transform specification that does not parse or does not apply to this input."""


class DataError(EqauditError):
    """Input images or arrays that are missing, unreadable or of the wrong shape."""


class ModelError(EqauditError):
    """The model cannot be loaded or run."""

    exit_code = EXIT_MODEL


class ModelLoadError(ModelError):
    """Missing, corrupt or refused model file."""


class UnsupportedModelError(ModelError):
    """A model eqaudit cannot audit (not an image classifier, several inputs, ...)."""


class ModelRunError(ModelError):
    """The model failed at run time or produced non-finite outputs."""


class GateFailed(EqauditError):
    """A release gate failed (used by the gate; never raised for user mistakes)."""

    exit_code = EXIT_GATE_FAILED


#: How a TorchScript interpreter error starts; the cause is on its last line, after a traceback.
_TORCHSCRIPT_FAILED = "The following operation failed in the TorchScript interpreter"


def cause_line(exc: BaseException, limit: int | None = None) -> str:
    """The line of a third-party exception's message that says what went wrong, for a one-line
    error: its first line, or for a TorchScript interpreter error (a heading, then a TorchScript
    traceback) its last, e.g. ``RuntimeError: AssertionError: batch must be 1``. The exception's
    type name when it has no message; cut to ``limit`` characters (``...`` marks the cut)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if lines[0].startswith(_TORCHSCRIPT_FAILED) else lines[0]
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line

"""eqaudit: audit image classifiers for invariance and per-layer equivariance.

Python API::

    import eqaudit
    result = eqaudit.audit("model.onnx", transforms="d4", data="images/")
    result.score, result.to_frame("layers")
"""

from importlib import metadata as _metadata

from eqaudit.audit import audit
from eqaudit.errors import EqauditError
from eqaudit.results import AuditResult

try:
    __version__ = _metadata.version("eqaudit")
except _metadata.PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["AuditResult", "EqauditError", "__version__", "audit"]

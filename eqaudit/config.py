"""The resolved options of one audit, as a frozen dataclass.

The CLI and the Python API both build an :class:`AuditConfig` and hand it to the engine; the
resolved values are written into summary.json so a run can be reproduced from its report.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from eqaudit.errors import UsageError

OUTPUT_KINDS = ("auto", "logits", "probs")


def parse_input_size(text: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"224"`` -> (224, 224); ``"48x192"`` -> (48, 192) (height x width)."""
    if text is None:
        return None
    if isinstance(text, tuple):
        size = text
    elif isinstance(text, int):
        size = (text, text)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", text)
        if not match:
            raise UsageError(
                f"--input-size '{text}' is not a size: write N for a square input or HxW, e.g. 48x192"
            )
        h = int(match.group(1))
        size = (h, int(match.group(2)) if match.group(2) else h)
    if min(size) < 1 or max(size) > 16384:
        raise UsageError(f"--input-size {size[0]}x{size[1]} is out of range (1..16384 per side)")
    return (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class AuditConfig:
    """Every option that changes the numbers of an audit."""

    transforms: str = "d4"
    shift_mode: str = "crop"
    # model
    factory: str | None = None
    trust_pickle: bool = False
    input_name: str | None = None
    output_name: str | None = None
    layout: str | None = None
    providers: tuple[str, ...] = ()
    input_size: tuple[int, int] | None = None
    outputs: str = "auto"
    # data
    data: str | None = None
    labels: str | None = None
    num_images: int | None = None
    seed: int = 0
    # preprocessing
    preset: str | None = None
    resize: str | None = None
    channels: str | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # engine
    layers: bool = True
    layer_patterns: tuple[str, ...] = field(default_factory=tuple)
    batch_size: int = 64
    # declared label action: ((element, action), ...), see eqaudit/transforms/labels.py
    label_action: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.outputs not in OUTPUT_KINDS:
            raise UsageError(
                f"--outputs must be one of {', '.join(OUTPUT_KINDS)}, not '{self.outputs}'"
            )
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.num_images is not None and self.num_images < 1:
            raise UsageError(f"--num-images must be at least 1, not {self.num_images}")
        if not self.layers and self.layer_patterns:
            raise UsageError("--layers and --no-layers contradict each other: keep one")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["providers"] = list(self.providers)
        d["layer_patterns"] = list(self.layer_patterns)
        d["label_action"] = {name: action for name, action in self.label_action}
        for key in ("input_size", "mean", "std"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

"""``eqaudit inspect``: what eqaudit sees in a model, without auditing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eqaudit.models import load_model


def inspect_model(model: Path | str, **options: Any) -> dict:
    """Input spec, outputs and auditable layers (with shapes when the input size is known)."""
    input_size = options.get("input_size")
    adapter = load_model(model, **options)
    if input_size is not None:
        adapter.with_input_size(*input_size)
    spec = adapter.input_spec
    info: dict[str, Any] = {
        "model": str(model),
        "backend": adapter.backend,
        "sha256": adapter.sha256,
        "input": spec.to_dict(),
        **adapter.describe(),
        "class_names": getattr(adapter, "class_names", None),
    }
    if spec.height is not None and spec.width is not None:
        example = torch.zeros(1, spec.channels, spec.height, spec.width)
        with torch.inference_mode():
            layers = adapter.probe_layers(example)
            info["num_classes"] = int(adapter.run(example).scores.shape[1])
        info["layers"] = [
            {
                "name": la.name,
                "op": la.op,
                "shape": list(la.shape or ()),
                "kind": "spatial" if la.spatial else "flat",
            }
            for la in layers
        ]
    else:
        info["layers"] = [
            {"name": la.name, "op": la.op, "shape": None, "kind": "?"} for la in adapter.layers()
        ]
        info["note"] = "the input size is dynamic: pass --input-size to see layer shapes"
    return info

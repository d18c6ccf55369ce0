"""``eqaudit inspect``: what eqaudit sees in a model, without auditing it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eqaudit.data import probe_image
from eqaudit.models import load_model
from eqaudit.models.base import check_layout_option, kept_as_given


def _grid_text(grid: Any) -> str:
    if grid is None:
        return "unknown"
    if isinstance(grid, str):
        return grid
    return (
        f"{grid.h.stride:g}x{grid.w.stride:g} @ {grid.h.offset:g},{grid.w.offset:g}"
        f" ({grid.h.n}x{grid.w.n})"
    )


def inspect_model(model: Path | str | Any, align_input: bool = False, **options: Any) -> dict:
    """Input spec, outputs and auditable layers (with shapes and sampling grids when the input
    size is known). ``align_input``: choose the nearest aligned size first (as ``check``). An
    ``nn.Module`` comes back in the modes and on the devices it was given (as from ``audit``)."""
    with kept_as_given(model):
        return _inspect_model(model, align_input, **options)


def _inspect_model(model: Path | str | Any, align_input: bool, **options: Any) -> dict:
    input_size = options.get("input_size")
    # aligned:N starts a search at N: the model must not be fixed at N before it runs.
    adapter = load_model(model, **{**options, "input_size": None} if align_input else options)
    size_note = None
    if align_input:
        from eqaudit.audit import choose_input_size
        from eqaudit.config import AuditConfig
        from eqaudit.transforms import parse_transforms

        choice = choose_input_size(
            adapter, AuditConfig(input_size=input_size, align_input=True), parse_transforms("d4")
        )
        size_note = choice.note()
    elif input_size is not None:
        adapter.with_input_size(*input_size)
    spec = adapter.input_spec
    check_layout_option(spec)  # (as check refuses it: an axis read as the channels)
    info: dict[str, Any] = {
        "model": str(model) if isinstance(model, (str, Path)) else adapter.path.name,
        "backend": adapter.backend,
        "sha256": adapter.sha256,
        "input": spec.to_dict(),
        **adapter.describe(),
        "class_names": getattr(adapter, "class_names", None),
    }
    if spec.height is not None and spec.width is not None:
        example = probe_image(spec.channels, spec.height, spec.width)
        with torch.inference_mode():
            layers = adapter.probe_layers(example)
            info["num_classes"] = int(adapter.run(example).scores.shape[1])
        try:
            graph = adapter.grid_graph()
            grids = graph.grids(spec.height, spec.width) if graph is not None else {}
        except Exception as exc:  # geometry is a help: inspect still lists the layers
            grids, info["grid_note"] = {}, f"sampling grids unavailable: {exc}"
        centred = _centred(grids, (spec.height, spec.width))
        info["layers"] = [
            {
                "name": la.name,
                "op": la.op,
                "shape": list(la.shape or ()),
                "kind": "spatial" if la.spatial else "flat",
                "grid": _grid_text(grids.get(la.name)) if la.spatial else "flat",
                "centred": centred.get(la.name) if la.spatial else None,
                **_tokens(adapter.token_layout(la.name)),
            }
            for la in layers
        ]
        info["size_note"] = size_note
        info["unauditable"] = list(adapter.unauditable)
    else:
        info["layers"] = [
            {"name": la.name, "op": la.op, "shape": None, "kind": "?"} for la in adapter.layers()
        ]
        info["note"] = "the input size is dynamic: pass --input-size to see layer shapes"
    return info


def _tokens(layout: Any) -> dict[str, Any]:
    """A token sequence's prefix tokens (a class token), left out of its map of cells."""
    return {} if layout is None else {"token_sequence": {"prefix_tokens": layout.prefix}}


def _centred(grids: dict, size: tuple[int, int]) -> dict[str, bool]:
    """Per tensor: is its grid symmetric about the image centre (rot180 maps it onto itself)?"""
    from eqaudit.transforms import D4Element
    from eqaudit.transforms.geometry import aligned

    half_turn = D4Element(2, False)
    return {
        name: aligned(half_turn, grid, size)
        for name, grid in grids.items()
        if grid is not None and not isinstance(grid, str)
    }

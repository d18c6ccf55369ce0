"""Model adapters: one interface (:class:`ModelAdapter`) over ONNX and PyTorch models.

:func:`load_model` picks the backend from the file (``.onnx`` -> onnxruntime; ``.pt2``, TorchScript,
state dicts and pickles -> PyTorch) or wraps an in-memory ``torch.nn.Module`` / ``onnx.ModelProto``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eqaudit.errors import ModelLoadError, UsageError
from eqaudit.models.base import (
    InputSpec,
    LayerInfo,
    ModelAdapter,
    RunOutput,
    layout_option,
    sha256_file,
)

__all__ = ["InputSpec", "LayerInfo", "ModelAdapter", "RunOutput", "load_model", "sha256_file"]

TORCH_SUFFIXES = (".pt2", ".pt", ".pth", ".bin", ".ts", ".torchscript", ".jit", ".ckpt")


def load_model(
    model: str | Path | Any,
    *,
    factory: str | None = None,
    trust_pickle: bool = False,
    input_name: str | None = None,
    output_name: str | None = None,
    layout: str | None = None,
    providers: Sequence[str] | None = None,
    input_size: tuple[int, int] | None = None,
    channels: int | None = None,
    threads: int | None = None,
) -> ModelAdapter:
    """Load a model file (or wrap an in-memory model) behind the adapter interface.

    ``threads``: onnxruntime's intra-op threads for an ONNX model (None: its default, one per
    physical core); a PyTorch model runs on torch's own setting (``torch.set_num_threads``)."""
    import onnx
    import torch

    if isinstance(model, torch.nn.Module):
        from eqaudit.models.torch_adapter import TorchAdapter, guess_channels

        c = channels or guess_channels(model)[0]
        h, w = input_size if input_size else (None, None)
        layout = layout_option(layout)
        spec = InputSpec(
            name="input",
            layout=layout or "NCHW",
            channels=c,
            height=h,
            width=w,
            batch=None,
            layout_source="option" if layout else "default",
        )
        adapter = TorchAdapter.from_module(model, input_spec=spec)
        adapter.output_name = output_name
        adapter.batch_dynamically()  # a TorchScript module traced at a fixed batch, once checked
        return adapter
    if isinstance(model, onnx.ModelProto):
        from eqaudit.models.onnx_adapter import OnnxAdapter

        onnx.checker.check_model(model)
        return OnnxAdapter(
            model,
            path=Path("<in-memory>.onnx"),
            input_name=input_name,
            output_name=output_name,
            layout=layout,
            providers=providers,
            threads=threads,
        )
    if isinstance(model, ModelAdapter):
        return model

    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"model file '{path}' does not exist: check the path")
    if path.is_dir():
        raise ModelLoadError(
            f"'{path}' is a directory: pass the model file itself (.onnx, .pt2, .pt, .pth)"
        )
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file '{path}' is empty (0 bytes): re-export or re-download it")
    if path.suffix.lower() == ".onnx":
        if factory or trust_pickle:
            raise UsageError(
                "--factory and --trust-pickle apply to PyTorch files, not to ONNX models: drop them"
            )
        from eqaudit.models.onnx_adapter import load_onnx

        return load_onnx(
            path,
            input_name=input_name,
            output_name=output_name,
            layout=layout,
            providers=providers,
            threads=threads,
        )
    if path.suffix.lower() in TORCH_SUFFIXES:
        if input_name:
            raise UsageError("--input-name applies to ONNX graphs only: drop it")
        from eqaudit.models.torch_adapter import load_torch

        adapter = load_torch(
            path,
            factory=factory,
            trust_pickle=trust_pickle,
            input_size=input_size,
            channels=channels,
            layout=layout,
        )
        adapter.output_name = output_name
        adapter.batch_dynamically()  # a torch.export program fixed at batch 1, once checked
        return adapter
    raise ModelLoadError(
        f"cannot tell the format of '{path.name}' from its suffix: use .onnx for ONNX, "
        ".pt2 for torch.export, .pt/.pth for TorchScript, state dicts or pickles"
    )

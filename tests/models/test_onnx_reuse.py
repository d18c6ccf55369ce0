"""The ONNX adapter writes a repeated run's outputs into the previous run's arrays."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from models_zoo import SmallCNN, export_onnx

from eqaudit.models import load_model


def test_reused_outputs_hold_each_runs_own_values(tmp_path) -> None:
    torch.manual_seed(0)
    path = export_onnx(SmallCNN().eval(), tmp_path / "m.onnx", 17)
    adapter = load_model(path)
    names = [layer.name for layer in adapter.probe_layers(torch.zeros(1, 3, 17, 17))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    first_x, second_x, third_x = (torch.randn(4, 3, 17, 17) for _ in range(3))
    first = adapter.run(first_x, names)
    first_scores = first.scores.clone()
    adapter.run(second_x, names)  # the second run with this key: written into the same arrays
    third = adapter.run(third_x, names)
    assert adapter._reuse, "the arrays of the last run are kept for the next"
    expected = session.run(None, {"image": third_x.numpy()})[0]
    np.testing.assert_array_equal(third.scores.numpy(), expected)
    # Scores are copied out: an earlier run's scores survive later runs.
    torch.testing.assert_close(first.scores, first_scores, rtol=0, atol=0)
    fresh = load_model(path)
    fresh.probe_layers(torch.zeros(1, 3, 17, 17))
    reference = fresh.run(third_x, names)
    for name in names:
        torch.testing.assert_close(third.activations[name], reference.activations[name])


def test_a_fixed_batch_model_keeps_every_chunks_activations(tmp_path) -> None:
    # A batch-1 graph runs a batch chunk by chunk with the same key: each chunk must keep its own
    # activations, not the last chunk's arrays.
    torch.manual_seed(0)
    model = SmallCNN().eval()
    fixed = load_model(export_onnx(model, tmp_path / "fixed.onnx", 17, dynamic_batch=False))
    dynamic = load_model(export_onnx(model, tmp_path / "dynamic.onnx", 17))
    names = [layer.name for layer in fixed.probe_layers(torch.zeros(1, 3, 17, 17))]
    dynamic.probe_layers(torch.zeros(1, 3, 17, 17))
    x = torch.randn(3, 3, 17, 17)
    got, want = fixed.run(x, names), dynamic.run(x, names)
    for name in names:
        torch.testing.assert_close(got.activations[name], want.activations[name])

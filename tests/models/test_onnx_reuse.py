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


def test_a_new_batch_shape_runs_into_fresh_arrays_of_the_adapter(tmp_path, monkeypatch) -> None:
    # Once the per-image output shapes are known (the probe), a batch of a new size is bound to
    # arrays the adapter allocates: onnxruntime's own outputs would be a second set of pages.
    torch.manual_seed(0)
    path = export_onnx(SmallCNN().eval(), tmp_path / "m.onnx", 17)
    adapter = load_model(path)
    names = [layer.name for layer in adapter.probe_layers(torch.zeros(1, 3, 17, 17))]
    bound = []
    run_into = type(adapter)._run_into
    monkeypatch.setattr(
        type(adapter), "_run_into", lambda self, *args: bound.append(1) or run_into(self, *args)
    )
    x = torch.randn(5, 3, 17, 17)
    out = adapter.run(x, names)
    assert bound == [1], "the first run of a new batch shape is already bound"
    (arrays,) = [v for k, v in adapter._reuse.items() if k[2] == (5, 3, 17, 17)]
    assert all(a.shape[0] == 5 for a in arrays)
    assert out.activations[names[0]].data_ptr() == arrays[1].ctypes.data  # handed out, no copy
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(out.scores.numpy(), session.run(None, {"image": x.numpy()})[0])
    fresh = load_model(path)
    fresh.probe_layers(torch.zeros(1, 3, 17, 17))
    fresh._fresh_buffers = lambda *args: None  # the unbound path, as before any shape is known
    reference = fresh.run(x, names)
    for name in names:
        torch.testing.assert_close(out.activations[name], reference.activations[name])
    # Layer sessions plan no memory pattern (it would allocate every output a second time).
    (layer_session,) = [s for key, s in adapter._sessions.items() if key]
    assert layer_session.get_session_options().enable_mem_pattern is False


class Regrouped(torch.nn.Module):
    """A layer whose first axis is not the batch: (N, 4, 4, 4) regrouped to (N * 4, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)
        self.fc = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.relu(self.conv(x)).reshape(-1, 16)
        return self.fc(rows).reshape(x.shape[0], 4, 2).mean(1)


def test_an_output_that_is_not_batch_major_is_run_unbound(tmp_path) -> None:
    torch.manual_seed(0)
    model = Regrouped().eval()
    path = export_onnx(model, tmp_path / "r.onnx", 16)
    adapter = load_model(path)
    names = [layer.name for layer in adapter.layers()]
    adapter.run(torch.zeros(1, 3, 16, 16), names)
    session = next(s for key, s in adapter._sessions.items() if key)
    assert adapter._fresh_buffers(session, tuple(names), (3, 3, 16, 16)) is None
    x = torch.randn(3, 3, 16, 16)
    out = adapter.run(x, names)
    with torch.no_grad():
        torch.testing.assert_close(out.scores, model(x), rtol=1e-5, atol=1e-6)
    assert all(value.shape[0] == 3 for value in out.activations.values())

"""A graph fixed at batch 1 (a plain ``torch.onnx.export``) runs batched when a dynamic-batch
copy gives the same outputs, and one image at a time when it does not."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from models_zoo import SmallCNN, Sqrt, calibrate_, export_onnx
from onnx import numpy_helper
from torch import nn

import eqaudit
from eqaudit.models import load_model
from eqaudit.models.onnx_adapter import _same_values, _with_outputs


class ViewHead(nn.Module):
    """SmallCNN with the head of many real models: ``x.view(x.size(0), -1)``, which a static
    export writes as a Reshape to the constant shape ``[1, -1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = calibrate_(SmallCNN(), 17)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.body
        x = b.relu3(b.conv3(b.relu2(b.conv2(b.relu1(b.conv1(x))))))
        x = b.pool(x).view(x.size(0), -1)
        return b.fc(b.norm(x))


class ExtraClass(nn.Module):
    """Appends a constant class: a static export writes the batch of 1 into that constant's
    shape (as it does into a ViT's class token, expanded to the batch)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.inner(x)
        return torch.cat([scores, torch.zeros(x.shape[0], 1)], dim=1)


class ClassesFirst(ExtraClass):
    """Appends a constant class to the scores transposed to (classes, batch): the batch of 1
    written into the constant is on its second axis, so the graph cannot run two images
    together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.inner(x).t()
        return torch.cat([scores, torch.zeros(1, x.shape[0])], dim=0).t()


def summary_without_run(result) -> dict:
    summary = {k: v for k, v in result.summary.items() if k not in ("run", "model")}
    return summary


def test_a_batch_1_graph_runs_batched_and_audits_as_the_dynamic_export(tmp_path) -> None:
    torch.manual_seed(0)
    model = ViewHead().eval()
    fixed_path = export_onnx(model, tmp_path / "fixed.onnx", 17, dynamic_batch=False)
    reshapes = [n for n in onnx.load(str(fixed_path)).graph.node if n.op_type == "Reshape"]
    assert reshapes, "the static export writes the head as a Reshape (the case this covers)"
    fixed = load_model(fixed_path)
    assert fixed.describe()["fixed_batch"] == {"size": 1, "run": "batched"}
    assert fixed.input_spec.batch is None
    x = torch.randn(5, 3, 17, 17)
    assert len(fixed._chunks(x)) == 1  # one run for the whole batch, not five
    dynamic = load_model(export_onnx(model, tmp_path / "dynamic.onnx", 17))
    names = [layer.name for layer in fixed.probe_layers(torch.zeros(1, 3, 17, 17))]
    assert names == [layer.name for layer in dynamic.probe_layers(torch.zeros(1, 3, 17, 17))]
    got, want = fixed.run(x, names), dynamic.run(x, names)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)
    for name in names:
        torch.testing.assert_close(got.activations[name], want.activations[name])
    # The audits agree: the same numbers, whichever export the user has.
    a = eqaudit.audit(fixed_path, "d4", num_images=6, batch_size=16)
    b = eqaudit.audit(tmp_path / "dynamic.onnx", "d4", num_images=6, batch_size=16)
    assert a.summary["model"]["fixed_batch"] == {"size": 1, "run": "batched"}
    assert a.summary["model"]["sha256"] != b.summary["model"]["sha256"]
    assert summary_without_run(a)["scores"] == summary_without_run(b)["scores"]
    assert a.to_frame("layers").equals(b.to_frame("layers"))


@pytest.mark.parametrize("batched", [True, False], ids=["class axis", "batch axis second"])
def test_a_constant_of_batch_1_concatenated_to_an_image_tensor(tmp_path, batched) -> None:  # type: ignore[no-untyped-def]
    # A static export writes the batch of 1 into a constant concatenated to the scores (or a
    # ViT's class token): the copy with a dynamic batch expands it to the batch, and runs.
    # Where the batch is not the first axis, the copy does not run: one image at a time.
    torch.manual_seed(0)
    model = (ExtraClass if batched else ClassesFirst)(calibrate_(SmallCNN(), 17)).eval()
    fixed = load_model(export_onnx(model, tmp_path / "fixed.onnx", 17, dynamic_batch=False))
    record = fixed.describe()["fixed_batch"]
    if batched:
        assert record == {"size": 1, "run": "batched"}
    else:
        assert record["run"] == "one image at a time" and fixed.input_spec.batch == 1
        assert record["why"].startswith("a copy with a dynamic batch does not run (the batch of 1")
        # onnxruntime's cause, not the loader's guess at an operator it lacks (the graph loads)
        assert "pip install" not in record["why"] and "lacks" not in record["why"], record["why"]
    dynamic = load_model(export_onnx(model, tmp_path / "dynamic.onnx", 17))
    x = torch.randn(3, 3, 17, 17)
    assert len(fixed._chunks(x)) == (1 if batched else 3)
    torch.testing.assert_close(fixed.run(x).scores, dynamic.run(x).scores)


def test_a_graph_with_a_dynamic_size_is_checked_once_the_size_is_known(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        ViewHead().eval(),
        (torch.zeros(1, 3, 17, 17),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["scores"],
        dynamic_axes={"image": {2: "height", 3: "width"}},
    )
    adapter = load_model(path)
    assert adapter.input_spec.batch == 1 and "fixed_batch" not in adapter.describe()
    adapter.with_input_size(17, 17)
    assert adapter.describe()["fixed_batch"]["run"] == "batched"
    assert adapter.input_spec.batch is None


def test_a_batch_1_graph_whose_output_has_no_batch_axis_runs_one_image_at_a_time(tmp_path):
    # Scores of shape (K,) (an x.view(-1) head): a dynamic copy gives (2K,) for two images,
    # the same shape as the two (K,) outputs joined, so no output check could tell them apart.
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = calibrate_(SmallCNN(), 17)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).view(-1)

    torch.manual_seed(0)
    model = Flat().eval()
    adapter = load_model(export_onnx(model, tmp_path / "flat.onnx", 17, dynamic_batch=False))
    assert adapter.describe()["fixed_batch"] == {
        "size": 1,
        "run": "one image at a time",
        "why": "its output of shape [5] has no batch axis",
    }
    x = torch.randn(3, 3, 17, 17)
    torch.testing.assert_close(adapter.run(x).scores, model.body(x), rtol=1e-5, atol=1e-5)


def test_a_graph_that_fails_on_the_noise_probes_says_so(tmp_path, monkeypatch) -> None:
    import onnxruntime

    torch.manual_seed(0)
    path = export_onnx(SmallCNN().eval(), tmp_path / "fixed.onnx", 17, dynamic_batch=False)

    def refuse(*_args, **_kwargs):
        raise RuntimeError("values must be in [0, 1]")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", refuse)
    record = load_model(path).describe()["fixed_batch"]
    assert record["run"] == "one image at a time"
    assert record["why"] == "the graph does not run on noise images: values must be in [0, 1]"


def test_a_graph_with_nan_on_the_noise_probes_runs_one_image_at_a_time(tmp_path) -> None:
    # NaN where both runs give NaN was counted as agreeing, and an infinite score made the
    # tolerance infinite: no check at all. As for .pt2 programs, the check cannot tell.
    torch.manual_seed(0)
    path = export_onnx(Sqrt().eval(), tmp_path / "sqrt.onnx", 17, dynamic_batch=False)
    record = load_model(path).describe()["fixed_batch"]
    assert record == {
        "size": 1,
        "run": "one image at a time",
        "why": "its output is not finite on noise images, so the check cannot tell",
    }
    pixels = torch.rand(3, 17, 17, 3).mul(255).to(torch.uint8).numpy()
    assert eqaudit.audit(path, "flips", pixels, lie=False).outputs[1]["n"] == 3


class TracedBatch(nn.Module):
    """A batch size read with ``int()`` is a constant to the tracer, even under
    ``dynamic_axes`` (a Swin's window reverse): ``mix`` reshapes two images into one row of
    scores, ``fail`` into a row that the head cannot take."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 if kind == "mix" else 4 * 17 * 17, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.kind == "mix":
            return self.head(h.reshape(int(h.shape[0]), 4, -1).mean(-1))
        return self.head(h.reshape(int(h.shape[0]), -1))


def test_a_declared_dynamic_batch_that_was_traced_at_1_runs_one_image_at_a_time(tmp_path):
    # It failed with "Attempting to broadcast ..." whatever --batch-size said (exit 3), or
    # mixed the images of a batch without an error (review).
    torch.manual_seed(0)
    for kind, why in (
        ("fail", "two images run together fail: "),
        ("mix", "two images run together give other outputs than each alone"),
    ):
        model = TracedBatch(kind).eval()
        adapter = load_model(export_onnx(model, tmp_path / f"{kind}.onnx", 17))
        record = adapter.describe()["fixed_batch"]
        assert record["run"] == "one image at a time", kind
        assert record["why"].startswith(f"the graph declares a dynamic batch, but {why}"), record
        assert adapter.input_spec.batch == 1
        x = torch.randn(3, 3, 17, 17)
        with torch.no_grad():
            want = torch.cat([model(image[None]) for image in x])
        torch.testing.assert_close(adapter.run(x).scores, want, rtol=1e-5, atol=1e-5)
    # A graph whose dynamic batch is real is run batched, without a record.
    plain = load_model(export_onnx(calibrate_(SmallCNN(), 17).eval(), tmp_path / "ok.onnx", 17))
    assert "fixed_batch" not in plain.describe() and plain.input_spec.batch is None


class HandGroupNorm(nn.Module):
    """A GroupNorm of one group written by hand (``y.view(b, 1, -1)``, its statistics, back),
    scaled, then a layer norm over (C, H, W), which cancels a scale shared by the images: the
    dynamo exporter writes both views as Reshapes of batch 1 with ``allowzero=1``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, 2, 1), nn.Linear(8, 5)
        self.scale = nn.Parameter(torch.tensor(1.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, c, h, w = y.shape
        z = y.view(b, 1, -1)
        z = (z - z.mean(-1, keepdim=True)) / (z.var(-1, keepdim=True) + 1e-5).sqrt()
        y = torch.nn.functional.layer_norm(z.view(b, c, h, w) * self.scale, (c, h, w))
        return self.head(y.relu().mean((2, 3)))


def test_a_dynamo_graph_of_batch_1_runs_batched_with_each_layer_as_alone(tmp_path) -> None:
    # (review) the copy gave the second view -1 for the batch while the first kept its 1: the
    # statistics were taken over the whole batch, the layer norm cancelled it in the scores,
    # the check passed, and the layers after the view differed from each image's alone (up
    # to 0.19). Both views now keep the input's first axis (0, allowzero cleared).
    import contextlib
    import io

    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    torch.manual_seed(0)
    path = tmp_path / "gn.onnx"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        program = torch.onnx.export(
            HandGroupNorm().eval(), (torch.zeros(1, 3, 16, 16),), input_names=["image"]
        )
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("Reshape") >= 2
    adapter = load_model(path)
    assert adapter.fixed_batch == {"size": 1, "run": "batched"}
    layers = {layer.name for layer in adapter.layers()}
    names = [o for n in graph.node for o in n.output if o in layers]  # (the layers)
    assert "mul" in names and len(names) >= 8
    x = torch.randn(3, 3, 16, 16)
    together = adapter.run(x, names).activations
    original = ort.InferenceSession(
        _with_outputs(onnx.load(str(path)), names).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    alone = [original.run(names, {"image": x[i : i + 1].numpy()}) for i in range(3)]
    compared = [name for name in names if name in together]  # (maps and flat features)
    assert "mul" in compared and len(compared) >= 5
    for name in compared:
        want = torch.from_numpy(np.concatenate([a[names.index(name)] for a in alone]))
        torch.testing.assert_close(together[name].reshape(want.shape), want)


def test_a_rewrite_that_mixes_the_images_inside_is_refused(tmp_path) -> None:
    # The output alone cannot show every mixing (a layer norm cancels a scale the images
    # share): each rewritten tensor is compared with each image's alone before the copy runs.
    from onnx import TensorProto, helper

    def graph(target: list[int]) -> onnx.ModelProto:
        nodes = [
            helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
            helper.make_node("Reshape", ["flat", "back_shape"], ["scores"]),
        ]
        inits = [
            numpy_helper.from_array(np.array(target, np.int64), "flat_shape"),
            numpy_helper.from_array(np.array([-1, 12], np.int64), "back_shape"),
        ]
        image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 2, 2])
        scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 12])
        body = helper.make_graph(nodes, "g", [image], [scores], inits)
        return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])

    path = tmp_path / "flat.onnx"
    onnx.save(graph([1, 12]), str(path))
    adapter = load_model(path)
    probe = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32)
    mixing = graph([1, -1])  # (1, 24) for two images: their cells side by side
    mixing.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    keeping = graph([0, -1])
    keeping.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    assert adapter._mixed_inside(mixing, ["flat"], probe) == "flat"
    assert adapter._mixed_inside(keeping, ["flat"], probe) is None


def test_rewritten_tensors_compare_their_non_finite_entries_by_place() -> None:
    # (review) attention scores masked with -inf before a softmax are not finite: compared as
    # "not finite, cannot tell", a copy that computed them right was refused
    alone = np.array([[1.0, -np.inf, 3.0], [np.nan, 2.0, 1.0]], np.float32)
    assert _same_values(alone, alone.copy(), half=False)
    assert _same_values(alone, alone + np.float32(1e-7), half=False)
    moved = np.array([[1.0, 3.0, -np.inf], [np.nan, 2.0, 1.0]], np.float32)
    assert not _same_values(alone, moved, half=False)
    assert not _same_values(alone, np.where(np.isinf(alone), np.inf, alone), half=False)
    assert not _same_values(alone, alone * 1.1, half=False)
    assert not _same_values(alone, alone[None], half=False)


def test_a_second_output_that_mixes_the_images_keeps_one_image_at_a_time(tmp_path) -> None:
    # A graph's other outputs are layers read from the copy: a statistic over the batch axis
    # (here a mean over axis 0, exported at batch 1 where it is each image's own map) agrees
    # with nothing once two images run together, though the scores do.
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["image"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["scores"]),
        helper.make_node("ReduceMean", ["relu"], ["features"], axes=[0], keepdims=1),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4])
    outputs = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 48]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 3, 4, 4]),
    ]
    body = helper.make_graph(nodes, "g", [image], outputs)
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    record = load_model(path, output_name="scores").fixed_batch
    assert record["run"] == "one image at a time"
    assert record["why"].startswith("a copy with a dynamic batch gives another 'features'")

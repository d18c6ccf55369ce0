"""Which tensors of an ONNX graph are audited as layers."""

from __future__ import annotations

import onnx
import torch
from models_zoo import ConvHead, export_onnx

from eqaudit.models import load_model


class Sums(ConvHead):
    """A residual sum read by a ReLU, and a three-part sum of slices (a pooling written out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x) + x.mean(1, keepdim=True))
        pooled = y[..., :3, :] + y[..., 3:6, :] + y[..., 6:9, :]
        return self.head(pooled / 3)


def test_a_partial_sum_read_only_by_further_additions_is_not_a_layer(tmp_path) -> None:
    # The dynamo exporter writes AdaptiveAvgPool2d(7) over a 66-cell map as ~100 chained Adds of
    # gathered cells: each partial sum showed as a layer with an unknown grid. Only sums read by
    # something other than an addition are layers: here the residual (read by the ReLU) and
    # the whole three-part sum (read by the division), not the first two parts' sum.
    torch.manual_seed(0)
    path = export_onnx(Sums().eval(), tmp_path / "sums.onnx", 9)
    graph = onnx.load(path).graph
    adds = [node for node in graph.node if node.op_type == "Add"]
    read_by = {
        node.output[0]: {n.op_type for n in graph.node if node.output[0] in n.input}
        for node in adds
    }
    assert sorted(map(sorted, read_by.values())) == [["Add"], ["Div"], ["Relu"]]
    layers = {layer.name: layer.op for layer in load_model(path).layers()}
    kept = {name for name, op in layers.items() if op == "Add"}
    assert kept == {name for name, ops in read_by.items() if ops != {"Add"}}
    assert {"Conv", "Relu", "Div"} <= set(layers.values())


class PerImageStandardised(ConvHead):
    """Standardises its input by its own spread (TensorFlow ports, medical imaging): a
    constant image gives NaN scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean()) / x.std()
        return self.head(torch.relu(self.conv(x)))


def test_layers_are_learnt_from_an_image_a_standardising_model_can_take(tmp_path) -> None:
    # The engine and inspect learnt the layers from a blank image: NaN scores, and the audit
    # of real images failed with "the model produced NaN or Inf scores".
    import eqaudit
    from eqaudit.inspect import inspect_model

    torch.manual_seed(0)
    module = PerImageStandardised().eval()
    path = export_onnx(module, tmp_path / "std.onnx", 9)
    for model in (module, path):
        result = eqaudit.audit(model, "flips", input_size=9, num_images=3, lie=False)
        assert any("conv" in row["layer"] for row in result.layers)  # "conv", "/conv/Conv_..."
        assert inspect_model(model, input_size=(9, 9))["num_classes"] == 5


class TwoHeads(ConvHead):
    """Class scores, a second head's scores, and the argmax: three graph outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor):
        scores = self.head(torch.relu(self.conv(x)))
        return scores, self.aux(scores), scores.argmax(1)


def test_a_graphs_other_outputs_are_layers_as_a_modules_are(tmp_path) -> None:
    # With --output-name picking one head, the other head (a graph output) was left out of the
    # layers, where the same PyTorch module's other head is audited (review). An integer
    # output is no layer.
    torch.manual_seed(0)
    path = tmp_path / "two.onnx"
    torch.onnx.export(
        TwoHeads().eval(),
        (torch.zeros(1, 3, 9, 9),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["scores", "aux", "label"],
        dynamic_axes={"image": {0: "batch"}},
    )
    names = {layer.name for layer in load_model(path, output_name="scores").layers()}
    assert "aux" in names and "scores" not in names and "label" not in names
    names = {layer.name for layer in load_model(path, output_name="aux").layers()}
    assert "scores" in names and "aux" not in names


def _quantized(model: torch.nn.Module, folder, size: int, fmt: str):
    """``model`` exported and statically quantized by onnxruntime's quantizer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"image": images[i : i + 1]} for i in range(len(images))])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.feeds, None)

    source = export_onnx(model, folder / f"{fmt}_float.onnx", size)
    target = folder / f"{fmt}.onnx"
    quantize_static(str(source), str(target), Reader(), quant_format=getattr(QuantFormat, fmt))
    return source, target


def _integer_maps(path) -> set[str]:
    """The QLinearConv outputs of a graph not read back as floats right away."""
    graph = onnx.load(path).graph
    read_back = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return {n.output[0] for n in graph.node if n.op_type == "QLinearConv"} - read_back


def test_a_quantized_graphs_integer_maps_are_layers_read_as_floats(tmp_path) -> None:
    # QOperator models keep their maps in uint8 (QLinearConv): every one was dropped, and a
    # per-layer gate that the float model fails passed on the one float tensor left (review).
    from models_zoo import PositionalBias, symmetric_cnn

    import eqaudit

    torch.manual_seed(0)
    symmetric = symmetric_cnn(size=33)
    (tmp_path / "biased").mkdir()
    _, exact_path = _quantized(symmetric, tmp_path, 33, "QOperator")
    biased = PositionalBias(symmetric, 33, strength=1.0).eval()
    _, biased_path = _quantized(biased, tmp_path / "biased", 33, "QOperator")

    exact = eqaudit.audit(str(exact_path), "d4", num_images=4)
    layers = {row["layer"] for row in exact.layers}
    convs = _integer_maps(exact_path)
    assert len(convs) == 3 and convs <= layers  # dequantized: (q - zero point) * scale
    graph = onnx.load(exact_path).graph
    # Not a float tensor rounded (QuantizeLinear: the float one is the layer, or the image).
    assert not {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"} & layers
    rows = [row for row in exact.layers if row["layer"] in convs]
    assert len(rows) == 3 * 8 and all(row["scored"] for row in rows)
    assert max(row["relative_error"] for row in rows) < 1e-6  # integer kernels: exact

    broken = eqaudit.audit(str(biased_path), "d4", num_images=4)
    convs = _integer_maps(biased_path)
    rows = [row for row in broken.layers if row["layer"] in convs and row["transform"] == "rot90"]
    assert len(rows) == 3 and all(row["scored"] and row["relative_error"] > 1e-2 for row in rows)


def test_a_qdq_graph_audited_with_layers_says_it_runs_unfused(tmp_path) -> None:
    # Handing out a QDQ graph's tensors stops onnxruntime fusing its Q/DQ pairs into integer
    # kernels: the scores come from float kernels (review: 7 of 3200 confidences differed).
    from models_zoo import symmetric_cnn

    import eqaudit

    _, path = _quantized(symmetric_cnn(size=33), tmp_path, 33, "QDQ")
    with_layers = eqaudit.audit(str(path), "flips", num_images=2)
    without = eqaudit.audit(str(path), "flips", num_images=2, layers=False)
    said = [n for n in with_layers.summary["preprocessing"]["notes"] if "QDQ-quantized" in n]
    assert len(said) == 1 and "--no-layers runs it fused" in said[0]
    assert not [n for n in without.summary["preprocessing"]["notes"] if "QDQ-quantized" in n]


def test_one_number_per_batch_is_not_a_layer(tmp_path) -> None:
    # quantize_dynamic computes each map's scale and zero point from the batch: scalars that
    # depend on the image, listed as "not auditable, such as ... attention scores" (review).
    from models_zoo import symmetric_cnn
    from onnxruntime.quantization import quantize_dynamic

    from eqaudit.inspect import inspect_model

    source = export_onnx(symmetric_cnn(size=33), tmp_path / "float.onnx", 33)
    quantize_dynamic(str(source), str(tmp_path / "dynamic.onnx"))
    graph = onnx.load(tmp_path / "dynamic.onnx").graph
    scalars = {
        out for n in graph.node if n.op_type == "DynamicQuantizeLinear" for out in n.output[1:]
    }
    assert scalars
    info = inspect_model(str(tmp_path / "dynamic.onnx"))
    names = {layer["name"] for layer in info["layers"]} | set(info["unauditable"])
    assert not scalars & names


class BiasedBranch(ConvHead):
    """A branch's output with a bias added (a linear layer exported as MatMul + Add), read by
    a residual sum alone: a ViT's attention and MLP outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y + (torch.relu(y) + self.bias))


def test_a_bias_added_before_a_residual_sum_is_a_layer(tmp_path) -> None:
    torch.manual_seed(0)
    path = export_onnx(BiasedBranch().eval(), tmp_path / "branch.onnx", 9)
    graph = onnx.load(path).graph
    adds = [node.output[0] for node in graph.node if node.op_type == "Add"]
    assert len(adds) == 2  # the bias, read by the residual sum alone; the residual sum
    layers = {layer.name for layer in load_model(path).layers()}
    assert set(adds) <= layers

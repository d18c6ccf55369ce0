"""Sampling grids from the model graph (eqaudit.grids), for ONNX and torch.export graphs.

Oracles: hand-computed grids (DESIGN.md section 4), the output sizes onnxruntime and PyTorch
actually produce, and the centroid of d out[i, j] / d input for a linear stack with positive,
mirror-symmetric kernels, which sits exactly at the cell's centre ``offset + stride * i``.
"""

from __future__ import annotations

import io
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from models_group import GroupPool, c4_net
from models_zoo import same_net
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import eqaudit
from eqaudit.grids import (
    AxisGrid,
    Grid,
    GridGraph,
    export_grid_graph,
    onnx_grid_graph,
    torch_grid_graph,
)
from eqaudit.models import load_model
from eqaudit.models.base import InputSpec
from eqaudit.models.torch_adapter import TorchAdapter, load_torch


# -- helpers ---------------------------------------------------------------------------------------
def onnx_model(
    nodes: Sequence[onnx.NodeProto],
    initializers: Sequence[np.ndarray | tuple[str, np.ndarray]] = (),
    *,
    channels: int = 1,
    layout: str = "NCHW",
    opset: int = 17,
    output: str = "y",
    output_shape: Sequence[int] | None = None,
) -> onnx.ModelProto:
    """A graph with one image input 'x' of dynamic H and W (any size can be run)."""
    shape = [1, channels, "H", "W"] if layout == "NCHW" else [1, "H", "W", channels]
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in initializers]
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def ort_shapes(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[int, ...]]:
    """Shapes of every node output, from onnxruntime."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    names = [o for n in model.graph.node for o in n.output if o]
    for name in names:
        if name not in known:
            exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(outputs, {"x": x})
    return {name: np.asarray(v).shape for name, v in zip(outputs, values, strict=True)}


def conv_weight(out_c: int, in_c: int, k: int) -> np.ndarray:
    return np.ones((out_c, in_c, k, k), dtype=np.float32)


def to_onnx(
    module: nn.Module, size: tuple[int, int], channels: int = 3, dynamic: bool = False
) -> onnx.ModelProto:
    """The legacy (TorchScript) exporter; ``dynamic``: batch, H and W dynamic, so the graph
    reads sizes with Shape nodes instead of constants."""
    buffer = io.BytesIO()
    axes = {"x": {0: "B", 2: "H", 3: "W"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(1, channels, *size),),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes=axes,
        )
    return onnx.load_from_string(buffer.getvalue())


def export(module: nn.Module, size: tuple[int, int], channels: int = 3) -> GridGraph:
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    graph, reason = export_grid_graph(module.eval(), torch.zeros(1, channels, *size, dtype=dtype))
    assert graph is not None, reason
    return graph


def torch_shapes(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape of every module call, named as TorchAdapter names layers."""
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    handles = []
    for path, sub in module.named_modules():
        if not path:
            continue

        def hook(_m: nn.Module, _i: object, out: object, path: str = path) -> None:
            index = calls.get(path, 0)
            calls[path] = index + 1
            if isinstance(out, torch.Tensor):
                shapes[path if index == 0 else f"{path}:{index}"] = tuple(out.shape)

        handles.append(sub.register_forward_hook(hook))
    with torch.no_grad():
        module(x)
    for handle in handles:
        handle.remove()
    return shapes


def assert_sizes_match(graph: GridGraph, shapes: dict[str, tuple[int, ...]], h: int, w: int):
    """Every known grid has the cell counts of the real tensor (in its own layout; NCHW-like
    tensors of rank > 4 end in H, W)."""
    grids, layouts = graph.grids(h, w), graph.layouts(h, w)
    checked = 0
    for name, grid in grids.items():
        if isinstance(grid, Grid) and name in shapes:
            shape = shapes[name]
            cells = shape[1:3] if layouts[name] == "NHWC" else shape[-2:]
            assert (grid.h.n, grid.w.n) == tuple(cells), name
            checked += 1
    assert checked > 0


def axis(n: int, stride: float, offset: float) -> AxisGrid:
    return AxisGrid(n, float(stride), float(offset))


# -- test models -----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet's basic block: one ReLU module called twice, a residual add, a 1x1 downsample."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetLike(nn.Module):
    """ResNet-18's geometry (7x7/2 stem, functional 3x3/2 max pool, four stages of two blocks,
    three of them strided, global pool, torch.flatten, fc); ``width=64`` is ResNet-18's size."""

    def __init__(self, width: int = 4, classes: int = 10) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = width
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


RESNET_STRIDED = [
    "conv1",
    "layer2.0.conv1",
    "layer2.0.downsample.0",
    "layer3.0.conv1",
    "layer3.0.downsample.0",
    "layer4.0.conv1",
    "layer4.0.downsample.0",
    "layer4.1",
]


class Crop(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 1:-1, 2::2]


class Roll(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=-1)


def symmetric_kernel(k: int, channels_out: int, channels_in: int) -> torch.Tensor:
    """Positive, mirror-symmetric (in both axes) kernels: centroid at the kernel centre."""
    v = torch.tensor([min(i, k - 1 - i) + 1.0 for i in range(k)], dtype=torch.float64)
    base = torch.outer(v, v)
    scale = torch.arange(1, channels_out * channels_in + 1, dtype=torch.float64)
    return scale.view(channels_out, channels_in, 1, 1) * base


def linear_stack() -> nn.Sequential:
    """No ReLU, positive symmetric kernels: d out / d input is a positive blob centred on the
    cell. Covers stride, asymmetric 'same' padding, avg pooling, dilation, transposed conv,
    bilinear upsampling, padding and slicing."""
    layers = nn.Sequential(
        nn.Conv2d(2, 3, 3, 2, 1),
        nn.Conv2d(3, 3, 4, 1, padding="same"),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(3, 2, 3, 1, 2, dilation=2),
        nn.ConvTranspose2d(2, 2, 3, 2, 1),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.ZeroPad2d((1, 2, 3, 0)),
        Crop(),
        nn.Conv2d(2, 2, 5, 3, 1),
    ).double()
    with torch.no_grad():
        for m in layers:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                w = m.weight
                m.weight.copy_(symmetric_kernel(w.shape[-1], w.shape[0], w.shape[1]))
                m.bias.zero_()
    return layers.eval()


# -- formulas --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", range(7, 15))
def test_strided_3x3_conv_is_centred_on_odd_inputs(size: int) -> None:
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    grid = export(nn.Sequential(conv), (size, size)).grids(size, size)["0"]
    assert grid.h == axis((size - 1) // 2 + 1, 2, 0)
    assert grid.h.centred(size) is (size % 2 == 1)


@pytest.mark.parametrize("size", range(6, 14))
def test_2x2_pool_is_centred_on_even_inputs(size: int) -> None:
    model = onnx_model(
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    )
    grid = onnx_grid_graph(model, "x", "NCHW").grids(size, size)["y"]
    assert grid.w == axis(size // 2, 2, 0.5)
    assert grid.w.centred(size) is (size % 2 == 0)


def test_resnet18_geometry_is_centred_at_225_not_224() -> None:
    graph = export(ResNetLike(), (225, 225))
    at_225, at_224 = graph.grids(225, 225), graph.grids(224, 224)
    for name in RESNET_STRIDED:
        assert at_225[name].h.centred(225) and at_225[name].w.centred(225), name
        assert not at_224[name].h.centred(224), name
    # The functional max pool is no module: the grid after it is layer1's.
    assert at_225["layer1.0.conv1"].h == axis(57, 4, 0)
    assert at_225["layer4.1"].h == axis(8, 32, 0)
    assert at_224["layer4.1"].h == axis(7, 32, 0)
    assert at_225["avgpool"] == "flat" and at_225["fc"] == "flat"


@pytest.mark.parametrize(
    ("auto_pad", "offset"), [("SAME_UPPER", 1.0), ("SAME_LOWER", 0.0), ("VALID", 1.0)]
)
def test_auto_pad_places_the_odd_pad(auto_pad: str, offset: float) -> None:
    # k=3, s=2 on 8 cells: SAME pads 1 in total, at the end (UPPER) or the begin (LOWER).
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad=auto_pad
    )
    model = onnx_model([node], [("w", conv_weight(1, 1, 3))])
    graph = onnx_grid_graph(model, "x", "NCHW")
    n = 4 if auto_pad != "VALID" else 3
    assert graph.grids(8, 8)["y"].h == axis(n, 2, offset)
    assert ort_shapes(model, np.zeros((1, 1, 8, 8), np.float32))["y"][2] == n
    # SAME pads depend on the size: 9 cells need 2 pads, one on each side.
    if auto_pad != "VALID":
        assert graph.grids(9, 9)["y"].h == axis(5, 2, 0)


@pytest.mark.parametrize("ceil_mode", [0, 1])
@pytest.mark.parametrize(
    ("k", "s", "p", "d"), [(2, 2, 0, 1), (3, 2, 1, 1), (2, 2, 1, 1), (3, 3, 1, 2)]
)
def test_window_cells_match_onnxruntime_and_torch(ceil_mode: int, k: int, s: int, p: int, d: int):
    node = helper.make_node(
        "MaxPool",
        ["x"],
        ["y"],
        kernel_shape=[k, k],
        strides=[s, s],
        pads=[p] * 4,
        dilations=[d, d],
        ceil_mode=ceil_mode,
    )
    model = onnx_model([node])
    graph = onnx_grid_graph(model, "x", "NCHW")
    for size in range(max(3, d * (k - 1) + 1 - 2 * p), 14):
        grid = graph.grids(size, size + 1)["y"]
        x = np.zeros((1, 1, size, size + 1), np.float32)
        assert (grid.h.n, grid.w.n) == ort_shapes(model, x)["y"][2:]
        out = F.max_pool2d(torch.from_numpy(x), k, s, p, d, ceil_mode=bool(ceil_mode))
        assert (grid.h.n, grid.w.n) == tuple(out.shape[2:])
        assert grid.h.offset == -p + d * (k - 1) / 2 and grid.h.stride == s


def test_ceil_mode_drops_a_window_that_starts_in_the_padding() -> None:
    # 3 cells, k=2, s=2, p=1: windows start at -1, 1, (3 = in the end padding: dropped).
    graph = export(nn.Sequential(nn.MaxPool2d(2, 2, 1, ceil_mode=True)), (3, 3), channels=1)
    assert graph.grids(3, 3)["0"].h == axis(2, 2, -0.5)
    assert graph.grids(4, 4)["0"].h == axis(3, 2, -0.5)


def test_dilation_spreads_the_kernel() -> None:
    graph = export(
        nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2), nn.Conv2d(1, 1, 3, 2, 2, 2)), (20, 20), 1
    )
    grids = graph.grids(20, 20)
    assert grids["0"].h == axis(16, 1, 2)  # 2*(3-1)/2 = 2 pixels from the border
    assert grids["1"].h == axis(8, 2, 2)  # padding 2 cancels the dilated half-kernel


@pytest.mark.parametrize(
    ("k", "s", "p", "op", "offset"), [(3, 2, 1, 0, 0.0), (3, 2, 1, 1, 0.0), (4, 2, 1, 0, -0.25)]
)
def test_conv_transpose_grid(k: int, s: int, p: int, op: int, offset: float) -> None:
    node = helper.make_node(
        "ConvTranspose",
        ["x", "w"],
        ["y"],
        kernel_shape=[k, k],
        strides=[s, s],
        pads=[p] * 4,
        output_padding=[op, op],
    )
    model = onnx_model([node], [("w", conv_weight(1, 1, k))])
    grid = onnx_grid_graph(model, "x", "NCHW").grids(5, 6)["y"]
    assert grid.h == axis((5 - 1) * s - 2 * p + k + op, 1 / s, offset)
    assert (grid.h.n, grid.w.n) == ort_shapes(model, np.zeros((1, 1, 5, 6), np.float32))["y"][2:]
    # Without output padding the upsampled grid stays centred when its input was.
    if op == 0:
        assert grid.h.centred(5) and grid.w.centred(6)


def _resize(mode: str, coordinates: str, scales=None, sizes=None, nearest="floor"):
    inputs = ["x", "", "scales" if scales is not None else "", "sizes" if sizes is not None else ""]
    node = helper.make_node(
        "Resize",
        inputs,
        ["y"],
        mode=mode,
        coordinate_transformation_mode=coordinates,
        nearest_mode=nearest,
    )
    inits = []
    if scales is not None:
        inits.append(("scales", np.asarray([1, 1, *scales], np.float32)))
    if sizes is not None:
        inits.append(("sizes", np.asarray([1, 1, *sizes], np.int64)))
    return onnx_model([node], inits)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (_resize("linear", "half_pixel", scales=[2, 2]), axis(10, 0.5, -0.25)),
        (_resize("linear", "pytorch_half_pixel", scales=[3, 3]), axis(15, 1 / 3, -1 / 3)),
        (_resize("linear", "asymmetric", scales=[2, 2]), axis(10, 0.5, 0)),
        (_resize("linear", "align_corners", sizes=[9, 9]), axis(9, 0.5, 0)),
        (_resize("cubic", "half_pixel", scales=[0.5, 0.5]), axis(2, 2, 0.5)),
        # Nearest copies: an upsample by 2 gets the half-pixel centre whatever its mode ...
        (_resize("nearest", "asymmetric", scales=[2, 2]), axis(10, 0.5, -0.25)),
        (
            _resize("nearest", "half_pixel", scales=[3, 3], nearest="round_prefer_floor"),
            axis(15, 1 / 3, -1 / 3),
        ),
        # ... and a subsample is the grid of the cells it keeps.
        (_resize("nearest", "asymmetric", scales=[0.5, 0.5]), axis(2, 2, 0)),
    ],
)
def test_resize_grids(model: onnx.ModelProto, expected: AxisGrid) -> None:
    grid = onnx_grid_graph(model, "x", "NCHW").grids(5, 5)["y"]
    assert grid.h.n == expected.n
    assert grid.h.stride == pytest.approx(expected.stride)
    assert grid.h.offset == pytest.approx(expected.offset)
    assert (grid.h.n, grid.w.n) == ort_shapes(model, np.zeros((1, 1, 5, 5), np.float32))["y"][2:]


@pytest.mark.parametrize(("scale", "size"), [(0.7, (10, 20)), (0.7, (30, 17)), (1 / 3, (21, 24))])
def test_a_resize_by_scale_has_the_cells_onnxruntime_computes(scale, size) -> None:
    # onnxruntime rounds n x scale to float32 before the floor: 10 x 0.7f is 6.99.. exactly but
    # 7.0 in float32, and it gives 7 cells.
    model = _resize("linear", "half_pixel", scales=[scale, scale])
    grid = onnx_grid_graph(model, "x", "NCHW").grids(*size)["y"]
    assert isinstance(grid, Grid)
    assert (grid.h.n, grid.w.n) == ort_shapes(model, np.zeros((1, 1, *size), np.float32))["y"][2:]


@pytest.mark.parametrize(
    "options",
    [
        dict(mode="bilinear", antialias=True),
        dict(mode="bilinear"),
        dict(mode="bicubic", antialias=True),
        dict(mode="bilinear", align_corners=True),
    ],
)
def test_a_resize_by_scale_has_the_cells_torch_computes(options) -> None:
    # torch rounds n x scale to float64 before the floor: 21 x (1/3) is 6.99.. exactly but 7.0
    # in float64, and it gives 7 cells.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        Fn(lambda x: F.interpolate(x, scale_factor=1 / 3, **options)),
    )
    graph = export(model, (21, 24))
    for size in [(21, 24), (45, 48), (20, 22)]:
        assert isinstance(graph.grids(*size)["1"], Grid), size
        assert_sizes_match(graph, torch_shapes(model, torch.zeros(1, 3, *size)), *size)


def _rows_copied(grid) -> list[float] | None:
    return (
        None
        if not isinstance(grid, Grid)
        else [grid.h.offset + grid.h.stride * j for j in range(grid.h.n)]
    )


def _ramp(h: int, w: int = 7) -> np.ndarray:
    return np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (1, 1, h, w)).copy()


def _torch_nearest(options: dict, h: int) -> tuple[Grid | None, list[float]]:
    """The grid of ``F.interpolate(**options)`` at ``h`` rows, and the rows torch copies."""
    model = nn.Sequential(nn.Identity(), Fn(lambda x: F.interpolate(x, **options)))
    grid = export(model, (21, 24), channels=1).grids(h, 7)["1"]
    with torch.no_grad():
        return grid, model(torch.from_numpy(_ramp(h)))[0, 0, :, 0].tolist()


@pytest.mark.parametrize(
    ("options", "h", "rows"),
    [
        (dict(scale_factor=0.2, mode="nearest"), 12, [0, 5]),  # 12 x float32(1/0.2): not [0, 4]
        (dict(scale_factor=0.4, mode="nearest"), 9, None),  # rows 0, 2, 5: unevenly
        (dict(scale_factor=0.45, mode="nearest-exact"), 12, None),  # 1, 3, 5, 7, 10
        (dict(scale_factor=1 / 3, mode="nearest"), 12, [0, 3, 6, 9]),
    ],
)
def test_a_nearest_resize_copies_the_rows_torch_copies(options, h, rows) -> None:
    grid, copied = _torch_nearest(options, h)
    assert copied == (rows or copied)
    assert _rows_copied(grid) == rows


def test_a_nearest_upsample_is_the_half_pixel_grid_of_its_repeats() -> None:
    grid, copied = _torch_nearest(dict(scale_factor=3.0, mode="nearest"), 4)
    assert copied == [j // 3 for j in range(12)]
    assert _rows_copied(grid) == pytest.approx([(j + 0.5) / 3 - 0.5 for j in range(12)])


def _resize_10(scale: float) -> onnx.ModelProto:
    node = helper.make_node("Resize", ["x", "scales"], ["y"], mode="nearest")
    return onnx_model([node], [("scales", np.asarray([1, 1, scale, scale], np.float32))], opset=10)


@pytest.mark.parametrize(
    ("model", "h", "rows"),
    [
        # float32 coordinates: (j + 0.5f) / 0.33333334f - 0.5f floors to 1, 4, 7 (exactly: 0, 3, 6)
        (_resize("nearest", "half_pixel", scales=[1 / 3, 1 / 3], nearest="floor"), 9, [1, 4, 7]),
        (_resize("nearest", "asymmetric", scales=[0.2, 0.2], nearest="floor"), 11, [0, 5]),
        # coordinates 2j + 0.5 exactly: round_prefer_floor takes 2j
        (_resize("nearest", "half_pixel", scales=[0.5, 0.5]), 10, [0, 2, 4, 6, 8]),
        # opset 10 rounds up when downsampling: 0, 4, 7, unevenly (not floor's 0, 3, 6)
        (_resize_10(0.3), 12, None),
        (_resize_10(0.25), 12, [0, 4, 8]),
    ],
)
def test_a_nearest_resize_copies_the_rows_onnxruntime_copies(model, h, rows) -> None:
    grid = onnx_grid_graph(model, "x", "NCHW").grids(h, 7)["y"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    copied = session.run(["y"], {"x": _ramp(h)})[0][0, 0, :, 0].tolist()
    assert copied == (rows or copied)
    assert _rows_copied(grid) == rows


def test_uneven_nearest_resize_is_unknown() -> None:
    # asymmetric + round_prefer_floor by 3 copies cells 2, 3, 3, ... times: no uniform grid.
    model = _resize("nearest", "asymmetric", scales=[3, 3], nearest="round_prefer_floor")
    graph = onnx_grid_graph(model, "x", "NCHW")
    assert graph.grids(5, 5)["y"] is None
    assert "unevenly" in graph.unknown_reason("y")


def test_pad_and_slice_move_the_offset() -> None:
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
        helper.make_node("Slice", ["p", "starts", "ends", "axes", "steps"], ["y"]),
    ]
    inits = [
        ("pads", np.asarray([0, 0, 1, 2, 0, 0, 3, -1], np.int64)),  # H: +1/+3, W: +2/-1
        ("starts", np.asarray([1, 2], np.int64)),
        ("ends", np.asarray([-1, 1000], np.int64)),
        ("axes", np.asarray([2, 3], np.int64)),
        ("steps", np.asarray([1, 3], np.int64)),
    ]
    model = onnx_model(nodes, inits)
    grids = onnx_grid_graph(model, "x", "NCHW").grids(10, 11)
    assert grids["p"] == Grid(axis(14, 1, -1), axis(12, 1, -2))
    assert grids["y"] == Grid(axis(12, 1, 0), axis(4, 3, 0))
    shapes = ort_shapes(model, np.zeros((1, 1, 10, 11), np.float32))
    assert shapes["y"][2:] == (12, 4)


def test_nhwc_model_transposes_first() -> None:
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv", ["t", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        ),
        helper.make_node("Transpose", ["c"], ["back"], perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["back"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["y"], axes=[1, 2], keepdims=1),
    ]
    model = onnx_model(nodes, [("w", conv_weight(4, 3, 3))], channels=3, layout="NHWC", opset=13)
    graph = onnx_grid_graph(model, "x", "NHWC")
    grids, layouts = graph.grids(9, 9), graph.layouts(9, 9)
    assert grids["x"] == grids["t"] == Grid(axis(9, 1, 0), axis(9, 1, 0))
    assert grids["c"] == grids["r"] == Grid(axis(5, 2, 0), axis(5, 2, 0))
    assert (layouts["x"], layouts["t"], layouts["r"], layouts["y"]) == (
        "NHWC",
        "NCHW",
        "NHWC",
        "NHWC",
    )
    assert grids["y"] == "flat"


def test_grid_mismatch_in_an_add_is_unknown() -> None:
    # ResNet-D style: a 2x2 average-pool shortcut (offset 0.5) added to a 3x3/2 conv (offset 0).
    nodes = [
        helper.make_node(
            "Conv", ["x", "w"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        ),
        helper.make_node("AveragePool", ["x"], ["b"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    graph = onnx_grid_graph(onnx_model(nodes, [("w", conv_weight(1, 1, 3))]), "x", "NCHW")
    assert graph.grids(8, 8)["y"] is None
    assert "different grids" in graph.unknown_reason("y")


# -- the empirical oracle: gradient centroids ------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_grid_is_the_centroid_of_each_cells_receptive_field() -> None:
    model = linear_stack()
    size = (73, 66)
    graph = export(model, size, channels=2)
    grids = graph.grids(*size)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name, m in model.named_children()
    ]
    x = torch.rand(1, 2, *size, dtype=torch.float64, requires_grad=True)
    model(x)
    for h in handles:
        h.remove()
    ys = torch.arange(size[0], dtype=torch.float64)[:, None]
    xs = torch.arange(size[1], dtype=torch.float64)[None, :]
    checked = 0
    for name, out in outputs.items():
        grid = grids[name]
        assert (grid.h.n, grid.w.n) == tuple(out.shape[2:]), name
        for i, j in ((grid.h.n // 2, grid.w.n // 2), (grid.h.n // 2 - 1, grid.w.n // 2 + 1)):
            (g,) = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)
            weight = g[0].sum(0)
            assert (weight >= 0).all()
            cy = float((weight * ys).sum() / weight.sum())
            cx = float((weight * xs).sum() / weight.sum())
            assert cy == pytest.approx(grid.h.offset + grid.h.stride * i, abs=1e-9), name
            assert cx == pytest.approx(grid.w.offset + grid.w.stride * j, abs=1e-9), name
            checked += 1
    assert checked == 2 * len(model)


# -- ONNX and torch.export agree -------------------------------------------------------------------
def mixed_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1),
        nn.ReLU(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(4, 4, 3, 1, 2, dilation=2),
        nn.ConvTranspose2d(4, 4, 4, 2, 1),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Upsample(scale_factor=0.5, mode="nearest"),
        nn.ZeroPad2d((1, 2, 3, 4)),
        Crop(),
        nn.MaxPool2d(3, 2, 1, ceil_mode=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


_ONNX_LAYER_OPS = {
    "Conv",
    "Relu",
    "AveragePool",
    "ConvTranspose",
    "Resize",
    "Pad",
    "MaxPool",
    "GlobalAveragePool",
    "Flatten",
    "Gemm",
}


def test_onnx_and_torch_export_give_the_same_grids(tmp_path) -> None:
    model = mixed_model()
    size = (41, 38)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, *size),), strict=False), pt2)
    from_pt2 = torch_grid_graph(torch.export.load(pt2))
    onnx_proto = to_onnx(model, size)
    from_onnx = onnx_grid_graph(onnx_proto, "x", "NCHW")
    # One ONNX node per module, except the crop: two Slice nodes, the second is its output.
    onnx_names = [n.output[0] for n in onnx_proto.graph.node if n.op_type in _ONNX_LAYER_OPS]
    slices = [n.output[0] for n in onnx_proto.graph.node if n.op_type == "Slice"]
    onnx_names.insert(9, slices[-1])
    torch_names = [str(i) for i in range(len(model))]
    assert len(onnx_names) == len(torch_names)
    torch_grids, onnx_grids = from_pt2.grids(*size), from_onnx.grids(*size)
    for t, o in zip(torch_names, onnx_names, strict=True):
        assert torch_grids[t] == onnx_grids[o], (t, o)
    assert_sizes_match(
        from_onnx, ort_shapes(onnx_proto, np.zeros((1, 3, *size), np.float32)), *size
    )
    assert_sizes_match(from_pt2, torch_shapes(model, torch.zeros(1, 3, *size)), *size)


class Fn(nn.Module):
    """A functional op as a module, so that both graphs name its output."""

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class SqueezeExcite(nn.Module):
    """MobileNetV3's gate: a flat (B, C, 1, 1) branch multiplied back onto the map."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, 2, 1)
        self.fc2 = nn.Conv2d(2, c, 1)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x))))))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, then LayerNorm and Linear in NHWC between two permutes, residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(self.norm(self.dw(x).permute(0, 2, 3, 1)))
        return x + y.permute(0, 3, 1, 2)


def blocks_model() -> nn.Sequential:
    layers = {
        "stem": nn.Conv2d(3, 8, 3, 2, 1),
        "se": SqueezeExcite(8),
        "cnx": ConvNeXtBlock(8),
        "bn": nn.BatchNorm2d(8),
        "shuffle": nn.PixelShuffle(2),
        "widen": Fn(lambda x: torch.cat([x] * 4, 1)),
        "fixed": Fn(lambda x: F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=True)),
        "nearest": Fn(lambda x: F.interpolate(x, scale_factor=3, mode="nearest")),
        "pool": Fn(lambda x: F.avg_pool2d(x, 3, 2, 1)),
        "crop": Fn(lambda x: torch.cat([x, 2 * x], 1)[:, :8, 1:]),
        "reflect": Fn(lambda x: F.pad(x, (1, 2, 0, 1), mode="reflect")),
        "mean": Fn(lambda x: x.mean((2, 3))),
        "head": nn.Linear(8, 4),
    }
    return nn.Sequential(OrderedDict(layers)).eval()


def test_onnx_and_torch_agree_on_mobile_and_convnext_blocks() -> None:
    model, size = blocks_model(), (31, 29)
    from_torch = export(model, size)
    onnx_proto = to_onnx(model, size)
    from_onnx = onnx_grid_graph(onnx_proto, "x", "NCHW")
    torch_grids, onnx_grids = from_torch.grids(*size), from_onnx.grids(*size)
    compared = 0
    for path, grid in torch_grids.items():
        scope = "/" + path.replace(".", "/") + "/"
        outputs = [n.output[0] for n in onnx_proto.graph.node if n.name.startswith(scope)]
        if outputs and outputs[-1] in onnx_grids:
            assert grid == onnx_grids[outputs[-1]], path
            assert grid is not None, from_torch.unknown_reason(path)
            compared += 1
    assert compared >= 12
    assert torch_grids["se.fc2"] == "flat" and isinstance(torch_grids["se"], Grid)
    assert torch_grids["cnx.pw"] == torch_grids["stem"]  # NHWC inside the block: same grid
    assert from_torch.layouts(*size)["cnx.pw"] == "NHWC"
    assert torch_grids["shuffle"].h == axis(32, 1, -0.5)
    assert torch_grids["fixed"].h == axis(
        20, 31 / 19, -0.5
    )  # 32 cells at stride 1 -> 20, corners kept
    assert_sizes_match(from_torch, torch_shapes(model, torch.zeros(1, 3, *size)), *size)
    assert_sizes_match(
        from_onnx, ort_shapes(onnx_proto, np.zeros((1, 3, *size), np.float32)), *size
    )


def test_replay_at_another_size_equals_a_fresh_extraction() -> None:
    model = ResNetLike()
    replayed = export(model, (64, 64)).grids(97, 90)
    fresh = export(model, (97, 90)).grids(97, 90)
    assert replayed == fresh
    assert_sizes_match(
        export(model, (64, 64)), torch_shapes(model, torch.zeros(1, 3, 97, 90)), 97, 90
    )


# -- grouped channels (rank > 4) -------------------------------------------------------------------
CONV_17 = Grid(axis(9, 2, 0), axis(9, 2, 0))  # Conv2d(3, 8, 3, 2, 1) on 17x17 (cell i at 2i)


def grouped(x: torch.Tensor) -> torch.Tensor:
    """(B, 8, H, W) -> (B, 2, 4, H, W), sizes read from the tensor as GroupPool does."""
    return x.reshape(x.shape[0], 2, 4, *x.shape[2:])


def after_conv(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(conv=nn.Conv2d(3, 8, 3, 2, 1), layer=layer, relu=nn.ReLU())
    ).eval()


def onnx_tensor(model: onnx.ModelProto, op: str) -> str:
    """The output of the model's last ``op`` node."""
    return [n.output[0] for n in model.graph.node if n.op_type == op][-1]


def test_group_pool_keeps_the_strided_conv_grid_in_pt2_and_onnx(tmp_path) -> None:
    model = after_conv(GroupPool())
    pt2 = tmp_path / "gpool.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 17, 17),), strict=False), pt2)
    from_pt2 = torch_grid_graph(torch.export.load(pt2))
    grids = from_pt2.grids(17, 17)
    assert grids["conv"] == grids["layer"] == grids["relu"] == CONV_17
    assert from_pt2.unknown_reason("layer") is None
    assert from_pt2.layouts(17, 17)["layer"] == "NCHW"

    static = to_onnx(model, (17, 17))
    graph = onnx_grid_graph(static, "x", "NCHW")
    reshaped = onnx_tensor(static, "Reshape")  # (1, 2, 4, 9, 9): same cells, one more axis
    pooled = onnx_tensor(static, "ReduceMax")
    grids = graph.grids(17, 17)
    assert grids[reshaped] == grids[pooled] == grids["y"] == CONV_17
    assert graph.layouts(17, 17)[reshaped] is None and graph.layouts(17, 17)[pooled] == "NCHW"

    # Dynamic H and W: the target is Concat(Shape(x)[0], C // 4, 4, Shape(x)[2], Shape(x)[3]).
    dynamic = to_onnx(model, (17, 17), dynamic=True)
    graph = onnx_grid_graph(dynamic, "x", "NCHW")
    assert "Shape" in {n.op_type for n in dynamic.graph.node}
    assert graph.grids(17, 17)["y"] == CONV_17
    assert graph.grids(22, 21)["y"] == Grid(axis(11, 2, 0), axis(11, 2, 0))
    x = np.zeros((2, 3, 22, 21), np.float32)
    assert_sizes_match(graph, ort_shapes(dynamic, x), 22, 21)


def test_c4_group_pooling_is_compared_exactly() -> None:
    graph = export(c4_net(0), (17, 17))
    assert graph.grids(17, 17)["gpool"] == Grid(axis(17, 1, 0), axis(17, 1, 0))
    row = eqaudit.audit(c4_net(0), "c4", input_size=17, num_images=2).layer("gpool", "rot90")
    assert row["comparison"] == "exact" and row["aligned"] is True
    assert row["relative_error"] < 1e-5


CHANNEL_REDUCTIONS = {
    "amax": lambda g, k: g.amax(2, keepdim=k),
    "amin": lambda g, k: g.amin(-3, keepdim=k),
    "max.dim": lambda g, k: g.max(2, keepdim=k)[0],
    "min.dim": lambda g, k: g.min(2, keepdim=k).values,
    "sum": lambda g, k: g.sum(2, keepdim=k),
    "mean": lambda g, k: g.mean(2, keepdim=k),
    "prod": lambda g, k: g.prod(2, keepdim=k),
    "logsumexp": lambda g, k: g.logsumexp(2, keepdim=k),
    "norm": lambda g, k: g.norm(dim=2, keepdim=k),
    "two axes": lambda g, k: g.unsqueeze(2).sum((1, 2), keepdim=k),
}


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("op", sorted(CHANNEL_REDUCTIONS))
def test_reductions_over_channel_axes_keep_the_grid(op: str, keepdim: bool) -> None:
    model = after_conv(Fn(lambda x: CHANNEL_REDUCTIONS[op](grouped(x), keepdim)))
    from_torch = export(model, (17, 17))
    assert from_torch.grids(17, 17)["layer"] == CONV_17, from_torch.unknown_reason("layer")
    assert from_torch.grids(17, 17)["relu"] == CONV_17
    proto = to_onnx(model, (17, 17))
    from_onnx = onnx_grid_graph(proto, "x", "NCHW")
    assert from_onnx.grids(17, 17)["y"] == CONV_17, from_onnx.unknown_reason("y")
    assert_sizes_match(from_onnx, ort_shapes(proto, np.zeros((1, 3, 17, 17), np.float32)), 17, 17)


REGROUPINGS = {
    "view -1": lambda x: x.view(-1, 2, 4, *x.shape[2:]).amax(1),
    "unflatten, flatten": lambda x: x.unflatten(1, (2, 2, 2)).flatten(2, 3).sum(1),
    "unsqueeze, squeeze": lambda x: x.unsqueeze(1).unsqueeze(3).squeeze(3).mean(1),
    "permute groups": lambda x: grouped(x).permute(0, 2, 1, 3, 4).reshape(x.shape),
    "concat groups": lambda x: torch.cat([grouped(x), -grouped(x)], 1).amax(1),
    "slice groups": lambda x: grouped(x)[:, :, 1:3].sum(2),
    "constant groups": lambda x: (grouped(x) * torch.arange(4.0).view(4, 1, 1)).sum(2),
    # channel splits (GLU gates, CSP blocks) and a ShuffleNet's shuffle: the walk of
    # torch.export's graph had no rule for them, and every map after them was unknown
    "chunk": lambda x: x.chunk(2, 1)[0] * torch.sigmoid(x.chunk(2, 1)[1]),
    "split sizes": lambda x: torch.cat(x.split([3, 5], 1)[::-1], 1),
    "unbind groups": lambda x: grouped(x).unbind(1)[1],
    "transpose groups": lambda x: grouped(x).transpose(1, 2).reshape(x.shape),
}


@pytest.mark.parametrize("name", sorted(REGROUPINGS))
def test_regrouping_channel_axes_keeps_the_grid(name: str) -> None:
    model = after_conv(Fn(REGROUPINGS[name]))
    graph = export(model, (17, 17))
    assert graph.grids(17, 17)["layer"] == CONV_17, graph.unknown_reason("layer")
    proto = to_onnx(model, (17, 17))
    assert onnx_grid_graph(proto, "x", "NCHW").grids(17, 17)["y"] == CONV_17


UNKNOWN = {
    # H folded into the channels: (B, 8, 9, 9) -> (B, 72, 1, 9), or (B, 8, 9, 1, 9) (rank 5,
    # H, W last but not the map's H: its sizes differ).
    "fold H into channels": (
        lambda x: x.reshape(x.shape[0], -1, 1, x.shape[3]),
        "regrouping its channel axes",
    ),
    "fold H, keep rank 5": (
        lambda x: x.reshape(x.shape[0], 8, 9, 1, 9).amax(2),
        "regrouping its channel axes",
    ),
    "merge C and H": (
        lambda x: x.reshape(x.shape[0], -1, x.shape[3]),
        "other than by regrouping its channel axes",
    ),
    "split H": (lambda x: x.split([4, 5], 2)[1], "splits axis 2, not a channel axis"),
    "transpose H and W": (lambda x: x.transpose(2, 3), "permutes axes [0, 1, 3, 2]"),
    "reduce H": (lambda x: x.mean(2), "reduces the height axis but not the width axis"),
    "reduce W, keepdim": (
        lambda x: grouped(x).amax(-1, keepdim=True),
        "reduces the width axis but not the height axis",
    ),
    "reduce every channel axis": (lambda x: x.sum(1), "rank-3 (B, H, W)"),
    "ranks 4 and 5 combined": (
        lambda x: grouped(x) * x.mean(1, keepdim=True),
        "combines maps of ranks [4, 5]",
    ),
    "argmax": (lambda x: grouped(x).argmax(2).float(), "argmax"),
    "nhwc regrouped": (
        lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], 9, 9, 2, 4).sum(-1),
        "reshapes a map",
    ),
}


@pytest.mark.parametrize("name", sorted(UNKNOWN))
def test_ambiguous_reshapes_and_reductions_stay_unknown(name: str) -> None:
    fn, reason = UNKNOWN[name]
    graph = export(
        nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, 2, 1), layer=Fn(fn))), (17, 17)
    )
    assert graph.grids(17, 17)["conv"] == CONV_17
    assert graph.grids(17, 17)["layer"] is None
    assert reason in graph.unknown_reason("layer")


@pytest.mark.parametrize("name", ["fold H into channels", "reduce H"])
def test_ambiguous_onnx_reshapes_and_reductions_stay_unknown(name: str) -> None:
    fn, _ = UNKNOWN[name]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Fn(fn)).eval()
    for dynamic in (False, True):
        graph = onnx_grid_graph(to_onnx(model, (17, 17), dynamic=dynamic), "x", "NCHW")
        assert graph.grids(17, 17)["y"] is None
        assert ("Reshape" if "fold" in name else "ReduceMean") in graph.unknown_reason("y")


def test_onnx_slices_with_computed_bounds() -> None:
    # The ONNX exporter writes chunk as Slices whose bounds come from Shape: on the channel
    # axis any bounds keep the grid; on H they are evaluated at the replayed size (the crop of
    # a static export); computed from anything but shapes, they are unknown.
    chunk = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Fn(lambda x: x.chunk(2, 1)[1])).eval()
    graph = onnx_grid_graph(to_onnx(chunk, (17, 17), dynamic=True), "x", "NCHW")
    assert graph.grids(17, 17)["y"] == CONV_17, graph.unknown_reason("y")
    crop = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Fn(lambda x: x[:, :, : x.shape[2] // 2 + 1]))
    proto = to_onnx(crop.eval(), (17, 17), dynamic=True)
    assert any(n.op_type == "Shape" for n in proto.graph.node)  # (computed, not folded)
    graph = onnx_grid_graph(proto, "x", "NCHW")
    for size in (17, 21):
        static = onnx_grid_graph(to_onnx(crop, (size, size)), "x", "NCHW")
        grid = graph.grids(size, size)["y"]
        assert grid == static.grids(size, size)["y"] and grid.h.n == (size + 1) // 4 + 1
    nodes = [  # a crop by the image's mean value
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["e"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["e", "zero"], ["ends"]),
        helper.make_node("Slice", ["x", "zero", "ends", "two"], ["y"]),
    ]
    inits = [("zero", np.array([0], np.int64)), ("two", np.array([2], np.int64))]
    graph = onnx_grid_graph(onnx_model(nodes, inits), "x", "NCHW")
    assert graph.grids(9, 9)["y"] is None
    assert "not constant on a spatial axis" in graph.unknown_reason("y", 9, 9)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x.mean((2, 3)),
        lambda x: x.amax((-1, -2), keepdim=True),
        lambda x: grouped(x).sum((3, 4)),
        lambda x: grouped(x).norm(dim=(-2, -1), keepdim=True),
    ],
)
def test_reductions_over_h_and_w_are_flat(fn) -> None:  # type: ignore[no-untyped-def]
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, 2, 1), layer=Fn(fn))).eval()
    assert export(model, (17, 17)).grids(17, 17)["layer"] == "flat"
    assert onnx_grid_graph(to_onnx(model, (17, 17)), "x", "NCHW").grids(17, 17)["y"] == "flat"


def _shape_target(pieces: Sequence[tuple[str, object]]) -> list[onnx.NodeProto]:
    """Concat of constants and slices of Shape(c) into 'target' (dynamic H and W)."""
    nodes = [helper.make_node("Shape", ["c"], ["shape"])]
    names = []
    for i, (kind, value) in enumerate(pieces):
        name = f"piece{i}"
        if kind == "const":
            nodes.append(helper.make_node("Constant", [], [name], value_ints=list(value)))
        else:
            start, end = value  # type: ignore[misc]
            nodes += [
                helper.make_node("Constant", [], [f"s{i}"], value_ints=[start]),
                helper.make_node("Constant", [], [f"e{i}"], value_ints=[end]),
                helper.make_node("Slice", ["shape", f"s{i}", f"e{i}"], [name]),
            ]
        names.append(name)
    return [*nodes, helper.make_node("Concat", names, ["target"], axis=0)]


@pytest.mark.parametrize(
    ("pieces", "kept"),
    [
        ([("const", [0, 2, 4]), ("shape", (2, 4))], True),  # 0: the batch size, copied
        ([("shape", (0, 1)), ("const", [-1, 2]), ("shape", (2, 4))], True),
        ([("const", [-1, 2, 4]), ("shape", (2, 4))], True),  # -1: the batch, 2 * 4 = 8
        ([("const", [-1, 2, 2]), ("shape", (2, 4))], False),  # -1 is not the batch size
        ([("const", [0, -1]), ("shape", (3, 4)), ("const", [1])], False),  # (B, 8H, W, 1)
        ([("const", [0, 2, 4]), ("shape", (3, 4)), ("shape", (2, 3))], False),  # H, W swapped
    ],
)
def test_onnx_reshape_to_a_shape_derived_target(pieces, kept: bool) -> None:  # type: ignore[no-untyped-def]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
        *_shape_target(pieces),
        helper.make_node("Reshape", ["c", "target"], ["r"], name="regroup"),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    model = onnx_model(nodes, [("w", conv_weight(8, 1, 3))], opset=17)
    graph = onnx_grid_graph(model, "x", "NCHW")
    for h, w in ((17, 17), (21, 15)):
        conv = graph.grids(h, w)["c"]
        assert graph.grids(h, w)["y"] == (conv if kept else None)
    if kept:
        x = np.zeros((1, 1, 21, 15), np.float32)
        assert_sizes_match(graph, ort_shapes(model, x), 21, 15)
    else:
        assert "Reshape 'regroup'" in graph.unknown_reason("y")


@pytest.mark.parametrize(
    ("ops", "kept"),
    [
        ([("Unsqueeze", [2]), ("ReduceMax", [2])], True),
        ([("Unsqueeze", [1, 2]), ("ReduceSum", [1, -3])], True),
        ([("Unsqueeze", [1]), ("Squeeze", [1])], True),
        ([("Unsqueeze", [-1]), ("ReduceMax", [-1])], False),  # the new axis lands after W
        ([("Unsqueeze", [0]), ("ReduceMax", [0])], False),  # ... or before the batch
        ([("Unsqueeze", [2]), ("ReduceMean", [3])], False),  # H of the rank-5 tensor
    ],
)
def test_onnx_squeeze_and_unsqueeze_of_channel_axes(ops, kept: bool) -> None:  # type: ignore[no-untyped-def]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], kernel_shape=[3, 3], strides=[2, 2])]
    for i, (op, axes) in enumerate(ops):
        extra = {"keepdims": 0} if op.startswith("Reduce") else {}
        node = helper.make_node(op, [f"t{i}"], [f"t{i + 1}"], axes=axes, **extra)
        nodes.append(node)
    nodes.append(helper.make_node("Relu", [f"t{len(ops)}"], ["y"]))
    graph = onnx_grid_graph(onnx_model(nodes, [("w", conv_weight(8, 1, 3))], opset=11), "x", "NCHW")
    assert graph.grids(17, 17)["y"] == (Grid(axis(8, 2, 1), axis(8, 2, 1)) if kept else None)


# -- unknown and invalid ---------------------------------------------------------------------------
def test_unknown_onnx_op_makes_everything_downstream_unknown() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Tile", ["c", "reps"], ["t"], name="tiler"),
        helper.make_node("Relu", ["t"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["y"]),
    ]
    inits = [("w", conv_weight(1, 1, 3)), ("reps", np.asarray([1, 1, 2, 2], np.int64))]
    graph = onnx_grid_graph(onnx_model(nodes, inits), "x", "NCHW")
    grids = graph.grids(9, 9)
    assert grids["c"] == Grid(axis(4, 2, 1), axis(4, 2, 1))
    assert grids["t"] is None and grids["r"] is None and grids["y"] is None
    assert graph.unknown_reason("c") is None
    assert "Tile 'tiler'" in graph.unknown_reason("y")


def test_unknown_torch_op_names_the_aten_op_and_module() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), Roll(), nn.Conv2d(4, 4, 3))
    graph = export(model, (17, 17))
    grids = graph.grids(17, 17)
    assert grids["0"] == Grid(axis(9, 2, 0), axis(9, 2, 0))
    assert grids["1"] is None and grids["2"] is None
    reason = graph.unknown_reason("2")
    assert "roll" in reason and "module '1'" in reason


def test_adaptive_pool_is_a_window_when_its_windows_are_regular() -> None:
    # Cell i pools cells floor(i n / m) to ceil((i + 1) n / m): 12 into 3 is 4 wide at stride
    # 4; 13 into 3 is 5 wide at stride 4 ([0, 5), [4, 9), [8, 13)); 8 into 7 (a VGG head's 7x7
    # on an 8x8 map) is 2 wide at stride 1. 11 into 3 has widths 4, 5, 4: no grid.
    graph = export(nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(3)), (12, 12))
    assert graph.grids(12, 12)["1"].h == axis(3, 4, 1.5)
    assert graph.grids(13, 12)["1"].h == axis(3, 4, 2)
    assert graph.grids(11, 12)["1"] is None
    assert "uneven" in graph.unknown_reason("1", 11, 12)
    seven = export(nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(7)), (8, 8))
    assert seven.grids(8, 8)["1"] == Grid(axis(7, 1, 0.5), axis(7, 1, 0.5))
    # Fewer cells than outputs (a 7x7 head at a CIFAR size): repeated, not pooled; no grid
    # (its windows' stride of 0 divided by zero and lost every grid of the graph).
    assert seven.grids(1, 1)["1"] is None and seven.grids(1, 1)["0"] is not None
    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.arange(64.0).reshape(1, 1, 8, 8), 7)
    windows = torch.nn.functional.avg_pool2d(torch.arange(64.0).reshape(1, 1, 8, 8), 2, 1)
    torch.testing.assert_close(pooled, windows, rtol=0, atol=0)  # the rule's premise


def test_an_input_too_small_for_a_window_is_invalid() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[5, 5], name="big")
    graph = onnx_grid_graph(onnx_model([node], [("w", conv_weight(1, 1, 5))]), "x", "NCHW")
    assert graph.invalid_reason(5, 5) is None
    reason = graph.invalid_reason(4, 9)
    assert "Conv 'big'" in reason and "height" in reason
    assert graph.grids(4, 9)["y"] is None


# -- adapters --------------------------------------------------------------------------------------
def test_torch_adapter_names_map_to_exported_nodes() -> None:
    """A module called twice (the block's ReLU), a residual add, a functional max pool."""
    model = ResNetLike()
    spec = InputSpec("x", "NCHW", 3, 33, 33, None)
    adapter = TorchAdapter.from_module(model, input_spec=spec)
    layers = adapter.probe_layers(torch.zeros(1, 3, 33, 33))
    graph = adapter.grid_graph()
    assert graph is not None and adapter.grid_graph() is graph  # cached
    grids = graph.grids(33, 33)
    names = {layer.name for layer in layers}
    # The ReLU's second call is the block's output: named by the block (one layer, not two).
    assert {"layer1.0.relu", "layer1.0", "layer4.1"} <= names
    assert not {"layer1.0.relu:1", "layer4.1.relu:1"} & names
    for layer in layers:
        grid = grids[layer.name]
        if layer.spatial:
            assert (grid.h.n, grid.w.n) == layer.shape[1:], layer.name
        else:
            assert grid == "flat", layer.name
    # The first call of the block's ReLU follows bn1, the second the residual add: same grid.
    assert grids["layer2.0.relu"] == grids["layer2.0.relu:1"] == grids["layer2.0.conv1"]
    assert grids["layer2.0"] == grids["layer2.0.relu:1"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_adapter_grid_sources(tmp_path) -> None:
    model = mixed_model()
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 41, 38),), strict=False), pt2)
    from_pt2 = load_torch(pt2)
    assert from_pt2.grid_graph().grids(41, 38)["0"] == Grid(axis(21, 2, 0), axis(19, 2, 0))

    unsized = load_model(mixed_model())
    assert unsized.grid_graph() is None and "input size" in unsized.grid_graph_note
    unsized.with_input_size(41, 38)
    assert unsized.grid_graph().grids(41, 38) == from_pt2.grid_graph().grids(41, 38)

    scripted = tmp_path / "m.ts"
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 41, 38)), scripted)
    ts = load_torch(scripted, input_size=(41, 38))
    assert ts.grid_graph() is None and "TorchScript" in ts.grid_graph_note


def test_onnx_adapter_strides_and_layouts_come_from_the_grids(tmp_path) -> None:
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv", ["t", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        ),
        helper.make_node("Transpose", ["c"], ["n"], perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("Gemm", ["m", "fc"], ["y"]),
    ]
    inits = [("w", conv_weight(4, 3, 3)), ("fc", np.ones((4, 2), np.float32))]
    model = onnx_model(nodes, inits, channels=3, layout="NHWC", opset=13, output_shape=[1, 2])
    path = tmp_path / "nhwc.onnx"
    onnx.save(model, path)
    adapter = load_model(path)
    adapter.with_input_size(9, 9)
    layers = {layer.name: layer for layer in adapter.probe_layers(torch.rand(1, 3, 9, 9))}
    assert layers["r"].stride == (2.0, 2.0) and layers["r"].shape == (4, 5, 5)  # NHWC -> NCHW
    assert layers["m"].stride is None and layers["m"].shape == (4,)
    assert adapter.grid_graph().grids(9, 9)["r"] == Grid(axis(5, 2, 0), axis(5, 2, 0))


class ResizeHead(nn.Module):
    """Convolutions (large weights), an upsample (small scale constants) and a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.conv2(torch.relu(self.conv1(x))), scale_factor=2.0)
        return self.fc(h[:, :, ::2, ::2].reshape(x.shape[0], -1))


def test_shape_inference_without_the_large_weights_infers_the_same_types():
    from eqaudit.models.onnx_adapter import _without_large_weights

    buffer = io.BytesIO()
    torch.onnx.export(ResizeHead().eval(), (torch.zeros(1, 3, 32, 32),), buffer, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    light = _without_large_weights(model)
    large = {t.name for t in model.graph.initializer if t.ByteSize() > 4096}
    assert large and large <= {i.name for i in light.graph.input}
    assert {t.name for t in light.graph.initializer} == {
        t.name for t in model.graph.initializer if t.name not in large
    }
    assert light.ByteSize() < model.ByteSize() / 10
    full = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    types = [
        {v.name: v.type for v in [*m.graph.value_info, *m.graph.output]} for m in (full, inferred)
    ]
    assert len(types[0]) > 8 and types[0] == types[1]
    # The model itself is untouched.
    assert len(model.graph.initializer) == len(large) + len(light.graph.initializer)


def _slice(name: str, source: str, start: int, end: int, axis: int) -> list[onnx.NodeProto]:
    """An ONNX Slice of ``source`` along ``axis`` with constant starts and ends."""
    values = {f"{name}_s": start, f"{name}_e": end, f"{name}_a": axis}
    constants = [
        helper.make_node(
            "Constant", [], [key], value=numpy_helper.from_array(np.array([v], np.int64))
        )
        for key, v in values.items()
    ]
    return [*constants, helper.make_node("Slice", [source, *values], [name])]


def test_wrap_around_concatenation_is_a_padding_and_a_roll_is_not() -> None:
    # Circular padding as torch exports it: [x[..., -1:], x, x[..., :1]] along W, then H. A
    # Concat along a spatial axis was "not a channel axis": every later grid was unknown.
    nodes = [
        *_slice("tail_w", "x", -1, 2**31 - 1, 3),
        *_slice("head_w", "x", 0, 1, 3),
        helper.make_node("Concat", ["tail_w", "x", "head_w"], ["pw"], axis=3),
        *_slice("tail_h", "pw", -1, 2**31 - 1, 2),
        *_slice("head_h", "pw", 0, 1, 2),
        helper.make_node("Concat", ["tail_h", "pw", "head_h"], ["p"], axis=2),
        helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3]),
    ]
    model = onnx_model(nodes, [("w", np.ones((1, 1, 3, 3), np.float32))])
    graph = onnx_grid_graph(model, "x", "NCHW")
    grids = graph.grids(9, 9)
    assert grids["p"] == Grid(axis(11, 1, -1), axis(11, 1, -1))  # as a Pad of 1
    assert grids["y"] == Grid(axis(9, 1, 0), axis(9, 1, 0))
    # Halves swapped (a roll by half the width): not cells of one map in padding order.
    roll = [
        *_slice("left", "x", 0, 4, 3),
        *_slice("right", "x", 4, 8, 3),
        helper.make_node("Concat", ["right", "left"], ["y"], axis=3),
    ]
    assert onnx_grid_graph(onnx_model(roll), "x", "NCHW").grids(8, 8)["y"] is None
    # A piece twice, or a map beside a function of itself: no one piece is the map (review).
    twice = [
        *_slice("left", "x", 0, 4, 3),
        helper.make_node("Concat", ["left", "left"], ["y"], axis=3),
    ]
    assert onnx_grid_graph(onnx_model(twice), "x", "NCHW").grids(8, 8)["y"] is None
    beside = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Concat", ["x", "r"], ["y"], axis=3),
    ]
    assert onnx_grid_graph(onnx_model(beside), "x", "NCHW").grids(8, 8)["y"] is None


def test_a_failed_export_prints_nothing_and_mutes_only_its_own_thread(capfd) -> None:
    # torch printed the partial graph's whole code to stderr on a data-dependent branch; a
    # plain redirect of sys.stderr also swallowed other threads' writes (a progress bar's).
    import sys
    import threading

    from eqaudit.grids import _quiet_export_logs, export_grid_graph

    class Branch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if float(x.mean()) > 0 else x

    graph, note = export_grid_graph(Branch(), torch.zeros(1, 3, 8, 8))
    assert graph is None and note.startswith("torch.export failed")
    assert capfd.readouterr().err == ""
    with _quiet_export_logs():
        print("from the export", file=sys.stderr)
        other = threading.Thread(target=lambda: print("from a progress bar", file=sys.stderr))
        other.start()
        other.join()
    assert capfd.readouterr().err == "from a progress bar\n"


# -- padding-free cells ----------------------------------------------------------------------------
# Oracle: a cell reads no padding exactly when its value does not change when the image is
# surrounded by more image (the padding moves away): run the model on x and on x inside a larger
# random canvas, and compare each cell with the cell at the same input position.
class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.conv(x))


def padding_model() -> nn.Sequential:
    """Ops whose padding-free cells are exact (no bound): windows of every kind, residual add,
    pads (reflected, asymmetric), slices, a nearest upsample. Many channels: a max-pool window
    that reads the padding keeps its value when the maximum lies elsewhere, in fewer channels."""
    c = 32
    return nn.Sequential(
        nn.Conv2d(3, c, 5, padding=2),
        nn.Tanh(),
        nn.MaxPool2d(3, 2, 1),
        Residual(c),
        nn.Conv2d(c, c, 3, 1, 2, dilation=2),
        nn.ReflectionPad2d((1, 2, 0, 1)),
        nn.Conv2d(c, c, 3),
        Crop(),
        nn.Conv2d(c, c, 3, 2, 1),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.AvgPool2d(3, 1, 1),
    ).eval()


def unchanged_cells(
    model: nn.Module, graph: GridGraph, size: tuple[int, int], margin: int
) -> dict[str, tuple[np.ndarray, Grid]]:
    """Per module: (cells whose value is the same inside a larger image, the module's grid)."""
    draw = torch.Generator().manual_seed(0)
    canvas = torch.randn(1, 3, size[0] + 2 * margin, size[1] + 2 * margin, generator=draw)
    canvas = canvas.double()
    image = canvas[..., margin:-margin, margin:-margin]
    small, large = torch_outputs(model.double(), image), torch_outputs(model, canvas)
    grids = graph.grids(*size)
    larger = graph.grids(size[0] + 2 * margin, size[1] + 2 * margin)
    found = {}
    for name, out in small.items():
        grid, big = grids.get(name), larger.get(name)
        if not isinstance(grid, Grid) or out.dim() != 4:
            continue
        assert isinstance(big, Grid)
        # cell i sits at input pixel offset + stride*i: margin pixels further in the canvas
        rows = (grid.h.offset + margin - big.h.offset) / grid.h.stride
        cols = (grid.w.offset + margin - big.w.offset) / grid.w.stride
        assert rows == int(rows) and cols == int(cols)
        n_h, n_w = out.shape[-2:]
        there = large[name][..., int(rows) : int(rows) + n_h, int(cols) : int(cols) + n_w]
        same = ((out - there).abs() <= 1e-12).all(dim=1)[0]
        found[name] = (same.numpy(), grid)
    return found


def torch_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        sub.register_forward_hook(lambda _m, _i, out, path=path: outputs.__setitem__(path, out))
        for path, sub in model.named_modules()
        if path
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return outputs


def free_cells(grid: Grid) -> np.ndarray:
    mask = np.zeros((grid.h.n, grid.w.n), dtype=bool)
    assert grid.h.free is not None and grid.w.free is not None
    (lo_h, hi_h), (lo_w, hi_w) = grid.h.free, grid.w.free
    mask[lo_h : hi_h + 1, lo_w : hi_w + 1] = True
    return mask


@pytest.mark.parametrize("size", [(37, 37), (40, 53)])
def test_padding_free_cells_are_those_that_no_surrounding_content_changes(size) -> None:
    torch.manual_seed(0)
    model = padding_model()
    graph = export(model, size)
    found = unchanged_cells(model, graph, size, margin=8)
    assert len(found) == 12  # the 11 modules and the residual block's convolution
    for name, (same, grid) in found.items():
        assert np.array_equal(free_cells(grid), same), name
    # deep enough that padding reaches most cells, not all of them
    last = found["10"][1]
    assert last.h.free is not None and last.h.free[0] > 0 and last.h.free[1] < last.h.n - 1


def test_padding_free_cells_after_resampling_ops_are_a_safe_bound() -> None:
    # Transposed convolutions and linear/cubic resizes: the span is a bound (at most a few cells
    # short of the exact set), never a cell that reads the padding.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ConvTranspose2d(4, 4, 4, 2, 1),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.Upsample(scale_factor=0.5, mode="bicubic"),
        nn.Conv2d(4, 4, 3, padding=1),
    ).eval()
    graph = export(model, (31, 31))
    for name, (same, grid) in unchanged_cells(model, graph, (31, 31), margin=8).items():
        free = free_cells(grid)
        assert not (free & ~same).any(), name
        assert free.sum() >= 0.5 * same.sum() > 0, name


def test_onnx_and_torch_give_the_same_padding_free_cells() -> None:
    model = padding_model()
    size = (37, 41)
    from_torch = export(model, size).grids(*size)["10"]
    from_onnx = onnx_grid_graph(to_onnx(model, size, dynamic=True), "x", "NCHW").grids(*size)["y"]
    assert isinstance(from_onnx, Grid) and isinstance(from_torch, Grid)
    assert (from_onnx.h.free, from_onnx.w.free) == (from_torch.h.free, from_torch.w.free)
    assert from_torch.h.free is not None


def test_a_receptive_field_wider_than_the_image_leaves_no_free_cell() -> None:
    graph = export(
        nn.Sequential(*[nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(9)]), (17, 17)
    )
    grids = graph.grids(17, 17)
    assert grids["7"].h.free == (8, 8)  # 8 convs reach 8 pixels: the centre only
    assert grids["8"].h.free == (0, -1)


class GatedConv(nn.Module):
    """A padded convolution times a squeeze-excite gate (from a global pool of its output)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))


@pytest.mark.parametrize(
    "layers",
    [
        lambda: [GatedConv(4)],
        lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4)],
        # (exported to ONNX as Reshape, InstanceNormalization, Reshape: the grid is unknown)
        lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)],
    ],
    ids=["squeeze-excite", "instance-norm", "group-norm"],
)
def test_statistics_over_the_map_leave_no_cell_padding_free(layers, request) -> None:
    # Each cell then reads the whole map, border included (review of the padding-free spans:
    # a squeeze-excite gate kept the map's span, 342 cells that the canvas oracle changes).
    torch.manual_seed(0)
    model = nn.Sequential(*layers()).eval()
    size = (20, 21)
    last = str(len(model) - 1)
    onnx_grid = onnx_grid_graph(to_onnx(model, size, dynamic=True), "x", "NCHW").grids(*size)["y"]
    if "group-norm" not in request.node.name:
        assert isinstance(onnx_grid, Grid) and onnx_grid.h.free == onnx_grid.w.free == (0, -1)
    same, grid = unchanged_cells(model, export(model, size), size, margin=8)[last]
    assert not same.any()
    assert grid.h.free == grid.w.free == (0, -1)


def test_a_channels_last_layer_norm_keeps_each_cell_on_its_own() -> None:
    class ChannelsLastNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.norm = nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    size = (20, 21)
    grids = export(ChannelsLastNorm().eval(), size).grids(*size)
    assert grids["norm"].h.free == (1, 18) and grids["norm"].w.free == (1, 19)


class TopDown(nn.Module):
    """An FPN's merge: a stride-2 level upsampled 2x and added to the level above. It runs at
    even sizes only (at 65 the sum is of 65 and 66 cells), and no even size aligns its grids."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, 2, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.c1(x)
        p1 = f1 + F.interpolate(self.c2(f1), scale_factor=2.0, mode="nearest")
        return self.head(p1.mean((2, 3)))


class PaddedUp(nn.Module):
    """A U-Net's up step as often written: the upsampled map padded to the skip connection's
    size by amounts computed in Python (frozen at the exported size in the graph). It runs at
    every size."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.c1(x)
        up = self.up(self.down(skip))
        dy, dx = skip.size(2) - up.size(2), skip.size(3) - up.size(3)
        up = F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.head(torch.cat([skip, up], 1).mean((2, 3)))


def test_aligned_sizes_are_sizes_the_model_runs_at() -> None:
    # aligned:64 chose 65 for an FPN-like merge, where the model fails (helper-51); a grid
    # replay cannot tell that from a U-Net whose Python-computed pads it froze (review), so the
    # model is run at a size before it is picked.
    from eqaudit.audit import _runs_at
    from eqaudit.transforms import parse_transforms
    from eqaudit.transforms.geometry import choose_aligned_size

    d4 = parse_transforms("d4", "crop")
    spec = InputSpec("x", "NCHW", 3, None, None, None)
    fpn = TorchAdapter.from_module(TopDown().eval(), input_spec=spec)
    fpn.with_input_size(64, 64)
    with pytest.raises(RuntimeError, match="65"):  # as torch says
        TopDown().eval()(torch.zeros(1, 3, 65, 65))
    choice = choose_aligned_size(
        export(TopDown(), (64, 64)), (64, 64), d4, runs=_runs_at(fpn, (64, 64))
    )
    assert choice.chosen is None and "no input size near 64x64" in choice.note()
    assert fpn.input_spec.size == (64, 64)  # left at the requested size
    # Without the run it would pick 65 ...
    assert choose_aligned_size(export(TopDown(), (64, 64)), (64, 64), d4).chosen == (65, 65)
    # ... and a U-Net that runs everywhere gets its aligned size
    unet = TorchAdapter.from_module(PaddedUp().eval(), input_spec=spec)
    unet.with_input_size(31, 31)  # runs there; its 2x2 pool's grid is off-centre
    graph = export(PaddedUp(), (31, 31))
    choice = choose_aligned_size(graph, (31, 31), d4, runs=_runs_at(unet, (31, 31)))
    assert choice.chosen == (32, 32) and choice.misaligned_at_requested


class FoldedSoftmax(nn.Module):
    """Reshape to (B, G, -1), a softmax over each group's channels and cells, reshape back: not
    a GroupNorm, and each cell's value depends on the whole group as there; read as unknown."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.reshape(x.shape[0], 2, -1), -1).reshape(x.shape)


@pytest.mark.parametrize("dynamic", [False, True])
def test_an_exported_group_norm_keeps_the_grid(dynamic: bool) -> None:
    # The ONNX exporter writes GroupNorm as Reshape (B, G, -1), InstanceNormalization, Reshape
    # back to the input's Shape: every map after the first GroupNorm of a GN network was
    # unknown in ONNX where the .pt2 had them all (helper-51).
    model = after_conv(nn.GroupNorm(2, 8))
    proto = to_onnx(model, (17, 17), dynamic=dynamic)
    assert [n.op_type for n in proto.graph.node].count("InstanceNormalization") == 1
    graph = onnx_grid_graph(proto, "x", "NCHW")
    grid = graph.grids(17, 17)["y"]
    assert grid is not None, graph.unknown_reason("y")
    assert export(model, (17, 17)).grids(17, 17)["relu"] == grid  # as torch.export's walk
    assert (grid.h.n, grid.h.stride, grid.h.offset) == (9, 2.0, 0.0)
    # Anything else between the two reshapes stays unknown.
    other = onnx_grid_graph(to_onnx(after_conv(FoldedSoftmax()), (17, 17)), "x", "NCHW")
    assert other.grids(17, 17)["y"] is None
    assert "folds each group of channels with H and W" in other.unknown_reason("y")


class SkipResize(nn.Module):
    """A U-Net's decoder step: the coarse map resized to the skip connection's size."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(x)
        up = F.interpolate(self.down(skip), size=skip.shape[-2:], mode="bilinear")
        return skip + up


def test_a_resize_to_another_maps_size_in_a_dynamic_export_keeps_the_grid() -> None:
    # Exported with a dynamic H and W, the sizes come from Shape(skip): "not constant", and a
    # U-Net's whole decoder was unknown where the static export had it (helper-51).
    model = SkipResize().eval()
    proto = to_onnx(model, (17, 17), dynamic=True)
    resize = next(n for n in proto.graph.node if n.op_type == "Resize")
    assert len(resize.input) == 4 and resize.input[3]  # by sizes, read from a Shape
    up = resize.output[0]
    graph = onnx_grid_graph(proto, "x", "NCHW")
    for size in (17, 24):  # the skip connection's size, whatever the input's
        static = onnx_grid_graph(to_onnx(model, (size, size)), "x", "NCHW")
        grid = graph.grids(size, size)[up]
        assert grid is not None, graph.unknown_reason(up, size, size)
        assert grid.h.n == size and grid == static.grids(size, size)[up]


class ResizedConstant(nn.Module):
    """A position embedding resized to the map's size (a ViT-hybrid's, a DETR's): a constant
    whose Resize reads another map's Shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + F.interpolate(self.pos, size=y.shape[-2:], mode="bilinear")


def test_a_constant_resized_to_a_maps_size_stays_a_constant() -> None:
    # Reading the map's state made the Resize's step look image-dependent, and its rule failed
    # on the constant's missing state: an internal error ending the audit (review).
    proto = to_onnx(ResizedConstant().eval(), (16, 16), dynamic=True)
    graph = onnx_grid_graph(proto, "x", "NCHW")
    assert graph.grids(16, 16)["y"] == graph.grids(16, 16)["/conv/Conv_output_0"] is not None


class PooledBranch(nn.Module):
    """A DeepLab ASPP head: a conv branch and an image-pooling branch (global pool, 1x1 conv,
    resized back to the map's size), concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.branch = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.pooled = nn.Conv2d(4, 4, 1)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        g = self.pooled(F.adaptive_avg_pool2d(h, 1))
        g = F.interpolate(g, size=h.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([self.branch(h), g], 1))


def test_a_1x1_map_resized_to_a_maps_size_broadcasts_as_the_1x1_map() -> None:
    # "resizes flat features": every layer after an ASPP head was unknown (helper-53). The
    # resized map is constant over its cells: concatenated, it keeps the other branch's grid.
    model = PooledBranch().eval()
    torch_graph = export(model, (17, 17))
    onnx_graph = onnx_grid_graph(to_onnx(model, (17, 17)), "x", "NCHW")
    for graph, out in ((torch_graph, "project"), (onnx_graph, "y")):
        grid = graph.grids(17, 17)[out]
        assert grid is not None and (grid.h.n, grid.h.stride, grid.h.offset) == (9, 2.0, 0.0)
    # every cell reads the whole map through the pool, padding included: none is free of it
    assert onnx_graph.grids(17, 17)["y"].h.free == (0, -1)


def _convs(model: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in model.graph.node if n.op_type == "Conv"]


def test_same_pads_computed_from_the_shape_are_read_at_each_size() -> None:
    # A TF-"same" network exported with a dynamic H and W computes its pads from Shape at run
    # time: "pads that are not constant", and every grid after the first conv was unknown.
    dynamic = to_onnx(same_net(frozen=False), (64, 64), dynamic=True)
    assert {"Shape", "Div", "Clip"} <= {n.op_type for n in dynamic.graph.node}
    graph = onnx_grid_graph(dynamic, "x", "NCHW")
    for size in (63, 64, 65, 40):
        static = to_onnx(same_net(frozen=True), (size, size))  # the same pads, as constants
        expected = onnx_grid_graph(static, "x", "NCHW").grids(size, size)
        grids = graph.grids(size, size)
        for mine, theirs in zip(_convs(dynamic), _convs(static), strict=True):
            assert grids[mine] is not None, graph.unknown_reason(mine, size, size)
            assert grids[mine] == expected[theirs], (size, mine)
        x = np.zeros((1, 3, size, size), np.float32)
        assert_sizes_match(graph, ort_shapes(dynamic, x), size, size)
    # Odd pads go to the end: at 64 the first conv pads (0, 1), so no D4 element aligns; at 65
    # every conv pads evenly.
    first = _convs(dynamic)[0]
    assert graph.grids(64, 64)[first].h == AxisGrid(32, 2.0, 1.0, (0, 30))
    assert graph.grids(65, 65)[first].h == AxisGrid(33, 2.0, 0.0, (1, 31))


def test_aligned_size_of_a_same_padded_export() -> None:
    from eqaudit.transforms import parse_transforms
    from eqaudit.transforms.geometry import choose_aligned_size

    graph = onnx_grid_graph(to_onnx(same_net(frozen=False), (64, 64), dynamic=True), "x", "NCHW")
    choice = choose_aligned_size(graph, (64, 64), parse_transforms("d4", "crop"))
    assert choice.chosen == (65, 65) and choice.misaligned_at_requested


@pytest.mark.parametrize("op", ["Sub", "Mod"])
def test_pads_that_depend_on_the_batch_size_stay_unknown(op: str) -> None:
    # pads = [0, 0, B - 1, 0, ...]: a batch of one pads nothing, of two one row; B % 2: the
    # same at every odd batch (review: two odd guesses of the batch size read it as constant)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node(op, ["batch", "one" if op == "Sub" else "two"], ["extra"]),
        helper.make_node("Concat", ["zeros2", "extra", "zeros5"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["y"]),
    ]
    inits = [
        ("zero", np.array([0], np.int64)),
        ("one", np.array([1], np.int64)),
        ("two", np.array([2], np.int64)),
        ("zeros2", np.zeros(2, np.int64)),
        ("zeros5", np.zeros(5, np.int64)),
    ]
    model = onnx_model(nodes, inits)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert onnx_grid_graph(model, "x", "NCHW").grids(9, 9)["y"] is not None  # batch 1: known
    batch.dim_param = "B"  # (clears dim_value)
    graph = onnx_grid_graph(model, "x", "NCHW")
    assert graph.grids(9, 9)["y"] is None
    assert graph.unknown_reason("y", 9, 9) == "Pad 'node 4' has pads that are not known"


def test_slice_bounds_are_clamped_as_onnxruntime_clamps_them() -> None:
    from eqaudit.grids import _shape_op

    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    bounds = [-12, -11, -10, -3, -1, 0, 1, 5, 9, 10, 12, 2**31 - 1, big, small]
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"])],
        "slice",
        [
            helper.make_tensor_value_info("x", TensorProto.INT64, [10]),
            *(helper.make_tensor_value_info(n, TensorProto.INT64, [1]) for n in "seat"),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    run = _shape_op(model.graph.node[0])
    x, axis = np.arange(10, dtype=np.int64), np.array([0], np.int64)
    for start in bounds:
        for end in bounds:
            for step in (-3, -1, 1, 2):
                s, e, t = (np.array([v], np.int64) for v in (start, end, step))
                expected = session.run(None, {"x": x, "s": s, "e": e, "a": axis, "t": t})[0]
                found = run([x, s, e, axis, t])[0]
                assert found.tolist() == expected.tolist(), (start, end, step)


class CropUp(nn.Module):
    """A U-Net's up step that crops the upsampled map to the skip connection's size (odd sizes
    upsample one cell too many)."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, 2, 1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(x)
        up = self.up(self.down(skip))[:, :, : skip.shape[2], : skip.shape[3]]
        return torch.cat([skip, up], 1)


def test_a_crop_to_another_maps_size_in_a_dynamic_export_keeps_the_grid() -> None:
    dynamic = to_onnx(CropUp().eval(), (16, 16), dynamic=True)
    crops = [n.output[0] for n in dynamic.graph.node if n.op_type == "Slice"]
    assert crops and "Shape" in {n.op_type for n in dynamic.graph.node}
    graph = onnx_grid_graph(dynamic, "x", "NCHW")
    for size in (15, 16, 17):
        static = onnx_grid_graph(to_onnx(CropUp().eval(), (size, size)), "x", "NCHW")
        grids, expected = graph.grids(size, size), static.grids(size, size)
        assert grids["y"] is not None, graph.unknown_reason("y", size, size)
        assert grids["y"] == expected["y"] and grids["y"].h.n == size
        assert_sizes_match(
            graph, ort_shapes(dynamic, np.zeros((1, 3, size, size), np.float32)), size, size
        )


def test_a_resize_to_a_size_computed_from_a_shape_keeps_the_grid() -> None:
    # sizes = Shape(x)[2:] * 2 in a dynamic export: arithmetic on the shape, not a plain read
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1),
        Fn(lambda x: F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear")),
    ).eval()
    dynamic = to_onnx(model, (16, 16), dynamic=True)
    assert "Mul" in {n.op_type for n in dynamic.graph.node}
    graph = onnx_grid_graph(dynamic, "x", "NCHW")
    for size in (16, 17):
        static = onnx_grid_graph(to_onnx(model, (size, size)), "x", "NCHW")
        grid = graph.grids(size, size)["y"]
        assert grid is not None, graph.unknown_reason("y", size, size)
        assert grid == static.grids(size, size)["y"] and grid.h.n == 2 * ((size + 1) // 2)
        x = np.zeros((1, 3, size, size), np.float32)
        assert_sizes_match(graph, ort_shapes(dynamic, x), size, size)


def _shape_op_cases() -> list[tuple[onnx.NodeProto, list[np.ndarray | None]]]:
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    s = np.array(-7, np.int64)  # a scalar
    make = helper.make_node
    cases = []
    for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Less", "Greater"):
        for a, b in ((i64(7, -7, 6, -6, 0), i64(2, 2, -4, -4, 3)), (s, i64(3)), (i64(5), s)):
            cases.append((make(op, ["a", "b"], ["y"]), [a, b]))
    floats = np.array([2.5, -2.5, 7.0], np.float32), np.array([2.0, 2.0, -4.0], np.float32)
    cases += [(make(op, ["a", "b"], ["y"]), list(floats)) for op in ("Div", "Sub", "Max")]
    cases += [(make("Ceil", ["a"], ["y"]), [floats[0]]), (make("Floor", ["a"], ["y"]), [floats[0]])]
    cases += [(make(op, ["a"], ["y"]), [i64(3, -4)]) for op in ("Neg", "Abs", "Identity")]
    b1, b2 = np.array([True, False, True]), np.array([True, True, False])
    cases += [(make(op, ["a", "b"], ["y"]), [b1, b2]) for op in ("And", "Or", "Xor")]
    cases += [
        (make("Not", ["a"], ["y"]), [b1]),
        (make("Where", ["c", "a", "b"], ["y"]), [b1, i64(1, 2, 3), i64(4, 5, 6)]),
    ]
    cases += [
        (make("Mod", ["a", "b"], ["y"], fmod=f), [i64(7, -7, 7, -7), i64(3, 3, -3, -3)])
        for f in (0, 1)
    ]
    cases += [
        (make("Gather", ["a", "i"], ["y"], axis=0), [i64(1, 3, 64, 65), i64(-1)]),
        (make("Gather", ["a", "i"], ["y"], axis=0), [i64(1, 3, 64, 65), np.array(2, np.int64)]),
        (make("Concat", ["a", "b", "c"], ["y"], axis=0), [i64(1), i64(2, 3), i64(4)]),
        (make("Cast", ["a"], ["y"], to=TensorProto.FLOAT), [i64(3, -4)]),
        (make("Cast", ["a"], ["y"], to=TensorProto.INT64), [np.array([2.7, -2.7], np.float32)]),
        (make("Unsqueeze", ["a", "i"], ["y"]), [s, i64(0)]),
        (make("Unsqueeze", ["a", "i"], ["y"]), [i64(1, 2), i64(-1, 0)]),
        (make("Squeeze", ["a", "i"], ["y"]), [i64(5).reshape(1, 1), i64(0)]),
        (make("Reshape", ["a", "t"], ["y"]), [np.arange(8).reshape(2, 4), i64(0, -1, 2)]),
        (make("Transpose", ["a"], ["y"], perm=[1, 0]), [np.arange(8).reshape(2, 4)]),
        (make("Transpose", ["a"], ["y"]), [np.arange(8).reshape(2, 4)]),
        (make("Clip", ["a", "lo", "hi"], ["y"]), [i64(-3, 0, 9), i64(0), i64(5)]),
        (make("Clip", ["a", "lo"], ["y"]), [i64(-3, 0, 9), i64(0)]),
        (make("Clip", ["a", "", "hi"], ["y"]), [i64(-3, 0, 9), None, i64(5)]),
        (make("ConstantOfShape", ["a"], ["y"]), [i64(3)]),
        (make("ConstantOfShape", ["a"], ["y"], value=numpy_helper.from_array(i64(4))), [i64(2, 2)]),
        (make("Range", ["a", "b", "c"], ["y"]), [s, np.array(5, np.int64), np.array(3, np.int64)]),
    ]
    big = np.iinfo(np.int64).max
    x = np.arange(24).reshape(4, 6)
    for starts, ends, axes, steps in (
        ((1,), (3,), None, None),
        ((-1,), (-big,), (1,), (-1,)),
        ((big,), (-big,), (0,), (-2,)),
        ((0, 2), (big, -1), (0, 1), (2, 1)),
        ((-10,), (10,), (-1,), None),
    ):
        ins = [x, i64(*starts), i64(*ends), None if axes is None else i64(*axes)]
        ins += [None if steps is None else i64(*steps)]
        names = ["a", "b", "e", "x" if axes else "", "s" if steps else ""]
        cases.append((make("Slice", names, ["y"]), ins))
    return cases


@pytest.mark.parametrize(("node", "ins"), _shape_op_cases())
def test_shape_arithmetic_matches_the_onnx_reference(node, ins) -> None:  # type: ignore[no-untyped-def]
    from onnx.reference import ReferenceEvaluator

    from eqaudit.grids import _shape_op

    feeds = {n: v for n, v in zip(node.input, ins, strict=True) if n}
    expected = np.asarray(ReferenceEvaluator(node).run(None, feeds)[0])
    found = np.asarray(_shape_op(node)(ins)[0])
    assert found.dtype == expected.dtype and found.shape == expected.shape
    assert np.array_equal(found, expected)


@pytest.mark.parametrize(
    "gate",
    [
        lambda x, g: x * g[:, :, None, None],
        lambda x, g: x * g.unsqueeze(-1).unsqueeze(-1),
        lambda x, g: (x.permute(0, 2, 3, 1) * g[:, None, None, :]).permute(0, 3, 1, 2),
    ],
)
def test_a_squeeze_excite_gate_indexed_to_1x1_broadcasts(gate) -> None:  # type: ignore[no-untyped-def]
    # g[:, :, None, None] unsqueezes (B, C) through (B, C, 1): "reshapes a tensor", and every
    # map after a squeeze-excite block written so was unknown.
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 2, 1)
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            return gate(x, torch.sigmoid(self.fc(x.mean((2, 3)))))

    grid = export(nn.Sequential(OrderedDict(layer=Gated())), (17, 17)).grids(17, 17)["layer"]
    assert grid is not None and (grid.h.n, grid.h.stride, grid.h.offset) == (9, 2.0, 0.0)
    assert grid.h.free == (0, -1)  # every cell reads the whole map through the gate


@pytest.mark.parametrize("op", ["Range", "ConstantOfShape"])
def test_pads_read_past_a_vector_as_long_as_the_batch_stay_unknown(op: str) -> None:
    # pads = Concat(v, [0, 0, 1], zeros(8))[1:9], v as long as the batch: a pad on H at batch
    # 1, on W at batch 2 (review: the constants' entries were untainted, their positions were
    # not)
    if op == "Range":  # 0 .. B-1
        vector = [helper.make_node("Range", ["zero_s", "batch_s", "one_s"], ["v"])]
    else:  # ones(B)
        one = numpy_helper.from_array(np.array([1], np.int64))
        vector = [helper.make_node("ConstantOfShape", ["batch"], ["v"], value=one)]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Squeeze", ["batch", "zero"], ["batch_s"]),
        *vector,
        helper.make_node("Concat", ["v", "pad_h", "zeros8"], ["c"], axis=0),
        helper.make_node("Slice", ["c", "one", "nine"], ["pads"]),
        helper.make_node("Pad", ["x", "pads"], ["y"]),
    ]
    inits = [
        ("zero", np.array([0], np.int64)),
        ("one", np.array([1], np.int64)),
        ("nine", np.array([9], np.int64)),
        ("zero_s", np.array(0, np.int64)),
        ("one_s", np.array(1, np.int64)),
        ("pad_h", np.array([0, 0, 1], np.int64)),
        ("zeros8", np.zeros(8, np.int64)),
    ]
    model = onnx_model(nodes, inits)
    assert onnx_grid_graph(model, "x", "NCHW").grids(9, 9)["y"] is not None  # batch 1: known
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "B"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sizes = [
        session.run(None, {"x": np.zeros((b, 1, 9, 9), np.float32)})[0].shape[2:] for b in (1, 2)
    ]
    assert sizes[0] != sizes[1]  # the grid depends on the batch size
    assert onnx_grid_graph(model, "x", "NCHW").grids(9, 9)["y"] is None

"""Per-layer geometry through the whole engine (issue: exact per-layer geometry).

Known answers: the D4-symmetric CNN is exact at an aligned input size and *flagged* (not
reported as broken) at a misaligned one; --input-size aligned picks the size; a lifting
convolution is equivariant up to a channel permutation (--channel-map).
"""

from __future__ import annotations

import pytest
import torch
from models_group import c4_net
from models_zoo import symmetric_cnn
from torch import nn

import eqaudit


def _rows(result, transform: str | None = None, kind: str = "spatial") -> list[dict]:
    return [
        r
        for r in result.layers
        if r["kind"] == kind and r["transform"] != "id" and transform in (None, r["transform"])
    ]


@pytest.fixture(scope="module")
def lifted():
    return eqaudit.audit(c4_net(0), "c4", input_size=17, num_images=12, seed=1, channel_map=True)


def test_lifting_convolution_is_equivariant_up_to_a_channel_permutation(lifted) -> None:
    for layer in ("lift", "relu1", "gconv", "relu2"):
        for transform in ("rot90", "rot180", "rot270"):
            row = lifted.layer(layer, transform)
            assert row["relative_error"] > 0.3, (layer, transform)  # naive: channels permuted
            assert row["fitted_relative_error"] < 1e-5, (layer, transform)
            assert row["channel_map_permutation"] is True
            assert row["pooled_relative_error"] > 0.3


def test_group_pooled_layers_are_invariant_without_a_map(lifted) -> None:
    for layer in ("gpool", "pool"):  # (fc is the output: not a layer)
        for transform in ("rot90", "rot180", "rot270"):
            assert lifted.layer(layer, transform)["relative_error"] < 1e-5


def test_channel_map_columns_reach_layers_csv(lifted, tmp_path) -> None:
    frame = lifted.to_frame("layers")
    assert {"fitted_relative_error", "pooled_relative_error", "channel_map_permutation"} <= set(
        frame.columns
    )
    identity = frame[frame["transform"] == "id"]
    assert identity["fitted_relative_error"].isna().all()


def test_flips_are_not_rescued_by_a_channel_map() -> None:
    # C4 has no reflections: the lifting layer is not flip-equivariant even up to a map.
    result = eqaudit.audit(
        c4_net(0), "flips", input_size=17, num_images=12, seed=1, channel_map=True
    )
    assert result.layer("lift", "flip_h")["fitted_relative_error"] > 0.05


def test_channel_map_needs_layers() -> None:
    with pytest.raises(eqaudit.errors.UsageError, match="--channel-map needs per-layer"):
        eqaudit.audit(c4_net(0), "c4", input_size=17, num_images=2, layers=False, channel_map=True)


def test_symmetric_cnn_is_exact_and_scored_at_an_aligned_size() -> None:
    result = eqaudit.audit(symmetric_cnn(seed=0), "d4", input_size=33, num_images=8, seed=3)
    spatial = _rows(result)
    assert spatial and all(r["aligned"] is True for r in spatial)
    assert all(r["comparison"] == "exact" and r["scored"] for r in spatial)
    assert max(r["relative_error_max"] for r in spatial) < 1e-5
    assert result.summary["scores"]["layer_relative_error"] < 1e-5
    assert result.summary["geometry"]["misaligned_pairs"] == 0


def test_symmetric_cnn_is_flagged_not_broken_at_a_misaligned_size() -> None:
    # 32 is even: the stride-2 pad-1 convolutions' grids miss the image centre by half a pixel.
    result = eqaudit.audit(symmetric_cnn(seed=0), "d4", input_size=32, num_images=8, seed=3)
    misaligned = [r for r in _rows(result) if r["aligned"] is False]
    assert misaligned, "the strided layers must be flagged"
    assert all(not r["scored"] for r in misaligned)
    assert all("misaligned" in r["reason"] for r in misaligned)
    # The naive comparison on the map's own grid is large: that is what flagging keeps out.
    assert max(r["relative_error"] for r in misaligned) > 0.05
    # Layers before the first stride stay aligned, exact and scored.
    aligned = [r for r in _rows(result) if r["aligned"] is True and r["transform"] != "transpose"]
    assert aligned and all(r["scored"] and r["relative_error_max"] < 1e-5 for r in aligned)
    # Flat layers are compared for invariance, exactly, whatever the grids: at 32 the pooled
    # features really are not invariant (the outputs disagree too), so they are scored as such.
    flat = _rows(result, "rot90", kind="flat")
    assert flat and all(r["scored"] and r["relative_error"] > 1e-4 for r in flat)
    assert result.output("rot90")["logit_error"] > 1e-4
    geometry = result.summary["geometry"]
    assert geometry["misaligned_pairs"] == len(misaligned)


def test_input_size_aligned_picks_the_nearest_aligned_size() -> None:
    result = eqaudit.audit(
        symmetric_cnn(seed=0), "d4", input_size="aligned:32", num_images=8, seed=3
    )
    assert result.summary["model"]["input"]["height"] == 33
    choice = result.summary["geometry"]["size_choice"]
    assert choice["chosen"] == [33, 33] and choice["requested"] == [32, 32]
    assert "33x33 chosen" in choice["note"]
    assert all(r["aligned"] is True for r in _rows(result))
    assert result.summary["geometry"]["misaligned_pairs"] == 0


def test_misaligned_resample_gives_an_approximate_comparison() -> None:
    result = eqaudit.audit(
        symmetric_cnn(seed=0),
        "flips",
        input_size=32,
        num_images=8,
        seed=3,
        misaligned="resample",
    )
    misaligned = [r for r in _rows(result) if r["aligned"] is False]
    assert misaligned and all(r["comparison"] == "resampled" for r in misaligned)
    assert all(not r["scored"] for r in misaligned)
    assert all(r["interpolation_floor"] is not None for r in misaligned)
    naive = eqaudit.audit(symmetric_cnn(seed=0), "flips", input_size=32, num_images=8, seed=3)
    for row in misaligned:
        flagged = naive.layer(row["layer"], row["transform"])
        # Resampling about the true centre removes most of the grid's half-pixel offset.
        assert row["relative_error"] < flagged["relative_error"]


def test_unknown_grids_are_not_scored() -> None:
    # A TorchScript module exposes no graph geometry and no hooks; an nn.Module whose forward
    # torch.export cannot trace keeps shape-estimated strides and unknown offsets.
    class Untraceable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            if float(h.mean()) > 1e9:  # data-dependent control flow: export refuses it
                h = h * 2
            return self.head(h.mean(dim=(2, 3)))

    result = eqaudit.audit(
        Untraceable().eval(), "flips,rot:30,shift:0.5", input_size=9, num_images=4
    )
    # Every element alike, the rotation by another angle and the sub-pixel shift too: they
    # read "resampled" with no reason, and the summary's count of unknown grids missed them.
    for transform in ("flip_h", "rot30", "shift_x+0.5_fourier"):
        row = result.layer("conv", transform)
        assert row["aligned"] is None and row["comparison"] == "naive" and not row["scored"]
        assert row["reason"].startswith("sampling grid unknown"), transform
    # (resampled about the map's own centre all the same: the interpolation floor is beside)
    assert result.layer("conv", "rot30")["interpolation_floor"] > 0


def test_a_torchscript_audit_says_why_no_layer_is_audited(tmp_path) -> None:
    # It said "sampling grids unavailable ... such layers are compared on their own grid" of a
    # model with no layers at all, and the report read "Layers audited 0" without a reason.
    from eqaudit.reports import write_report

    path = tmp_path / "ts.pt"
    torch.jit.trace(symmetric_cnn(seed=0), torch.zeros(1, 3, 9, 9)).save(str(path))
    result = eqaudit.audit(str(path), "flips", input_size=9, num_images=2)
    assert result.layers == [] and result.summary["model"]["layers_audited"] == 0
    notes = result.summary["geometry"]["notes"]
    assert notes == [
        "no layer is audited: TorchScript archives expose no per-layer hooks: export with "
        "torch.export for per-layer results"
    ]
    write_report(result, tmp_path / "r")
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert '<dd class="wide">none (TorchScript archives expose no per-layer hooks' in html


def _linear_circular_cnn() -> torch.nn.Module:
    """Stride-1 circular convolutions without non-linearities, global average pool, linear head:
    every layer commutes with band-limited (Fourier) circular shifts, fractional ones included."""
    torch.manual_seed(5)
    conv = [
        torch.nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="circular")
        for c_in, c_out in ((3, 6), (6, 6))
    ]
    return torch.nn.Sequential(
        conv[0], conv[1], torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 4)
    ).eval()


@pytest.mark.parametrize("size", [24, 25])
def test_circular_cnn_passes_sub_pixel_shifts_to_the_interpolation_floor(size: int) -> None:
    result = eqaudit.audit(
        _linear_circular_cnn(),
        "shift:0.5,1.25",
        shift_mode="circular",
        input_size=size,
        num_images=6,
    )
    fractional = [r for r in result.layers if r["transform"].endswith("_fourier")]
    assert fractional
    for row in fractional:
        floor = row["interpolation_floor"] or 0.0
        assert row["relative_error"] <= floor + 1e-6, row
        if row["kind"] == "spatial":
            assert row["comparison"] == "resampled" and row["scored"]
    for row in result.outputs[1:]:
        assert row["agreement"] == 1.0 and row["logit_error"] < 1e-5


def test_relu_aliasing_shows_above_the_floor_under_sub_pixel_shifts() -> None:
    # The same check on a ReLU network: the first convolution commutes exactly, the ReLU after
    # it creates harmonics that a half-pixel shift aliases (a real, measurable non-equivariance).
    from models_zoo import SmallCNN

    torch.manual_seed(2)
    model = SmallCNN(padding_mode="circular", stride=1).eval()
    result = eqaudit.audit(model, "shift:0.5", shift_mode="circular", input_size=25, num_images=6)
    assert result.layer("conv1", "shift_x+0.5_fourier")["relative_error"] < 1e-6
    relu = result.layer("relu1", "shift_x+0.5_fourier")
    assert relu["relative_error"] > 100 * relu["interpolation_floor"]


def test_a_circular_cnn_exported_to_onnx_is_exactly_shift_equivariant_at_every_layer(
    tmp_path,
) -> None:
    # DESIGN.md's oracle through ONNX: torch writes circular padding as Slice + Concat pieces,
    # which the grid walker called "concatenates along axis 2": every layer unknown, naive,
    # unscored, where the same model as .pt2 had every layer aligned and exact.
    from models_zoo import SmallCNN, export_onnx

    torch.manual_seed(2)
    model = SmallCNN(padding_mode="circular", stride=1).eval()
    path = export_onnx(model, tmp_path / "circular.onnx", 17)
    result = eqaudit.audit(
        str(path), "shift:1,2", shift_mode="circular", input_size=17, num_images=4
    )
    spatial = [r for r in result.summary["layers"] if r["kind"] == "spatial"]
    assert len(spatial) >= 4
    for row in spatial:
        assert row["aligned"] is True and row["comparison"] == "exact" and row["scored"], row
        assert row["relative_error"] < 1e-6, row


class _TinyResNet(torch.nn.Module):
    """A ResNet-18-shaped stride stack (7x7/2 stem, 3x3/2 max pool, three stride-2 stages with
    1x1/2 shortcuts) with few channels: aligned at 225 = 7 * 32 + 1, misaligned at 224."""

    def __init__(self) -> None:
        super().__init__()
        c = 4
        self.stem = torch.nn.Conv2d(3, c, 7, stride=2, padding=3)
        self.relu = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(c, c, 3, stride=2, padding=1) for _ in range(3)
        )
        self.shortcuts = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 1, stride=2) for _ in range(3))
        self.gap = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.stem(x)))
        for conv, shortcut in zip(self.convs, self.shortcuts, strict=True):
            x = self.relu(conv(x) + shortcut(x))
        return self.fc(self.gap(x).flatten(1))


def _symmetric_resnet() -> torch.nn.Module:
    from models_zoo import d4_symmetrise_

    torch.manual_seed(11)
    return d4_symmetrise_(_TinyResNet()).eval()


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_resnet_stride_stack_is_exact_at_225_and_flagged_at_224(backend, tmp_path) -> None:
    from models_zoo import export_onnx

    model = _symmetric_resnet()
    results = {}
    for size in (224, 225):
        source = (
            model if backend == "torch" else export_onnx(model, tmp_path / f"r{size}.onnx", size)
        )
        results[size] = eqaudit.audit(source, "d4", input_size=size, num_images=3, seed=0)
    exact = _rows(results[225])
    assert exact and all(r["aligned"] is True and r["comparison"] == "exact" for r in exact)
    assert max(r["relative_error_max"] for r in exact) < 1e-5
    flagged = [r for r in _rows(results[224]) if r["aligned"] is False]
    assert flagged and all(not r["scored"] for r in flagged)
    # The naive comparison at 224 is what a tool without grids would report as "broken": four
    # orders of magnitude above the exact comparison of the same filters at 225.
    assert max(r["relative_error"] for r in flagged) > 0.1
    stems = [r for r in _rows(results[224], "rot90") if r["stride"] == "2x2"]
    assert stems and all(r["offset_h"] == 0.0 and r["aligned"] is False for r in stems)


def test_cli_input_size_aligned_and_misaligned_options(tmp_path) -> None:
    from models_zoo import export_onnx
    from typer.testing import CliRunner

    from eqaudit.cli import app

    path = export_onnx(symmetric_cnn(seed=0), tmp_path / "sym.onnx", 32, dynamic_size=True)
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "check",
            str(path),
            "-t",
            "flips",
            "-n",
            "4",
            "--input-size",
            "aligned:32",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "input size 33x33 chosen" in result.output
    summary = eqaudit.AuditResult.from_json(out).summary
    assert summary["model"]["input"]["height"] == 33
    bad = runner.invoke(app, ["check", str(path), "--input-size", "33", "--misaligned", "maybe"])
    assert bad.exit_code == 2
    assert "--misaligned must be one of flag, resample, skip" in bad.output
    dynamic = runner.invoke(app, ["check", str(path), "--input-size", "aligned", "-o", str(out)])
    assert dynamic.exit_code == 2
    assert "write --input-size aligned:224" in dynamic.output


def test_layer_gate_leaves_misaligned_layers_out() -> None:
    from eqaudit.config import GateConfig
    from eqaudit.gate import evaluate_gate

    result = eqaudit.audit(symmetric_cnn(seed=0), "d4", input_size=32, num_images=4, seed=3)
    report = evaluate_gate(result, GateConfig(max_layer_error=(("conv*", 1e-4),)))
    rot90 = next(c for c in report.checks if c.name == "layer_error[conv*][rot90]")
    # conv1 (stride 1) is aligned and exact; conv2 and conv3 are misaligned and left out.
    assert rot90.status == "passed"
    assert "over 1 layer(s), at conv1" in rot90.description
    assert "2 misaligned layer(s) left out" in rot90.description
    naive = max(result.layer(n, "rot90")["relative_error"] for n in ("conv2", "conv3"))
    assert naive > 1e-4  # what the gate would have failed on without grids


def test_lie_derivatives_through_the_engine_and_the_report(tmp_path) -> None:
    from models_zoo import SmallCNN, export_onnx

    from eqaudit.reports import write_report

    torch.manual_seed(0)
    model = SmallCNN().eval()
    result = eqaudit.audit(model, "flips", input_size=17, num_images=6, seed=2, lie=True)
    lie = result.summary["lie"]
    assert lie["method"] == "forward-mode AD"
    outputs = {r["generator"]: r for r in lie["outputs"]}
    assert set(outputs) == {"rotation", "translate_x", "translate_y"}
    assert all(r["n"] == 6 and r["mean"] > 0 for r in outputs.values())
    assert outputs["rotation"]["unit"] == "per radian"
    # Every audited layer of this chain has a contribution; layers.csv carries the means.
    frame = result.to_frame("layers")
    conv1 = frame[(frame["layer"] == "conv1") & (frame["transform"] == "flip_h")].iloc[0]
    assert conv1["lie_rotation"] > 0 and conv1["lie_translate_x"] > 0
    write_report(result, tmp_path / "r")
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert 'id="lie-outputs"' in html and 'id="lie-bars"' in html
    # The same model through ONNX: central differences, outputs agree with the AD numbers.
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    onnx = eqaudit.audit(path, "flips", num_images=6, seed=2, lie=True).summary["lie"]
    assert onnx["method"].startswith("central differences")
    for row in onnx["outputs"]:
        assert row["mean"] == pytest.approx(outputs[row["generator"]]["mean"], rel=0.1)


def test_compare_takes_layer_differences_only_on_scored_pairs() -> None:
    from eqaudit.compare import compare_results

    model = symmetric_cnn(seed=0)
    a = eqaudit.audit(model, "flips", input_size=32, num_images=4, seed=3)
    b = eqaudit.audit(symmetric_cnn(seed=1), "flips", input_size=32, num_images=4, seed=3)
    rows = compare_results(a, b).data["layers"]
    conv2 = next(r for r in rows if r["layer_a"] == "conv2" and r["transform"] == "flip_h")
    assert conv2["scored"] is False and conv2["relative_error_difference"] is None
    assert conv2["relative_error_a"] is not None  # both errors kept for the record
    conv1 = next(r for r in rows if r["layer_a"] == "conv1" and r["transform"] == "flip_h")
    assert conv1["scored"] is True and conv1["relative_error_difference"] is not None


def test_inspect_shows_grids_and_chooses_an_aligned_size() -> None:
    from typer.testing import CliRunner

    from eqaudit.cli import app

    runner = CliRunner()
    args = ["inspect", "eqaudit/demo/assets/demo_cnn.pt", "--factory", "eqaudit.demo.model:build"]
    result = runner.invoke(app, [*args, "--input-size", "aligned:32"])
    assert result.exit_code == 0, result.output
    assert "input size 33x33 chosen" in result.output
    assert "2x2 @ 0,0 (17x17)" in result.output  # the first stride-2 convolution's grid
    misaligned = runner.invoke(app, [*args, "--input-size", "32"])
    assert misaligned.exit_code == 0 and "2x2 @ 0,0 (16x16)" in misaligned.output


def test_layers_that_give_token_sequences_are_named_as_not_audited() -> None:
    # (A ViT's sequences are compared as maps, tests/models/test_tokens.py; these tokens are
    # rolled, which the grid walk does not follow.)
    class Tokens(nn.Module):  # a patch embedding, a layer on shifted tokens, a head
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 3, stride=3)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.embed(x).flatten(2).transpose(1, 2)  # (batch, 9 tokens, 8)
            return self.head(self.mix(torch.roll(tokens, 1, 1)).mean(1))

    torch.manual_seed(0)
    result = eqaudit.audit(Tokens(), "flips", input_size=9, num_images=2)
    assert {row["layer"] for row in result.layers} == {"embed"}
    assert result.summary["geometry"]["not_audited"] == ["mix"]  # all of them, not 3
    notes = result.summary["geometry"]["notes"]
    assert any(n.startswith("1 layer is not audited: ") and n.endswith("(mix)") for n in notes)
    from eqaudit.inspect import inspect_model

    torch.manual_seed(0)
    assert inspect_model(Tokens(), input_size=(9, 9))["unauditable"] == ["mix"]


class Attention(nn.Module):
    """A patch embedding (4x4 patches of a 12x12 image: 9 tokens), two attention heads' scores
    (batch, 2 heads, 9, 9) and per-head features (batch, 2, 9, 4), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (batch, 9 tokens, 8)
        heads = tokens.reshape(tokens.shape[0], 9, 2, 4).transpose(1, 2)  # (batch, 2, 9, 4)
        scores = torch.softmax(heads @ heads.transpose(-1, -2), dim=-1)  # (batch, 2, 9, 9)
        mixed = (scores @ heads).transpose(1, 2).reshape(tokens.shape)
        return self.head(mixed.mean(1))


#: The spatial layers of :class:`Attention` exported to ONNX: the patch map, then its token
#: sequences (compared as the maps of their cells), not the scores.
ATTENTION_SPATIAL = [
    "/embed/Conv_output_0",
    "/Transpose_output_0",  # (batch, 9 tokens, 8)
    "/Transpose_1_output_0",  # (batch, 2 heads, 9 tokens, 4)
    "/Transpose_2_output_0",  # (batch, 2 heads, 4, 9 tokens): the keys, transposed
    "/MatMul_1_output_0",  # scores @ values: (batch, 2 heads, 9 tokens, 4)
    "/Transpose_3_output_0",
]


def test_attention_tensors_of_an_onnx_graph_are_not_audited_as_image_maps(tmp_path) -> None:
    # An ONNX graph hands out every tensor: a ViT's (batch, heads, tokens, tokens) scores were
    # "spatial" layers of unknown grid, 144 of a small ViT's 146, compared as if they were
    # images (rot90 of an attention matrix) and filling the report (review). Its token
    # sequences are compared as maps of their cells; the scores are not audited.
    from models_zoo import export_onnx

    from eqaudit.inspect import inspect_model

    torch.manual_seed(0)
    path = export_onnx(Attention().eval(), tmp_path / "vit.onnx", 12)
    info = inspect_model(str(path))
    spatial = [layer["name"] for layer in info["layers"] if layer["kind"] == "spatial"]
    assert spatial == ATTENTION_SPATIAL
    assert [layer["name"] for layer in info["layers"] if layer.get("token_sequence")] == spatial[1:]
    assert info["unauditable"] == ["/MatMul_output_0", "/Softmax_output_0"]  # the scores
    result = eqaudit.audit(str(path), "flips", num_images=2)
    assert {row["layer"] for row in result.layers if row["kind"] == "spatial"} == set(spatial)


@pytest.mark.parametrize("opset", [11, 13])
def test_attention_tensors_of_an_older_opset_export_are_not_audited(tmp_path, opset) -> None:
    # Before opset 14 the exporter writes flatten(2) as a Reshape to a target built from
    # Shape, Slice and Concat: shape inference gives it no rank, nor anything after it, so the
    # token sequence went unseen and the scores were "spatial" layers again (review); and the
    # batch size its next Reshape reads from a Shape of that unknown rank was unknown.
    from eqaudit.inspect import inspect_model

    torch.manual_seed(0)
    path = tmp_path / "vit.onnx"
    torch.onnx.export(
        Attention().eval(),
        (torch.zeros(1, 3, 12, 12),),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["image"],
        dynamic_axes={"image": {0: "batch"}},
    )
    info = inspect_model(str(path))
    spatial = [layer["name"] for layer in info["layers"] if layer["kind"] == "spatial"]
    assert spatial == ATTENTION_SPATIAL
    assert info["unauditable"] == ["/MatMul_output_0", "/Softmax_output_0"]


class AttentionModules(Attention):
    """:class:`Attention` whose scores go through ``Softmax`` and ``Dropout`` modules, as in
    timm's ``Attention`` without fused kernels: module outputs a forward hook hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        heads = tokens.reshape(tokens.shape[0], 9, 2, 4).transpose(1, 2)
        scores = self.attn_drop(self.softmax(heads @ heads.transpose(-1, -2)))
        mixed = (scores @ heads).transpose(1, 2).reshape(tokens.shape)
        return self.head(mixed.mean(1))


def test_attention_scores_of_pytorch_modules_are_not_audited_as_image_maps() -> None:
    # The (batch, 2 heads, 9, 9) outputs of the Softmax and Dropout modules were "spatial"
    # layers of unknown grid, rot90 of an attention matrix compared as if it were an image.
    from eqaudit.inspect import inspect_model

    torch.manual_seed(0)
    info = inspect_model(AttentionModules().eval(), input_size=(12, 12))
    assert [layer["name"] for layer in info["layers"]] == ["embed"]
    assert "softmax" in info["unauditable"]  # (the Dropout hands out its values again)
    torch.manual_seed(0)
    result = eqaudit.audit(AttentionModules().eval(), "flips", input_size=12, num_images=2)
    assert {row["layer"] for row in result.layers} == {"embed"}


class ChannelsLastNorm(nn.Module):
    """A stride-2 conv, a ConvNeXt-style LayerNorm and Linear over channels-last maps, a
    pooled head; with ``branch``, a data-dependent ``if`` that torch.export cannot trace."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.branch = branch
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        with torch.no_grad():  # flip-symmetric kernels: every map is flip-equivariant
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.branch and float(h.mean()) > 1e9:
            h = h * 2
        h = self.mix(self.norm(h.permute(0, 2, 3, 1)))  # (batch, 5, 5, 6)
        return self.head(h.mean((1, 2)))


def test_channels_last_maps_of_no_known_layout_are_read_by_their_shape() -> None:
    # Without a graph (export fails on the branch), the norm's (batch, 5, 5, 6) maps were read
    # as 5 channels of 5x6 and compared as such (review); with a graph, inspect printed them
    # before the graph gave their layout. A map of a known map's size in its first two axes,
    # where the channels-first reading matches none, is channels-last.
    from eqaudit.inspect import inspect_model

    for branch in (True, False):
        torch.manual_seed(0)
        model = ChannelsLastNorm(branch).eval()
        info = inspect_model(model, input_size=(9, 9))
        shapes = {layer["name"]: layer["shape"] for layer in info["layers"]}
        assert shapes["norm"] == shapes["mix"] == [6, 5, 5], (branch, shapes)
        result = eqaudit.audit(model, "flips", input_size=9, num_images=2)
        rows = {row["layer"]: row for row in result.layers if row["transform"] == "flip_h"}
        assert rows["norm"]["shape"] == "6x5x5"
        # Pointwise over channels after a flip-equivariant conv: equivariant, read right.
        for name in ("conv", "norm", "mix"):
            assert rows[name]["relative_error"] < 1e-6, (branch, name, rows[name])


class SqueezeExcite(nn.Module):
    """A conv, a squeeze-excite gate whose squeeze goes through ``(batch, C, H*W)`` (as
    ``x.view(b, c, -1).mean(-1)`` writes it), then a strided conv at a new resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Linear(4, 4)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        b, c = h.shape[:2]
        weights = torch.sigmoid(self.gate(h.view(b, c, -1).mean(-1))).view(b, c, 1, 1)
        return self.head(self.down(h * weights).mean((2, 3)))


def test_a_squeeze_excite_gate_does_not_make_the_maps_after_it_tokens() -> None:
    # Its (batch, C, H*W) squeeze is rank 3: every map after the gate counted as computed from
    # a token sequence, and the new-resolution ones were dropped as attention tensors (review).
    torch.manual_seed(0)
    result = eqaudit.audit(SqueezeExcite().eval(), "flips", input_size=9, num_images=2)
    assert {row["layer"]: row["shape"] for row in result.layers} == {
        "conv": "4x9x9",
        "gate": "4",
        "down": "4x5x5",
    }


class HalfPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 2)  # no channels-first module op


class PoolAfterBranch(nn.Module):
    """No graph (a data-dependent branch); on a 32x16 input, a functional pool gives a
    16-channel 8x4 map whose channels-last reading (16 x 8) is a conv's size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 8 x 16x8
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)  # 16 x 16x8
        self.down = HalfPool()
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        if float(x.mean()) > 1e9:
            x = x * 2
        return self.fc(self.down(x).mean((2, 3)))


def test_a_channels_first_map_with_the_inputs_aspect_is_not_read_channels_last() -> None:
    from eqaudit.models import load_model

    torch.manual_seed(0)
    adapter = load_model(PoolAfterBranch().eval(), input_size=(32, 16))
    shapes = {layer.name: layer.shape for layer in adapter.probe_layers(torch.rand(1, 3, 32, 16))}
    assert adapter.grid_graph() is None
    assert shapes["down"] == (16, 8, 4)  # it was read as (4, 16, 8)


class TokensBackToMaps(nn.Module):
    """A patch embedding, a layer over its token sequence, the tokens put back on the patch
    grid channels-last (a Swin's window reverse), and a norm over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 3, stride=3)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mix(self.embed(x).flatten(2).transpose(1, 2))  # (batch, 9, 6)
        maps = self.norm(tokens.reshape(x.shape[0], 3, 3, 6))  # (batch, 3, 3, 6)
        return self.head(maps.mean((1, 2)))


class PatchMerging(nn.Module):
    """A stride-2 conv, its map channels-last, 2x2 patches merged into channels (a Swin's
    downsampling: a reshape to a new resolution no map of known layout has), a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).permute(0, 2, 3, 1)  # (batch, 8, 8, 6)
        b, height, width, c = h.shape
        h = h.reshape(b, height // 2, 2, width // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        merged = self.norm(h.reshape(b, height // 2, width // 2, 4 * c))  # (batch, 4, 4, 24)
        return self.head(merged.mean((1, 2)))


def test_a_channels_last_map_at_a_new_resolution_is_read_by_its_shape() -> None:
    # After a Swin's patch merging, (batch, 4, 4, 64) was read as 4 channels of 4x64 (review):
    # its 4x4 is the input's size at stride 4, where 4x64 is no stride of a square input.
    torch.manual_seed(0)
    result = eqaudit.audit(PatchMerging().eval(), "flips", input_size=16, num_images=2)
    assert {row["layer"]: row["shape"] for row in result.layers}["norm"] == "24x4x4"


def test_maps_rebuilt_from_tokens_channels_last_are_audited_not_dropped() -> None:
    # A Swin keeps (batch, H, W, C) maps between its blocks; read as (C=H, W, C) of no known
    # size they were dropped as "token sequences and attention scores" (review). The walk now
    # follows the tokens back onto their grid: all three are audited, on the patch grid.
    torch.manual_seed(0)
    result = eqaudit.audit(TokensBackToMaps().eval(), "flips", input_size=9, num_images=2)
    shapes = {row["layer"]: row["shape"] for row in result.layers}
    assert shapes == {"embed": "6x3x3", "mix": "6x3x3", "norm": "6x3x3"}
    assert {row["stride_h"] for row in result.layers} == {3.0}
    assert not result.summary["geometry"]["not_audited"]


class SpaceToDepth(nn.Module):
    """A space-to-depth stem written with reshape and permute (rank 6 and back): its grid is
    lost at the reshape, but its maps are image maps, never token sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(12, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        x = torch.relu(self.c1(x.reshape(b, c * 4, h // 2, w // 2)))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def test_maps_whose_grid_a_reshape_lost_stay_when_no_token_sequence_made_them(tmp_path) -> None:
    # A first try at leaving out attention tensors dropped every layer of such a stem (review).
    from models_zoo import export_onnx

    from eqaudit.inspect import inspect_model

    torch.manual_seed(0)
    path = export_onnx(SpaceToDepth().eval(), tmp_path / "s2d.onnx", 16)
    spatial = [layer["name"] for layer in inspect_model(str(path))["layers"]]
    assert "/c1/Conv_output_0" in spatial and "/c2/Conv_output_0" in spatial


def test_the_layer_floor_of_a_map_that_cubics_reproduce_is_near_zero() -> None:
    # A linear ramp is reproduced exactly by the cubic interpolant, so its round trip loses
    # nothing but what the way back reads from the way out's few samples whose stencils left
    # the map (5.7e-4 here). The way out used to be zeroed outside its disk before the way back
    # read it: a floor of 0.13 for a map that loses almost nothing (review).
    from eqaudit.grids import AxisGrid, Grid
    from eqaudit.transforms import Rotation
    from eqaudit.transforms.geometry import resampled_floor

    axis = AxisGrid(12, 2.0, 0.5)  # centred in a 24-pixel image: 0.5 + 2 * 11 / 2 = 11.5
    ii, jj = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    ramp = (1.0 + 0.3 * ii + 0.2 * jj).expand(2, 3, 12, 12)
    floor = resampled_floor(Rotation(30), ramp, Grid(axis, axis), (24, 24))
    assert floor is not None and float(floor.max()) < 1e-3


class _OffCentre(nn.Module):
    """A stride-1 map one whole cell off the image centre (asymmetric zero padding): flips map
    its cells onto cells, but the border cells without a counterpart are where the asymmetry
    is, so the pooled output is not invariant though the overlap compares exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((2, 0, 2, 0))
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(self.pad(x))).flatten(1))


@pytest.mark.parametrize("misaligned", ["flag", "skip"])
def test_a_grid_off_centre_by_whole_cells_is_misaligned_and_not_scored(misaligned) -> None:
    from models_zoo import d4_symmetrise_

    torch.manual_seed(0)
    model = d4_symmetrise_(_OffCentre()).eval()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = eqaudit.audit(model, "flips", images.numpy(), misaligned=misaligned)
    rows = result.to_frame("layers").set_index(["layer", "transform"])
    pooled = rows.loc[("pool", "flip_h")]
    assert pooled["relative_error"] > 1e-3 and pooled["scored"]  # the symmetry is lost ...
    for layer in ("pad", "conv"):
        for g in ("flip_h", "flip_v"):
            row = rows.loc[(layer, g)]
            assert not row["aligned"] and not row["scored"]  # ... in these layers' borders
            if misaligned == "flag":  # compared exactly on the cells that land on the map
                assert row["comparison"] == "exact" and row["relative_error"] < 1e-6
            else:
                assert not row["measurable"] and "not symmetric" in row["reason"]


def test_an_aligned_size_is_refused_when_no_layer_has_a_known_grid(tmp_path) -> None:
    # Every map follows an op the grid walk does not read (Einsum): "already aligned" was said
    # of a model none of whose grids had been checked (review).
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from eqaudit.errors import UsageError

    rng = np.random.default_rng(0)
    weights = [
        helper.make_tensor("W", TensorProto.FLOAT, [4, 3, 3, 3], rng.random(108, np.float32)),
        helper.make_tensor("F", TensorProto.FLOAT, [4, 2], rng.random(8, np.float32)),
    ]
    nodes = [
        helper.make_node("Einsum", ["x"], ["e"], equation="nchw->nchw"),
        helper.make_node("Conv", ["e", "W"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "F"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "einsum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "einsum.onnx")
    with pytest.raises(UsageError, match="no map of this model's graph has a known one") as err:
        eqaudit.audit(str(tmp_path / "einsum.onnx"), "flips", input_size=32, align_input=True)
    assert "(the first layer's is unknown: Einsum 'node 0' is not understood" in str(err.value)


def _isotropic_stack(depth: int, channels: int = 6) -> torch.nn.Module:
    """Linear stride-1 zero-padded 5x5 convolutions whose filters are one Gaussian per (out, in)
    pair: equivariant to rotations up to resampling and the square 5x5 truncation, except where
    a cell reads the padding (the padding frame does not turn with the image)."""
    torch.manual_seed(0)
    offsets = torch.arange(5.0) - 2
    gauss = torch.exp(-(offsets[:, None] ** 2 + offsets[None] ** 2) / (2 * 1.2**2))
    layers: list[nn.Module] = []
    for i in range(depth):
        conv = nn.Conv2d(3 if i == 0 else channels, channels, 5, padding=2)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(channels, conv.in_channels, 1, 1) * gauss / gauss.sum())
            conv.bias.uniform_(0.2, 0.5)
        layers.append(conv)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5))


def _smooth_images(count: int, size: int) -> torch.Tensor:
    """Images whose detail is a few pixels wide (low-pass noise): cubic resampling is accurate."""
    draw = torch.Generator().manual_seed(3)
    noise = torch.rand(count, 3, max(2, size // 8), max(2, size // 8), generator=draw)
    smooth = torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic")
    return smooth.clamp(0, 1).permute(0, 2, 3, 1).contiguous().numpy()


def test_rotations_are_compared_away_from_the_padding_border() -> None:
    # DESIGN.md section 4: inside a central disk "minus the border affected by padding". The
    # fourth 5x5 layer reads the padding within 8 pixels of the border; on the 0.8 disk (radius
    # 12.8 pixels) its error is mostly the padding's (0.0027 against 0.0002 away from it, where
    # it grows from the first layer's 0.0001 only by the kernels' square truncation).
    images = _smooth_images(8, 33)
    model = _isotropic_stack(4)
    kept = eqaudit.audit(model, "rot:30", data=images, input_size=33, resize="center")
    whole = eqaudit.audit(
        model, "rot:30", data=images, input_size=33, resize="center", padding_border="include"
    )
    first, last = (kept.layer(f"{i}", "rot30")["relative_error"] for i in (0, 3))
    assert last < 3 * first
    assert whole.layer("3", "rot30")["relative_error"] > 5 * last
    # the first layer reads the padding 2 pixels in: the disk of 0.8 x 16 pixels is inside, but
    # for a few cells at its edge whose 5x5 field reaches the turned image's zero fill
    near = whole.layer("0", "rot30")["relative_error"]
    assert kept.layer("0", "rot30")["relative_error"] == pytest.approx(near, rel=0.05)
    assert kept.summary["geometry"]["padding_border"] == "exclude"
    assert whole.summary["geometry"]["padding_border"] == "include"


def test_a_layer_that_reads_the_padding_everywhere_is_not_compared_under_rotation() -> None:
    model = _isotropic_stack(5)  # 5 layers reach 10 pixels: nothing of a 17-pixel map is free
    images = _smooth_images(4, 17)
    result = eqaudit.audit(model, "rot:30,flips", data=images, input_size=17, resize="center")
    # 2 layers reach 4 pixels: cells 4..12 read no padding, and those within 4 pixels of the
    # centre not the zero fill of the image turned by 30 degrees either. 3 layers (6 pixels):
    # cells 6..10, but the field of each but the centre reaches the fill, and the centre has
    # no free neighbour for the cubic stencil.
    assert result.layer("1", "rot30")["measurable"] is True
    for layer in ("2", "3", "4"):
        row = result.layer(layer, "rot30")
        assert row["measurable"] is False and "out of reach of the padding" in row["reason"]
        assert result.layer(layer, "flip_h")["measurable"] is True  # exact: no padding issue
    notes = result.summary["geometry"]["notes"]
    assert any("rotations by other angles: 3 layers (2, 3, 4)" in note for note in notes), notes
    anyway = eqaudit.audit(
        model, "rot:30", data=images, input_size=17, resize="center", padding_border="include"
    )
    assert anyway.layer("4", "rot30")["measurable"] is True


def test_padding_border_option_is_checked() -> None:
    from eqaudit.errors import UsageError

    with pytest.raises(UsageError, match="--padding-border must be one of exclude"):
        eqaudit.audit(_isotropic_stack(1), "rot:30", padding_border="outside", input_size=17)


class _Permute(nn.Module):
    def __init__(self, *order: int) -> None:
        super().__init__()
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.order)


def _channels_last_block() -> tuple[nn.Module, nn.Module]:
    """A ConvNeXt-style block held (B, H, W, C) between permutes, and its channels-first twin:
    each Linear a 1x1 conv of the same weights, the LayerNorm over the channels wrapped in
    permutes inside a module, so that the twin's maps are all (B, C, H, W)."""

    class ChannelNorm(nn.Module):  # LayerNorm over axis 1 of a (B, C, H, W) map
        def __init__(self, norm: nn.LayerNorm) -> None:
            super().__init__()
            self.norm = norm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    torch.manual_seed(4)
    stem, norm = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8)
    fc1, fc2, head = nn.Linear(8, 16, bias=False), nn.Linear(16, 8), nn.Linear(8, 5)
    last = nn.Sequential(
        stem, _Permute(0, 2, 3, 1), norm, fc1, nn.Softplus(2), fc2, _Permute(0, 3, 1, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), head,
    )  # fmt: skip
    conv1, conv2 = nn.Conv2d(8, 16, 1, bias=False), nn.Conv2d(16, 8, 1)
    with torch.no_grad():
        conv1.weight.copy_(fc1.weight[..., None, None])
        conv2.weight.copy_(fc2.weight[..., None, None])
        conv2.bias.copy_(fc2.bias)
    first = nn.Sequential(
        stem, ChannelNorm(norm), conv1, nn.Softplus(2), conv2,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), head,
    )  # fmt: skip
    return last.eval(), first.eval()


def test_lie_contributions_of_channels_last_maps_are_those_of_the_channels_first_twin() -> None:
    # The generators act on a map's spatial axes: on a (B, H, W, C) map those are axes 1 and 2.
    # Taken as (B, C, H, W), a Linear over the channels read 1.3 (rotation) and 1.6 (x) where
    # its 1x1-conv twin reads ~1e-3 and ~1e-10 (review).
    last, first = _channels_last_block()
    options = dict(input_size=17, num_images=4, seed=3, lie=True)
    a = eqaudit.audit(last, "flips", **options).to_frame("layers")
    b = eqaudit.audit(first, "flips", **options).to_frame("layers")
    pairs = {"2": "1", "3": "2", "4": "3", "5": "4"}  # norm, fc1, softplus, fc2
    for generator in ("rotation", "translate_x", "translate_y"):
        column = f"lie_{generator}"
        for name_last, name_first in pairs.items():
            x = a[(a["layer"] == name_last) & (a["transform"] == "flip_h")][column].iloc[0]
            y = b[(b["layer"] == name_first) & (b["transform"] == "flip_h")][column].iloc[0]
            assert x == pytest.approx(y, rel=1e-3, abs=1e-8), (generator, name_last)
        # A bias-free Linear over the channels commutes with every generator.
        fc1 = a[(a["layer"] == "3") & (a["transform"] == "flip_h")][column].iloc[0]
        assert fc1 < 1e-6, generator


def test_a_same_padded_export_is_exact_at_the_aligned_size_it_finds(tmp_path) -> None:
    # TF-"same" pads computed from Shape in a dynamic ONNX export (timm's Conv2dSame): every
    # grid after the first pad was unknown, and --input-size aligned refused.
    from models_zoo import d4_symmetrise_, same_net

    path = tmp_path / "same.onnx"
    torch.onnx.export(
        d4_symmetrise_(same_net(frozen=False)),
        (torch.zeros(1, 3, 64, 64),),
        str(path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "B", 2: "H", 3: "W"}},
    )
    result = eqaudit.audit(str(path), "d4", input_size=64, align_input=True, num_images=4)
    assert result.summary["geometry"]["input_size"] == [65, 65]  # at 64 the pads are (0, 1)
    spatial = _rows(result)
    assert {r["op"] for r in spatial} >= {"Pad", "Conv"}
    assert all(r["comparison"] == "exact" and r["scored"] for r in spatial)
    assert max(r["relative_error_max"] for r in spatial) < 1e-5


def test_aligned_sizes_of_a_module_that_computes_its_pads_in_python() -> None:
    # TF-"same" pads computed in Python are frozen in the trace at the requested size: the
    # search replayed that trace and picked 35 for aligned:34, and the audit at 35 ran on it
    # (a 2-cell offset read as 1: exact rows, scored, at 0.07). Each size is judged on its own
    # trace now, and the audit runs on the one at the size picked.
    from models_zoo import d4_symmetrise_, same_net

    model = d4_symmetrise_(same_net(frozen=True))
    result = eqaudit.audit(model, "d4", input_size=34, align_input=True, num_images=4)
    assert result.summary["geometry"]["input_size"] == [33, 33]  # 35 pads (0, 1) at the 2nd
    spatial = _rows(result)
    assert spatial and all(r["comparison"] == "exact" and r["scored"] for r in spatial)
    assert max(r["relative_error_max"] for r in spatial) < 1e-5
    direct = eqaudit.audit(model, "d4", input_size=35, num_images=2)  # its own trace at 35
    assert direct.summary["geometry"]["misaligned_pairs"] > 0


class OddSizesOnly(nn.Module):
    """A stride-2 conv that refuses even sizes (an HRNet's branches that cannot be summed)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 == 0:
            raise ValueError("this model takes odd sizes only")
        return self.head(self.conv(x).mean((2, 3)))


def test_aligned_search_from_a_size_the_module_cannot_run_at() -> None:
    # aligned:64 refused ("this model's graph does not give them (TorchScript, or a module
    # torch.export cannot trace)"): the trace at 64 fails where the model fails.
    torch.manual_seed(0)
    result = eqaudit.audit(OddSizesOnly(), "flips", input_size=64, align_input=True, num_images=2)
    assert result.summary["geometry"]["input_size"] == [65, 65]


class DataDependent(nn.Module):
    """Control flow on the data: torch.export cannot trace it, at any size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.abs().sum() > 1e9:
            y = y * 2
        return self.head(y.mean((2, 3)))


def test_aligned_search_on_a_module_that_cannot_be_traced_says_why(monkeypatch) -> None:
    # (review) it traced 33 sizes near 64 before refusing, and the refusal said "TorchScript,
    # or a module torch.export cannot trace" whatever the cause. A model that runs at the size
    # asked for is not traced elsewhere.
    import eqaudit.models.torch_adapter as torch_adapter

    traces = []
    export = torch_adapter.export_grid_graph
    monkeypatch.setattr(
        torch_adapter, "export_grid_graph", lambda *a, **k: traces.append(1) or export(*a, **k)
    )
    with pytest.raises(eqaudit.errors.UsageError, match=r"torch\.export failed") as err:
        eqaudit.audit(DataDependent(), "flips", input_size=64, align_input=True, num_images=2)
    assert "data-dependent" in str(err.value) and len(traces) == 1

"""Known-answer audits (DESIGN.md section 6) through the whole engine, both backends."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from models_zoo import (
    OrbitAverage,
    PositionalBias,
    SmallCNN,
    calibrate_,
    export_onnx,
    symmetric_cnn,
)
from torch import nn

import eqaudit
from eqaudit.transforms import D4_NAMES

D4 = list(D4_NAMES.values())


def _max_layer_error(result, transform=None) -> float:
    rows = [r for r in result.layers if r["measurable"]]
    if transform:
        rows = [r for r in rows if r["transform"] == transform]
    return max(r["relative_error_max"] for r in rows)


@pytest.fixture(scope="module")
def sym_model() -> nn.Module:
    return symmetric_cnn(seed=0)


@pytest.fixture(scope="module")
def sym_torch(sym_model):
    return eqaudit.audit(sym_model, "d4", input_size=33, num_images=12, seed=3)


@pytest.fixture(scope="module")
def sym_onnx(sym_model, tmp_path_factory):
    path = export_onnx(sym_model, tmp_path_factory.mktemp("sym") / "sym.onnx", 33)
    return eqaudit.audit(path, "d4", num_images=12, seed=3)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_d4_symmetric_cnn_is_exactly_invariant_at_aligned_size(backend, sym_torch, sym_onnx):
    result = sym_torch if backend == "torch" else sym_onnx
    assert [r["transform"] for r in result.outputs] == D4
    for row in result.outputs:
        assert row["n"] == 12
        assert row["agreement"] == 1.0
        assert row["js_divergence"] < 1e-6
        assert row["logit_error"] < 1e-5
    # Every spatial layer is compared under the element's action on its own grid.
    spatial = [r for r in result.layers if r["kind"] == "spatial"]
    assert len({r["layer"] for r in spatial}) >= 3
    assert all(r["measurable"] for r in result.layers)
    assert _max_layer_error(result) < 1e-5
    assert result.score > 99.9999
    assert result.scores["orbit_consistency"] == 1.0


def test_identity_gives_exactly_zero(sym_torch):
    identity = sym_torch.output("id")
    assert identity["agreement"] == 1.0
    assert identity["js_divergence"] == 0.0
    assert identity["logit_error"] == 0.0
    assert all(r["relative_error_max"] == 0.0 for r in sym_torch.layers if r["transform"] == "id")


def test_onnx_and_torch_give_the_same_numbers(sym_torch, sym_onnx):
    for a, b in zip(sym_torch.outputs, sym_onnx.outputs, strict=True):
        assert a["transform"] == b["transform"]
        assert a["agreement"] == b["agreement"]
        assert abs(a["js_divergence"] - b["js_divergence"]) < 1e-5
        assert abs(a["logit_error"] - b["logit_error"]) < 1e-5
    assert abs(sym_torch.score - sym_onnx.score) < 1e-5
    # Same per-image predictions through both loaders.
    pa, pb = sym_torch.predictions, sym_onnx.predictions
    assert (pa["top1"].to_numpy() == pb["top1"].to_numpy()).all()
    np.testing.assert_allclose(pa["confidence"], pb["confidence"], atol=1e-5)
    # The conv outputs of both backends agree on the (exact) per-layer errors.
    conv_t = [r for r in sym_torch.layers if r["op"] == "Conv2d"]
    conv_o = [r for r in sym_onnx.layers if r["op"] == "Conv"]
    assert len(conv_t) == len(conv_o) == 3 * 8
    for a, b in zip(conv_t, conv_o, strict=True):
        assert a["transform"] == b["transform"] and a["shape"] == b["shape"]
        assert a["stride"] == b["stride"]
        assert abs(a["relative_error"] - b["relative_error"]) < 1e-5
    # The pooled features once each: the nn.Flatten after the pool holds the pool's values (an
    # ONNX graph's Flatten is not a layer), so counting it would weigh them twice in the score.
    assert not [r for r in sym_torch.layers if r["layer"] == "flatten"]
    pool_t = [r for r in sym_torch.layers if r["op"] == "AdaptiveAvgPool2d"]
    pool_o = [r for r in sym_onnx.layers if r["op"] == "GlobalAveragePool"]
    assert len(pool_t) == len(pool_o) == 8


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_layer_seen_again_through_a_view_is_one_layer(memory_format) -> None:
    """Dropout (eval) and Flatten hand out their input's memory: one layer, not three. An
    in-place ReLU also hands out its input's memory, with new values: a layer of its own. A
    model in channels_last memory format too (its maps are not 'contiguous': the Dropout was a
    layer of its own there, a MobileNet had 61 layers for 59)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)
            self.drop = nn.Dropout2d(0.5)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(4 * 9 * 9, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.drop(self.relu(self.conv(x)))
            return self.fc(self.flat(torch.tanh(self.conv2(x))))

    torch.manual_seed(0)
    model = Net().to(memory_format=memory_format)
    result = eqaudit.audit(model, "flips", input_size=9, num_images=4)
    assert list(dict.fromkeys(r["layer"] for r in result.layers)) == [
        "conv",
        "relu",
        "conv2",
        "flat",
    ]


def test_misaligned_size_breaks_the_per_layer_comparison(sym_model):
    # 32 is even: the stride-2 grids are not centred, so rot90 no longer maps cells onto cells.
    result = eqaudit.audit(sym_model, "c4", input_size=32, num_images=6)
    assert _max_layer_error(result, "rot90") > 1e-2


def test_positional_bias_breaks_invariance(sym_model):
    biased = PositionalBias(sym_model, 33).eval()
    result = eqaudit.audit(biased, "d4", input_size=33, num_images=12, seed=3)
    clean = eqaudit.audit(sym_model, "d4", input_size=33, num_images=12, seed=3)
    worst_js = max(r["js_divergence"] for r in result.outputs[1:])
    assert worst_js > 1e-2
    assert min(r["agreement"] for r in result.outputs[1:]) < 1.0
    assert result.score < clean.score - 5
    assert result.scores["orbit_consistency"] < 1.0


def test_orbit_average_is_invariant_while_inner_layers_are_not():
    torch.manual_seed(5)
    model = OrbitAverage(calibrate_(SmallCNN(), 33)).eval()
    result = eqaudit.audit(model, "d4", input_size=33, num_images=8)
    for row in result.outputs:
        assert row["agreement"] == 1.0
        assert row["js_divergence"] < 1e-9
        assert row["logit_error"] < 1e-5
    # The inner network is called once per orbit element; its first call sees T_g x, whose
    # feature map is not T_g of the reference's.
    inner = [r for r in result.layers if r["layer"].startswith("inner.conv1")]
    assert inner and max(r["relative_error"] for r in inner if r["transform"] != "id") > 0.1


def test_circular_stride1_cnn_is_shift_equivariant_at_every_layer():
    torch.manual_seed(2)
    model = SmallCNN(padding_mode="circular", stride=1).eval()
    result = eqaudit.audit(model, "shift:1,3", shift_mode="circular", input_size=24, num_images=6)
    assert len(result.outputs) == 1 + 8
    assert all(r["measurable"] for r in result.layers)
    assert _max_layer_error(result) < 1e-5
    assert all(r["agreement"] == 1.0 for r in result.outputs)


def test_shift_not_divisible_by_stride_is_not_measurable():
    torch.manual_seed(2)
    model = SmallCNN(padding_mode="circular", stride=2).eval()
    result = eqaudit.audit(model, "shift:1,4", shift_mode="circular", input_size=32, num_images=4)
    conv3_1 = result.layer("conv3", "shift_x+1")
    assert conv3_1["stride"] == "4x4"
    assert conv3_1["measurable"] is False and conv3_1["relative_error"] is None
    assert "cells at stride" in conv3_1["reason"]
    conv3_4 = result.layer("conv3", "shift_x+4")
    assert conv3_4["measurable"] is True
    # A circular CNN with stride 2 whose input size is divisible by its stride is exactly
    # equivariant to shifts by multiples of the stride.
    assert conv3_4["relative_error_max"] < 1e-5


class NHWCProbsNet(nn.Module):
    """NHWC input (TensorFlow origins) and softmaxed outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.body = SmallCNN(classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(x.permute(0, 3, 1, 2)), dim=1)


def test_nhwc_batch1_probs_bgr_255_matches_hand_reference(tmp_path):
    path = export_onnx(
        NHWCProbsNet().eval(), tmp_path / "nhwc.onnx", 17, nhwc=True, dynamic_batch=False
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 17, 17, 3), dtype=np.uint8)
    mean, std = (103.9, 116.8, 123.7), (57.4, 57.1, 58.4)
    result = eqaudit.audit(
        path, "flips", data=images, channels="bgr", scale=255.0, mean=mean, std=std, batch_size=6
    )
    spec = result.summary["model"]["input"]
    # The graph is fixed at batch 1; its dynamic-batch copy runs, checked against the reference
    # below, which runs the file one image at a time.
    assert (spec["layout"], spec["batch"], spec["channels"]) == ("NHWC", None, 3)
    assert result.summary["model"]["fixed_batch"] == {"size": 1, "run": "batched"}
    assert result.summary["model"]["output_kind"] == "probs"
    assert result.outputs[1]["logit_error"] is None  # not defined for probability outputs

    # Reference by hand: transform in pixel space, then BGR, x255, mean/std, NHWC, one at a time.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = images.astype(np.float64) / 255.0
    ops = {"id": lambda a: a, "flip_h": lambda a: a[:, ::-1], "flip_v": lambda a: a[::-1]}

    def run(img: np.ndarray) -> np.ndarray:
        x = (img[..., ::-1] * 255.0 - np.array(mean)[::-1]) / np.array(std)[::-1]
        (p,) = session.run(None, {"image": x[None].astype(np.float32)})
        return p[0].astype(np.float64)

    ref = np.stack([run(img) for img in pixels])
    for name, op in ops.items():
        out = np.stack([run(op(img)) for img in pixels])
        agree = (out.argmax(1) == ref.argmax(1)).mean()
        m = (ref + out) / 2
        kl = lambda p, q: np.sum(np.where(p > 0, p * np.log2(p / q), 0.0), axis=1)  # noqa: E731
        js = (0.5 * kl(ref, m) + 0.5 * kl(out, m)).mean()
        row = result.output(name)
        assert row["agreement"] == pytest.approx(agree, abs=0)
        assert row["js_divergence"] == pytest.approx(js, abs=1e-6)


def test_probability_outputs_are_detected_and_a_contradicting_option_is_flagged():
    class Probs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = symmetric_cnn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.body(x), dim=1)

    model = Probs().eval()
    auto = eqaudit.audit(model, "flips", input_size=33, num_images=4)
    assert auto.summary["model"]["output_kind"] == "probs"
    assert auto.summary["model"]["output_kind_source"] == "auto"
    forced = eqaudit.audit(model, "flips", input_size=33, num_images=4, outputs="logits")
    assert forced.summary["model"]["output_kind"] == "logits"
    assert any("look like probabilities" in w for w in forced.warnings)
    # The other way round (it was silent): logits taken for probabilities.
    logits = eqaudit.audit(model.body, "flips", input_size=33, num_images=4, outputs="probs")
    assert logits.summary["model"]["output_kind"] == "probs"
    assert any("--outputs probs was given but the outputs are not" in w for w in logits.warnings)


def test_sigmoid_outputs_of_a_multi_label_model_are_flagged() -> None:
    # Every score in [0, 1], rows not summing to 1: read as logits without a word, so the JS
    # divergence was that of softmax(sigmoid probabilities), tiny whatever the model did.
    model = nn.Sequential(symmetric_cnn(), nn.Sigmoid()).eval()
    auto = eqaudit.audit(model, "flips", input_size=33, num_images=4)
    assert auto.summary["model"]["output_kind"] == "logits"
    assert sum("(sigmoid) probabilities of a multi-label model?" in w for w in auto.warnings) == 1
    said = eqaudit.audit(model, "flips", input_size=33, num_images=4, outputs="logits")
    assert not any("multi-label" in w for w in said.warnings)
    plain = eqaudit.audit(symmetric_cnn(), "flips", input_size=33, num_images=4)
    assert not any("multi-label" in w for w in plain.warnings)


class NHWCSymmetric(nn.Module):
    """The D4-symmetric CNN behind a permute: a PyTorch model that takes channels-last images."""

    def __init__(self) -> None:
        super().__init__()
        self.body = symmetric_cnn(size=33)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 3, 1, 2))


def test_a_pytorch_model_taking_nhwc_images_is_audited_as_its_nchw_body(tmp_path):
    model = NHWCSymmetric().eval()
    reference = eqaudit.audit(model.body, "d4", input_size=33, num_images=6, seed=2)
    program = torch.export.export(model, (torch.zeros(2, 33, 33, 3),))
    torch.export.save(program, tmp_path / "nhwc.pt2")
    exported = eqaudit.audit(tmp_path / "nhwc.pt2", "d4", num_images=6, seed=2)
    spec = exported.summary["model"]["input"]
    assert (spec["layout"], spec["layout_source"], spec["channels"]) == ("NHWC", "detected", 3)
    in_memory = eqaudit.audit(model, "d4", input_size=33, num_images=6, seed=2, layout="NHWC")
    for result in (exported, in_memory):
        # The same model on the same images; a permuted input is only rounded differently.
        for got, want in zip(result.outputs, reference.outputs, strict=True):
            assert got["transform"] == want["transform"] and got["agreement"] == want["agreement"]
            assert got["logit_error"] == pytest.approx(want["logit_error"], abs=1e-5)
        # Grids are read through the permute: the exact layers are scored, at ~0.
        assert result.summary["scores"]["layer_relative_error"] < 1e-5
        assert len(result.layers) == len(reference.layers)
    with pytest.raises(eqaudit.errors.ModelRunError, match="--layout"):
        eqaudit.audit(model, "d4", input_size=33, num_images=2)  # fed NCHW: the permute breaks


def test_a_quarter_turn_is_exact_on_a_square_input_and_resampled_on_another() -> None:
    # rot:90 on a 16x24 model was refused ("defined only for square inputs") for a while.
    square = eqaudit.audit(symmetric_cnn(), "rot:90", input_size=33, num_images=4, layers=False)
    assert square.outputs[1]["transform"] == "rot90" and square.outputs[1]["exact"] is True
    assert square.outputs[1]["logit_error"] < 1e-5  # D4-symmetric weights at an aligned size
    wide = eqaudit.audit(
        symmetric_cnn(), "rot:90,180", input_size=(16, 24), num_images=4, layers=False
    )
    exact = {row["transform"]: row["exact"] for row in wide.outputs}
    assert exact == {"id": True, "rot90": False, "rot180": True}
    assert wide.outputs[1]["skipped"] is None and wide.outputs[1]["agreement"] is not None


class SignedHalves(nn.Module):
    """One logit per image: 8 x (right half's mean - left half's), whose sign a left-right
    mirror flips and an up-down one keeps; ``sigmoid``: its probability instead."""

    def __init__(self, sigmoid: bool = False) -> None:
        super().__init__()
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        z = 8 * (x[..., w:].mean((1, 2, 3)) - x[..., :w].mean((1, 2, 3)))[:, None]
        return torch.sigmoid(z) if self.sigmoid else z


def test_a_binary_classifier_with_one_score_is_read_as_two_classes() -> None:
    from eqaudit.reports.html import render_html

    # One score per image gave agreement 1, JS 0 and score 100 whatever the model did: one
    # class is always the top-1 class (review). A logit z is read as scores [0, z], a
    # probability p as [1 - p, p]; the same model gives the same numbers either way.
    images = torch.rand(6, 3, 16, 16)
    results = [
        eqaudit.audit(
            SignedHalves(sigmoid).eval(), "flips", images.numpy(), input_size=16, layers=False
        )
        for sigmoid in (False, True)
    ]
    z = SignedHalves()(images).squeeze(1).double()
    p = torch.sigmoid(z)
    own, mirrored = torch.stack([1 - p, p], 1), torch.stack([p, 1 - p], 1)
    m = (own + mirrored) / 2
    kl = lambda a, b: (a * torch.log2(a / b)).sum(1)  # noqa: E731
    js = (0.5 * kl(own, m) + 0.5 * kl(mirrored, m)).mean().item()
    for result, kind in zip(results, ("logits", "probs"), strict=True):
        assert result.summary["model"]["num_classes"] == 2
        assert result.summary["model"]["output_kind"] == kind
        assert result.summary["model"]["binary"] == kind
        read = "[0, z]" if kind == "logits" else "[1 − p, p]"
        html = render_html(result)
        assert f"(one score per image, read as {read})" in html
        # Methods says why a binary logit's error is large near the decision boundary.
        assert ("near the decision boundary" in html) == (kind == "logits")
        assert result.output("flip_h")["agreement"] == 0.0  # every decision flips
        assert result.output("flip_h")["js_divergence"] == pytest.approx(js, rel=1e-5)
        assert result.output("flip_v")["agreement"] == 1.0
        assert result.summary["preprocessing"]["notes"][-1].startswith(
            "the model gives one score per image, read as a binary classifier's "
            + ("logit z: scores [0, z]" if kind == "logits" else "probability p: scores [1 - p, p]")
        )
    # A mirror that swaps the two classes, declared: then it is equivariant.
    swapped = eqaudit.audit(
        SignedHalves().eval(),
        "flips",
        images.numpy(),
        input_size=16,
        layers=False,
        label_action={"flip_h": "swap:0,1", "flip_v": "id"},
    )
    assert swapped.output("flip_h")["agreement"] == 1.0
    # Its Lie derivatives read the same two classes (the centred logit of one class is 0).
    lie = eqaudit.audit(
        SignedHalves().eval(), "flips", images.numpy(), input_size=16, layers=False, lie=True
    )
    rotation = next(r for r in lie.summary["lie"]["outputs"] if r["generator"] == "rotation")
    assert rotation["mean"] > 0.01


def test_a_binary_score_of_shape_batch_gives_no_false_determinism_warning() -> None:
    # A (B,) score (z.squeeze(1)) ran the determinism check on other shapes than the batch's:
    # "depends on the other images of its batch (by 0.9)" for a deterministic model (review).
    class Squeezed(SignedHalves):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).squeeze(1)

    images = torch.rand(4, 3, 16, 16).numpy()
    squeezed = eqaudit.audit(Squeezed().eval(), "flips", images, layers=False)
    column = eqaudit.audit(SignedHalves().eval(), "flips", images, layers=False)
    assert not squeezed.warnings and squeezed.outputs == column.outputs


def test_a_module_handing_out_several_maps_is_not_a_layer_of_its_first() -> None:
    """A backbone returning (stage1, stage2) was a layer named 'backbone' holding stage 1's map
    again (its first tensor), listed after stage 2 (review)."""

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stage1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.stage2 = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            one = self.stage1(x)
            return one, self.stage2(one)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = Backbone()
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            one, two = self.backbone(x)
            return self.fc(torch.cat([one.mean((2, 3)), two.mean((2, 3))], 1))

    torch.manual_seed(0)
    result = eqaudit.audit(Net(), "flips", input_size=9, num_images=2)
    names = list(dict.fromkeys(r["layer"] for r in result.layers))
    assert names == [
        "backbone.stage1.0",
        "backbone.stage1.1",
        "backbone.stage2.0",
        "backbone.stage2.1",
    ]

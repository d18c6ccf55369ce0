"""Lie derivatives: tangents against finite transforms, AD against central differences, exactly
invariant oracles, and the telescoping sum of per-layer contributions."""

from __future__ import annotations

import math

import pytest
import torch
from models_zoo import PositionalBias, SmallCNN, calibrate_, export_onnx
from torch import nn

from eqaudit.data import synthetic_images
from eqaudit.data.preprocess import make_preprocessing
from eqaudit.lie import (
    GENERATORS,
    LieAccumulator,
    LieStats,
    feature_tangent,
    image_tangent,
    lie_batch,
    normalised_derivative,
    transform_pixels,
)
from eqaudit.metrics.functional import normalised_logit_error
from eqaudit.models.base import InputSpec
from eqaudit.models.onnx_adapter import load_onnx
from eqaudit.models.torch_adapter import TorchAdapter
from eqaudit.transforms.elements import Rotation, Shift

SIZE = 17
IMAGENET = make_preprocessing(preset="imagenet")
#: Zero mean: black (the rotation's zero fill) stays zero after normalisation.
ZERO_MEAN = make_preprocessing(std=0.5)


def _adapter(model: nn.Module, size: int = SIZE, channels: int = 3) -> TorchAdapter:
    spec = InputSpec("x", "NCHW", channels, size, size, None)
    return TorchAdapter.from_module(model, input_spec=spec)


def _images(n: int = 4, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return synthetic_images(n, (size, size), 3, seed=seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` over the whole batch."""
    return float((a - b).norm() / b.norm())


def smooth_cnn(size: int = SIZE, seed: int = 0) -> nn.Module:
    """SmallCNN with Softplus activations: differentiable everywhere, so AD and central
    differences agree up to truncation and round-off (ReLU kinks would blur the comparison)."""
    torch.manual_seed(seed)
    model = calibrate_(SmallCNN(), size)
    model.relu1, model.relu2, model.relu3 = nn.Softplus(3), nn.Softplus(3), nn.Softplus(3)
    return model.eval()


class Energy(nn.Module):
    """1x1 channel mix (no bias) -> square -> spatial mean -> linear: a function of the energies
    ``||sum_c a_c x_c||^2``. Every generator here is an antisymmetric matrix acting on each
    channel, so ``d/dt ||y||^2 = 2 y^T X y = 0``: exactly invariant to all three."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.mix = nn.Conv2d(3, 6, 1, bias=False)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(10 * self.mix(x).square().mean(dim=(2, 3)))


class CircularSquareCNN(nn.Module):
    """Circular 3x3 convs (linear) -> square -> global average -> linear. The Fourier derivative
    commutes with circular convolution and is antisymmetric, so the translation derivative is
    exactly zero; a 3x3 filter does not commute with rotation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular")
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.conv1(x)).square().mean(dim=(2, 3)))


def chain() -> tuple[nn.Module, list[tuple[str, tuple | None]]]:
    """A Sequential chain and every link with its output grid (input 17: centred grids)."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Softplus(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    full, half = (1.0, 1.0, 0.0, 0.0), (2.0, 2.0, 0.0, 0.0)
    grids = [full, full, half, half, half, None, None, None]
    return model, [(str(i), g) for i, g in enumerate(grids)]


# -- tangents -------------------------------------------------------------------------------------
def test_translation_tangent_is_the_limit_of_fourier_shifts() -> None:
    x = torch.rand(2, 3, SIZE, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for g in ("translate_x", "translate_y"):
        v = image_tangent(x, g)
        h = 1e-4
        fd = (transform_pixels(x, g, h) - transform_pixels(x, g, -h)) / (2 * h)
        assert float((fd - v).abs().max()) < 1e-7 * float(v.abs().max())  # O(h^2)


def test_rotation_tangent_is_the_limit_of_rotate() -> None:
    x = torch.rand(2, 3, SIZE, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = image_tangent(x, "rotation")
    scale = float(v.abs().max())

    def central(h: float) -> torch.Tensor:
        return (transform_pixels(x, "rotation", h) - transform_pixels(x, "rotation", -h)) / (2 * h)

    # The cubic kernel is C1 at the nodes: a plain central difference converges as O(h) ...
    e1, e2 = (float((central(h) - v).abs().max()) / scale for h in (1e-4, 1e-5))
    assert e2 < 1e-3 and 8 < e1 / e2 < 12
    # ... and Richardson's 2 D(h) - D(2h) removes that term.
    richardson = 2 * central(1e-4) - central(2e-4)
    assert float((richardson - v).abs().max()) < min(1e-5, e1 / 30) * scale


def test_ramp_closed_forms() -> None:
    height, width = 11, 9
    cy, cx = (height - 1) / 2, (width - 1) / 2
    ii = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    jj = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width)
    inner = (slice(1, -1), slice(1, -1))  # away from the zero fill
    # The Catmull-Rom kernel (Keys a = -0.5) reproduces ramps: the continuous tangent, exactly.
    v = image_tangent(jj[None, None], "rotation")[0, 0]
    torch.testing.assert_close(v[inner], (-(ii - cy))[inner], rtol=0, atol=1e-12)
    v = image_tangent(ii[None, None], "rotation")[0, 0]
    torch.testing.assert_close(v[inner], (jj - cx)[inner], rtol=0, atol=1e-12)
    # A constant image turns into itself inside; only the zero-filled border moves.
    v = image_tangent(torch.ones(1, 1, height, width, dtype=torch.float64), "rotation")[0, 0]
    assert float(v[inner].abs().max()) == 0.0 and float(v.abs().max()) > 0.5
    # Translations are band-limited: a sinusoid moving right by t has tangent -d/dx exactly.
    k = 2
    w = 2 * math.pi * k / width
    wave = torch.sin(w * jj)[None, None]
    v = image_tangent(wave, "translate_x")[0, 0]
    torch.testing.assert_close(v, -w * torch.cos(w * jj), rtol=0, atol=1e-12)
    assert float(image_tangent(wave, "translate_y").abs().max()) < 1e-12


def test_feature_tangent_on_a_strided_grid_is_the_image_motion_in_cells() -> None:
    # A map sampling the image at every second pixel (offset 0, input 17 -> 9 cells): the same
    # rotation about the image centre, one pixel of translation is half a cell.
    x = torch.rand(1, 2, 9, 9, dtype=torch.float64)
    grid = (2.0, 2.0, 0.0, 0.0)
    torch.testing.assert_close(
        feature_tangent(x, "rotation", grid, (17, 17)), image_tangent(x, "rotation")
    )
    torch.testing.assert_close(
        feature_tangent(x, "translate_x", grid, (17, 17)), image_tangent(x, "translate_x") / 2
    )
    # Off-centre grid: rotation about the true centre (8, 8) = cell (3.5, 3.5) at offset 1.
    ramp = torch.arange(9, dtype=torch.float64)[None, None, None, :].expand(1, 1, 9, 9)
    v = feature_tangent(ramp, "rotation", (2.0, 2.0, 1.0, 1.0), (17, 17))[0, 0]
    rows = torch.arange(9, dtype=torch.float64)[:, None].expand(9, 9)
    torch.testing.assert_close(v[1:-1, 1:-1], (-(rows - 3.5))[1:-1, 1:-1])
    assert float(feature_tangent(torch.rand(2, 5), "rotation", grid, (17, 17)).abs().max()) == 0


# -- AD against central differences ----------------------------------------------------------------
@pytest.fixture(scope="module")
def smooth() -> TorchAdapter:
    return _adapter(smooth_cnn())


def test_forward_mode_ad_matches_central_differences(smooth) -> None:
    pixels = _images(6)
    ad = lie_batch(smooth, pixels, IMAGENET, "logits")
    fd = lie_batch(smooth, pixels, IMAGENET, "logits", method="fd")
    assert ad.method == "forward-mode AD" and ad.steps == {}
    # 0.05 px at the corner, r_max = hypot(8, 8): 0.05 / 11.31 rad.
    assert fd.method.startswith("central differences, step 0.00442 rad (rotation, Richardson")
    assert fd.steps["translate_x"] == 0.05
    for g in GENERATORS:
        assert _rel(fd.tangents[g], ad.tangents[g]) < 0.02, g
        assert float(ad.output[g].min()) > 1e-3  # the comparison is not between two zeros
    assert _rel(fd.output["rotation"], ad.output["rotation"]) < 0.02


def test_onnx_central_differences_match_torch_ad(smooth, tmp_path) -> None:
    path = export_onnx(smooth.module, tmp_path / "smooth.onnx", SIZE)
    onnx = load_onnx(path)
    pixels = _images(4)
    ad = lie_batch(smooth, pixels, IMAGENET, "logits")
    fd = lie_batch(onnx, pixels, IMAGENET, "logits", layers=[("conv1", None)])
    assert fd.method.startswith("central differences")
    for g in GENERATORS:
        assert _rel(fd.tangents[g], ad.tangents[g]) < 0.02, g
    assert "PyTorch module" in fd.skipped["conv1"]
    assert not any(fd.contributions.values())


def test_torchscript_uses_central_differences_and_fixed_batches_are_chunked(smooth) -> None:
    pixels = _images(3)
    ad = lie_batch(smooth, pixels, IMAGENET, "logits")
    scripted = _adapter(torch.jit.trace(smooth.module, torch.zeros(1, 3, SIZE, SIZE)))
    fd = lie_batch(scripted, pixels, IMAGENET, "logits", layers=[("conv1", None)])
    assert fd.method.startswith("central differences") and "conv1" in fd.skipped
    for g in GENERATORS:
        assert _rel(fd.tangents[g], ad.tangents[g]) < 0.02, g
    # A model fixed at batch 2 gets 3 images as two padded chunks, AD and hooks included.
    model, layers = chain()
    fixed = TorchAdapter.from_module(model, input_spec=InputSpec("x", "NCHW", 3, SIZE, SIZE, 2))
    free = _adapter(model)
    a = lie_batch(fixed, pixels, IMAGENET, "logits", layers=layers[:3])
    b = lie_batch(free, pixels, IMAGENET, "logits", layers=layers[:3])
    for g in GENERATORS:
        torch.testing.assert_close(a.tangents[g], b.tangents[g])
        torch.testing.assert_close(a.contributions[g]["2"], b.contributions[g]["2"])


def test_small_steps_predict_the_audits_logit_error(smooth) -> None:
    # For small t the normalised logit error of the finite transform is |t| L.
    pixels = _images(4)
    lie = lie_batch(smooth, pixels, IMAGENET, "logits")
    z = smooth.run(IMAGENET.normalise(pixels)).scores
    t_rad, t_px = 1e-3, 2e-2
    finite = {
        "rotation": Rotation(math.degrees(t_rad)).apply_image(pixels, 0),
        "translate_x": Shift(0, t_px).apply_image(pixels, 0),
        "translate_y": Shift(t_px, 0).apply_image(pixels, 0),
    }
    for g, moved in finite.items():
        error = normalised_logit_error(z, smooth.run(IMAGENET.normalise(moved)).scores)
        t = t_rad if g == "rotation" else t_px
        # O(t^2) terms matter only where L itself is tiny
        atol = 0.01 * float(lie.output[g].max())
        torch.testing.assert_close(error / t, lie.output[g], rtol=0.03, atol=atol)


def test_an_op_without_forward_ad_falls_back_to_central_differences() -> None:
    class Square(torch.autograd.Function):  # backward only: no jvp formula
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    class Custom(CircularSquareCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(Square.apply(self.conv2(self.conv1(x))).mean(dim=(2, 3)))

    pixels = _images(3)
    fallback = lie_batch(_adapter(Custom()), pixels, IMAGENET, "logits")
    reference = lie_batch(_adapter(CircularSquareCNN()), pixels, IMAGENET, "logits")
    assert fallback.method.startswith("central differences")
    assert "forward-mode AD failed" in fallback.method
    assert _rel(fallback.tangents["rotation"], reference.tangents["rotation"]) < 0.02
    with pytest.raises(NotImplementedError):
        lie_batch(_adapter(Custom()), pixels, IMAGENET, "logits", method="ad")


def test_probability_outputs_use_the_plain_norm(smooth) -> None:
    probs_model = _adapter(nn.Sequential(smooth.module, nn.Softmax(dim=1)))
    pixels = _images(3)
    logits = lie_batch(smooth, pixels, IMAGENET, "logits", generators=("translate_y",))
    probs = lie_batch(probs_model, pixels, IMAGENET, "probs", generators=("translate_y",))
    p = torch.softmax(logits.scores.double(), dim=1)
    dz = logits.tangents["translate_y"]
    dp = p * (dz - (p * dz).sum(dim=1, keepdim=True))  # the softmax's Jacobian
    torch.testing.assert_close(probs.output["translate_y"], dp.norm(dim=1), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        probs.output["translate_y"],
        normalised_derivative(probs.scores, dp, "probs"),
        rtol=1e-4,
        atol=1e-7,
    )


# -- known answers ----------------------------------------------------------------------------------
def test_energy_model_is_exactly_invariant_and_a_positional_bias_is_not() -> None:
    pixels = _images(4)
    exact = lie_batch(_adapter(Energy()), pixels, ZERO_MEAN, "logits")
    biased_model = PositionalBias(Energy(), SIZE, strength=2.0)
    biased = lie_batch(_adapter(biased_model), pixels, ZERO_MEAN, "logits")
    for g in GENERATORS:
        assert float(exact.output[g].max()) < 1e-7, g
        assert float(biased.output[g].min()) > 1e-4, g


def test_circular_cnn_has_zero_translation_and_nonzero_rotation_derivative() -> None:
    lie = lie_batch(_adapter(CircularSquareCNN()), _images(4), IMAGENET, "logits")
    assert float(lie.output["translate_x"].max()) < 1e-7
    assert float(lie.output["translate_y"].max()) < 1e-7
    assert float(lie.output["rotation"].min()) > 0.01


# -- per-layer attribution --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ad", "fd"])
def test_contributions_of_a_chain_sum_to_the_total(method) -> None:
    model, layers = chain()
    pixels = _images(3)
    lie = lie_batch(_adapter(model), pixels, IMAGENET, "logits", layers=layers, method=method)
    assert lie.skipped == {}
    tol = 1e-5 if method == "ad" else 0.02
    for g in GENERATORS:
        parts = lie.contributions[g]
        assert list(parts) == [name for name, _ in layers]
        total = torch.stack(list(parts.values())).sum(0)
        assert _rel(total, lie.tangents[g]) < tol, g
        # Flatten and linear act on flat features, where the generator is zero.
        scale = float(lie.tangents[g].abs().max())
        for name in ("6", "7"):
            assert float(parts[name].abs().max()) < 1e-6 * scale
        # A pointwise tanh is not: a discrete derivative has no chain rule,
        # d(tanh u) != tanh'(u) du (aliasing, as Gruver et al. found for activations).
        assert float(parts["1"].abs().max()) > 1e-3 * scale
        assert lie.layers[g]["0"].shape == (3,)


def test_input_grid_follows_from_a_conv_when_its_producer_is_not_audited() -> None:
    model, layers = chain()
    pixels = _images(2)
    whole = lie_batch(_adapter(model), pixels, IMAGENET, "logits", layers=layers)
    alone = lie_batch(_adapter(model), pixels, IMAGENET, "logits", layers=[layers[2]])
    for g in GENERATORS:
        torch.testing.assert_close(alone.contributions[g]["2"], whole.contributions[g]["2"])


def test_layers_without_a_grid_or_a_single_input_are_skipped_with_a_reason() -> None:
    class Adds(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.add = Adds()
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.head(self.add(y, torch.tanh(y)).mean(dim=(2, 3)))

    lie = lie_batch(
        _adapter(Net()),
        _images(2),
        IMAGENET,
        "logits",
        layers=[("conv", None), ("add", (1, 1, 0, 0)), ("head", None), ("nope", None)],
    )
    assert "output grid" in lie.skipped["conv"]
    assert "2 tensor inputs" in lie.skipped["add"]
    assert "not a hookable module" in lie.skipped["nope"]
    assert list(lie.contributions["rotation"]) == ["head"]


# -- accumulators -----------------------------------------------------------------------------------
def test_lie_stats_merge_equals_the_whole() -> None:
    values = torch.rand(101, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 30
    whole, a, b = LieStats(), LieStats(), LieStats()
    whole.update(values)
    a.update(values[:40])
    b.update(values[40:])
    merged = a.merge(b).compute()
    for key, value in whole.compute().items():
        assert merged[key] == pytest.approx(value, rel=1e-12)
    stats = whole.compute()
    assert stats["mean"] == pytest.approx(float(values.mean()), rel=1e-12)
    assert stats["std"] == pytest.approx(float(values.std(unbiased=False)), rel=1e-9)
    assert stats["max"] == float(values.max())
    exact = float(values.sort().values[math.ceil(0.95 * 101) - 1])
    assert exact <= stats["p95"] <= exact * 1.05


def test_accumulator_rows(smooth) -> None:
    model, layers = chain()
    adapter = _adapter(model)
    first = lie_batch(adapter, _images(2, seed=1), IMAGENET, "logits", layers=layers[:3])
    second = lie_batch(adapter, _images(3, seed=2), IMAGENET, "logits", layers=layers[:3])
    acc_a, acc_b, whole = LieAccumulator(), LieAccumulator(), LieAccumulator()
    acc_a.update(first)
    acc_b.update(second)
    whole.update(first)
    whole.update(second)
    merged = acc_a.merge(acc_b)
    assert merged.output_rows() == whole.output_rows()
    rows = merged.output_rows()
    assert [r["generator"] for r in rows] == list(GENERATORS)
    assert rows[0]["unit"] == "per radian" and rows[0]["n"] == 5
    assert rows[0]["method"] == "forward-mode AD"
    layer_rows = merged.layer_rows()
    assert [(r["layer"], r["generator"]) for r in layer_rows[:3]] == [
        ("0", "rotation"),
        ("0", "translate_x"),
        ("0", "translate_y"),
    ]
    assert len(layer_rows) == 9

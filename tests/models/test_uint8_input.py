"""Models that take uint8 pixels (0-255) and normalise them themselves, as TF and TFLite
conversions do: fed 0-255 values rounded after each transform, in ONNX and .pt2 alike."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import eqaudit
from eqaudit.errors import UsageError

SIZE = 12


class Normalised(nn.Module):
    """A conv net on [0, 1] pixels, normalised inside: ``(x - 0.5) / 0.25``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv((x - 0.5) / 0.25))
        return self.fc(y.amax((2, 3)))


class Uint8Pixels(nn.Module):
    """The same net taking uint8 pixels: ``x / 255`` first."""

    def __init__(self, inner: Normalised) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float() / 255.0)


def _exported(tmp_path: Path, fmt: str) -> Path:
    torch.manual_seed(0)
    model = Uint8Pixels(Normalised()).eval()
    example = torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8)
    path = tmp_path / f"m.{fmt}"
    if fmt == "pt2":
        batch = torch.export.Dim("batch")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, path)
        return path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["scores"],
            dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}},
        )
    return path


def _pixels() -> np.ndarray:
    """Images that are whole 0-255 values, as uint8 (N, H, W, C): the D4 elements move them
    without interpolating, so rounding changes nothing."""
    return np.random.default_rng(0).integers(0, 256, size=(6, SIZE, SIZE, 3)).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_uint8_model_gives_the_numbers_of_its_float_twin(tmp_path, fmt):
    result = eqaudit.audit(str(_exported(tmp_path, fmt)), "d4", data=_pixels(), seed=0)
    assert result.summary["model"]["input"]["dtype"] == "uint8"
    assert result.summary["preprocessing"]["scale"] == 255.0
    torch.manual_seed(0)
    twin = Uint8Pixels(Normalised()).eval().inner  # the same weights, on [0, 1] pixels
    expected = eqaudit.audit(twin, "d4", data=_pixels(), input_size=SIZE, seed=0, layers=False)
    for got, want in zip(result.outputs, expected.outputs, strict=True):
        assert got["agreement"] == want["agreement"]
        assert got["logit_error"] == pytest.approx(want["logit_error"], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"preset": "imagenet"}, "normalises them itself: drop --preset"),
        ({"mean": 0.5, "std": 0.2}, "drop --mean and --std"),
        ({"scale": 1.0}, "drop --scale"),
        ({"lie": True}, "--lie needs a float input"),
    ],
)
def test_options_that_would_normalise_uint8_pixels_again_are_refused(tmp_path, options, message):
    path = _exported(tmp_path, "onnx")
    with pytest.raises(UsageError, match=message):
        eqaudit.audit(str(path), "flips", data=_pixels(), **options)

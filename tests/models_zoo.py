"""Tiny models with known answers (DESIGN.md section 6), built in-process for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def d4_symmetrise_(module: nn.Module) -> nn.Module:
    """Replace every conv filter by the mean of its 8 D4 images: the conv commutes with D4."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight
                orbit = [torch.rot90(w, k, (-2, -1)) for k in range(4)]
                orbit += [torch.rot90(torch.flip(w, (-1,)), k, (-2, -1)) for k in range(4)]
                m.weight.copy_(torch.stack(orbit).mean(0))
    return module


class SmallCNN(nn.Module):
    """conv3x3 -> conv3x3/2 -> conv3x3/2 -> global average pool -> linear.

    Grids are centred for odd input sizes (33 -> 17 -> 9) and not for even ones.
    """

    def __init__(
        self, in_channels: int = 3, classes: int = 5, padding_mode: str = "zeros", stride: int = 2
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, padding_mode=padding_mode)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=stride, padding=1, padding_mode=padding_mode)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(16, 16, 3, stride=stride, padding=1, padding_mode=padding_mode)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.norm = Standardise(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(self.norm(self.flatten(self.pool(x))))


class Standardise(nn.Module):
    """Per-feature (x - mean) / std with stored statistics (set by :func:`calibrate_`)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def calibrate_(model: SmallCNN, size: int, seed: int = 123) -> SmallCNN:
    """Standardise the pooled features on synthetic images so that the logits spread (O(1)) and
    predictions differ between images, as a trained model's do."""
    from eqaudit.data import synthetic_images

    images = synthetic_images(64, (size, size), model.conv1.in_channels, seed=seed)
    with torch.no_grad():
        x = model.relu1(model.conv1(images))
        x = model.relu3(model.conv3(model.relu2(model.conv2(x))))
        feats = model.flatten(model.pool(x))
        model.norm.mean.copy_(feats.mean(0))
        model.norm.std.copy_(feats.std(0).clamp_min(1e-6))
        model.fc.weight.mul_(4.0)
    return model


def symmetric_cnn(seed: int = 0, size: int = 33, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return calibrate_(d4_symmetrise_(SmallCNN(**kwargs)), size).eval()


class PositionalBias(nn.Module):
    """Adds a fixed pattern to the input before an otherwise D4-invariant network."""

    def __init__(self, inner: nn.Module, size: int, strength: float = 0.5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        ramp = torch.linspace(-1, 1, size)
        pattern = strength * (ramp[None, :] + 0.5 * ramp[:, None] ** 2)
        self.register_buffer(
            "bias", pattern[None, None] + 0.1 * torch.randn(1, 1, size, size, generator=g)
        )
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + self.bias)


class OrbitAverage(nn.Module):
    """Averages any model's logits over the D4 orbit of its input: exactly invariant output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for flip in (False, True):
            y = torch.flip(x, (-1,)) if flip else x
            for k in range(4):
                outs.append(self.inner(torch.rot90(y, k, (-2, -1))))
        return torch.stack(outs).mean(0)


class ConvHead(nn.Module):
    """A 3x3 conv (3 -> 4 channels) and a linear head over its mean (4 -> 5 classes), for the
    small models whose own forward is what a test is about: layers ``conv`` and ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean((2, 3)))


class Sqrt(ConvHead):
    """Takes [0, 1] pixels: noise probes give NaN scores, real images do not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x.sqrt()))


def export_onnx(
    model: nn.Module,
    path: Path,
    size: int | tuple[int, int],
    channels: int = 3,
    dynamic_batch: bool = True,
    nhwc: bool = False,
    dynamic_size: bool = False,
) -> Path:
    h, w = (size, size) if isinstance(size, int) else size
    shape = (1, h, w, channels) if nhwc else (1, channels, h, w)
    axes = {"image": {0: "batch"}, "scores": {0: "batch"}} if dynamic_batch else None
    if dynamic_size:  # H and W dynamic too (NCHW)
        axes = {"image": {0: "batch", 2: "height", 3: "width"}, "scores": {0: "batch"}}
    torch.onnx.export(
        model,
        (torch.zeros(shape),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["scores"],
        dynamic_axes=axes,
    )
    return path


class ConvSame(nn.Conv2d):
    """TensorFlow's "same" padding (timm's Conv2dSame): the pads computed from the input's size
    in the forward. ``frozen``: as Python ints (constants in an export); else as tensor ops,
    which an export with a dynamic H and W writes as Shape -> Gather -> Div ... -> Pad."""

    frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pads: list = []
        for n, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            n = torch.as_tensor(n)
            total = torch.clamp((torch.div(n + s - 1, s, rounding_mode="floor") - 1) * s + k - n, 0)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, [int(p) for p in pads] if self.frozen else pads)
        return F.conv2d(x, self.weight, self.bias, self.stride)


def same_net(frozen: bool, seed: int = 0) -> nn.Module:
    """Three "same"-padded convs (strides 2, 2, 1), pads computed in the forward, and a linear
    head over their mean."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        ConvSame(3, 4, 3, 2),
        nn.ReLU(),
        ConvSame(4, 4, 3, 2),
        ConvSame(4, 4, 5, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    for module in net.modules():
        if isinstance(module, ConvSame):
            module.frozen = frozen
    return net.eval()

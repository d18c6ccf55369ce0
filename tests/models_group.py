"""C4 group-convolution test models: equivariant with channels permuted, invariant after pooling.

Convention: rot90 is counter-clockwise, ``torch.rot90(x, 1, (-2, -1))`` (as in
:mod:`eqaudit.transforms.elements`). Feature channels come in groups of four, one per
orientation: channel ``4 i + r`` is field ``i`` at orientation ``r``.

Why the channels permute: with ``R`` the rotation and ``*`` cross-correlation,
``(R x) * w = R (x * R^-1 w)``. The lifting layer uses ``w_r = R^r w`` for one base bank ``w``,
so ``lift(R^k x)[4i + r] = R^k lift(x)[4i + (r - k) % 4]``: under rot90^k the reference map's
channels roll by ``k`` inside every group of four (:func:`rotation_permutation`). This holds
exactly (up to float rounding) for odd kernels, stride 1 and zero 'same' padding on square
inputs, because zero padding is itself rotation symmetric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ORIENTATIONS = 4


def rotation_permutation(fields: int, k: int) -> list[int]:
    """``perm`` with ``h(rot90^k x)[:, c] = rot90^k(h(x))[:, perm[c]]`` for a C4 feature map of
    ``fields`` groups: ``perm[4 i + r] = 4 i + (r - k) % 4``."""
    return [
        ORIENTATIONS * i + (r - k) % ORIENTATIONS
        for i in range(fields)
        for r in range(ORIENTATIONS)
    ]


class LiftingConv(nn.Module):
    """``(B, in, H, W) -> (B, 4 m, H, W)``: one bank of ``m`` filters in its 4 rotated copies.

    Output channel ``4 i + r`` is filter ``i`` rotated by ``r`` quarter turns (counter-clockwise).
    The bias is one value per field, shared by its four orientations (a per-channel bias would
    break the permutation). Stride 1, odd kernel, zero padding ``k // 2``.
    """

    def __init__(self, in_channels: int, fields: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError("odd kernel sizes only: an even kernel has no centre cell")
        self.weight = nn.Parameter(torch.randn(fields, in_channels, kernel_size, kernel_size) / 3)
        self.bias = nn.Parameter(0.1 * torch.randn(fields))
        self.padding = kernel_size // 2

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full ``(4 m, in, k, k)`` weight and ``(4 m,)`` bias."""
        rotated = [torch.rot90(self.weight, r, (-2, -1)) for r in range(ORIENTATIONS)]
        weight = torch.stack(rotated, dim=1).flatten(0, 1)  # (m, 4, in, k, k) -> (4m, in, k, k)
        return weight, self.bias.repeat_interleave(ORIENTATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.expanded()
        return F.conv2d(x, weight, bias, padding=self.padding)


class GroupConv(nn.Module):
    """C4 group convolution ``(B, 4 m, H, W) -> (B, 4 n, H, W)``, keeping the permutation.

    Base weight ``psi`` ``(n, m, 4, k, k)``; output orientation ``r`` uses
    ``w_r[o, i, s] = R^r psi[o, i, (s - r) % 4]``, so a rotated input (whose orientations rolled by
    one) gives ``out(R x)[4 o + r] = R out(x)[4 o + r - 1]``: the same roll as the lifting layer.
    """

    def __init__(self, in_fields: int, out_fields: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError("odd kernel sizes only: an even kernel has no centre cell")
        shape = (out_fields, in_fields, ORIENTATIONS, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.randn(shape) / (3 * (4 * in_fields) ** 0.5))
        self.bias = nn.Parameter(0.1 * torch.randn(out_fields))
        self.padding = kernel_size // 2

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full ``(4 n, 4 m, k, k)`` weight and ``(4 n,)`` bias."""
        per_r = [
            torch.rot90(torch.roll(self.weight, r, dims=2), r, (-2, -1))
            for r in range(ORIENTATIONS)
        ]  # roll by r along s: entry s holds psi[..., (s - r) % 4]
        weight = torch.stack(per_r, dim=1)  # (n, 4, m, 4, k, k)
        return weight.flatten(2, 3).flatten(0, 1), self.bias.repeat_interleave(ORIENTATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.expanded()
        return F.conv2d(x, weight, bias, padding=self.padding)


class GroupPool(nn.Module):
    """Max over the 4 orientations of each field: ``(B, 4 m, H, W) -> (B, m, H, W)``; the result
    is rotation-equivariant with the identity on channels (naive error ~0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        return x.reshape(batch, channels // ORIENTATIONS, ORIENTATIONS, *x.shape[2:]).amax(2)


class C4Net(nn.Module):
    """lift -> relu1 -> gconv -> relu2 -> gpool -> pool -> flatten -> fc: C4-invariant logits.

    Per-layer picture under rot90 (aligned, odd input): ``lift``, ``relu1``, ``gconv``,
    ``relu2`` have a large naive and a ~0 fitted error (channels roll within groups of four);
    ``gpool`` onwards have ~0 naive error. Under flips the layers are not equivariant at all,
    not even up to a channel map (C4 has no reflections), so both errors stay large.
    """

    def __init__(
        self, in_channels: int = 3, fields: int = 2, hidden_fields: int = 3, classes: int = 5
    ) -> None:
        super().__init__()
        self.lift = LiftingConv(in_channels, fields)
        self.relu1 = nn.ReLU()
        self.gconv = GroupConv(fields, hidden_fields)
        self.relu2 = nn.ReLU()
        self.gpool = GroupPool()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(hidden_fields, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.gconv(self.relu1(self.lift(x))))
        return self.fc(self.flatten(self.pool(self.gpool(x))))


def c4_net(seed: int = 0, **kwargs: int) -> C4Net:
    """A seeded :class:`C4Net` in eval mode."""
    torch.manual_seed(seed)
    return C4Net(**kwargs).eval()

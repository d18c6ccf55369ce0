"""The demo CNN: four 3x3 convolutions, global average pooling and a linear head.

Input ``(B, 3, 33, 33)`` float, pixel values in [0, 1] normalised with ImageNet mean/std; output
``(B, 7)`` logits in the order of ``classes.txt``. Pass :func:`build` as the model factory
(``eqaudit.demo.model:build``) and load ``assets/demo_cnn.pt`` into it.

Grid: the two stride-2 convolutions (k=3, p=1) satisfy (n + 2p - k) % s == 0 for n = 33 and
n = 17, so the feature grids 33 -> 17 -> 9 stay centred on the image centre and D4 elements act
on them exactly. The network is not constrained to be invariant; it only learnt to be nearly so.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 7


def build() -> nn.Module:
    """Return the (untrained) demo CNN; hook names read ``features.0`` ... ``pool``, ``head``."""
    return DemoCNN()


class DemoCNN(nn.Module):
    """conv3x3(3->16) -> conv3x3/2(16->32) -> conv3x3/2(32->32) -> conv3x3(32->32) -> GAP -> FC."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 33, 33)`` normalised images -> ``(B, num_classes)`` logits."""
        return self.head(self.flatten(self.pool(self.features(x))))

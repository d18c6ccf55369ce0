"""What ``eqaudit demo`` audits: the bundled CNN on the bundled images."""

from __future__ import annotations

from pathlib import Path

from eqaudit.config import AuditConfig
from eqaudit.demo import (
    CLASSES_PATH,
    FLIP_H_PERMUTATION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGES_DIR,
    INPUT_SIZE,
    ONNX_PATH,
    ROT90_PERMUTATION,
    STATE_DICT_PATH,
)
from eqaudit.errors import UsageError

BACKENDS = ("onnx", "torch")


def demo_model(backend: str) -> Path:
    if backend not in BACKENDS:
        raise UsageError(f"unknown demo --backend '{backend}': use onnx or torch")
    return ONNX_PATH if backend == "onnx" else STATE_DICT_PATH


def demo_config(backend: str) -> AuditConfig:
    """D4, a 30-degree rotation and 2-pixel crop-shifts, on the shipped 40x40 images centre-cropped to 33x33.

    The arrows' classes are their directions, so the demo declares how labels move (rot90 turns
    arrow_up into arrow_left, flip_h swaps left and right): the audit measures equivariance
    against that action rather than invariance.
    """
    return AuditConfig(
        transforms="d4,rot:30,shift:2",
        data=str(IMAGES_DIR),
        labels=str(CLASSES_PATH),
        preset="imagenet",
        resize="center",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        factory="eqaudit.demo.model:build" if backend == "torch" else None,
        input_size=(INPUT_SIZE, INPUT_SIZE) if backend == "torch" else None,
        label_action=(
            ("rot90", ",".join(map(str, ROT90_PERMUTATION))),
            ("flip_h", ",".join(map(str, FLIP_H_PERMUTATION))),
        ),
    )

"""What ``eqaudit demo`` audits: the bundled CNN on the bundled images."""

from __future__ import annotations

from pathlib import Path

from eqaudit.config import AuditConfig
from eqaudit.demo import (
    CLASSES_PATH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGES_DIR,
    INPUT_SIZE,
    ONNX_PATH,
    STATE_DICT_PATH,
)
from eqaudit.errors import UsageError

BACKENDS = ("onnx", "torch")


def demo_model(backend: str) -> Path:
    if backend not in BACKENDS:
        raise UsageError(f"unknown demo --backend '{backend}': use onnx or torch")
    return ONNX_PATH if backend == "onnx" else STATE_DICT_PATH


def demo_config(backend: str) -> AuditConfig:
    """D4 plus 2-pixel crop-shifts, on the shipped 40x40 images centre-cropped to 33x33."""
    return AuditConfig(
        transforms="d4,shift:2",
        data=str(IMAGES_DIR),
        labels=str(CLASSES_PATH),
        preset="imagenet",
        resize="center",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        factory="eqaudit.demo.model:build" if backend == "torch" else None,
        input_size=(INPUT_SIZE, INPUT_SIZE) if backend == "torch" else None,
    )

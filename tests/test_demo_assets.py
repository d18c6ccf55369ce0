"""The shipped demo assets exist, agree with each other, and the model is good at its task.

Preprocessing here is written out independently of ``scripts/make_demo.py``: PIL RGB, centre
33x33 crop of the 40x40 image, /255, ImageNet mean/std.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from eqaudit.demo import (
    CLASS_NAMES,
    CLASSES_PATH,
    FLIP_H_PERMUTATION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGES_DIR,
    INPUT_SIZE,
    ONNX_PATH,
    ROT90_PERMUTATION,
    SOURCE_SIZE,
    STATE_DICT_PATH,
)
from eqaudit.demo.model import build

IMAGES_PER_CLASS = 12


def _class_names() -> list[str]:
    return CLASSES_PATH.read_text().split()


def _preprocess(path) -> np.ndarray:
    """PNG -> (3, 33, 33) float32, normalised."""
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert image.shape == (SOURCE_SIZE, SOURCE_SIZE, 3)
    o = (SOURCE_SIZE - INPUT_SIZE) // 2
    crop = image[o : o + INPUT_SIZE, o : o + INPUT_SIZE] / 255.0
    crop = (crop - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return crop.transpose(2, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def eval_set() -> tuple[np.ndarray, np.ndarray]:
    """All shipped images, preprocessed, with labels from their folder names."""
    images, labels = [], []
    for label, name in enumerate(_class_names()):
        for path in sorted((IMAGES_DIR / name).glob("*.png")):
            images.append(_preprocess(path))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


@pytest.fixture(scope="module")
def torch_model() -> torch.nn.Module:
    model = build()
    model.load_state_dict(torch.load(STATE_DICT_PATH, weights_only=True))
    return model.eval()


def test_classes_file_matches_package_constants() -> None:
    assert _class_names() == list(CLASS_NAMES)
    assert len(CLASS_NAMES) == 7


def test_image_folders_match_classes() -> None:
    folders = sorted(p.name for p in IMAGES_DIR.iterdir() if p.is_dir())
    assert folders == sorted(_class_names())
    for name in _class_names():
        files = sorted((IMAGES_DIR / name).glob("*.png"))
        assert [f.name for f in files] == [f"{name}_{i:02d}.png" for i in range(IMAGES_PER_CLASS)]
    assert len(list(IMAGES_DIR.rglob("*.png"))) == 84


def test_assets_are_small() -> None:
    total = sum(p.stat().st_size for p in IMAGES_DIR.parent.rglob("*") if p.is_file())
    assert total < 1_000_000


def test_state_dict_loads_strictly_with_weights_only() -> None:
    state = torch.load(STATE_DICT_PATH, weights_only=True)
    model = build()
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    out = model(torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE))
    assert out.shape == (2, len(CLASS_NAMES))


def test_onnx_model_is_valid_and_declares_its_interface() -> None:
    proto = onnx.load(str(ONNX_PATH))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, INPUT_SIZE, INPUT_SIZE]
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata["class_names"]) == _class_names()


def test_onnx_and_torch_agree(eval_set, torch_model) -> None:
    images, _ = eval_set
    batch = images[:: len(images) // 7]  # one image from every class, batch > 1
    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"image": batch})
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=0, atol=1e-5)


def test_shipped_model_classifies_shipped_images(eval_set, torch_model) -> None:
    images, labels = eval_set
    with torch.no_grad():
        predictions = torch_model(torch.from_numpy(images)).argmax(1).numpy()
    accuracy = float((predictions == labels).mean())
    assert accuracy >= 0.85, f"demo model accuracy {accuracy:.3f} on the shipped images"


@pytest.mark.parametrize(
    ("permutation", "expected"),
    [
        (ROT90_PERMUTATION, {"arrow_up": "arrow_left", "arrow_right": "arrow_up"}),
        (FLIP_H_PERMUTATION, {"arrow_left": "arrow_right", "arrow_up": "arrow_up"}),
    ],
)
def test_arrow_label_permutations(permutation, expected) -> None:
    assert sorted(permutation) == list(range(len(CLASS_NAMES)))
    for i in range(3):  # the shapes keep their label
        assert permutation[i] == i
    for source, target in expected.items():
        assert CLASS_NAMES[permutation[CLASS_NAMES.index(source)]] == target


def test_rotating_an_arrow_image_moves_the_prediction(eval_set, torch_model) -> None:
    """rot90 of an arrow_up image is read as arrow_left (the demo model is D4-aware, not exact)."""
    images, labels = eval_set
    up = images[labels == CLASS_NAMES.index("arrow_up")]
    with torch.no_grad():
        rotated = torch_model(torch.rot90(torch.from_numpy(up), 1, (-2, -1))).argmax(1)
    share_left = float((rotated == CLASS_NAMES.index("arrow_left")).double().mean())
    assert share_left >= 0.75

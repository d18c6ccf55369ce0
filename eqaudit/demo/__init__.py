"""The bundled demo: procedural shape/arrow images and a tiny CNN trained on them.

The assets under ``assets/`` are produced by ``scripts/make_demo.py`` (deterministic, no network):

* ``images/<class_name>/<class_name>_NN.png``: 12 RGB images of 40x40 pixels per class, larger
  than the model input so that crop-shifts have a margin; centre-crop 33x33 for the model.
* ``classes.txt``: one class name per line, in class-index order.
* ``demo_cnn.pt``: a plain state dict for :func:`eqaudit.demo.model.build`
  (loads with ``torch.load(..., weights_only=True)``).
* ``demo_cnn.onnx``: the same network (opset 17), input ``image`` ``(batch, 3, 33, 33)``, output
  ``logits`` ``(batch, 7)``; metadata key ``class_names`` holds the class names as a JSON list.

Preprocessing: pixel values / 255, then ImageNet mean/std per channel (RGB, NCHW).

Label behaviour under D4 (rot90 counter-clockwise as ``torch.rot90(x, 1, (-2, -1))``, flip_h
mirrors left-right): ``circle``, ``square`` and ``cross`` keep their label; the arrows move with
the image, see :data:`ROT90_PERMUTATION` and :data:`FLIP_H_PERMUTATION`. The model was trained with
D4 augmentation but is an ordinary CNN: it is close to, not exactly, D4-equivariant.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
IMAGES_DIR = ASSETS / "images"
CLASSES_PATH = ASSETS / "classes.txt"
STATE_DICT_PATH = ASSETS / "demo_cnn.pt"
ONNX_PATH = ASSETS / "demo_cnn.onnx"

CLASS_NAMES = (
    "circle",
    "square",
    "cross",
    "arrow_up",
    "arrow_right",
    "arrow_down",
    "arrow_left",
)
INPUT_SIZE = 33  # 33 = 4 * 8 + 1: the stride-2 grids (33 -> 17 -> 9) stay centred.
SOURCE_SIZE = 40  # shipped images are larger than the input so crop-shifts have a margin.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Class-index permutations: entry i is the label of the transformed image of class i.
# rot90 (counter-clockwise) turns arrow_up into arrow_left, arrow_right into arrow_up, ...
ROT90_PERMUTATION = (0, 1, 2, 6, 3, 4, 5)
# flip_h (left-right mirror) swaps arrow_left and arrow_right, keeps up and down.
FLIP_H_PERMUTATION = (0, 1, 2, 3, 6, 5, 4)

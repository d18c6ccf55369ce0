"""Images to audit (folders, arrays, synthetic) and the preprocessing that feeds them to a model.

Pixel space is float32 ``(B, C, H, W)`` in [0, 1], RGB or gray; transforms act there, and
:meth:`Preprocessing.normalise` turns pixel-space batches into the model's input afterwards.
Sources load their batches ahead of the consumer on a few threads (:mod:`eqaudit.data.prefetch`).
"""

from eqaudit.data.prefetch import PREFETCH_BATCHES, default_load_workers
from eqaudit.data.preprocess import (
    CHANNEL_ORDERS,
    PRESETS,
    RESIZE_POLICIES,
    Preprocessing,
    ResizePlan,
    make_preprocessing,
    parse_floats,
    plan_resize,
    resize_to,
)
from eqaudit.data.sources import (
    ARRAY_SUFFIXES,
    DEFAULT_SYNTHETIC_COUNT,
    IMAGE_SUFFIXES,
    ArraySource,
    DataDescription,
    FolderSource,
    ImageBatch,
    ImageSource,
    SyntheticSource,
    load_class_names,
    open_images,
)
from eqaudit.data.synthetic import probe_image, synthetic_images

__all__ = [
    "ARRAY_SUFFIXES",
    "CHANNEL_ORDERS",
    "DEFAULT_SYNTHETIC_COUNT",
    "IMAGE_SUFFIXES",
    "PREFETCH_BATCHES",
    "PRESETS",
    "RESIZE_POLICIES",
    "ArraySource",
    "DataDescription",
    "FolderSource",
    "ImageBatch",
    "ImageSource",
    "Preprocessing",
    "ResizePlan",
    "SyntheticSource",
    "default_load_workers",
    "load_class_names",
    "make_preprocessing",
    "open_images",
    "parse_floats",
    "plan_resize",
    "probe_image",
    "resize_to",
    "synthetic_images",
]

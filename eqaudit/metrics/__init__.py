"""Output and per-layer metrics: one-shot functions and mergeable accumulators."""

from eqaudit.metrics.accumulators import HIST_EDGES, LayerStats, OrbitStats, OutputStats
from eqaudit.metrics.functional import (
    cosine_distance,
    errors_from_norms,
    image_norms,
    js_divergence,
    looks_like_probabilities,
    map_norms,
    normalised_logit_error,
    probabilities,
    relative_error,
    robustness_score,
    two_classes,
    wide,
    wilson_interval,
)

__all__ = [
    "HIST_EDGES",
    "LayerStats",
    "OrbitStats",
    "OutputStats",
    "cosine_distance",
    "errors_from_norms",
    "image_norms",
    "js_divergence",
    "looks_like_probabilities",
    "map_norms",
    "normalised_logit_error",
    "probabilities",
    "relative_error",
    "robustness_score",
    "two_classes",
    "wide",
    "wilson_interval",
]

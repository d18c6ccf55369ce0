"""One-shot metric functions (DESIGN.md sections 3 and 4), shared by the streaming accumulators.

All functions work per image (row) and compute in float64, whatever the input dtype.
"""

from __future__ import annotations

import math

import torch

#: Two-sided 95% normal quantile, used by the Wilson interval.
Z95 = 1.959963984540054
#: Added to denominators so that two all-zero maps compare as equal (error 0) without 0/0.
EPS = 1e-12
#: The smallest positive float64 (a subnormal): ``log2`` of it is -1074, finite.
_SMALLEST_POSITIVE = math.ulp(0.0)


def two_classes(scores: torch.Tensor, kind: str, derivative: bool = False) -> torch.Tensor:
    """A binary classifier's one score per image ``(..., 1)`` as two classes ``(..., 2)``,
    class 1 positive: a logit ``z`` as ``[0, z]`` (softmax gives ``[1 - sigmoid(z),
    sigmoid(z)]``), a probability ``p`` as ``[1 - p, p]``. ``derivative``: ``scores`` are the
    derivative of such scores, read the same way (``[0, z']``, ``[-p', p']``)."""
    if kind != "probs":
        return torch.cat([torch.zeros_like(scores), scores], dim=-1)
    return torch.cat([-scores if derivative else 1 - scores, scores], dim=-1)


def probabilities(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Class probabilities ``(B, K)`` in float64 from logits (softmax) or probability outputs."""
    scores = scores.to(torch.float64)
    if kind == "logits":
        return torch.softmax(scores, dim=1)
    # Probability outputs: guard against tiny negative values and rows that are not normalised.
    probs = scores.clamp_min(0)
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(EPS)


def looks_like_probabilities(scores: torch.Tensor, tol: float = 1e-3) -> bool:
    """True when every row is non-negative and sums to 1 (within ``tol``)."""
    scores = scores.to(torch.float64)
    return bool((scores >= 0).all() and ((scores.sum(dim=1) - 1).abs() <= tol).all())


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row, log base 2, in [0, 1].

    ``JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2`` and ``0 log 0 = 0``.

    The term of a class where ``a <= 0`` is a zero: ``max(a, 0) * log2(max(a / m, 2**-1074))``
    gives ``0 * -1074``, with no boolean mask (``torch.where`` on a mask is the slowest pass on
    CPU). A positive ``a`` keeps its exact ``a * log2(a / m)``: no positive float64 is below
    ``2**-1074``, and a zero of either sign adds nothing to a sum that starts at ``+0``.
    """
    p = p.to(torch.float64)
    q = q.to(torch.float64)
    m = (0.5 * (p + q)).clamp_min_(1e-300)

    def kl(a: torch.Tensor) -> torch.Tensor:
        ratio = (a / m).clamp_min_(_SMALLEST_POSITIVE).log2_()
        return ratio.mul_(a.clamp_min(0.0)).sum(dim=1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)


def normalised_logit_error(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``||c(z') - c(z)|| / ||c(z)||`` per row, ``c`` = subtract the mean over classes.

    Softmax ignores a constant shift of the logits, so the shift is removed before comparing.
    A reference with no spread (all logits equal) gives 0 when the other is equal too.
    """
    z = reference.to(torch.float64)
    w = other.to(torch.float64)
    z = z - z.mean(dim=1, keepdim=True)
    w = w - w.mean(dim=1, keepdim=True)
    return (w - z).norm(dim=1) / z.norm(dim=1).clamp_min(EPS)


#: Elements summed in the maps' dtype before the partial sums are combined in float64
#: (:func:`image_norms`): float32 sums this long are accurate to about 1e-7 relative.
_CHUNK = 4096
#: Dtypes whose own sums are accurate enough for a partial norm; others are summed in float32.
_WIDE = (torch.float32, torch.float64)


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` when float32 or float64, else a float32 copy: a difference of half-precision maps
    is taken in float32 (float16 overflows past 65504 and keeps 3 digits), as the GPU's Triton
    comparison takes it, so that every path gives the same numbers."""
    return x if x.dtype in _WIDE else x.float()


def image_norms(x: torch.Tensor, start: int = 1) -> torch.Tensor:
    """L2 norms over every axis from ``start`` on, as float64 of shape ``x.shape[:start]``.

    One pass over ``x`` with no float64 copy of it, and accurate to about 1e-7 relative whatever
    the map's size: a float32 ``vector_norm`` over a whole map adds each SIMD lane's squares in
    one running sum (about 1e-5 relative on the CPU for a 64 x 112 x 112 map). So the squares
    are summed over short runs first: each spatial plane of a ``(..., C, H, W)`` map (up to 256
    x 256; larger planes, a 2048 x 2048 one was off by 1e-4, and flat maps in chunks of
    :data:`_CHUNK` elements), in float32 (float16 and bfloat16 maps are summed
    in float32: their own range overflows on a large map, their precision is 3 digits), then the
    partial norms are combined in float64. Two equal maps still give exactly equal norms.
    """
    wide = x.dtype if x.dtype in _WIDE else torch.float32
    if x.ndim - start >= 3 and x.shape[-1] * x.shape[-2] <= _CHUNK * 16:
        # spatial planes: (..., C, H, W) -> (..., C) -> (...); larger planes go in chunks
        partial = torch.linalg.vector_norm(x, dim=(-2, -1), dtype=wide)
        if x.ndim - start > 3:
            partial = partial.flatten(start)
    else:
        flat = x.reshape(*x.shape[:start], -1)
        size = flat.shape[-1]
        whole = size - size % _CHUNK
        if not whole:  # one chunk or less
            return torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float64)
        runs = flat[..., :whole].unflatten(-1, (whole // _CHUNK, _CHUNK))
        partial = torch.linalg.vector_norm(runs, dim=-1, dtype=wide)
        if whole < size:
            rest = torch.linalg.vector_norm(flat[..., whole:], dim=-1, dtype=wide)
            partial = torch.cat([partial, rest.unsqueeze(-1)], dim=-1)
    return torch.linalg.vector_norm(partial, dim=-1, dtype=torch.float64)


def map_norms(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image ``(||a||, ||b||, ||a - b||)`` as float64, over every axis but the first
    (:func:`image_norms`: one pass each, no float64 copies of the maps). ``a - b`` of two equal
    maps is exactly zero. ``mask`` (bool, broadcastable) keeps the cells where both maps are
    defined.
    """
    if mask is not None:
        weight = mask.to(a.dtype)
        a = a * weight
        b = b * weight
    return image_norms(a), image_norms(b), image_norms(wide(a) - b)


def errors_from_norms(
    na: torch.Tensor, nb: torch.Tensor, nd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relative_error, cosine_distance)`` per image from the three norms.

    ``1 - cos(a, b) = (||a - b||^2 - (||a|| - ||b||)^2) / (2 ||a|| ||b||)``, which stays accurate
    when the maps are nearly equal (no cancellation of ``1 - cos`` near 1).
    """
    relative = nd / (na + nb + EPS)
    cosine = (nd * nd - (na - nb) ** 2) / (2 * na * nb).clamp_min(EPS)
    both_zero = (na <= EPS) & (nb <= EPS)
    one_zero = ((na <= EPS) | (nb <= EPS)) & ~both_zero
    cosine = torch.where(one_zero, torch.ones_like(cosine), cosine)
    cosine = torch.where(both_zero, torch.zeros_like(cosine), cosine)
    # Rounding must not report a distance a hair outside [0, 2].
    return relative, cosine.clamp(0.0, 2.0)


def relative_error(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``||a - b|| / (||a|| + ||b|| + eps)`` per image, in [0, 1] (0: exact; ~0.7: unrelated).

    ``mask`` (broadcastable to ``a``, bool) restricts the comparison to the cells where both
    maps are defined (a shifted border, the disk of a resampled rotation).
    """
    return errors_from_norms(*map_norms(a, b, mask))[0]


def cosine_distance(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 - cos(a, b)`` per image, in [0, 2]; two zero maps are at distance 0, one zero map at 1."""
    return errors_from_norms(*map_norms(a, b, mask))[1]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(nan, nan)`` when ``n == 0``."""
    if n == 0:
        return (math.nan, math.nan)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    # Exactly 0 or 1 at the ends: rounding must not leave 0.9999999999999999 for k = n.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def robustness_score(agreements: list[float], js_values: list[float]) -> float:
    """``100 * mean_g [(A_g + (1 - JS_g)) / 2]`` over the non-identity elements."""
    if not agreements:
        return math.nan
    terms = [(a + (1.0 - j)) / 2 for a, j in zip(agreements, js_values, strict=True)]
    return 100.0 * sum(terms) / len(terms)

"""Synthetic images: deterministic, in range, structured (not noise), not symmetric."""

from __future__ import annotations

import pytest
import torch

from eqaudit.data import synthetic_images
from eqaudit.data.synthetic import synthetic_image


def test_same_seed_same_images_other_seed_different() -> None:
    a = synthetic_images(6, (32, 32), 3, seed=0)
    b = synthetic_images(6, (32, 32), 3, seed=0)
    c = synthetic_images(6, (32, 32), 3, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().mean().item() > 0.05
    assert not torch.equal(a[0], a[1])


def test_shape_dtype_range_and_quantisation() -> None:
    images = synthetic_images(4, (20, 36), 3, seed=2)
    assert images.shape == (4, 3, 20, 36)
    assert images.dtype == torch.float32
    assert images.min().item() >= 0.0
    assert images.max().item() <= 1.0
    # Rounded to 16-bit levels, so last-ulp differences between machines cannot show.
    levels = (images.double() * 65535).round() / 65535
    assert torch.equal(images, levels.float())


def test_image_depends_only_on_seed_and_index() -> None:
    whole = synthetic_images(5, (16, 16), 3, seed=7)
    tail = synthetic_images(2, (16, 16), 3, seed=7, start=3)
    assert torch.equal(whole[3:], tail)
    assert torch.equal(whole[4], torch.from_numpy(synthetic_image(4, (16, 16), 3, seed=7)))


def test_gray_images() -> None:
    gray = synthetic_images(3, (16, 16), 1, seed=0)
    assert gray.shape == (3, 1, 16, 16)
    assert gray.std().item() > 0.02
    with pytest.raises(ValueError, match="channels"):
        synthetic_images(1, (8, 8), 2)


def test_structured_not_noise() -> None:
    images = synthetic_images(16, (48, 48), 3, seed=0)
    neighbours = (images[..., 1:] - images[..., :-1]).abs().mean().item()
    flat = images.flatten(2)
    generator = torch.Generator().manual_seed(0)
    i = torch.randint(0, flat.shape[-1], (4096,), generator=generator)
    j = torch.randint(0, flat.shape[-1], (4096,), generator=generator)
    random_pairs = (flat[..., i] - flat[..., j]).abs().mean().item()
    assert neighbours < 0.25 * random_pairs
    assert random_pairs > 0.08  # real contrast, not a flat field


def test_transforms_change_the_image() -> None:
    images = synthetic_images(8, (32, 32), 3, seed=0)
    for moved in (
        torch.rot90(images, 1, (-2, -1)),
        images.flip(-1),
        images.flip(-2),
        images.transpose(-2, -1),
        torch.roll(images, 3, dims=-1),
    ):
        per_image = (moved - images).abs().flatten(1).mean(1)
        assert per_image.min().item() > 0.02


def test_zero_images() -> None:
    assert synthetic_images(0, (8, 8), 3).shape == (0, 3, 8, 8)

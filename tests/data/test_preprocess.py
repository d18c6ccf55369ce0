"""Resize policies, pixel decoding and model-side normalisation, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eqaudit.data import (
    PRESETS,
    Preprocessing,
    ResizePlan,
    make_preprocessing,
    parse_floats,
    plan_resize,
    resize_to,
)
from eqaudit.data.preprocess import check_pil_pixels, pil_to_array, to_channels
from eqaudit.errors import UsageError


# -- resize plans ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "target", "policy", "resized", "offset"),
    [
        ((40, 40), (33, 33), "crop", (33, 33), (0, 0)),
        ((20, 40), (20, 20), "crop", (20, 40), (0, 10)),
        ((40, 20), (10, 10), "crop", (20, 10), (5, 0)),
        ((20, 41), (10, 10), "crop", (10, 21), (0, 5)),
        ((20, 40), (20, 20), "letterbox", (10, 20), (5, 0)),
        ((20, 40), (9, 9), "letterbox", (5, 9), (2, 0)),  # 4.5 rounds up
        ((20, 40), (7, 13), "stretch", (7, 13), (0, 0)),
        ((4, 4), (8, 8), "crop", (8, 8), (0, 0)),
    ],
)
def test_plan_resize_known_answers(
    source: tuple[int, int],
    target: tuple[int, int],
    policy: str,
    resized: tuple[int, int],
    offset: tuple[int, int],
) -> None:
    assert plan_resize(source, target, policy) == ResizePlan(
        policy, source, target, resized, offset
    )


def test_plan_flags_upscaling_and_resampling() -> None:
    assert plan_resize((4, 4), (8, 8), "crop").upscales
    assert not plan_resize((16, 16), (8, 8), "crop").upscales
    assert plan_resize((4, 16), (8, 8), "stretch").upscales
    assert not plan_resize((8, 20), (8, 8), "crop").resamples


def test_unknown_policy_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="crop, letterbox, stretch"):
        plan_resize((4, 4), (4, 4), "zoom")


# -- resize_to ------------------------------------------------------------------------------------
def _random_image(h: int, w: int, c: int = 3) -> torch.Tensor:
    return torch.rand(c, h, w, generator=torch.Generator().manual_seed(h * 100 + w))


@pytest.mark.parametrize("policy", ["crop", "stretch", "letterbox"])
def test_same_size_is_bit_exact_pass_through(policy: str) -> None:
    image = _random_image(33, 33)
    out = resize_to(image, (33, 33), policy)
    assert torch.equal(out, image)
    out[0, 0, 0] = 5.0
    assert image[0, 0, 0].item() != 5.0  # never aliases the input
    values = np.random.default_rng(0).integers(0, 256, (33, 33, 3), dtype=np.uint8)
    expected = torch.from_numpy(values.astype(np.float32) / np.float32(255)).permute(2, 0, 1)
    assert torch.equal(resize_to(Image.fromarray(values), (33, 33), policy), expected)


def test_crop_keeps_aspect_and_takes_the_centre_without_resampling() -> None:
    image = _random_image(20, 40)
    assert torch.equal(resize_to(image, (20, 20), "crop"), image[:, :, 10:30])


def test_crop_of_a_tall_image_scales_the_short_side_then_crops() -> None:
    image = torch.zeros(1, 40, 20)
    image[:, 20:] = 1.0  # top half black, bottom half white
    out = resize_to(image, (10, 10), "crop")  # 40x20 -> 20x10, rows 5..14 kept
    assert out.shape == (1, 10, 10)
    assert torch.equal(out[:, :3], torch.zeros(1, 3, 10))  # filter support stays in the black
    torch.testing.assert_close(out[:, 7:], torch.ones(1, 3, 10), rtol=0, atol=1e-6)
    assert 0.0 < out[0, 4, 0].item() < out[0, 5, 0].item() < 1.0


def test_forty_to_thirty_three_crop_resamples_whole_image() -> None:
    image = torch.full((3, 40, 40), 0.25)
    out = resize_to(image, (33, 33), "crop")
    assert out.shape == (3, 33, 33)
    torch.testing.assert_close(out, torch.full((3, 33, 33), 0.25), rtol=0, atol=1e-6)


def test_letterbox_pads_with_exact_zeros() -> None:
    image = torch.ones(3, 20, 40)
    out = resize_to(image, (20, 20), "letterbox")
    assert out.shape == (3, 20, 20)
    assert torch.equal(out[:, :5], torch.zeros(3, 5, 20))
    assert torch.equal(out[:, 15:], torch.zeros(3, 5, 20))
    torch.testing.assert_close(out[:, 5:15], torch.ones(3, 10, 20), rtol=0, atol=1e-6)


def test_stretch_gives_the_exact_shape() -> None:
    out = resize_to(_random_image(20, 40), (7, 13), "stretch")
    assert out.shape == (3, 7, 13)
    assert out.dtype == torch.float32


def test_resampling_is_clamped_to_unit_range() -> None:
    board = torch.zeros(1, 8, 8)
    board[:, ::2, ::2] = 1.0
    board[:, 1::2, 1::2] = 1.0
    out = resize_to(board, (29, 29), "stretch")  # bicubic overshoots at every edge
    assert out.min().item() == 0.0
    assert out.max().item() == 1.0


def test_pil_resize_matches_tensor_resize() -> None:
    values = np.random.default_rng(1).integers(0, 256, (12, 18, 3), dtype=np.uint8)
    tensor = torch.from_numpy(values.astype(np.float32) / np.float32(255)).permute(2, 0, 1)
    for policy in ("crop", "stretch", "letterbox"):
        assert torch.equal(
            resize_to(Image.fromarray(values), (7, 7), policy), resize_to(tensor, (7, 7), policy)
        )


def test_two_dimensional_tensor_is_one_gray_channel() -> None:
    assert resize_to(torch.zeros(5, 6), (5, 6)).shape == (1, 5, 6)


# -- decoding and channels ------------------------------------------------------------------------
def test_pil_to_array_modes() -> None:
    sixteen = Image.new("I;16", (2, 1))
    sixteen.putpixel((0, 0), 65535)
    assert pil_to_array(sixteen).tolist() == [[[1.0], [0.0]]]
    binary = Image.new("1", (2, 1))
    binary.putpixel((1, 0), 1)
    assert pil_to_array(binary).tolist() == [[[0.0], [1.0]]]
    # A float TIFF is read in the smallest of 0-1, 0-255, 0-65535 holding its values: one in
    # 0-255 was clipped to white (review); values in none of them are refused.
    floats = Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32))
    assert pil_to_array(floats).tolist() == [[[0.0], [0.25], [1.0]]]
    floats = Image.fromarray(np.array([[0.0, 51.0, 255.0]], np.float32))
    assert pil_to_array(floats).tolist() == [[[0.0], [np.float32(0.2)], [1.0]]]
    floats = Image.fromarray(np.array([[0.0, 65535.0]], np.float32))
    assert pil_to_array(floats).tolist() == [[[0.0], [1.0]]]
    # Small overshoots of a resampled image are clipped, not read in the next range (review).
    floats = Image.fromarray(np.array([[-0.01, 1.02]], np.float32))
    assert pil_to_array(floats).tolist() == [[[0.0], [1.0]]]
    floats = Image.fromarray(np.array([[0.0, 127.5, 256.0]], np.float32))
    assert pil_to_array(floats).tolist() == [[[0.0], [0.5], [1.0]]]
    for bad in ([[-0.6, 0.25]], [[0.0, 1e5]], [[0.0, np.nan]]):
        with pytest.raises(ValueError, match="not in 0-1, 0-255 or 0-65535"):
            pil_to_array(Image.fromarray(np.array(bad, np.float32)))
    gray = Image.fromarray(np.array([[7, 200]], np.uint8))
    gray.info["transparency"] = 7
    assert pil_to_array(gray).tolist() == [[[0.0], [np.float32(200) / np.float32(255)]]]


@pytest.mark.parametrize("mode", Image.MODES)
def test_check_pil_pixels_refuses_what_pil_to_array_refuses(mode: str) -> None:
    # A folder's files are checked without building their arrays: what the check lets through
    # must convert. Every mode Pillow has converts; float pixels depend on their values.
    image = Image.new(mode, (3, 2))
    check_pil_pixels(image)
    assert pil_to_array(image).shape[:2] == (2, 3)
    if mode == "F":
        for bad in ([[-0.6, 0.25]], [[0.0, 1e5]], [[0.0, np.nan]], [[np.inf, 0]]):
            floats = Image.fromarray(np.array(bad, np.float32))
            with pytest.raises(ValueError) as refused:
                pil_to_array(floats)
            with pytest.raises(ValueError, match="not in 0-1, 0-255 or 0-65535") as checked:
                check_pil_pixels(floats)
            assert str(checked.value) == str(refused.value)


def test_to_channels() -> None:
    gray = np.array([[[0.5]]], np.float32)
    assert to_channels(gray, 3).tolist() == [[[0.5, 0.5, 0.5]]]
    colour = np.array([[[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]], np.float32)
    luma = to_channels(colour, 1)
    assert luma.shape == (1, 2, 1)
    np.testing.assert_allclose(luma[0, :, 0], [1.0, 0.299], atol=1e-7)
    assert to_channels(colour, 3) is colour


# -- normalisation --------------------------------------------------------------------------------
def test_normalise_bgr_scale_mean_std_by_hand() -> None:
    prep = Preprocessing(channels="bgr", scale=255.0, mean=(100, 110, 120), std=(2, 4, 5))
    pixels = torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    # BGR order: (1.0, 0.25, 0.5) * 255 = (255, 63.75, 127.5); - mean; / std
    expected = torch.tensor([77.5, -11.5625, 1.5]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = prep.normalise(pixels)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)


def test_normalise_imagenet_preset() -> None:
    prep = make_preprocessing(preset="imagenet")
    pixels = torch.tensor([[0.0, 1.0], [0.5, 0.25], [1.0, 0.0]]).view(1, 3, 1, 2)
    expected = torch.tensor(
        [
            [(0.0 - 0.485) / 0.229, (1.0 - 0.485) / 0.229],
            [(0.5 - 0.456) / 0.224, (0.25 - 0.456) / 0.224],
            [(1.0 - 0.406) / 0.225, (0.0 - 0.406) / 0.225],
        ]
    ).view(1, 3, 1, 2)
    torch.testing.assert_close(prep.normalise(pixels), expected, rtol=0, atol=1e-6)


def test_inception_maps_to_minus_one_one_and_gray_broadcasts() -> None:
    inception = make_preprocessing(preset="inception")
    pixels = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert inception.normalise(pixels)[0, :, 0].tolist() == [[-1.0, 0.0, 1.0]] * 3
    gray = make_preprocessing(channels="gray", scale=255, mean=[128.0], std=2)
    assert gray.pixel_channels == 1
    assert gray.normalise(torch.tensor([[[[1.0, 0.0]]]])).tolist() == [[[[63.5, -64.0]]]]


def test_normalise_refuses_the_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="expected pixels"):
        Preprocessing().normalise(torch.zeros(1, 1, 2, 2))


def test_presets_and_overrides() -> None:
    caffe = make_preprocessing(preset="caffe")
    assert caffe == Preprocessing(
        channels="bgr", scale=255.0, mean=(103.939, 116.779, 123.68), std=(1, 1, 1), preset="caffe"
    )
    assert set(PRESETS) == {"imagenet", "caffe", "inception", "unit", "raw255"}
    custom = make_preprocessing(preset="IMAGENET", channels="bgr", resize="letterbox")
    assert (custom.channels, custom.resize, custom.mean) == (
        "bgr",
        "letterbox",
        PRESETS["imagenet"]["mean"],
    )
    assert make_preprocessing() == Preprocessing()
    assert make_preprocessing(preset="raw255").to_dict() == {
        "preset": "raw255",
        "resize": "crop",
        "channels": "rgb",
        "scale": 255.0,
        "mean": [0.0],
        "std": [1.0],
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "vgg"}, "unknown preset 'vgg': choose one of caffe, imagenet, inception"),
        ({"channels": "rbg"}, "unknown channel order 'rbg': choose one of bgr, gray, rgb"),
        ({"resize": "zoom"}, "unknown resize policy 'zoom'"),
        ({"mean": (0.1, 0.2)}, "mean has 2 values"),
        ({"preset": "caffe", "channels": "gray"}, "mean has 3 values"),
        ({"std": (1.0, 0.0, 1.0)}, "std values must be positive"),
        ({"scale": 0}, "scale must be a positive"),
        ({"mean": (float("nan"),)}, "finite"),
    ],
)
def test_bad_preprocessing_is_a_usage_error(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make_preprocessing(**kwargs)


def test_parse_floats() -> None:
    assert parse_floats("0.485,0.456,0.406") == (0.485, 0.456, 0.406)
    assert parse_floats(" [1, 2 3] ") == (1.0, 2.0, 3.0)
    assert parse_floats("-1e2") == (-100.0,)
    for bad in ("", "0.4x5", "1,,nan", "a,b"):
        with pytest.raises(UsageError, match="--mean"):
            parse_floats(bad, name="--mean")

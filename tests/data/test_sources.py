"""Image sources on real files written to tmp_path: folders, labels, arrays, synthetic."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eqaudit.data import DataDescription, ImageSource, open_images
from eqaudit.data import sources as sources_module
from eqaudit.data.preprocess import resize_to
from eqaudit.errors import DataError, UsageError


def save(path: Path, values: np.ndarray | Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = values if isinstance(values, Image.Image) else Image.fromarray(values)
    image.save(path, **kwargs)
    return path


def rgb(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def all_pixels(source: ImageSource, batch_size: int = 4) -> torch.Tensor:
    return torch.cat([batch.pixels for batch in source.iter_batches(batch_size)])


def all_ids(source: ImageSource, batch_size: int = 4) -> list[str]:
    return [i for batch in source.iter_batches(batch_size) for i in batch.ids]


def as_chw(values: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) / 255, the expected pass-through pixels."""
    return torch.from_numpy(values.astype(np.float32) / np.float32(255)).permute(2, 0, 1)


# -- folders --------------------------------------------------------------------------------------
def test_folder_found_recursively_in_sorted_order(tmp_path: Path) -> None:
    for i, rel in enumerate(["b/z.png", "a/y.jpg", "a/sub/x.png", "c.PNG", "a/w.bmp"]):
        save(tmp_path / rel, rgb(i))
    save(tmp_path / ".hidden" / "q.png", rgb(9))
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_images(tmp_path, size=(8, 8))
    expected = ["a/sub/x.png", "a/w.bmp", "a/y.jpg", "b/z.png", "c.PNG"]
    assert source.ids == expected
    assert all_ids(source, batch_size=2) == expected
    assert len(source) == 5
    suffixes = "png/jpg/jpeg/jfif/jpe/avif/bmp/gif/tif/tiff/webp"
    assert source.description == DataDescription(
        source="folder",
        path=str(tmp_path),
        count=5,
        synthetic=False,
        labelled=False,
        notes=(
            "1 other file not read: not images by their suffix (e.g. 'notes.txt'; images are "
            f"{suffixes})",
        ),
    )
    assert source.class_names is None


def test_folder_pixels_pass_through_with_margin(tmp_path: Path) -> None:
    values = rgb(0, 12, 12)
    save(tmp_path / "a.png", values)
    source = open_images(str(tmp_path), size=(8, 8), margin=2)
    assert source.source_size == (12, 12)
    (batch,) = source.iter_batches(8)
    assert batch.pixels.dtype == torch.float32
    assert batch.labels is None
    assert torch.equal(batch.pixels[0], as_chw(values))


def test_batches_have_requested_sizes(tmp_path: Path) -> None:
    for i in range(5):
        save(tmp_path / f"{i}.png", rgb(i))
    source = open_images(tmp_path, size=(8, 8))
    assert [b.pixels.shape[0] for b in source.iter_batches(2)] == [2, 2, 1]
    with pytest.raises(UsageError, match="batch size"):
        source.iter_batches(0)


def test_subset_is_deterministic_per_seed_and_sorted(tmp_path: Path) -> None:
    names = [f"img{i:02d}.png" for i in range(20)]
    for i, name in enumerate(names):
        save(tmp_path / name, rgb(i))
    first = open_images(tmp_path, size=(8, 8), num_images=5, seed=0).ids
    again = open_images(tmp_path, size=(8, 8), num_images=5, seed=0).ids
    other = open_images(tmp_path, size=(8, 8), num_images=5, seed=1).ids
    # The five files whose hash of (seed, relative path) comes first.
    key = {n: hashlib.sha256(f"0\0{n}".encode()).digest() for n in names}
    assert first == again == sorted(sorted(names, key=key.__getitem__)[:5])
    assert other != first
    assert other == sorted(other)
    assert len(open_images(tmp_path, size=(8, 8), num_images=5, seed=1)) == 5


def test_files_added_to_a_folder_displace_one_drawn_file_each(tmp_path: Path) -> None:
    # A permutation of positions drew another sample whenever a file was added anywhere: 22
    # of 50 images changed after 5 were added to a folder the labels did not even name (review).
    data = tmp_path / "data"
    for i in range(60):
        save(data / ("cat" if i % 2 else "dog") / f"{i:02d}.png", rgb(i, 4, 4))
    before = set(open_images(data, size=(4, 4), num_images=20, seed=7).ids)
    for i in range(8):
        save(data / "bird" / f"new{i}.png", rgb(100 + i, 4, 4))
    after = set(open_images(data, size=(4, 4), num_images=20, seed=7).ids)
    added = {i for i in after if i.startswith("bird/")}
    assert len(before - after) == len(added) and after - added <= before
    copied = tmp_path / "elsewhere" / "copy"
    shutil.copytree(data, copied)
    assert set(open_images(copied, size=(4, 4), num_images=20, seed=7).ids) == after


def test_subset_replaces_unreadable_files(tmp_path: Path) -> None:
    for i in range(10):
        save(tmp_path / f"{i}.png", rgb(i))
    (tmp_path / "3.png").write_bytes(b"broken")
    source = open_images(tmp_path, size=(8, 8), num_images=9, seed=0)
    assert len(source) == 9
    assert "3.png" not in source.ids
    assert source.description.skipped == ("3.png: cannot identify image file",)


_PROBE_IMAGE = sources_module._probe_image


def _probes_out_of_order(monkeypatch: pytest.MonkeyPatch, workers: int) -> list[str]:
    """Validation on ``workers`` threads, each file delayed by a hash of its name so the checks
    finish out of order; the names of the files checked."""
    checked = []

    def delayed(path: Path) -> object:
        checked.append(path.name)
        time.sleep(hashlib.sha256(path.name.encode()).digest()[0] / 255 * 0.01)
        return _PROBE_IMAGE(path)

    monkeypatch.setattr(sources_module, "default_load_workers", lambda: workers)
    monkeypatch.setattr(sources_module, "_probe_image", delayed)
    return checked


@pytest.mark.parametrize("num_images", [1, 4, 12, 17, 19, 30, None])
def test_threaded_validation_selects_what_trying_files_one_by_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_images: int | None
) -> None:
    names = [f"{i:02d}.png" for i in range(20)]
    for i, name in enumerate(names):
        save(tmp_path / ("cat" if i % 2 else "dog") / name, rgb(i))
    rel = [f"{'cat' if i % 2 else 'dog'}/{name}" for i, name in enumerate(names)]
    # The first files drawn for seed 3 are unreadable: each is replaced by the next one drawn.
    drawn = sorted(rel, key=lambda r: hashlib.sha256(f"3\0{r}".encode()).digest())
    reasons = {
        drawn[0]: b"not an image",
        drawn[2]: b"",
        drawn[3]: _truncated_png(),
        drawn[9]: b"junk",
    }
    for name, content in reasons.items():
        (tmp_path / name).write_bytes(content)
    serial_checked = _probes_out_of_order(monkeypatch, 1)
    serial = open_images(tmp_path, size=(8, 8), num_images=num_images, seed=3)
    wanted = 16 if num_images is None else min(num_images, 16)
    readable = [r for r in drawn if r not in reasons]
    assert serial.ids == sorted(readable[:wanted])
    assert len(serial_checked) == (
        20 if num_images is None else drawn.index(readable[:wanted][-1]) + 1
    )
    for workers in (2, 3, 8):
        threaded_checked = _probes_out_of_order(monkeypatch, workers)
        threaded = open_images(tmp_path, size=(8, 8), num_images=num_images, seed=3)
        assert threaded.ids == serial.ids
        assert threaded.description == serial.description
        assert threaded._infos == serial._infos
        assert torch.equal(all_pixels(threaded), all_pixels(serial))
        # Beyond the files needed, at most one chunk's surplus (fewer than one per thread).
        assert len(threaded_checked) < len(serial_checked) + workers
    skipped = [r for r in reasons if r in drawn[: len(serial_checked)]]
    assert len(serial.description.skipped) == len(skipped)
    assert [s.split(":")[0] for s in serial.description.skipped] == sorted(skipped)
    assert not [t for t in threading.enumerate() if t.name.startswith("eqaudit-check")]


def test_validation_decodes_without_float_arrays_yet_the_pixels_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation used to convert every file to float (pil_to_array) to learn its mode and size;
    it now only decodes. Before and after give the same files, notes, infos and pixel bits."""
    upright = _smooth(60, 80)
    save(tmp_path / "a_rgb.png", upright)
    turned = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = turned.getexif()
    exif[0x0112] = 6  # stored turned: display = rotate 90 degrees clockwise
    save(tmp_path / "b_turned.jpg", turned, quality=90, exif=exif)
    exif[0x0112] = 8
    save(
        tmp_path / "c_turned.png",
        Image.fromarray(upright).transpose(Image.Transpose.ROTATE_270),
        exif=exif,
    )
    sixteen = (np.arange(60 * 80, dtype=np.uint32).reshape(60, 80) * 13 % 65536).astype(np.uint16)
    save(tmp_path / "d_sixteen.png", Image.fromarray(sixteen))
    palette = Image.fromarray(upright).quantize(16)
    save(tmp_path / "e_palette.png", palette, transparency=0)
    save(tmp_path / "f_cmyk.jpg", Image.fromarray(upright).convert("CMYK"), quality=90)
    save(tmp_path / "g_la.png", Image.fromarray(upright).convert("LA"))
    save(tmp_path / "h_big.jpg", _smooth(600, 800), quality=90)  # decoded at a draft size
    save(tmp_path / "i_anim.gif", Image.fromarray(upright).quantize(32))
    save(tmp_path / "j_web.webp", upright, quality=90)
    save(tmp_path / "k_float.tif", Image.fromarray(sixteen.astype(np.float32) / 65535))
    bad_floats = np.array([[-2.0, 0.5], [0.25, 0.0]], np.float32)  # refused by pil_to_array
    save(tmp_path / "l_bad_float.tif", Image.fromarray(bad_floats))
    (tmp_path / "m_truncated.png").write_bytes(_truncated_png())

    def validated_as_before(path: Path) -> object:  # the old check: decoded to float
        return sources_module._decode_image(path, draft=(1, 1))[1]

    options = {"size": (32, 32), "margin": 4}
    with monkeypatch.context() as patch:
        patch.setattr(sources_module, "default_load_workers", lambda: 1)
        patch.setattr(sources_module, "_probe_image", validated_as_before)
        before = open_images(tmp_path, **options)
    before_pixels = all_pixels(before)
    to_array, converted = sources_module.pil_to_array, []
    monkeypatch.setattr(sources_module, "default_load_workers", lambda: 3)
    monkeypatch.setattr(
        sources_module, "pil_to_array", lambda image: converted.append(image) or to_array(image)
    )
    after = open_images(tmp_path, **options)
    assert converted == []
    assert after.ids == before.ids
    assert len(after) == 11
    assert after.description == before.description
    assert after.description.skipped == (
        "l_bad_float.tif: cannot read image (float pixel values from -2 to 0.5, "
        "not in 0-1, 0-255 or 0-65535)",
        "m_truncated.png: cannot read image (image file is truncated)",
    )
    assert after.description.notes == (
        "3 grayscale images converted to RGB",
        "2 images with transparency composited onto black",
        "2 images turned upright by their EXIF orientation",
    )
    assert after._infos == before._infos
    assert torch.equal(all_pixels(after), before_pixels)
    assert len(converted) == 11  # the loader's, one per image


@pytest.mark.parametrize("shape", [(3, 40, 40), (40, 40, 3)])
def test_one_colour_image_without_a_batch_axis_is_named(shape) -> None:
    # (3, 40, 40) was read as 3 grayscale images without a word; (40, 40, 3) had the hint.
    source = open_images(np.zeros(shape, np.uint8), size=(40, 40))
    assert len(source) == shape[0]
    assert any(
        "for one colour image add a leading batch axis" in n for n in source.description.notes
    )


def test_asking_for_more_images_than_exist_notes_it(tmp_path: Path) -> None:
    save(tmp_path / "a.png", rgb(0))
    source = open_images(tmp_path, size=(8, 8), num_images=4)
    assert len(source) == 1
    assert "asked for 4 images; only 1 readable images found" in source.description.notes


def _labelled_tree(root: Path) -> None:
    save(root / "cat" / "c1.png", rgb(0))
    save(root / "cat" / "deep" / "c2.png", rgb(1))
    save(root / "dog" / "d1.png", rgb(2))
    save(root / "other" / "o1.png", rgb(3))
    save(root / "loose.png", rgb(4))


def test_labels_from_subfolders_with_txt(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _labelled_tree(data)
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\n\n  cat \n")
    source = open_images(data, size=(8, 8), labels=labels)
    assert source.class_names == ["dog", "cat"]
    assert source.ids == [
        "cat/c1.png",
        "cat/deep/c2.png",
        "dog/d1.png",
        "loose.png",
        "other/o1.png",
    ]
    got = torch.cat([b.labels for b in source.iter_batches(2)])
    assert got.dtype == torch.int64
    assert got.tolist() == [1, 1, 0, -1, -1]
    assert source.description.labelled
    assert (
        "2 images get label -1: 1 in 1 subfolder named after no class ('other': 1); "
        "1 outside any subfolder (e.g. 'loose.png')"
    ) in source.description.notes


def test_class_folders_linked_in_are_read_once_and_other_files_are_named(tmp_path: Path) -> None:
    # A class folder symlinked from elsewhere was silently left out (os.walk does not follow
    # links), a .jfif JPEG and a README were dropped without a word (review).
    elsewhere = tmp_path / "elsewhere"
    save(elsewhere / "x1.png", rgb(0))
    data = tmp_path / "data"
    save(data / "cat" / "c1.png", rgb(1))
    Image.fromarray(rgb(2)).save(data / "cat" / "c2.jfif", format="JPEG")
    (data / "dog").symlink_to(elsewhere, target_is_directory=True)
    (data / "cat" / "up").symlink_to(data, target_is_directory=True)  # a loop: walked once
    # A folder also linked under another name is read under its own, whichever is listed
    # first (it was the filesystem's listing order that decided, review).
    (data / "a_cat").symlink_to(data / "cat", target_is_directory=True)
    (data / "README.txt").write_text("labels are folder names")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    source = open_images(data, size=(8, 8), labels=labels)
    assert source.ids == ["cat/c1.png", "cat/c2.jfif", "dog/x1.png"]
    assert torch.cat([b.labels for b in source.iter_batches(3)]).tolist() == [0, 0, 1]
    [note] = [n for n in source.description.notes if "not read" in n]
    assert note.startswith("1 other file not read: not images by their suffix (e.g. 'README.txt'")


def test_class_folders_match_their_names_in_either_unicode_form(tmp_path: Path) -> None:
    # macOS and zip files store 'café' decomposed (e + combining accent, NFD); a labels file
    # typed elsewhere has it composed (NFC). The images got label -1, "outside the class
    # subfolders", though they were plainly inside one (review).
    import unicodedata

    folder = tmp_path / "data" / unicodedata.normalize("NFD", "café")
    folder.mkdir(parents=True)
    save(folder / "x.png", rgb(0, 4, 4))
    labels = tmp_path / "labels.txt"
    labels.write_text(unicodedata.normalize("NFC", "tea\ncafé\n"), encoding="utf-8")
    source = open_images(tmp_path / "data", size=(8, 8), labels=labels)
    assert torch.cat([b.labels for b in source.iter_batches(2)]).tolist() == [1]


@pytest.mark.parametrize(
    "content",
    [
        ["dog", "cat"],
        {"cat": 1, "dog": 0},
        {"0": "dog", "1": "cat"},
    ],
    ids=["list", "name-to-index", "id-to-label"],
)
def test_labels_from_subfolders_with_json(tmp_path: Path, content: object) -> None:
    data = tmp_path / "data"
    _labelled_tree(data)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(content))
    source = open_images(data, size=(8, 8), labels=str(labels))
    assert source.class_names == ["dog", "cat"]
    assert source.labels is not None
    assert source.labels.tolist() == [1, 1, 0, -1, -1]


def test_labels_all_unknown_says_so(tmp_path: Path) -> None:
    save(tmp_path / "data" / "a.png", rgb(0))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n")
    source = open_images(tmp_path / "data", size=(8, 8), labels=labels)
    assert source.labels is not None and source.labels.tolist() == [-1]
    assert any("all labels are unknown" in note for note in source.description.notes)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.txt", None, "not found"),
        ("labels.json", "{not json", "not valid JSON"),
        ("labels.json", '{"a": "x", "b": 1}', "non-integer"),
        ("labels.json", "[1, 2]", "wrong structure"),
        ("labels.json", '{"a": 0, "b": 0}', "gives index 0 to both"),
        ("labels.txt", "\n\n", "no class names"),
        ("labels.csv", "a,b", "must be .txt"),
    ],
)
def test_bad_labels_file_is_a_data_error(
    tmp_path: Path, name: str, text: str | None, message: str
) -> None:
    save(tmp_path / "data" / "a.png", rgb(0))
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=message):
        open_images(tmp_path / "data", size=(8, 8), labels=path)


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb(0, 64, 64)).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    for name in ["a.png", "c.png", "e.png"]:
        save(tmp_path / name, rgb(0))
    (tmp_path / "b.png").write_bytes(b"this is not an image")
    (tmp_path / "d.jpg").write_bytes(b"")
    (tmp_path / "f.png").write_bytes(_truncated_png())
    source = open_images(tmp_path, size=(8, 8))
    assert source.ids == ["a.png", "c.png", "e.png"]
    assert source.description.count == 3
    assert source.description.skipped == (
        "b.png: cannot identify image file",
        "d.jpg: empty file (0 bytes)",
        "f.png: cannot read image (image file is truncated)",
    )
    assert all_pixels(source).shape == (3, 3, 8, 8)


def test_folder_of_only_bad_files_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 2 image files"):
        open_images(tmp_path, size=(8, 8))


def test_missing_or_empty_data_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images found in"):
        open_images(tmp_path, size=(8, 8))
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="no images found in"):
        open_images(tmp_path, size=(8, 8))
    with pytest.raises(DataError, match="does not exist"):
        open_images(tmp_path / "nowhere", size=(8, 8))
    with pytest.raises(DataError, match="unsupported type"):
        open_images(tmp_path / "readme.txt", size=(8, 8))


def test_single_image_file(tmp_path: Path) -> None:
    values = rgb(3)
    path = save(tmp_path / "one.png", values)
    source = open_images(path, size=(8, 8))
    assert source.ids == ["one.png"]
    assert source.description.source == "folder"
    assert torch.equal(all_pixels(source)[0], as_chw(values))


def test_palette_image_converts_to_its_colours(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    save(tmp_path / "p.png", image)
    pixels = all_pixels(open_images(tmp_path, size=(1, 2)))
    expected = torch.tensor([[10, 200], [20, 100], [30, 0]], dtype=torch.float32) / 255
    assert torch.equal(pixels[0, :, 0, :], expected)


def test_rgba_is_composited_onto_black(tmp_path: Path) -> None:
    values = np.array([[[255, 100, 50, 255], [255, 100, 50, 0], [200, 200, 200, 51]]], np.uint8)
    save(tmp_path / "a.png", values)
    source = open_images(tmp_path, size=(1, 3))
    pixels = all_pixels(source)[0, :, 0, :]
    colour = values[0, :, :3].astype(np.float32) / np.float32(255)
    alpha = values[0, :, 3:].astype(np.float32) / np.float32(255)
    assert torch.equal(pixels, torch.from_numpy(colour * alpha).T)
    assert pixels[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert "1 image with transparency composited onto black" in source.description.notes


def test_sixteen_bit_gray_is_scaled_by_65535(tmp_path: Path) -> None:
    image = Image.new("I;16", (3, 1))
    for x, value in enumerate([65535, 0, 32768]):
        image.putpixel((x, 0), value)
    save(tmp_path / "g16.png", image)
    for channels in (1, 3):
        pixels = all_pixels(open_images(tmp_path, size=(1, 3), channels=channels))
        assert pixels.shape == (1, channels, 1, 3)
        expected = torch.tensor([1.0, 0.0, 32768 / 65535], dtype=torch.float32)
        for c in range(channels):
            assert torch.equal(pixels[0, c, 0], expected)
    assert pixels[0, 0, 0, 0].item() == 1.0


def test_gray_to_rgb_and_rgb_to_gray_with_notes(tmp_path: Path) -> None:
    save(tmp_path / "g.png", np.array([[0, 51, 255]], np.uint8))
    save(tmp_path / "h.png", np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8))
    as_rgb = open_images(tmp_path, size=(1, 3), channels=3)
    pixels = all_pixels(as_rgb)
    gray = torch.tensor([0.0, 51.0, 255.0]) / 255
    assert torch.equal(pixels[0, :, 0], gray.expand(3, 3))
    assert "1 grayscale image converted to RGB" in as_rgb.description.notes
    as_gray = open_images(tmp_path, size=(1, 3), channels=1)
    pixels = all_pixels(as_gray)
    assert torch.equal(pixels[0, 0, 0], gray)
    torch.testing.assert_close(pixels[1, 0, 0], torch.tensor([0.299, 0.587, 0.114]))
    assert "1 colour image converted to grayscale (BT.601 luma)" in as_gray.description.notes


def test_la_and_cmyk_convert(tmp_path: Path) -> None:
    save(tmp_path / "a.png", np.array([[[200, 255], [200, 0]]], np.uint8))  # LA
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    save(tmp_path / "b.tif", cmyk)
    pixels = all_pixels(open_images(tmp_path, size=(1, 2)))
    assert torch.equal(pixels[0, :, 0], torch.tensor([200 / 255, 0.0]).expand(3, 2))
    assert pixels[1, :, 0].tolist() == [[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    values = rgb(5, 4, 6)
    image = Image.fromarray(values)
    exif = image.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    save(tmp_path / "o.png", image, exif=exif)
    source = open_images(tmp_path, size=(6, 4))
    clockwise = np.ascontiguousarray(np.rot90(values, k=-1))
    assert torch.equal(all_pixels(source)[0], as_chw(clockwise))
    assert "1 image turned upright by their EXIF orientation" in source.description.notes


def _smooth(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    return (255 * np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx)], axis=-1)).astype(np.uint8)


def test_large_jpegs_are_decoded_small_yet_give_the_same_pixels(tmp_path: Path) -> None:
    # An 81-megapixel photo was decoded whole (2 GB, 2.65 s) twice: to validate it and to
    # resize it to a few hundred pixels. JPEGs are now decoded at 1/2-1/8 in the DCT, at least
    # twice the resized size; the EXIF-turned copy (stored on its side) gives the same image.
    from eqaudit.data.sources import _decode_image

    upright = _smooth(1200, 1600)
    Image.fromarray(upright).save(tmp_path / "a_upright.jpg", quality=95)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # on its side
    exif = stored.getexif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise: upright again
    stored.save(tmp_path / "b_turned.jpg", quality=95, exif=exif)
    values, info = _decode_image(tmp_path / "a_upright.jpg", draft=(100, 100))
    assert info.size == (1200, 1600) and values.shape == (150, 200, 3)  # an eighth, full size
    _, turned = _decode_image(tmp_path / "b_turned.jpg", draft=(100, 100))
    assert turned.size == (1200, 1600) and turned.exif_rotated
    # A camera's JPEG with an MPF segment (Pillow: format MPO) was decoded whole (review).
    first = Image.fromarray(upright)
    first.save(tmp_path / "c_camera.jpg", format="MPO", save_all=True, append_images=[first])
    assert Image.open(tmp_path / "c_camera.jpg").format == "MPO"
    values, info = _decode_image(tmp_path / "c_camera.jpg", draft=(100, 100))
    assert info.size == (1200, 1600) and values.shape == (150, 200, 3)
    pixels = all_pixels(open_images(tmp_path, size=(48, 64)))
    expected = torch.from_numpy(upright[::25, ::25].astype(np.float32) / 255).permute(2, 0, 1)
    for image in pixels:  # both, against the full-size image sampled on the same grid
        assert float((image - expected).abs().mean()) < 0.02


def test_decompression_bombs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    save(tmp_path / "a_small.png", rgb(0, 20, 20))  # 400 pixels
    save(tmp_path / "b_warn.png", rgb(1, 40, 40))  # 1600: Pillow would only warn
    save(tmp_path / "c_bomb.png", rgb(2, 50, 50))  # 2500: Pillow refuses
    source = open_images(tmp_path, size=(8, 8))
    assert source.ids == ["a_small.png"]
    assert len(source.description.skipped) == 2
    assert all("decompression bomb" in reason for reason in source.description.skipped)
    assert source.description.skipped[0].startswith("b_warn.png: 40x40 pixels exceed")


def test_small_images_are_upscaled_with_a_note(tmp_path: Path) -> None:
    save(tmp_path / "small.png", rgb(0, 4, 4))
    save(tmp_path / "big.png", rgb(1, 16, 16))
    source = open_images(tmp_path, size=(6, 6), margin=1)
    assert all_pixels(source).shape == (2, 3, 8, 8)
    assert "1 image smaller than 8x8 upscaled (resize policy 'crop')" in source.description.notes


def test_folder_and_array_give_the_same_pixels(tmp_path: Path) -> None:
    values = np.stack([rgb(0, 20, 30), rgb(1, 20, 30)])
    for i, image in enumerate(values):
        save(tmp_path / "folder" / f"{i}.png", image)
    np.save(tmp_path / "images.npy", values)
    for policy in ("crop", "stretch", "letterbox"):
        a = open_images(tmp_path / "folder", size=(9, 11), margin=1, resize=policy)
        b = open_images(tmp_path / "images.npy", size=(9, 11), margin=1, resize=policy)
        assert torch.equal(all_pixels(a), all_pixels(b))


# -- arrays ---------------------------------------------------------------------------------------
def test_nhwc_uint8_npy(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", values)
    source = open_images(tmp_path / "x.npy", size=(8, 8))
    assert source.ids == ["array[0]", "array[1]", "array[2]"]
    # The images' hash: dtype and shape, then their bytes (an array's ids are positions).
    digest = hashlib.sha256(b"|u1(8, 8, 3)" + values.tobytes()).hexdigest()
    assert source.description == DataDescription(
        source="array",
        path=str(tmp_path / "x.npy"),
        count=3,
        synthetic=False,
        labelled=False,
        sha256=digest,
    )
    expected = torch.from_numpy(values.astype(np.float32) / np.float32(255)).permute(0, 3, 1, 2)
    assert torch.equal(all_pixels(source, 2), expected)


@pytest.mark.parametrize("num_images", [None, 7])
def test_an_arrays_hash_covers_the_audited_images_in_order(tmp_path: Path, num_images) -> None:
    # All images (one run of consecutive indices, hashed from a view of the memory-mapped file)
    # or a sample of them (positions with gaps): the bytes of exactly those images, in order.
    values = np.random.default_rng(3).random((20, 3, 5, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", values)
    source = open_images(tmp_path / "x.npy", size=(5, 4), num_images=num_images, seed=2)
    picked = [int(i[len("array[") : -1]) for i in source.ids]
    assert len(picked) == (num_images or 20)
    assert num_images is None or picked[-1] - picked[0] > len(picked) - 1  # gaps: a sample
    expected = hashlib.sha256(b"<f4(3, 5, 4)" + values[picked].tobytes()).hexdigest()
    assert source.description.sha256 == expected


def test_an_array_that_cannot_be_hashed_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    # The hash is taken on a thread while the audit runs; its failure (a memory-mapped file
    # that cannot be read) is a one-line data error where the summary reads it, not a traceback.
    def unreadable(array, indices):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sources_module, "_array_sha256", unreadable)
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4, 3), np.uint8))
    source = open_images(tmp_path / "x.npy", size=(4, 4))
    with pytest.raises(DataError) as caught:
        source.description  # noqa: B018 (the property waits for the hash)
    assert str(caught.value) == (
        f"could not read the images of '{tmp_path / 'x.npy'}' to hash them: "
        "[Errno 5] Input/output error"
    )


def test_nchw_float_npy(tmp_path: Path) -> None:
    values = np.random.default_rng(1).random((2, 3, 6, 5), dtype=np.float32)
    np.save(tmp_path / "x.npy", values)
    pixels = all_pixels(open_images(tmp_path / "x.npy", size=(6, 5)))
    assert torch.equal(pixels, torch.from_numpy(values))


def test_gray_nhw_uint16_array(tmp_path: Path) -> None:
    values = np.array([[[0, 65535], [32768, 1]]], dtype=np.uint16)
    np.save(tmp_path / "g.npy", values)
    source = open_images(tmp_path / "g.npy", size=(2, 2), channels=1)
    expected = torch.from_numpy(values.astype(np.float32) / np.float32(65535))[:, None]
    assert torch.equal(all_pixels(source), expected)
    assert all_pixels(source)[0, 0, 0, 1].item() == 1.0
    rgb_source = open_images(tmp_path / "g.npy", size=(2, 2), channels=3)
    assert torch.equal(all_pixels(rgb_source), expected.expand(1, 3, 2, 2))
    assert "1 grayscale image converted to RGB" in rgb_source.description.notes


def test_npz_with_images_and_labels(tmp_path: Path) -> None:
    images = np.random.default_rng(2).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    labels = np.array([2, 0, -1, 1])
    np.savez(tmp_path / "d.npz", extra=np.zeros((2, 2, 2)), images=images, labels=labels)
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\nc\n")
    source = open_images(tmp_path / "d.npz", size=(5, 5), labels=names, num_images=3, seed=0)
    chosen = np.sort(np.random.default_rng(0).permutation(4)[:3])
    assert source.ids == [f"array[{i}]" for i in chosen]
    assert source.class_names == ["a", "b", "c"]
    assert source.description.labelled
    batches = list(source.iter_batches(2))
    assert torch.cat([b.labels for b in batches]).tolist() == labels[chosen].tolist()
    expected = torch.from_numpy(images[chosen].astype(np.float32) / np.float32(255))
    assert torch.equal(torch.cat([b.pixels for b in batches]), expected.permute(0, 3, 1, 2))


def test_npz_without_images_key_uses_first_image_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", meta=np.zeros(3), pics=np.ones((2, 4, 4), np.uint8) * 255)
    pixels = all_pixels(open_images(tmp_path / "d.npz", size=(4, 4)))
    assert torch.equal(pixels, torch.ones(2, 3, 4, 4))


def test_npz_labels_are_validated(tmp_path: Path) -> None:
    images = np.zeros((3, 4, 4), np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.array([0, 1]))
    with pytest.raises(DataError, match="one class index per image"):
        open_images(tmp_path / "a.npz", size=(4, 4))
    np.savez(tmp_path / "b.npz", images=images, labels=np.array([0, 1, 5]))
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\n")
    with pytest.raises(DataError, match="lists 2 classes"):
        open_images(tmp_path / "b.npz", size=(4, 4), labels=names)


_UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _Trap:
    def __reduce__(self) -> tuple:
        return (_record_unpickling, ("unpickled!",))


def test_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    trap = np.empty((1, 2, 2), dtype=object)
    trap[0, 0, 0] = _Trap()
    np.save(tmp_path / "evil.npy", trap, allow_pickle=True)
    np.savez(tmp_path / "evil.npz", images=trap)
    for name in ("evil.npy", "evil.npz"):
        with pytest.raises(DataError, match="object arrays are refused"):
            open_images(tmp_path / name, size=(2, 2))
    with pytest.raises(DataError, match="dtype object"):
        open_images(trap, size=(2, 2))
    assert _UNPICKLED == []


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.zeros((4, 4), np.uint8), "has shape"),
        (np.zeros((2, 5, 5, 5), np.uint8), "no channel axis"),
        (np.zeros((0, 4, 4), np.uint8), "holds no pixels"),
        (np.full((1, 2, 2), -0.5, np.float32), "not normalised values"),
        (np.full((1, 2, 2), 900.0, np.float32), "not normalised values"),
        (np.full((1, 2, 2), np.nan, np.float32), "NaN"),
        (np.full((1, 2, 2), 300, np.int64), "0-255"),
        (np.zeros((1, 2, 2), np.complex64), "dtype complex64"),
    ],
    ids=["rank2", "no-channels", "empty", "negative", "too-big", "nan", "int-range", "complex"],
)
def test_bad_arrays_are_data_errors(tmp_path: Path, values: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", values)
    with pytest.raises(DataError, match=message):
        open_images(tmp_path / "bad.npy", size=(2, 2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_pixel_in_a_later_chunk_of_the_range_scan_is_found(bad: float) -> None:
    # 150 images: the scan reads them in chunks of 64 (on threads); the bad pixel is in the third.
    values = np.full((150, 3, 3), 0.5, np.float32)
    values[140, 2, 1] = bad
    with pytest.raises(DataError, match="contains NaN or infinite values"):
        open_images(values, size=(3, 3), channels=1)


def test_the_range_scan_sees_the_extremes_of_every_chunk() -> None:
    # One value above 1.5 in the last chunk decides 0-255 for the whole array.
    values = np.full((150, 2, 2), 0.25, np.float32)
    values[149, 1, 1] = 200.0
    source = open_images(values, size=(2, 2), channels=1)
    assert "float array values reach 200: read as 0-255 and divided by 255" in (
        source.description.notes
    )


def test_not_a_numpy_file_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "fake.npy").write_text("hello")
    (tmp_path / "fake.npz").write_text("hello")
    for name in ("fake.npy", "fake.npz"):
        with pytest.raises(DataError, match="cannot load"):
            open_images(tmp_path / name, size=(2, 2))


def test_float_0_255_and_int64_arrays_are_scaled_with_notes() -> None:
    values = np.array([[[0.0, 255.0], [51.0, 102.0]]])
    source = open_images(values, size=(2, 2), channels=1)
    assert source.description.path is None
    assert source.description.source == "array"
    expected = torch.tensor([[0.0, 1.0], [0.2, 0.4]])
    torch.testing.assert_close(all_pixels(source)[0, 0], expected, rtol=0, atol=1e-7)
    assert any("divided by 255" in note for note in source.description.notes)
    ints = open_images(values.astype(np.int64), size=(2, 2), channels=1)
    torch.testing.assert_close(all_pixels(ints)[0, 0], expected, rtol=0, atol=1e-7)
    assert "int64 array values read as 0-255 pixel values" in ints.description.notes


def test_ambiguous_shape_reads_channels_last_rgba() -> None:
    values = np.random.default_rng(4).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    source = open_images(values, size=(3, 4), channels=3)
    assert any("ambiguous: read as channels-last" in n for n in source.description.notes)
    assert "2 images with transparency composited onto black" in source.description.notes
    scaled = values.astype(np.float32) / np.float32(255)
    expected = torch.from_numpy(scaled[..., :3] * scaled[..., 3:]).permute(0, 3, 1, 2)
    assert torch.equal(all_pixels(source), expected)
    rgba = np.array([[[[255, 255, 255, 255]], [[200, 100, 50, 0]]]], np.uint8)  # (1, 2, 1, 4)
    pixels = all_pixels(open_images(rgba, size=(2, 1)))
    assert pixels[0, :, :, 0].tolist() == [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]


def test_tensor_input_and_array_subset_is_deterministic() -> None:
    values = torch.rand(10, 3, 5, 5)
    a = open_images(values, size=(5, 5), num_images=4, seed=3)
    b = open_images(values.numpy(), size=(5, 5), num_images=4, seed=3)
    c = open_images(values.numpy(), size=(5, 5), num_images=4, seed=4)
    assert a.ids == b.ids != c.ids
    chosen = np.sort(np.random.default_rng(3).permutation(10)[:4])
    assert torch.equal(all_pixels(a), values[chosen])


# -- synthetic and options ------------------------------------------------------------------------
def test_synthetic_source() -> None:
    source = open_images(None, size=(8, 8), margin=2)
    assert len(source) == 32
    description = source.description
    assert (description.source, description.path, description.synthetic) == (
        "synthetic",
        None,
        True,
    )
    assert not description.labelled
    assert any("synthetic" in note for note in description.notes)
    assert source.ids[:2] == ["synthetic[0]", "synthetic[1]"]
    pixels = all_pixels(source, 5)
    assert pixels.shape == (32, 3, 12, 12)
    assert torch.equal(pixels, all_pixels(open_images(None, size=(8, 8), margin=2), 32))
    assert all(b.labels is None for b in source.iter_batches(16))
    small = open_images(None, size=(8, 8), num_images=3, seed=1, channels=1)
    assert all_pixels(small).shape == (3, 1, 8, 8)


def test_description_to_dict() -> None:
    description = DataDescription(
        source="folder",
        path="imgs",
        count=2,
        synthetic=False,
        labelled=True,
        skipped=("a.png: empty file (0 bytes)",),
        notes=("n",),
    )
    assert description.to_dict() == {
        "source": "folder",
        "path": "imgs",
        "count": 2,
        "synthetic": False,
        "labelled": True,
        "skipped": ["a.png: empty file (0 bytes)"],
        "notes": ["n"],
    }
    json.dumps(description.to_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (0, 8)}, "input size"),
        ({"size": (8,)}, "input size"),
        ({"size": (8, 8), "margin": -1}, "margin"),
        ({"size": (8, 8), "channels": 2}, "channels"),
        ({"size": (8, 8), "resize": "squash"}, "crop, center, stretch, letterbox"),
        ({"size": (8, 8), "num_images": 0}, "num-images"),
        ({"size": (8, 8), "seed": -1}, "seed"),
    ],
)
def test_bad_options_are_usage_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        open_images(None, **kwargs)


@pytest.mark.parametrize("policy", ["crop", "letterbox", "stretch"])
@pytest.mark.parametrize(
    ("shape", "size"), [((9, 9), (9, 9)), ((12, 7), (7, 7)), ((5, 11), (9, 9))]
)
def test_array_images_are_fitted_as_one_image_is(policy: str, shape: tuple, size: tuple) -> None:
    # A chunk that is only cropped or padded is fitted at once; it must give the pixels each
    # image gets alone (resize_to), as must the images that are resampled one by one.
    values = np.random.default_rng(1).random((5, *shape, 3)).astype(np.float32)
    source = open_images(values, size=size, resize=policy)
    got = torch.cat([b.pixels for b in source.iter_batches(3, workers=1)])
    expected = torch.stack(
        [resize_to(torch.from_numpy(v).permute(2, 0, 1), size, policy) for v in values]
    )
    assert torch.equal(got, expected)

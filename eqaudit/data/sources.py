"""Image sources: folders of image files, ``.npy``/``.npz`` arrays, and the synthetic fallback.

Every source delivers pixel-space batches (see :mod:`eqaudit.data.preprocess`): float32
``(B, C, H + 2m, W + 2m)`` in [0, 1], where ``(H, W)`` is the model's input size and ``m`` the
margin kept on every side so crop-shifts of up to ``m`` pixels cut real image content. The
identity image is the central ``(H, W)`` window.

Sources stream: opening one reads headers/validates, but pixels are decoded one batch at a time
in :meth:`ImageSource.iter_batches`, by default on a few threads that load the next batches while
the consumer works on the current one (:mod:`eqaudit.data.prefetch`). A folder is validated when
opened (every audited file is decoded once, on the loader threads, and dropped, never converted
to float) so that unreadable files are skipped *before* the audit, the image count is final, and
the notes (conversions, upscaling) are known up front.

Determinism: files are ordered by their relative POSIX path; a ``num_images`` subset of a folder
is the first ``num_images`` usable files in the order of a hash of the seed and each file's path
(so a seed picks the same images wherever the folder is, and files added to it displace few of
them), kept in sorted order; of an array, the first ``num_images`` entries of
``numpy.random.default_rng(seed).permutation(count)``, sorted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import unicodedata
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, closing, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from eqaudit.data.prefetch import PREFETCH_BATCHES, default_load_workers, load_ahead
from eqaudit.data.preprocess import (
    RESIZE_POLICIES,
    check_pil_pixels,
    composite_alpha,
    has_alpha,
    is_gray_mode,
    pil_to_array,
    plan_resize,
    resize_array,
    to_channels,
)
from eqaudit.data.synthetic import CHUNK as SYNTHETIC_CHUNK
from eqaudit.data.synthetic import synthetic_images_into
from eqaudit.errors import DataError, UsageError, cause_line

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".jfif",
    ".jpe",
    ".avif",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)
ARRAY_SUFFIXES: tuple[str, ...] = (".npy", ".npz")
DEFAULT_SYNTHETIC_COUNT = 32

_DATA_HINT = "--data needs a folder of .png/.jpg/... files or a .npy/.npz array"
_ARRAY_SHAPES = "(N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1, 3, 4"
_EXIF_ORIENTATION = 0x0112
_VALUE_TOLERANCE = 0.01  # float arrays may stray this far outside [0, 1] before we refuse them
_RANGE_CHUNK = 64  # images per task of the value-range scan

_Decoded = TypeVar("_Decoded")


@dataclass(frozen=True)
class DataDescription:
    """What was audited, for reports: where the images came from and what was done to them."""

    source: str  # "folder", "array" or "synthetic"
    path: str | None  # as the user gave it; None for synthetic
    count: int  # images that will be audited
    synthetic: bool
    labelled: bool
    skipped: tuple[str, ...] = ()  # "rel/path.png: reason", one per unreadable file
    notes: tuple[str, ...] = ()  # visible notes ("3 grayscale images converted to RGB")
    #: an array's audited images, hashed (SHA-256 of their bytes, dtype and shape): their ids
    #: are positions, ``array[3]``, which two arrays share whatever they hold
    sha256: str | None = None

    def to_dict(self) -> dict:
        found = {
            "source": self.source,
            "path": self.path,
            "count": self.count,
            "synthetic": self.synthetic,
            "labelled": self.labelled,
            "skipped": list(self.skipped),
            "notes": list(self.notes),
        }
        return {**found, "sha256": self.sha256} if self.sha256 is not None else found


@dataclass
class ImageBatch:
    """One batch: pixels ``(B, C, H+2m, W+2m)``, labels ``(B,)`` int64 (-1 unknown) or None, ids."""

    pixels: torch.Tensor
    labels: torch.Tensor | None
    ids: list[str]


@dataclass(frozen=True)
class _Geometry:
    size: tuple[int, int]  # model input (H, W)
    margin: int
    channels: int  # 1 or 3 in pixel space
    resize: str

    @property
    def source_size(self) -> tuple[int, int]:
        return (self.size[0] + 2 * self.margin, self.size[1] + 2 * self.margin)


def _unpinned(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32)


def _pinned(shape: tuple[int, ...]) -> torch.Tensor:
    # torch's caching host allocator: a freed block is reused only once the copies that read
    # it (recorded on their stream) are done, so a batch may be freed while its copy runs.
    return torch.empty(shape, dtype=torch.float32, pin_memory=True)


class ImageSource(ABC):
    """A fixed, ordered set of images delivered in pixel space, one batch at a time.

    Subclasses implement :meth:`_load_into` only: write the pixels of the images at some
    positions into an array. It is called from several loader threads at once (for disjoint
    positions), so it must be thread-safe; process-wide settings it needs (warning filters) go
    in :meth:`_loading`, which the iterating thread enters.
    """

    #: the shortest run of positions worth one loader task
    run_length = 1

    def __init__(
        self,
        *,
        geometry: _Geometry,
        description: DataDescription,
        ids: list[str],
        labels: torch.Tensor | None,
        class_names: list[str] | None,
    ) -> None:
        self._geometry = geometry
        self._description = description
        self.ids = ids
        self.labels = labels
        self.class_names = class_names

    @property
    def description(self) -> DataDescription:
        return self._description

    @property
    def size(self) -> tuple[int, int]:
        """The model input size ``(H, W)``."""
        return self._geometry.size

    @property
    def margin(self) -> int:
        return self._geometry.margin

    @property
    def channels(self) -> int:
        return self._geometry.channels

    @property
    def source_size(self) -> tuple[int, int]:
        """Delivered image size ``(H + 2m, W + 2m)``."""
        return self._geometry.source_size

    def __len__(self) -> int:
        return len(self.ids)

    def iter_batches(
        self,
        batch_size: int,
        start: int = 0,
        stop: int | None = None,
        *,
        workers: int | None = None,
        pin: bool = False,
    ) -> Iterator[ImageBatch]:
        """Yield the images at positions ``start .. stop - 1`` (default: all) in order,
        ``batch_size`` at a time (the last batch may be smaller).

        ``workers`` loader threads (default :func:`~eqaudit.data.prefetch.default_load_workers`,
        ``min(CPUs, 8)``) load each batch in parallel, split into runs of positions, and load
        the next batches while the caller works on the current one. ``workers=1`` loads each
        batch in the calling thread when it is asked for (no threads). The batches are the same
        whatever the worker count: pixels bit-identical, labels, ids and order.

        Memory: with ``workers > 1``, while the caller holds batch ``k``, batches ``k + 1 ..
        k + 2`` (:data:`~eqaudit.data.prefetch.PREFETCH_BATCHES`) may be loading or loaded: two
        batches of pixels more than loading on demand.

        ``pin``: load into page-locked (pinned) host memory, which a GPU copies from without
        waiting for the work queued before the copy (needs CUDA).

        An error while loading batch ``k`` is raised when batch ``k`` is asked for. Stopping
        early (leaving the ``for`` loop, by ``break`` or an exception, or ``.close()``) stops the
        threads before it returns: chunks not started are dropped, running ones finish.
        """
        if not _positive_int(batch_size):
            raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
        if workers is None:
            workers = default_load_workers()
        elif not _positive_int(workers):
            raise UsageError(f"loader workers must be a positive integer, got {workers!r}")
        stop = len(self) if stop is None else min(stop, len(self))
        size = int(batch_size)
        plans = [range(first, min(stop, first + size)) for first in range(start, stop, size)]
        allocate = _pinned if pin else _unpinned
        if workers == 1:
            return self._batches(plans, allocate)
        return self._prefetched_batches(plans, int(workers), allocate)

    def _batches(
        self, plans: list[range], allocate: Callable[[tuple[int, ...]], torch.Tensor]
    ) -> Iterator[ImageBatch]:
        for positions in plans:
            pixels = allocate((len(positions), self.channels, *self.source_size))
            with self._loading():
                self._load_into(positions, pixels.numpy())
            yield self._batch(positions, pixels)

    def _prefetched_batches(
        self,
        plans: list[range],
        workers: int,
        allocate: Callable[[tuple[int, ...]], torch.Tensor],
    ) -> Iterator[ImageBatch]:
        image_shape = (self.channels, *self.source_size)
        loaded = load_ahead(
            plans,
            self._load_into,
            image_shape,
            workers,
            PREFETCH_BATCHES,
            self.run_length,
            allocate,
        )
        # closing() joins the threads before _loading() restores what the workers relied on.
        with self._loading(), closing(loaded):
            for positions, pixels in zip(plans, loaded, strict=True):
                yield self._batch(positions, pixels)

    def _batch(self, positions: range, pixels: torch.Tensor) -> ImageBatch:
        at = slice(positions.start, positions.stop)
        labels = None if self.labels is None else self.labels[at].clone()
        return ImageBatch(pixels, labels, self.ids[at])

    @abstractmethod
    def _load_into(self, positions: range, out: np.ndarray) -> None:
        """Write the pixels of the images at ``positions`` into ``out``, float32
        ``(len(positions), C, H+2m, W+2m)``. Thread-safe for disjoint positions."""

    def _loading(self) -> AbstractContextManager[None]:
        """Entered by the iterating thread around the loads (all of them, when threads load)."""
        return nullcontext()


# -- folders --------------------------------------------------------------------------------------
class _Unreadable(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


@dataclass(frozen=True)
class _FileInfo:
    gray: bool
    alpha: bool
    size: tuple[int, int]  # (H, W) after EXIF orientation
    exif_rotated: bool


class FolderSource(ImageSource):
    """Image files under a folder (recursive), decoded with Pillow one batch at a time."""

    def __init__(
        self, *, files: list[Path], infos: list[_FileInfo] | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self._files = files
        self._infos = infos  # (what validation found: each file's full size)

    def _load_into(self, positions: range, out: np.ndarray) -> None:
        for i, position in enumerate(positions):
            try:
                draft = None
                if self._infos is not None:
                    draft = _draft_size(self._infos[position], self._geometry)
                values, _ = _decode_image(self._files[position], draft)
            except _Unreadable as exc:
                raise DataError(
                    f"'{self.ids[position]}' can no longer be read ({exc}): "
                    "do not change the data folder during an audit"
                ) from None
            out[i] = _fit(values, self._geometry)

    def _loading(self) -> AbstractContextManager[None]:
        return _bomb_warnings_ignored()


def _open_folder(
    root: Path,
    files: list[Path],
    display: str,
    geometry: _Geometry,
    num_images: int | None,
    seed: int,
    label_map: tuple[list[str], dict[str, int], dict[str, str], str] | None,
    others: Sequence[str] = (),
) -> FolderSource:
    """Validate (a subset of) ``files`` and build the source; ``files`` is sorted; ``others``:
    the folder's files that are not images by their suffix (named in a note)."""
    rel = [_relative(f, root) for f in files]
    kept, infos, skipped = _select_readable(files, rel, num_images, seed)
    if not kept:
        raise DataError(
            f"none of the {len(skipped)} image files in '{display}' could be read "
            f"(e.g. {skipped[0]}): fix or remove them, or point --data elsewhere"
        )
    ids = [rel[i] for i in kept]
    notes = _image_notes(Counter(infos), geometry)
    if num_images is not None and num_images > len(kept):
        notes.append(f"asked for {num_images} images; only {len(kept)} readable images found")
    if others:
        suffixes = "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        notes.append(
            f"{_count(len(others), 'other file')} not read: not images by their suffix (e.g. "
            f"'{others[0]}'; images are {suffixes})"
        )
    labels, class_names = None, None
    if label_map is not None:
        class_names, name_to_index, repeated, labels_file = label_map
        labels, label_notes = _folder_labels(ids, name_to_index, class_names, repeated, labels_file)
        notes.extend(label_notes)
    description = DataDescription(
        source="folder",
        path=display,
        count=len(ids),
        synthetic=False,
        labelled=labels is not None,
        skipped=tuple(skipped),
        notes=tuple(notes),
    )
    return FolderSource(
        files=[files[i] for i in kept],
        infos=infos,
        geometry=geometry,
        description=description,
        ids=ids,
        labels=labels,
        class_names=class_names,
    )


def find_image_files(root: Path, others: list[Path] | None = None) -> list[Path]:
    """Image files under ``root``, recursively, sorted by relative POSIX path.

    Suffixes are matched case-insensitively; hidden files and folders (name starting with ``.``)
    are ignored. Symlinked folders are followed (a class folder linked in from elsewhere), each
    real folder once, so a link back up cannot loop. ``others``, when given, receives the
    other files found (not hidden, not images by their suffix).
    """
    found: list[Path] = []
    links: list[Path] = []
    walked: set[tuple[int, int]] = set()

    def take(directory: str, subdirs: list[str], names: list[str]) -> None:
        walked.add(_identity(directory))
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(directory) / name)
            elif others is not None:
                others.append(Path(directory) / name)

    # The folder's own tree first, then the folders linked into it that lie outside it: a
    # folder reached both as itself and through a link is read under its own path, whatever
    # order the filesystem lists them in (the names are the images' ids and labels).
    for directory, subdirs, names in os.walk(root):  # (links listed, not followed)
        take(directory, subdirs, names)
        links += [Path(directory) / d for d in subdirs if os.path.islink(Path(directory) / d)]
    for link in sorted(links, key=lambda path: _relative(path, root)):
        for directory, subdirs, names in os.walk(link, followlinks=True):
            if _identity(directory) in walked:  # (already read, or a link back up: a loop)
                subdirs[:] = []
                continue
            take(directory, subdirs, names)
    if others is not None:
        others.sort(key=lambda path: _relative(path, root))
    return sorted(found, key=lambda path: _relative(path, root))


def _identity(folder: str | Path) -> tuple[int, int]:
    found = os.stat(folder)
    return found.st_dev, found.st_ino


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else path.name


def _select_readable(
    files: list[Path], rel: list[str], num_images: int | None, seed: int
) -> tuple[list[int], list[_FileInfo], list[str]]:
    """Indices of readable files (sorted), their infos, and the skip reasons of the others.

    With a ``num_images`` below the file count, files are tried in the order of a seeded hash
    of their relative paths (:func:`_draw_key`) until enough readable ones are found, so a bad
    file is replaced by the next one drawn. Each file's place in that order is its own: files
    added to (or removed from) the folder displace only the drawn files they come before, one
    each, so a growing dataset keeps most of its sample (a permutation of the positions drew
    another sample whenever one file was added anywhere).

    Files are checked (:func:`_probe_image`) on the loader threads
    (:func:`~eqaudit.data.prefetch.default_load_workers`), a chunk of the draw order at a time:
    as many files as are still missing (every file, without ``num_images``), at least one per
    thread. The outcomes are taken in draw order and those after the last file needed are
    dropped, so the files kept and skipped are the ones trying them one by one finds.
    """
    order: Sequence[int] = range(len(files))
    wanted = len(files)
    if num_images is not None and num_images < len(files):
        order = sorted(range(len(files)), key=lambda i: _draw_key(seed, rel[i]))
        wanted = num_images
    found: dict[int, _FileInfo] = {}
    skipped: list[tuple[str, str]] = []
    tried = 0
    workers = min(len(order), default_load_workers())
    # _probing() joins its threads before _bomb_warnings_ignored() restores the filters.
    with _bomb_warnings_ignored(), _probing(workers) as probe:
        while len(found) < wanted and tried < len(order):
            chunk = order[tried : tried + max(wanted - len(found), workers)]
            tried += len(chunk)
            for index, outcome in zip(chunk, probe([files[i] for i in chunk]), strict=True):
                if isinstance(outcome, _FileInfo):
                    found[index] = outcome
                else:
                    skipped.append((rel[index], f"{rel[index]}: {outcome}"))
                if len(found) == wanted:  # checked last: the next outcome is not waited for
                    break
    kept = sorted(found)
    return kept, [found[i] for i in kept], [reason for _, reason in sorted(skipped)]


@contextmanager
def _probing(workers: int) -> Iterator[Callable[[list[Path]], Iterator[_FileInfo | str]]]:
    """A function that checks files (:func:`_probe_outcome`) on ``workers`` threads, yielding
    the outcomes in the files' order; with one worker, one file at a time in the calling
    thread, when its outcome is asked for. The caller holds :func:`_bomb_warnings_ignored`.
    Leaving the block drops the files not started and joins the threads."""
    if workers <= 1:
        yield lambda paths: map(_probe_outcome, paths)
        return
    # Every plugin registered before the threads open files: Pillow identifies a file its
    # suffix misnames by importing the other plugins, and does not look again when another
    # thread has just imported them: the file would be skipped, "cannot identify image file".
    Image.init()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="eqaudit-check")
    try:
        yield lambda paths: pool.map(_probe_outcome, paths)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _probe_outcome(path: Path) -> _FileInfo | str:
    """:func:`_probe_image`'s info, or the reason the file is unreadable."""
    try:
        return _probe_image(path)
    except _Unreadable as exc:
        return str(exc)


def _draw_key(seed: int, relative: str) -> bytes:
    """Where a file comes in a seed's draw: a hash of the seed and its relative path (in
    Unicode's composed form, as macOS and Linux copies of one folder store names differently)."""
    name = unicodedata.normalize("NFC", relative)
    return hashlib.sha256(f"{seed}\0{name}".encode()).digest()


def _probe_image(path: Path) -> _FileInfo:
    """Check that one file decodes, and what it is (its :class:`_FileInfo`: its full size, EXIF
    orientation applied): every byte is decoded once (a JPEG at an eighth of its size: every
    byte is still read, so a truncated file is found, at a fraction of the time and memory),
    and what :func:`~eqaudit.data.preprocess.pil_to_array` would refuse is refused
    (:func:`~eqaudit.data.preprocess.check_pil_pixels`), but no float array is built: the
    loader decodes the file again for its pixels.

    Raises :class:`_Unreadable` with a short reason for anything that is not a usable image.
    Thread-safe; callers hold :func:`_bomb_warnings_ignored`.
    """
    return _decoded(path, (1, 1), check_pil_pixels)[1]


@contextmanager
def _bomb_warnings_ignored() -> Iterator[None]:
    """Pillow's DecompressionBombWarning ignored: we apply Image.MAX_IMAGE_PIXELS ourselves
    (:func:`_check_pixel_limit`), as a hard limit. ``catch_warnings`` swaps the process-wide
    filter list, so only the thread that owns the loader threads enters this, around all of
    their work; the threads call :func:`_decode_image` and :func:`_probe_image` directly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _decode_image(path: Path, draft: tuple[int, int] | None = None) -> tuple[np.ndarray, _FileInfo]:
    """One file's pixels, ``(H, W, 1|3)`` float32 in [0, 1], EXIF orientation applied, and its
    :class:`_FileInfo` (its full size). Callers hold :func:`_bomb_warnings_ignored`;
    thread-safe. ``draft``: a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (in the DCT,
    as libjpeg does), as long as it stays at least this large ``(width, height)``, before any
    orientation: a 81-megapixel photo took 2.65 s and 2 GB decoded whole, to be resized to a
    few hundred pixels.

    Raises :class:`_Unreadable` with a short reason for anything that is not a usable image.
    """
    return _decoded(path, draft, pil_to_array)


def _decoded(
    path: Path,
    draft: tuple[int, int] | None,
    finish: Callable[[Image.Image], _Decoded],
) -> tuple[_Decoded, _FileInfo]:
    """:func:`_decode_image` and :func:`_probe_image`: ``finish`` of the decoded, upright
    image, and its info; any failure, ``finish``'s too, as :class:`_Unreadable`."""
    try:
        if path.stat().st_size == 0:
            raise _Unreadable("empty file (0 bytes)")
        with Image.open(path) as image:
            _check_pixel_limit(image.size)
            full = image.size
            # (a camera's or phone's JPEG with an MPF segment is read as MPO, a JPEG subclass)
            if draft is not None and image.format in ("JPEG", "MPO"):
                image.draft(image.mode, draft)
            image.load()
            oriented, rotated = _exif_oriented(image)
            turned = rotated and oriented.size != image.size  # a quarter turn swaps the axes
            width, height = (full[1], full[0]) if turned else full
            info = _FileInfo(
                gray=is_gray_mode(oriented),
                alpha=has_alpha(oriented),
                size=(height, width),
                exif_rotated=rotated,
            )
            return finish(oriented), info
    except _Unreadable:
        raise
    except UnidentifiedImageError:
        raise _Unreadable("cannot identify image file") from None
    except Image.DecompressionBombError:
        raise _Unreadable(_bomb_reason(Image.MAX_IMAGE_PIXELS)) from None
    except Exception as exc:  # Pillow's plugins raise many types (OSError, SyntaxError, ...)
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise _Unreadable(f"cannot read image ({message})") from None


def _draft_size(info: _FileInfo, geometry: _Geometry) -> tuple[int, int] | None:
    """How small a JPEG may be decoded for ``geometry`` (see :func:`_decode_image`): twice the
    size its resize policy scales it to, so the resize still has the detail it would have had;
    None for ``center`` (pixel-exact crops of the full image)."""
    if geometry.resize == "center":
        return None
    plan = plan_resize(info.size, geometry.source_size, geometry.resize)
    height, width = plan.resized
    if info.exif_rotated:  # the draft is of the stored image, before its orientation
        return (2 * max(height, width), 2 * max(height, width))
    return (2 * width, 2 * height)


def _check_pixel_limit(size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise _Unreadable(_bomb_reason(limit, size))


def _bomb_reason(limit: int | None, size: tuple[int, int] | None = None) -> str:
    pixels = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return f"{pixels} exceed PIL.Image.MAX_IMAGE_PIXELS ({limit}): possible decompression bomb"


def _exif_oriented(image: Image.Image) -> tuple[Image.Image, bool]:
    """The image turned upright by its EXIF orientation tag, and whether it was turned."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation in (None, 1):
            return image, False
        return ImageOps.exif_transpose(image), True
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        return image, False


def _fit(values: np.ndarray, geometry: _Geometry) -> np.ndarray:
    """``(H, W, 1|3)`` float -> ``(C, *source_size)`` float32 view in the source's channels."""
    values = to_channels(values, geometry.channels)
    return resize_array(values, geometry.source_size, geometry.resize).transpose(2, 0, 1)


def _image_notes(infos: Counter[_FileInfo], geometry: _Geometry) -> list[str]:
    """Visible notes about conversions applied to a source's images (info -> image count)."""

    def count(test: Callable[[_FileInfo], bool]) -> int:
        return sum(n for info, n in infos.items() if test(info))

    notes = []
    if geometry.channels == 3 and (n := count(lambda i: i.gray)):
        notes.append(f"{_count(n, 'grayscale image')} converted to RGB")
    if geometry.channels == 1 and (n := count(lambda i: not i.gray)):
        notes.append(f"{_count(n, 'colour image')} converted to grayscale (BT.601 luma)")
    if n := count(lambda i: i.alpha):
        notes.append(f"{_count(n, 'image')} with transparency composited onto black")
    if n := count(lambda i: i.exif_rotated):
        notes.append(f"{_count(n, 'image')} turned upright by their EXIF orientation")
    target = geometry.source_size
    upscaled = count(lambda i: plan_resize(i.size, target, geometry.resize).upscales)
    if upscaled:
        notes.append(
            f"{_count(upscaled, 'image')} smaller than {target[0]}x{target[1]} upscaled "
            f"(resize policy '{geometry.resize}')"
        )
    return notes


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- labels ---------------------------------------------------------------------------------------
def load_class_names(path: Path) -> tuple[list[str], dict[str, int]]:
    """Class names in index order, and the name -> index map, from a ``.txt`` or ``.json`` file.

    ``.txt``: one name per line; the index is the line's position among non-blank lines.
    ``.json``: a list of names; an object ``{name: index}``; or an ``{"0": name}`` id-to-label
    object (as in Hugging Face configs). A name listed twice maps to its first index (ImageNet's
    usual lists name two classes 'crane' and two 'maillot'); where a name must pick one class
    (an image subfolder, a --label-action) a repeated one is refused.
    """
    names, mapping, _ = _load_label_map(path)
    return names, mapping


def _load_label_map(path: Path) -> tuple[list[str], dict[str, int], dict[str, str]]:
    """:func:`load_class_names`, and each name listed more than once with where: ``"lines 1
    and 2"`` in a ``.txt`` file (as the user sees it, blank lines counted), ``"classes 134 and
    517"`` in a ``.json`` one."""
    if not path.is_file():
        raise DataError(f"labels file '{path}' not found: give a .txt or .json file of class names")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json"):
        raise DataError(
            f"labels file '{path}' must be .txt (one class name per line) or .json "
            "(a list of names, or an object mapping name to index)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file '{path}' ({exc}): save it as UTF-8") from None
    names = _names_from_text(text) if suffix == ".txt" else _names_from_json(text, path)
    if not names:
        raise DataError(f"labels file '{path}' lists no class names: add one name per class")
    mapping: dict[str, int] = {}
    for index, name in enumerate(names):
        mapping.setdefault(name, index)
    if suffix == ".txt":  # where the user sees them: line numbers of the file, blank ones too
        lines = [i for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
        return names, mapping, repeated_names(names, lines, "line")
    return names, mapping, repeated_names(names, range(len(names)), "class")


def repeated_names(names: Sequence[str], places: Sequence[int], what: str) -> dict[str, str]:
    """Each name given more than once, with where (``places[i]`` is where ``names[i]`` is, a
    ``what``): ``{"crane": "classes 134 and 517"}``."""
    found: dict[str, list[int]] = {}
    for name, place in zip(names, places, strict=True):
        found.setdefault(name, []).append(place)
    return {name: _listed(what, at) for name, at in found.items() if len(at) > 1}


def _listed(what: str, places: list[int]) -> str:
    """``lines 1 and 2``, ``classes 3, 5 and 9``."""
    numbers = [str(p) for p in places]
    text = numbers[0] if len(numbers) == 1 else f"{', '.join(numbers[:-1])} and {numbers[-1]}"
    return f"{what}{'es' if what == 'class' else 's'} {text}"


def _names_from_text(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _names_from_json(text: str, path: Path) -> list[str]:
    fix = "give a list of class names or an object mapping class name to index"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"labels file '{path}' is not valid JSON ({exc}): {fix}") from None
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return [n.strip() for n in data]
    if not isinstance(data, dict) or not data:
        raise DataError(f"labels file '{path}' has the wrong structure: {fix}")
    if all(isinstance(v, str) for v in data.values()) and all(k.isdigit() for k in data):
        pairs = {int(k): v.strip() for k, v in data.items()}  # id -> label
    elif all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data.values()):
        pairs = {}
        for name, index in data.items():
            if index in pairs:
                raise DataError(
                    f"labels file '{path}' gives index {index} to both '{pairs[index]}' and "
                    f"'{name}': give each class its own index"
                )
            pairs[index] = name.strip()
    else:
        raise DataError(f"labels file '{path}' maps names to non-integer indices: {fix}")
    # Gaps in the indices keep their position, named by the index itself.
    return [pairs.get(i, str(i)) for i in range(max(pairs) + 1)]


def _folder_labels(
    ids: list[str],
    name_to_index: dict[str, int],
    class_names: list[str],
    repeated: dict[str, str] | None = None,
    labels_file: str = "the labels file",
) -> tuple[torch.Tensor, list[str]]:
    """Label of each image = index of its first-level subfolder's name; -1 when not a class.
    Names match in Unicode's composed form (NFC): macOS and zip files store 'café' decomposed
    (NFD), which a labels file typed elsewhere does not. A subfolder named after a class the
    labels file lists twice (``repeated``, see :func:`_load_label_map`) has no single class:
    it is refused."""
    composed = {unicodedata.normalize("NFC", name): index for name, index in name_to_index.items()}
    twice = {
        unicodedata.normalize("NFC", name): (name, at) for name, at in (repeated or {}).items()
    }
    for image_id in ids:
        parts = image_id.split("/")
        folder = unicodedata.normalize("NFC", parts[0])
        if len(parts) > 1 and folder in twice:
            name, at = twice[folder]
            raise DataError(
                f"{labels_file} lists '{name}' more than once ({at}), so the images in "
                f"'{parts[0]}/' have no single class: name each class once"
            )
    labels = []
    unknown = []
    for image_id in ids:
        parts = image_id.split("/")
        folder = unicodedata.normalize("NFC", parts[0])
        index = composed.get(folder, -1) if len(parts) > 1 else -1
        labels.append(index)
        if index < 0:
            unknown.append(image_id)
    notes = []
    if len(unknown) == len(ids):
        notes.append(
            f"none of the {len(ids)} images is in a subfolder named after one of the "
            f"{len(class_names)} classes: all labels are unknown (-1)"
        )
    elif unknown:
        folders = Counter(i.split("/")[0] for i in unknown if "/" in i)
        loose = [i for i in unknown if "/" not in i]
        where = []
        if folders:
            named = ", ".join(f"'{name}': {n}" for name, n in folders.most_common(3))
            more = f" and {len(folders) - 3} more" if len(folders) > 3 else ""
            where.append(
                f"{sum(folders.values())} in {_count(len(folders), 'subfolder')} named after no "
                f"class ({named}{more})"
            )
        if loose:
            where.append(f"{len(loose)} outside any subfolder (e.g. '{loose[0]}')")
        notes.append(f"{_count(len(unknown), 'image')} get label -1: {'; '.join(where)}")
    return torch.tensor(labels, dtype=torch.int64), notes


# -- arrays ---------------------------------------------------------------------------------------
class ArraySource(ImageSource):
    """Images from an ``(N, ...)`` numpy array (possibly memory-mapped), converted per batch."""

    def __init__(self, *, array: np.ndarray, layout: _ArrayLayout, **kwargs) -> None:
        super().__init__(**kwargs)
        self._array = array
        self._layout = layout
        # The images' hash (summary.data.sha256) is taken on a thread of its own while the
        # audit runs: ~0.4 s per GB of images (hashlib releases the GIL), which before the
        # audit doubled a GPU audit's time for 2048 images at 224 px.
        self._sha256: Future[str] = Future()
        threading.Thread(target=self._hash, daemon=True, name="eqaudit-array-hash").start()

    def _hash(self) -> None:
        try:
            self._sha256.set_result(_array_sha256(self._array, self._layout.indices))
        except BaseException as error:  # raised where the hash is read (the summary)
            self._sha256.set_exception(error)

    @property
    def description(self) -> DataDescription:
        """With the images' hash: waits for its thread (done long before an audit's end)."""
        try:
            digest = self._sha256.result()
        except Exception as error:
            where = f"'{self._description.path}'" if self._description.path else "the array"
            raise DataError(
                f"could not read the images of {where} to hash them: {cause_line(error)}"
            ) from error
        return replace(self._description, sha256=digest)

    def _load_into(self, positions: range, out: np.ndarray) -> None:
        indices = self._layout.indices[positions.start : positions.stop]
        # Per image arithmetic only: a chunk of a batch gives the pixels the whole batch would.
        batch = self._layout.to_float_nhwc(np.asarray(self._array[indices]))
        geometry = self._geometry
        plan = plan_resize(batch.shape[1:3], geometry.source_size, geometry.resize)
        if batch.shape[-1] == geometry.channels and not plan.resamples:
            # Every image is cropped or padded alike: the whole chunk at once, the pixels _fit
            # gives one image at a time (and no Python per image beside the GPU).
            out[...] = resize_array(batch, geometry.source_size, geometry.resize).transpose(
                0, 3, 1, 2
            )
            return
        for i, image in enumerate(batch):
            out[i] = _fit(image, geometry)


def _array_sha256(array: np.ndarray, indices: np.ndarray) -> str:
    """SHA-256 of the images ``array[indices]`` (dtype, shape, bytes), read in slices of at
    most 64 MiB: a memory-mapped .npy is not read whole into memory. ``indices`` are sorted; a
    run of consecutive ones (all of them, when every image is audited) is hashed from a view of
    the array, not from a copy."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape[1:]}".encode())
    per_image = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
    step = max(1, (64 << 20) // per_image)
    for start in range(0, len(indices), step):
        run = indices[start : start + step]
        consecutive = int(run[-1]) - int(run[0]) == len(run) - 1
        part = array[int(run[0]) : int(run[-1]) + 1] if consecutive else array[run]
        digest.update(np.ascontiguousarray(part))  # its bytes, in C order
    return digest.hexdigest()


@dataclass(frozen=True)
class _ArrayLayout:
    """How to read an image array: axis order, value scale, and which images are used."""

    channels_last: bool
    channels: int  # 1, 3 or 4 (4 = RGBA, composited onto black)
    divisor: float  # raw values / divisor -> [0, 1]
    indices: np.ndarray = field(repr=False)

    def to_float_nhwc(self, raw: np.ndarray) -> np.ndarray:
        """Raw ``(B, ...)`` slice -> ``(B, H, W, 1|3)`` float32 in [0, 1]."""
        values = raw.astype(np.float32)
        if values.ndim == 3:
            values = values[..., None]
        elif not self.channels_last:
            values = values.transpose(0, 2, 3, 1)
        if self.divisor != 1.0:
            values = values / np.float32(self.divisor)
        values = np.clip(values, 0.0, 1.0)
        return composite_alpha(values) if self.channels == 4 else values


def _open_array(
    array: np.ndarray,
    display: str | None,
    geometry: _Geometry,
    num_images: int | None,
    seed: int,
    labels_array: np.ndarray | None,
    class_names: list[str] | None,
) -> ArraySource:
    where = f"'{display}'" if display else "the array"
    notes: list[str] = []
    channels_last, channels = _array_axes(array, where, notes)
    count = array.shape[0]
    indices = np.arange(count)
    if num_images is not None and num_images < count:
        indices = np.sort(np.random.default_rng(seed).permutation(count)[:num_images])
    elif num_images is not None and num_images > count:
        notes.append(f"asked for {num_images} images; the array holds only {count}")
    divisor = _array_divisor(array, indices, where, notes)
    layout = _ArrayLayout(channels_last, channels, divisor, indices)
    h, w = _image_size(array.shape, channels_last)
    # Array images share one shape and dtype: one info stands for all of them.
    info = _FileInfo(gray=channels == 1, alpha=channels == 4, size=(h, w), exif_rotated=False)
    notes.extend(_image_notes(Counter({info: len(indices)}), geometry))
    labels = None
    if labels_array is not None:
        labels = _array_labels(labels_array, count, class_names, where)[indices]
    elif class_names is not None:
        notes.append("the labels file gives class names only: the array has no 'labels' to match")
    description = DataDescription(
        source="array",
        path=display,
        count=len(indices),
        synthetic=False,
        labelled=labels is not None,
        notes=tuple(notes),
        sha256=None,  # ArraySource hashes the images on a thread of its own
    )
    return ArraySource(
        array=array,
        layout=layout,
        geometry=geometry,
        description=description,
        ids=[f"array[{i}]" for i in indices],
        labels=labels,
        class_names=class_names,
    )


def _array_axes(array: np.ndarray, where: str, notes: list[str]) -> tuple[bool, int]:
    """(channels_last, channels) of an image array; refuses shapes that are not images."""
    shape = array.shape
    if array.ndim == 3:
        if shape[-1] in (3, 4) or (shape[0] in (3, 4) and min(shape[1:]) > 4):
            notes.append(
                f"array shape {shape} read as {shape[0]} grayscale images of {shape[1]}x{shape[2]};"
                " for one colour image add a leading batch axis"
            )
        _check_image_count(shape, where)
        return True, 1
    if array.ndim != 4:
        raise DataError(f"array in {where} has shape {shape}: --data arrays need {_ARRAY_SHAPES}")
    last, first = shape[3] in (1, 3, 4), shape[1] in (1, 3, 4)
    if not (last or first):
        raise DataError(
            f"array in {where} has shape {shape}, with no channel axis of size 1, 3 or 4: "
            f"--data arrays need {_ARRAY_SHAPES}"
        )
    if last and first:
        notes.append(f"array shape {shape} is ambiguous: read as channels-last (N,H,W,C)")
    _check_image_count(shape, where)
    return last, shape[3] if last else shape[1]


def _image_size(shape: tuple[int, ...], channels_last: bool) -> tuple[int, int]:
    """``(H, W)`` of the images of an array of ``shape`` read as :func:`_array_axes` says."""
    h, w = shape[1:3] if channels_last or len(shape) == 3 else shape[2:4]
    return int(h), int(w)


def array_image_size(data: Any) -> tuple[int, int] | None:
    """``(H, W)`` of the images of an in-memory array (numpy or torch) as ``--data`` reads it;
    None for anything else, or an array that is no image array (the loader says why)."""
    if not isinstance(data, (np.ndarray, torch.Tensor)):
        return None
    try:
        channels_last, _ = _array_axes(data, "the array", [])  # type: ignore[arg-type]
    except DataError:
        return None
    return _image_size(tuple(data.shape), channels_last)


def _check_image_count(shape: tuple[int, ...], where: str) -> None:
    if 0 in shape:
        raise DataError(f"array in {where} has shape {shape}, which holds no pixels: {_DATA_HINT}")


def _array_divisor(array: np.ndarray, indices: np.ndarray, where: str, notes: list[str]) -> float:
    """What raw values are divided by to reach [0, 1], from the dtype (and, for floats, range)."""
    kind, dtype = array.dtype.kind, array.dtype
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if kind == "b":
        return 1.0
    if kind not in "iuf":
        raise DataError(
            f"array in {where} has dtype {dtype}: use uint8 (0-255), uint16 (0-65535) "
            "or float (0-1) pixel values"
        )
    low, high = _value_range(array, indices, where)
    if kind in "iu":
        if low < 0 or high > 255:
            raise DataError(
                f"array in {where} has {dtype} values from {low} to {high}: integer pixels must "
                "lie in 0-255 (or use uint16 for 16-bit images)"
            )
        notes.append(f"{dtype} array values read as 0-255 pixel values")
        return 255.0
    divisor = 1.0
    if high > 1.5:
        divisor = 255.0
        notes.append(f"float array values reach {high:g}: read as 0-255 and divided by 255")
    if low < -_VALUE_TOLERANCE or high / divisor > 1.0 + _VALUE_TOLERANCE:
        raise DataError(
            f"array in {where} has values from {low:g} to {high:g}: --data arrays must hold raw "
            "pixels in 0-1 or 0-255, not normalised values"
        )
    return divisor


def _value_range(array: np.ndarray, indices: np.ndarray, where: str) -> tuple[float, float]:
    """Min and max over the used images, read in chunks (the array may be memory-mapped) on the
    loader threads (numpy's reductions release the GIL): a fixed cost that grows with the
    images, paid before the first batch. A NaN or an infinity shows in the min or the max."""

    def extremes(start: int) -> tuple[float, float]:
        chunk = np.asarray(array[indices[start : start + _RANGE_CHUNK]])
        with np.errstate(invalid="ignore"):
            return chunk.min().item(), chunk.max().item()

    starts = range(0, len(indices), _RANGE_CHUNK)
    workers = min(len(starts), default_load_workers())
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="eqaudit-range") as pool:
            found = list(pool.map(extremes, starts))
    else:
        found = [extremes(start) for start in starts]
    low, high = min(f[0] for f in found), max(f[1] for f in found)
    if any(not math.isfinite(v) for f in found for v in f):
        raise DataError(f"array in {where} contains NaN or infinite values: remove them")
    return low, high


def _array_labels(
    labels: np.ndarray, count: int, class_names: list[str] | None, where: str
) -> torch.Tensor:
    """Validated ``labels`` array from an ``.npz`` as an int64 tensor."""
    if labels.dtype.kind not in "iu" or labels.shape != (count,):
        raise DataError(
            f"'labels' in {where} has shape {labels.shape} and dtype {labels.dtype}: it must be "
            f"integers of shape ({count},), one class index per image (-1 for unknown)"
        )
    values = labels.astype(np.int64)
    if values.size and values.min() < -1:
        raise DataError(f"'labels' in {where} has {values.min()}: use -1 for an unknown label")
    if class_names is not None and values.size and values.max() >= len(class_names):
        raise DataError(
            f"'labels' in {where} has class index {values.max()} but the labels file lists "
            f"{len(class_names)} classes: give the matching labels file"
        )
    return torch.from_numpy(values)


def load_array_file(path: Path, display: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (and ``labels`` when an ``.npz`` holds them) from a ``.npy``/``.npz`` file.

    Always ``allow_pickle=False``: an object array is refused, never unpickled. ``.npy`` files are
    memory-mapped, so only the images in use are read.
    """
    try:
        if path.suffix.lower() == ".npy":
            _refuse_object_npy(path, display)
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        with np.load(path, allow_pickle=False) as archive:
            return _pick_npz_images(archive, display), _npz_labels(archive, display)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        message = " ".join(str(exc).split())
        raise DataError(
            f"cannot load '{display}' as a numpy array ({message}): save plain numeric arrays "
            "with numpy.save / numpy.savez (object arrays are refused)"
        ) from None


def _refuse_object_npy(path: Path, display: str) -> None:
    """Refuse an object-dtype ``.npy`` from its header alone (numpy's own error is cryptic)."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    with open(path, "rb") as handle:
        reader = readers.get(np.lib.format.read_magic(handle))
        if reader is None:  # a newer header version: np.load's own check still applies
            return
        dtype = reader(handle)[2]
    if dtype.hasobject:
        raise DataError(
            f"'{display}' holds Python objects (dtype object), not pixel values; object arrays "
            "are refused, never unpickled: save a numeric array (uint8 or float) with numpy.save"
        )


def _npz_member(archive: np.lib.npyio.NpzFile, key: str, display: str) -> np.ndarray:
    """The array stored under ``key``. numpy hands out a member that is not a ``.npy`` file (a
    zip made by other tools) as raw bytes: refused here, naming it."""
    value = archive[key]
    if not isinstance(value, np.ndarray):
        raise DataError(
            f"'{key}' in '{display}' is not a .npy array (the archive is a zip of other "
            "files): save the images with numpy.savez(path, images=array)"
        )
    return value


def _pick_npz_images(archive: np.lib.npyio.NpzFile, display: str) -> np.ndarray:
    if "images" in archive.files:
        return _npz_member(archive, "images", display)
    for key in archive.files:
        if key == "labels":
            continue
        try:
            candidate = archive[key]
        except ValueError:  # an object array: refused without unpickling; look further
            continue
        if isinstance(candidate, np.ndarray) and candidate.ndim in (3, 4):
            return candidate
    raise DataError(
        f"no image array in '{display}' (keys: {', '.join(archive.files) or 'none'}): "
        "store the images under the key 'images' with shape " + _ARRAY_SHAPES
    )


def _npz_labels(archive: np.lib.npyio.NpzFile, display: str) -> np.ndarray | None:
    return _npz_member(archive, "labels", display) if "labels" in archive.files else None


# -- synthetic ------------------------------------------------------------------------------------
class SyntheticSource(ImageSource):
    """Deterministic structured synthetic images (see :mod:`eqaudit.data.synthetic`)."""

    #: runs of this many images are drawn together (few, large numpy calls): a loader task
    #: gets at least that many
    run_length = SYNTHETIC_CHUNK

    def __init__(self, *, seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._seed = seed

    def _load_into(self, positions: range, out: np.ndarray) -> None:
        # Image i depends on (seed, i) only, whichever thread and batch draws it; a run of
        # consecutive positions is drawn together (few, large numpy calls that release the GIL).
        if positions.step == 1:
            synthetic_images_into(out, positions.start, self._seed)
            return
        for i, position in enumerate(positions):
            synthetic_images_into(out[i : i + 1], position, self._seed)


def _open_synthetic(
    geometry: _Geometry, num_images: int | None, seed: int, class_names: list[str] | None
) -> SyntheticSource:
    count = DEFAULT_SYNTHETIC_COUNT if num_images is None else num_images
    description = DataDescription(
        source="synthetic",
        path=None,
        count=count,
        synthetic=True,
        labelled=False,
        notes=(
            f"no --data given: auditing {count} synthetic images (gratings and shapes); "
            "results on them say little about real images, pass --data for a meaningful audit",
        ),
    )
    return SyntheticSource(
        seed=seed,
        geometry=geometry,
        description=description,
        ids=[f"synthetic[{i}]" for i in range(count)],
        labels=None,
        class_names=class_names,
    )


# -- entry point ----------------------------------------------------------------------------------
def open_images(
    data: str | Path | np.ndarray | torch.Tensor | None,
    *,
    size: tuple[int, int],
    margin: int = 0,
    channels: int = 3,
    resize: str = "crop",
    num_images: int | None = None,
    seed: int = 0,
    labels: str | Path | None = None,
) -> ImageSource:
    """Open the images to audit, delivered at ``(H + 2*margin, W + 2*margin)`` in pixel space.

    ``data``: ``None`` (synthetic), a folder of images, a single image file, a ``.npy``/``.npz``
    file, or an in-memory array/tensor with the shapes an array file may have.
    ``size`` is the model's ``(H, W)``; ``channels`` 3 (RGB) or 1 (gray); ``resize`` one of
    ``crop``, ``stretch``, ``letterbox``; ``num_images`` a deterministic subset for ``seed``;
    ``labels`` a ``.txt``/``.json`` class-name file.

    Raises :class:`~eqaudit.errors.DataError` for missing or unusable data and
    :class:`~eqaudit.errors.UsageError` for invalid options.
    """
    geometry = _check_options(size, margin, channels, resize, num_images, seed)
    label_map = None
    if labels is not None:
        label_map = (*_load_label_map(Path(labels)), f"labels file '{labels}'")
    class_names = label_map[0] if label_map else None
    if data is None:
        return _open_synthetic(geometry, num_images, seed, class_names)
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise DataError(
                "the image array has dtype object: pass a numeric array (uint8, uint16 or float)"
            )
        return _open_array(data, None, geometry, num_images, seed, None, class_names)
    display = str(data)
    path = Path(data)
    if not display.strip():
        raise DataError(f"--data is empty: {_DATA_HINT}")
    if path.is_dir():
        others: list[Path] = []
        files = find_image_files(path, others)
        if not files:
            raise DataError(f"no images found in '{display}': {_DATA_HINT}")
        other = [_relative(f, path) for f in others]
        return _open_folder(path, files, display, geometry, num_images, seed, label_map, other)
    if not path.exists():
        raise DataError(f"'{display}' does not exist: {_DATA_HINT}")
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        array, labels_array = load_array_file(path, display)
        return _open_array(array, display, geometry, num_images, seed, labels_array, class_names)
    if suffix in IMAGE_SUFFIXES:
        return _open_folder(path.parent, [path], display, geometry, num_images, seed, label_map)
    raise DataError(f"'{display}' has an unsupported type ({suffix or 'no suffix'}): {_DATA_HINT}")


def _check_options(
    size: tuple[int, int],
    margin: int,
    channels: int,
    resize: str,
    num_images: int | None,
    seed: int,
) -> _Geometry:
    if len(size) != 2 or not all(_positive_int(s) for s in size):
        raise UsageError(f"input size must be two positive integers (H, W), got {size!r}")
    if not (_positive_int(margin) or margin == 0):
        raise UsageError(f"margin must be a non-negative integer, got {margin!r}")
    if channels not in (1, 3):
        raise UsageError(f"pixel channels must be 1 (gray) or 3 (RGB), got {channels!r}")
    if resize not in RESIZE_POLICIES:
        raise UsageError(
            f"unknown resize policy '{resize}': choose one of {', '.join(RESIZE_POLICIES)}"
        )
    if num_images is not None and not _positive_int(num_images):
        raise UsageError(f"--num-images must be a positive integer, got {num_images!r}")
    if not (_positive_int(seed) or seed == 0):
        raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")
    return _Geometry((int(size[0]), int(size[1])), int(margin), channels, resize)


def _positive_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0

"""Build the bundled demo assets: procedural images and a tiny CNN (state dict + ONNX).

Run from the repository root: ``python scripts/make_demo.py``. Deterministic (fixed seeds,
deterministic torch algorithms), uses no network, and takes about a minute on two CPU cores.

Steps:

1. Draw 40x40 RGB images of seven classes: ``circle``, ``square``, ``cross`` (any orientation)
   and ``arrow_up``, ``arrow_right``, ``arrow_down``, ``arrow_left`` (the direction the arrow
   points, jittered by at most 10 degrees), on a textured, noisy background.
2. Write the evaluation set (12 images per class) to ``eqaudit/demo/assets/images`` and the class
   names to ``eqaudit/demo/assets/classes.txt``.
3. Train :func:`eqaudit.demo.model.build` on a separate, freshly drawn training set with random
   33x33 crops and D4 augmentation whose labels move with the image (arrows rotate/mirror their
   label; the shapes keep theirs). The label permutations are checked first by drawing arrows,
   transforming them and reading off the direction they point.
4. Save the state dict (``demo_cnn.pt``) and the ONNX export (``demo_cnn.onnx``, opset 17, class
   names in the metadata), and check ONNX Runtime against torch on the evaluation images.

Convention: rot90 is counter-clockwise as ``torch.rot90(x, 1, (-2, -1))``; flip_h mirrors
left-right (``torch.flip(x, (-1,))``).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image, ImageDraw
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eqaudit.demo import (  # noqa: E402
    ASSETS,
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
from eqaudit.demo.model import build  # noqa: E402

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges.
EVAL_PER_CLASS = 12
TRAIN_PER_CLASS = 1000
HELDOUT_PER_CLASS = 100
EPOCHS = 20
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
SEED_EVAL, SEED_TRAIN, SEED_HELDOUT, SEED_TORCH = 2024, 7, 99, 0
ARROW_ANGLES = {"arrow_right": 0.0, "arrow_up": 90.0, "arrow_left": 180.0, "arrow_down": 270.0}
MAX_ARROW_JITTER_DEG = 10.0
MIN_LUMA_CONTRAST = 70.0
CROP_OFFSET = (SOURCE_SIZE - INPUT_SIZE) // 2


# --------------------------------------------------------------------------- drawing


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _rotated(points: list[tuple[float, float]], centre: tuple[float, float], angle_deg: float):
    """Rotate local (u, v) points by ``angle_deg`` counter-clockwise on screen, then place them.

    Image coordinates have y pointing down, so direction (cos a, -sin a) is "angle a
    counter-clockwise from pointing right": 90 degrees points up.
    """
    a = math.radians(angle_deg)
    d = (math.cos(a), -math.sin(a))  # the local u axis on screen
    n = (math.sin(a), math.cos(a))  # the local v axis (u rotated clockwise on screen)
    cx, cy = centre
    return [(cx + u * d[0] + v * n[0], cy + u * d[1] + v * n[1]) for u, v in points]


def _shape_mask(
    class_name: str, rng: np.random.Generator, clean: bool = False, angle: float | None = None
) -> np.ndarray:
    """Alpha mask (SOURCE_SIZE, SOURCE_SIZE) in [0, 1] of one object of ``class_name``.

    ``clean`` fixes size and position (used to check the label permutations).
    """
    s = SUPERSAMPLE
    canvas = Image.new("L", (SOURCE_SIZE * s, SOURCE_SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    jitter = np.zeros(2) if clean else rng.uniform(-3.0, 3.0, size=2)
    cx, cy = (SOURCE_SIZE / 2 + jitter[0]) * s, (SOURCE_SIZE / 2 + jitter[1]) * s
    spin = float(rng.uniform(0.0, 90.0)) if angle is None else angle

    def polygon(points: list[tuple[float, float]], rot: float) -> None:
        scaled = [(u * s, v * s) for u, v in points]
        draw.polygon(_rotated(scaled, (cx, cy), rot), fill=255)

    if class_name == "circle":
        r = (9.0 if clean else rng.uniform(7.0, 12.0)) * s
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif class_name == "square":
        h = 8.0 if clean else rng.uniform(6.0, 9.5)
        polygon([(-h, -h), (h, -h), (h, h), (-h, h)], spin)
    elif class_name == "cross":
        arm = 10.0 if clean else rng.uniform(8.0, 12.5)
        t = (4.5 if clean else rng.uniform(3.5, 5.5)) / 2
        polygon([(-arm, -t), (arm, -t), (arm, t), (-arm, t)], spin)
        polygon([(-t, -arm), (t, -arm), (t, arm), (-t, arm)], spin)
    elif class_name in ARROW_ANGLES:
        length = 24.0 if clean else rng.uniform(18.0, 27.0)
        t = (4.0 if clean else rng.uniform(3.0, 5.0)) / 2
        head_w = (14.0 if clean else rng.uniform(10.0, 14.0)) / 2
        head_l = 10.0 if clean else rng.uniform(7.0, 10.0)
        tail, tip = -length / 2, length / 2
        if angle is None:
            direction = ARROW_ANGLES[class_name]
            if not clean:
                direction += rng.uniform(-MAX_ARROW_JITTER_DEG, MAX_ARROW_JITTER_DEG)
        else:
            direction = angle
        polygon(
            [(tail, -t), (tip - head_l + 0.5, -t), (tip - head_l + 0.5, t), (tail, t)], direction
        )
        polygon([(tip - head_l, -head_w), (tip, 0.0), (tip - head_l, head_w)], direction)
    else:
        raise ValueError(f"unknown class {class_name!r}")
    small = canvas.resize((SOURCE_SIZE, SOURCE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Base colour + a linear gradient + low-frequency blotches, (H, W, 3) float."""
    n = SOURCE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5
    phi = rng.uniform(0.0, 2 * math.pi)
    gradient = rng.uniform(10.0, 40.0) * (xx * math.cos(phi) + yy * math.sin(phi))
    coarse = rng.normal(0.0, 1.0, size=(5, 5, 3)).astype(np.float32)
    blotches = np.stack(
        [
            np.asarray(
                Image.fromarray(coarse[..., c]).resize((n, n), Image.Resampling.BICUBIC),
                dtype=np.float32,
            )
            for c in range(3)
        ],
        axis=-1,
    )
    return base[None, None, :] + gradient[..., None] + rng.uniform(5.0, 14.0) * blotches


def draw_image(class_name: str, rng: np.random.Generator) -> np.ndarray:
    """One (SOURCE_SIZE, SOURCE_SIZE, 3) uint8 RGB image of ``class_name``."""
    bg = rng.uniform(0.0, 255.0, size=3)
    while True:
        fg = rng.uniform(0.0, 255.0, size=3)
        if abs(_luma(fg) - _luma(bg)) >= MIN_LUMA_CONTRAST:
            break
    alpha = _shape_mask(class_name, rng)[..., None]
    fg_field = fg[None, None, :] + rng.normal(0.0, 6.0, size=(1, 1, 3))  # a slight tint shift
    image = _background(rng, bg) * (1 - alpha) + fg_field * alpha
    image += rng.normal(0.0, rng.uniform(2.0, 6.0), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def draw_set(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every class: uint8 (N, H, W, 3) and int64 labels (N,)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(per_class):
        for label, name in enumerate(CLASS_NAMES):
            images.append(draw_image(name, rng))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------- D4 labels


def apply_d4(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """rot90 (counter-clockwise) ``k`` times, then flip_h if ``flip``; acts on the last two axes."""
    x = torch.rot90(x, k, (-2, -1))
    return torch.flip(x, (-1,)) if flip else x


def d4_label(label: int, k: int, flip: bool) -> int:
    for _ in range(k):
        label = ROT90_PERMUTATION[label]
    return FLIP_H_PERMUTATION[label] if flip else label


def _pointing(mask: torch.Tensor) -> str:
    """The arrow class of a clean arrow mask: its head is heavier, so the centroid leans to it."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    bbox_centre = torch.tensor([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2])
    yy, xx = torch.meshgrid(
        torch.arange(mask.shape[0], dtype=torch.float64),
        torch.arange(mask.shape[1], dtype=torch.float64),
        indexing="ij",
    )
    centroid = torch.stack([(xx * mask).sum(), (yy * mask).sum()]) / mask.sum()
    dx, dy = (centroid - bbox_centre).tolist()
    if abs(dx) > abs(dy):
        return "arrow_right" if dx > 0 else "arrow_left"
    return "arrow_down" if dy > 0 else "arrow_up"


def check_label_permutations() -> list[str]:
    """Draw each arrow, apply all 8 D4 elements, and check the label the image now shows."""
    rng = np.random.default_rng(0)
    for name in ARROW_ANGLES:
        mask = torch.from_numpy(_shape_mask(name, rng, clean=True)).double()
        if _pointing(mask) != name:
            raise AssertionError(f"drawn {name} reads as {_pointing(mask)}")
        for k in range(4):
            for flip in (False, True):
                seen = _pointing(apply_d4(mask, k, flip))
                expected = CLASS_NAMES[d4_label(CLASS_NAMES.index(name), k, flip)]
                if seen != expected:
                    raise AssertionError(
                        f"{name} under rot90^{k} flip={flip}: {seen} != {expected}"
                    )
    rows = ["element | class-index permutation (i -> P[i])"]
    for title, perm in (("rot90", ROT90_PERMUTATION), ("flip_h", FLIP_H_PERMUTATION)):
        pairs = ", ".join(
            f"{CLASS_NAMES[i]}->{CLASS_NAMES[j]}" for i, j in enumerate(perm) if i != j
        )
        rows.append(f"{title:6s} | {list(perm)}  ({pairs})")
    return rows


# --------------------------------------------------------------------------- tensors


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float, /255, ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def centre_crop(pixels: torch.Tensor) -> torch.Tensor:
    o = CROP_OFFSET
    return pixels[..., o : o + INPUT_SIZE, o : o + INPUT_SIZE]


def augment(
    pixels: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 33x33 crop and a random D4 element per image; labels follow the transform."""
    b = pixels.shape[0]
    max_offset = SOURCE_SIZE - INPUT_SIZE
    offsets = torch.randint(0, max_offset + 1, (b, 2), generator=gen)
    ks = torch.randint(0, 4, (b,), generator=gen)
    flips = torch.randint(0, 2, (b,), generator=gen).bool()
    out = torch.empty(b, 3, INPUT_SIZE, INPUT_SIZE, dtype=pixels.dtype)
    new_labels = torch.empty_like(labels)
    for i in range(b):
        oy, ox = offsets[i].tolist()
        crop = pixels[i, :, oy : oy + INPUT_SIZE, ox : ox + INPUT_SIZE]
        k, flip = int(ks[i]), bool(flips[i])
        out[i] = apply_d4(crop, k, flip)
        new_labels[i] = d4_label(int(labels[i]), k, flip)
    return out, new_labels


def to_chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    logits = model(normalise(centre_crop(pixels)))
    return float((logits.argmax(1) == labels).double().mean())


# --------------------------------------------------------------------------- steps


def write_eval_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Write the shipped PNGs and classes.txt; return them read back from disk."""
    images, labels = draw_set(EVAL_PER_CLASS, SEED_EVAL)
    ASSETS.mkdir(parents=True, exist_ok=True)
    CLASSES_PATH.write_text("".join(f"{name}\n" for name in CLASS_NAMES))
    counters = dict.fromkeys(CLASS_NAMES, 0)
    for image, label in zip(images, labels, strict=True):
        name = CLASS_NAMES[label]
        folder = IMAGES_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "RGB").save(
            folder / f"{name}_{counters[name]:02d}.png", optimize=True
        )
        counters[name] += 1
    loaded, loaded_labels = [], []
    for label, name in enumerate(CLASS_NAMES):
        for path in sorted((IMAGES_DIR / name).glob("*.png")):
            loaded.append(np.asarray(Image.open(path).convert("RGB")))
            loaded_labels.append(label)
    return to_chw(np.stack(loaded)), torch.tensor(loaded_labels)


def train(
    pixels: torch.Tensor, labels: torch.Tensor, heldout: tuple[torch.Tensor, torch.Tensor]
) -> nn.Module:
    torch.manual_seed(SEED_TORCH)
    gen = torch.Generator().manual_seed(SEED_TORCH)
    model = build()
    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(labels) / BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=LEARNING_RATE, total_steps=EPOCHS * steps_per_epoch
    )
    # Label smoothing keeps the logits small (|z| < ~10), so float32 differences between torch and
    # ONNX Runtime stay well inside an absolute 1e-5; unsmoothed logits reached ~100.
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(labels), generator=gen)
        total = 0.0
        for start in range(0, len(labels), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            x, y = augment(pixels[idx], labels[idx], gen)
            loss = loss_fn(model(normalise(x)), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        acc = accuracy(model, *heldout)
        print(f"epoch {epoch + 1:2d}: loss {total / len(labels):.4f}  held-out acc {acc:.3f}")
    return model.eval()


def export_onnx(model: nn.Module) -> None:
    dummy = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    # The TorchScript exporter (dynamo=False) is deliberate: its graph is small, plain and stable
    # across torch versions; silence only its deprecation notice.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(
            model,
            (dummy,),
            str(ONNX_PATH),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(ONNX_PATH))
    onnx.helper.set_model_props(
        proto,
        {
            "class_names": json.dumps(list(CLASS_NAMES)),
            "preprocessing": "pixels / 255, then ImageNet mean/std (RGB, NCHW)",
            "mean": json.dumps(list(IMAGENET_MEAN)),
            "std": json.dumps(list(IMAGENET_STD)),
        },
    )
    proto.doc_string = "eqaudit demo CNN (scripts/make_demo.py)"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(ONNX_PATH))


def check_onnx(model: nn.Module, pixels: torch.Tensor) -> float:
    x = normalise(centre_crop(pixels))
    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        torch_logits = model(x).numpy()
    diff = float(np.abs(ort_logits - torch_logits).max())
    if diff > 1e-5:
        raise AssertionError(f"ONNX Runtime and torch differ by {diff:.2e} (> 1e-5)")
    names = json.loads(
        {p.key: p.value for p in onnx.load(str(ONNX_PATH)).metadata_props}["class_names"]
    )
    if tuple(names) != CLASS_NAMES:
        raise AssertionError(f"ONNX metadata class_names {names} != {CLASS_NAMES}")
    return diff


@torch.no_grad()
def d4_consistency(model: nn.Module, pixels: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement with the permuted prediction and mean JS divergence (bits) between
    p(T_g x) and P_g p(x), over the 7 non-identity D4 elements (near-equivariant, not exact).
    """
    crops = centre_crop(pixels)
    probs = model(normalise(crops)).softmax(1)
    agreements, divergences = [], []
    for k in range(4):
        for flip in (False, True):
            if k == 0 and not flip:
                continue
            target = torch.tensor([d4_label(c, k, flip) for c in range(len(CLASS_NAMES))])
            expected = torch.empty_like(probs)
            expected[:, target] = probs  # class c's score moves to class P_g(c)
            moved = model(normalise(apply_d4(crops, k, flip))).softmax(1)
            mix = (moved + expected) / 2
            js = 0.5 * (moved * (moved / mix).log2()).sum(1)
            js += 0.5 * (expected * (expected / mix).log2()).sum(1)
            agreements.append((moved.argmax(1) == expected.argmax(1)).double().mean())
            divergences.append(js.double().mean())
    return float(torch.stack(agreements).mean()), float(torch.stack(divergences).mean())


def main() -> None:
    start = time.perf_counter()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED_TORCH)

    for row in check_label_permutations():
        print(row)

    eval_pixels, eval_labels = write_eval_set()
    train_images, train_labels = draw_set(TRAIN_PER_CLASS, SEED_TRAIN)
    heldout_images, heldout_labels = draw_set(HELDOUT_PER_CLASS, SEED_HELDOUT)
    heldout = (to_chw(heldout_images), torch.from_numpy(heldout_labels))
    print(f"drew {len(train_labels)} training images in {time.perf_counter() - start:.1f}s")

    t0 = time.perf_counter()
    model = train(to_chw(train_images), torch.from_numpy(train_labels), heldout)
    train_seconds = time.perf_counter() - t0

    torch.save(model.state_dict(), STATE_DICT_PATH)
    export_onnx(model)
    diff = check_onnx(model, eval_pixels)

    eval_acc = accuracy(model, eval_pixels, eval_labels)
    heldout_acc = accuracy(model, *heldout)
    asset_bytes = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    print(f"training time: {train_seconds:.1f}s")
    print(f"shipped eval-set accuracy (centre 33x33 crops, n={len(eval_labels)}): {eval_acc:.4f}")
    print(f"held-out accuracy (n={len(heldout_labels)}): {heldout_acc:.4f}")
    agreement, js = d4_consistency(model, eval_pixels)
    print(f"D4 on the eval set (near, not exact): agreement {agreement:.4f}, JS {js:.4f}")
    print(f"ONNX Runtime vs torch max |diff| on the eval set: {diff:.2e}")
    print(f"assets: {asset_bytes / 1024:.1f} KiB in {ASSETS.relative_to(REPO_ROOT)}")
    if eval_acc < 0.9:
        raise SystemExit(f"eval accuracy {eval_acc:.3f} < 0.90: adjust the training settings")


if __name__ == "__main__":
    main()

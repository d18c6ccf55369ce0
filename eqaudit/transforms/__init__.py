"""Transform families, their registry, and the ``--transforms`` spec parser.

A spec is a comma-separated list of families; parameters follow a colon and may themselves be
comma-separated numbers: ``d4``, ``c4,flips``, ``rot:15,30,45``, ``shift:2,4``,
``d4,shift:4,rot:10``. The identity is always run first (it is the reference every element is
compared with) and elements that appear in several families are run once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eqaudit.errors import TransformSpecError
from eqaudit.transforms.elements import (
    D4_NAMES,
    DISK_FRACTION,
    SHIFT_MODES,
    D4Element,
    FeatureAction,
    NotMeasurable,
    Rotation,
    Shift,
    Transform,
    center_crop,
    fourier_shift,
    rotate,
)

__all__ = [
    "D4_NAMES",
    "DISK_FRACTION",
    "FAMILIES",
    "SHIFT_MODES",
    "D4Element",
    "FeatureAction",
    "NotMeasurable",
    "Rotation",
    "Shift",
    "Transform",
    "center_crop",
    "fourier_shift",
    "list_families",
    "parse_transforms",
    "rotate",
]


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    example: str
    takes_values: bool
    build: Callable[[list[float], str], list[Transform]]


def _d4(names: list[str]) -> Callable[[list[float], str], list[Transform]]:
    return lambda values, mode: [D4Element.named(n) for n in names]


def _shifts(values: list[float], mode: str) -> list[Transform]:
    elements: list[Transform] = []
    for v in values:
        elements += [Shift(0, v, mode), Shift(0, -v, mode), Shift(v, 0, mode), Shift(-v, 0, mode)]
    return elements


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "d4",
            "dihedral group of the square: 4 rotations by 90 deg, 4 reflections (exact)",
            "d4",
            False,
            _d4(list(D4_NAMES.values())),
        ),
        Family(
            "c4",
            "rotations by 0/90/180/270 deg (exact)",
            "c4",
            False,
            _d4(["id", "rot90", "rot180", "rot270"]),
        ),
        Family(
            "flips",
            "identity, left-right and up-down mirror (exact)",
            "flips",
            False,
            _d4(["id", "flip_h", "flip_v"]),
        ),
        Family(
            "rot",
            "rotations by arbitrary angles in degrees, counter-clockwise (bicubic resampling, "
            "compared inside a central disk; reports an interpolation floor)",
            "rot:15,30,45",
            True,
            lambda values, mode: [Rotation(v) for v in values],
        ),
        Family(
            "shift",
            "translations by N px right/left/down/up (--shift-mode crop|circular|zero|reflect; "
            "fractional N uses band-limited Fourier shifts)",
            "shift:2,4",
            True,
            _shifts,
        ),
    ]
}


def list_families(pattern: str | None = None) -> list[Family]:
    import fnmatch

    return [f for f in FAMILIES.values() if pattern is None or fnmatch.fnmatch(f.name, pattern)]


def _number(text: str, family: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TransformSpecError(
            f"'{text}' in the {family} transform is not a number: write e.g. "
            f"--transforms {FAMILIES[family].example}"
        ) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise TransformSpecError(f"'{text}' in the {family} transform is not a finite number")
    return value


def _turn(degrees: float) -> float:
    """An angle as a turn in [0, 360), equal angles equal to 1e-9 degrees (rot:30.1 and
    rot:-329.9 differ in the last bits of float arithmetic)."""
    turn = round(degrees % 360, 9)
    return 0.0 if turn == 360 else turn


def _turn_of(element: Transform) -> float | None:
    """The turn of a rotation: a Rotation's, or a D4 element's without a flip; else None."""
    if isinstance(element, Rotation):
        return _turn(element.degrees)
    if isinstance(element, D4Element) and not element.flip and element.k:
        return 90.0 * element.k
    return None


def quarter_turns_exact(elements: list[Transform], height: int, width: int) -> list[Transform]:
    """``rot:90`` (180, 270) as the exact D4 rotation where it is defined: a quarter turn maps a
    square pixel grid onto itself, so resampling it (bicubic, compared in a disk) would only add
    interpolation error. On a non-square input rot90 and rot270 stay resampled rotations (the
    D4 elements are not defined there); rot180 is exact on any grid."""
    out: list[Transform] = []
    for element in elements:
        if isinstance(element, Rotation) and _turn(element.degrees) % 90 == 0:
            k = int(_turn(element.degrees) // 90)
            if height == width or k == 2:
                element = D4Element(k, False)
        out.append(element)
    return out


def parse_transforms(spec: str, shift_mode: str = "crop") -> list[Transform]:
    """Parse a ``--transforms`` spec into elements, identity first, duplicates removed."""
    if shift_mode not in SHIFT_MODES:
        raise TransformSpecError(
            f"unknown --shift-mode '{shift_mode}': choose one of {', '.join(SHIFT_MODES)}"
        )
    groups: list[tuple[str, list[float]]] = []
    for raw in spec.split(","):
        token = raw.strip().lower()
        if not token:
            continue
        name, _, value = token.partition(":")
        if name in FAMILIES:
            groups.append((name, []))
            if value:
                groups[-1][1].append(_number(value, name))
            elif FAMILIES[name].takes_values:
                pass  # values may follow as separate tokens; checked below
        elif groups and FAMILIES[groups[-1][0]].takes_values and not value:
            groups[-1][1].append(_number(token, groups[-1][0]))
        else:
            known = ", ".join(f.example for f in FAMILIES.values())
            raise TransformSpecError(f"unknown transform '{raw.strip()}': use one of {known}")
    if not groups:
        raise TransformSpecError("no transforms given: use e.g. --transforms d4")
    elements: list[Transform] = [D4Element(0, False)]
    seen = {"id"}
    for name, values in groups:
        family = FAMILIES[name]
        if family.takes_values and not values:
            raise TransformSpecError(
                f"the {name} transform needs values: write e.g. --transforms {family.example}"
            )
        if not family.takes_values and values:
            raise TransformSpecError(f"the {name} transform takes no values: write {name}")
        if name == "shift" and any(v <= 0 for v in values):
            raise TransformSpecError("shift amounts must be positive: e.g. --transforms shift:2,4")
        for element in family.build(values, shift_mode):
            if isinstance(element, Rotation):
                turn = _turn(element.degrees)
                if turn == 0:
                    continue  # the identity, always run
                if turn % 90 == 0:  # named as d4's rotation: rot:-90 is rot270
                    element = Rotation(turn)
                else:  # one name per rotation, in (-180, 180]: rot:-330 is rot30, rot:330 rot-30
                    element = Rotation(turn if turn <= 180 else round(turn - 360, 9))
                if any(_turn_of(e) == turn for e in elements):
                    continue  # rot:-30 and rot:330 are one rotation: audited (and scored) once
            if element.name in seen:
                # rot:90 and d4's rot90 share a name: the exact element wins, whatever the order.
                at = next(i for i, e in enumerate(elements) if e.name == element.name)
                if isinstance(element, D4Element) and isinstance(elements[at], Rotation):
                    elements[at] = element
                continue
            seen.add(element.name)
            elements.append(element)
    if len(elements) == 1:
        raise TransformSpecError(
            f"--transforms '{spec.strip()}' leaves only the identity (rotations by multiples of "
            "360 degrees): nothing to compare; use e.g. --transforms d4 or rot:15"
        )
    return elements

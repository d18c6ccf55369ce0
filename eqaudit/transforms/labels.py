"""Declared label actions: how a classifier's classes should move when the image moves.

Not every classifier should be invariant: an orientation detector's classes turn with the image,
a "left arrow" becomes a "right arrow" under a mirror. A label action assigns to each D4 element g
a permutation ``P_g`` of the class indices, read as *entry i is the class of the transformed
image of class i*. The audit then measures equivariance, ``f(g x) = P_g f(x)``, instead of
invariance (DESIGN.md sections 1 and 3).

The user declares a few elements (usually the generators rot90 and flip_h); eqaudit extends the
declaration to the whole group by composition and refuses declarations that contradict the group:
when two words in the generators name the same element (``rot90^4 = id``,
``flip_h . rot90 . flip_h = rot270``) they must give the same permutation.

Spec forms (one per element, ``ELEMENT=ACTION``):

* ``rot90=1,2,3,0``: the full permutation, by class index or class name, entry i for class i;
* ``rot90=cycle:0,1,2,3``: class 0 becomes 1, 1 becomes 2, ..., the last becomes the first;
  every class not listed is fixed (indices or names);
* ``flip_h=swap:arrow_left,arrow_right``: exchange pairs (an even number of classes);
* ``flip_h=id``: the element keeps every class.

Non-D4 elements (arbitrary rotations, shifts) act as the identity on labels.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from eqaudit.errors import UsageError
from eqaudit.transforms.elements import D4_BY_NAME, D4Element, Transform

Perm = tuple[int, ...]


def identity(k: int) -> Perm:
    return tuple(range(k))


def compose(after: Perm, first: Perm) -> Perm:
    """The permutation ``after . first`` (apply ``first``, then ``after``)."""
    return tuple(after[i] for i in first)


def invert(perm: Perm) -> Perm:
    inverse = [0] * len(perm)
    for i, j in enumerate(perm):
        inverse[j] = i
    return tuple(inverse)


def _class_index(token: str, num_classes: int, class_names: list[str] | None, element: str) -> int:
    token = token.strip()
    if token.lstrip("-").isdigit():
        index = int(token)
    elif class_names and token in class_names:
        index = class_names.index(token)
        if class_names.count(token) > 1:  # (ImageNet's lists name two classes 'crane')
            both = [str(i) for i, name in enumerate(class_names) if name == token]
            raise UsageError(
                f"--label-action {element}: the class name '{token}' is given to classes "
                f"{', '.join(both[:-1])} and {both[-1]}: name the class by its index"
            )
    else:
        known = (
            f"class names: {', '.join(class_names[:12])}" if class_names else "no class names known"
        )
        raise UsageError(
            f"--label-action {element}: '{token}' is neither a class index (0..{num_classes - 1}) "
            f"nor a class name ({known})"
        )
    if not 0 <= index < num_classes:
        raise UsageError(
            f"--label-action {element}: class {index} is out of range: the model has "
            f"{num_classes} classes (0..{num_classes - 1})"
        )
    return index


def parse_action(
    element: str, text: str, num_classes: int, class_names: list[str] | None = None
) -> Perm:
    """One ``ACTION`` (see the module docstring) -> a permutation of ``range(num_classes)``."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if text == "id":
        return identity(num_classes)
    if sep and kind in ("cycle", "swap"):
        items = [
            _class_index(t, num_classes, class_names, element) for t in rest.split(",") if t.strip()
        ]
        if len(set(items)) != len(items):
            raise UsageError(f"--label-action {element}={text}: a class is listed twice")
        perm = list(range(num_classes))
        if kind == "cycle":
            for a, b in zip(items, items[1:] + items[:1], strict=True):
                perm[a] = b
        else:
            if len(items) % 2:
                raise UsageError(
                    f"--label-action {element}={text}: swap needs pairs of classes (an even count)"
                )
            for a, b in zip(items[0::2], items[1::2], strict=True):
                perm[a], perm[b] = b, a
        return tuple(perm)
    perm = tuple(_class_index(t, num_classes, class_names, element) for t in text.split(","))
    if len(perm) != num_classes or sorted(perm) != list(range(num_classes)):
        raise UsageError(
            f"--label-action {element}={text}: a full action lists the new class of each of the "
            f"{num_classes} classes exactly once (a permutation); or use cycle:a,b,c / swap:a,b"
        )
    return perm


@dataclass(frozen=True)
class LabelAction:
    """A permutation for every D4 element, consistent with the group (see module docstring)."""

    declared: dict[str, str]
    permutations: dict[str, Perm]
    num_classes: int

    def of(self, element: Transform) -> Perm:
        """``P_g`` for an element (identity for elements outside D4)."""
        return self.permutations.get(element.name, identity(self.num_classes))

    @property
    def is_invariance(self) -> bool:
        ident = identity(self.num_classes)
        return all(p == ident for p in self.permutations.values())

    def to_dict(self) -> dict:
        return {
            "mode": "invariance" if self.is_invariance else "equivariance",
            "declared": dict(self.declared),
            "permutations": {name: list(p) for name, p in self.permutations.items()},
        }


def _word(path: list[str]) -> str:
    return " . ".join(reversed(path)) if path else "id"


def build_label_action(
    declared: dict[str, str] | list[tuple[str, str]],
    num_classes: int,
    class_names: list[str] | None = None,
    needed: list[Transform] | None = None,
) -> LabelAction:
    """Extend declared permutations to the group; refuse inconsistent or incomplete declarations.

    ``needed`` lists the elements the audit runs: every D4 element among them must be reachable
    from the declared ones.
    """
    declared = dict(declared)
    generators: list[tuple[D4Element, Perm, str]] = []
    for name, text in declared.items():
        if name not in D4_BY_NAME:
            raise UsageError(
                f"--label-action '{name}': label actions are declared for D4 elements "
                f"({', '.join(D4_BY_NAME)})"
            )
        generators.append(
            (D4Element.named(name), parse_action(name, text, num_classes, class_names), name)
        )
    start = D4Element(0, False)
    known: dict[D4Element, tuple[Perm, list[str]]] = {start: (identity(num_classes), [])}
    queue = deque([start])
    while queue:
        g = queue.popleft()
        perm, path = known[g]
        for h, ph, name in generators:
            target, new_perm, new_path = h.compose(g), compose(ph, perm), [*path, name]
            if target not in known:
                known[target] = (new_perm, new_path)
                queue.append(target)
            elif known[target][0] != new_perm:
                other_perm, other_path = known[target]
                raise UsageError(
                    f"the declared label actions contradict the group: {_word(new_path)} and "
                    f"{_word(other_path)} are both {target.name} but give different permutations "
                    f"({list(new_perm)} vs {list(other_perm)}); check --label-action"
                )
    for element in (needed or []) if declared else []:  # nothing declared: invariance
        if isinstance(element, D4Element) and element not in known:
            raise UsageError(
                f"the label action of {element.name} does not follow from the declared elements "
                f"({', '.join(declared) or 'none'}): declare it too (e.g. --label-action "
                f"{element.name}=id if it keeps every class)"
            )
    permutations = {
        g.name: perm for g, (perm, _) in sorted(known.items(), key=lambda kv: (kv[0].flip, kv[0].k))
    }
    return LabelAction(declared=declared, permutations=permutations, num_classes=num_classes)


def parse_label_action_options(values: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``["rot90=1,2,3,0", "flip_h=swap:1,3"]`` -> ``(("rot90", "1,2,3,0"), ...)``."""
    pairs = []
    for value in values:
        name, sep, action = value.partition("=")
        if not sep or not action.strip():
            raise UsageError(
                f"--label-action '{value}' is not ELEMENT=ACTION: write e.g. rot90=1,2,3,0, "
                "rot90=cycle:0,1,2,3 or flip_h=swap:left,right"
            )
        pairs.append((name.strip().lower(), action.strip()))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UsageError("--label-action names an element twice: give one action per element")
    return tuple(pairs)

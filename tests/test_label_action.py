"""Declared label actions (issue: classifiers whose labels move with the image)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import eqaudit
from eqaudit.cli import app
from eqaudit.errors import UsageError
from eqaudit.transforms import D4_NAMES, D4Element, parse_transforms
from eqaudit.transforms.labels import build_label_action, compose, invert, parse_action

ORIENTATIONS = ["up", "left", "down", "right"]  # class k = template turned k times by rot90


class TemplateOrientation(nn.Module):
    """z_k = <x, rot90^k T>: turning the image by rot90 moves class k to class k + 1, exactly.

    T is left-right symmetric, so flip_h maps class k to -k (swaps classes 1 and 3).
    """

    def __init__(self, size: int = 15) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        t = torch.randn(3, size, size, generator=g)
        t = (t + torch.flip(t, (-1,))) / 2
        self.register_buffer(
            "templates", torch.stack([torch.rot90(t, k, (-2, -1)) for k in range(4)])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", x - 0.5, self.templates) / 3


RIGHT = {"rot90": "cycle:0,1,2,3", "flip_h": "swap:1,3"}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return TemplateOrientation().eval()


def test_right_declaration_scores_perfectly(model):
    result = eqaudit.audit(model, "d4", input_size=15, num_images=24, label_action=RIGHT)
    assert result.summary["label_action"]["mode"] == "equivariance"
    for row in result.outputs:
        assert row["agreement"] == 1.0, row["transform"]
        assert row["js_divergence"] < 1e-9
        assert row["logit_error"] < 1e-5
    assert result.output("rot90")["mode"] == "equivariance"
    assert result.output("id")["mode"] == "invariance"
    assert result.score > 99.9999
    assert result.scores["orbit_consistency"] == 1.0


def test_wrong_or_missing_declaration_scores_badly(model):
    wrong = eqaudit.audit(
        model,
        "d4",
        input_size=15,
        num_images=24,
        label_action={"rot90": "cycle:0,3,2,1", "flip_h": "swap:1,3"},
    )
    none = eqaudit.audit(model, "d4", input_size=15, num_images=24)
    assert none.summary["label_action"]["mode"] == "invariance"
    for result in (wrong, none):
        assert result.output("rot90")["agreement"] < 0.3
        assert result.output("rot90")["js_divergence"] > 0.02
        assert result.score < 70
    # flip_h swaps 1 and 3 in every declaration here: classes 0 and 2 keep, so only the invariant
    # run is wrong on flips.
    assert wrong.output("flip_h")["agreement"] == 1.0
    assert none.output("flip_h")["agreement"] < 1.0


def test_labels_follow_the_declared_action(model, tmp_path):
    # Accuracy under g compares with P_g(label): label each image by the model's own top-1.
    images = torch.rand(12, 3, 15, 15)
    labels = model(images).argmax(1)
    import numpy as np

    path = tmp_path / "set.npz"
    np.savez(path, images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    result = eqaudit.audit(
        model,
        "c4",
        data=str(path),
        input_size=15,
        resize="stretch",
        label_action={"rot90": "cycle:0,1,2,3"},
    )
    assert all(row["accuracy"] == 1.0 for row in result.outputs)
    assert result.scores["orbit_accuracy"] == 1.0


def test_suggestion_recovers_the_planted_permutation(model):
    result = eqaudit.audit(model, "d4", input_size=15, num_images=48)
    suggested = result.summary["label_action"]["suggested"]
    assert suggested["rot90"]["spec"] == "rot90=1,2,3,0"
    assert suggested["rot180"]["spec"] == "rot180=2,3,0,1"
    assert suggested["flip_h"]["spec"] == "flip_h=0,3,2,1"
    assert suggested["rot90"]["share"] == [1.0, 1.0, 1.0, 1.0]


# Hand-computed for arrow classes (0 circle, 1 up, 2 right, 3 down, 4 left): rot90 is
# counter-clockwise (up -> left), flip_h mirrors left-right (right <-> left).
ARROWS = ["circle", "up", "right", "down", "left"]
EXPECTED = {
    "id": [0, 1, 2, 3, 4],
    "rot90": [0, 4, 1, 2, 3],
    "rot180": [0, 3, 4, 1, 2],
    "rot270": [0, 2, 3, 4, 1],
    "flip_h": [0, 1, 4, 3, 2],
    "transpose": [0, 4, 3, 2, 1],  # rot90 . flip_h: up -> left, right -> down
    "flip_v": [0, 3, 2, 1, 4],
    "antitranspose": [0, 2, 1, 4, 3],  # rot270 . flip_h: up -> right
}


@pytest.mark.parametrize(
    "declared",
    [
        {"rot90": "0,4,1,2,3", "flip_h": "0,1,4,3,2"},
        {"rot90": "cycle:up,left,down,right", "flip_h": "swap:left,right"},
        {"rot270": "cycle:1,2,3,4", "flip_v": "swap:up,down"},
        {"transpose": "0,4,3,2,1", "flip_h": "swap:2,4"},
    ],
)
def test_composition_gives_all_eight_elements(declared):
    action = build_label_action(declared, 5, ARROWS, needed=parse_transforms("d4"))
    assert {name: list(p) for name, p in action.permutations.items()} == EXPECTED


def test_composition_agrees_with_the_group_law():
    action = build_label_action({"rot90": "0,4,1,2,3", "flip_h": "0,1,4,3,2"}, 5, ARROWS)
    for a in D4_NAMES.values():
        for b in D4_NAMES.values():
            g = D4Element.named(a).compose(D4Element.named(b))
            p = compose(action.permutations[a], action.permutations[b])
            assert p == action.permutations[g.name]
    assert compose(invert(action.permutations["rot90"]), action.permutations["rot90"]) == (
        0,
        1,
        2,
        3,
        4,
    )


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"rot90": "1,2,0"}, "contradict the group"),  # a 3-cycle: rot90^4 != id
        ({"rot90": "swap:0,1", "flip_h": "swap:1,2"}, "contradict the group"),  # f r f != r^-1
        ({"flip_h": "cycle:0,1,2"}, "contradict the group"),  # flip_h^2 != id
        ({"rot90": "0,0,1"}, "permutation"),
        ({"rot90": "0,1"}, "permutation"),
        ({"rot90": "cycle:0,9"}, "out of range"),
        ({"rot90": "cycle:north,south"}, "neither a class index"),
        ({"rot15": "id"}, "D4 elements"),
        ({"flip_h": "swap:0,1,2"}, "pairs"),
    ],
)
def test_inconsistent_or_bad_declarations_are_refused(declared, message):
    with pytest.raises(UsageError, match=message):
        build_label_action(declared, 3, ["a", "b", "c"], needed=parse_transforms("d4"))


def test_undeclared_element_in_the_battery_is_refused():
    with pytest.raises(UsageError, match="declare it too"):
        build_label_action({"rot90": "cycle:0,1,2,3"}, 4, needed=parse_transforms("flips"))
    # c4 alone follows from rot90.
    build_label_action({"rot90": "cycle:0,1,2,3"}, 4, needed=parse_transforms("c4"))


def test_parse_action_forms():
    assert parse_action("rot90", "id", 3) == (0, 1, 2)
    assert parse_action("rot90", "cycle:2,0", 3) == (2, 1, 0)
    assert parse_action("rot90", "b,c,a", 3, ["a", "b", "c"]) == (1, 2, 0)


def test_cli_label_action_and_refusal(model, tmp_path):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 15, 15),)), path)
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "check",
            str(path),
            "-t",
            "c4",
            "--label-action",
            "rot90=cycle:0,1,2,3",
            "-n",
            "32",
            "--no-layers",
            "--suggest-label-action",
            "-o",
            str(tmp_path / "a"),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "Output equivariance" in ok.output and "rot90=1,2,3,0" in ok.output
    markdown = (tmp_path / "a" / "summary.md").read_text()  # it said "Output invariance"
    assert "### Output equivariance against the declared label action (rot90=" in markdown
    bad = runner.invoke(
        app,
        [
            "check",
            str(path),
            "-t",
            "c4",
            "--label-action",
            "rot90=1,2,0,3",
            "-n",
            "8",
            "-o",
            str(tmp_path / "b"),
        ],
    )
    assert bad.exit_code == 2
    assert "contradict the group" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "b" / "summary.json").exists()


def test_label_action_from_the_config_file_by_class_name(model, tmp_path, monkeypatch):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 15, 15),)), path)
    (tmp_path / "classes.txt").write_text("\n".join(ORIENTATIONS) + "\n")
    (tmp_path / "eqaudit.toml").write_text(
        "[tool.eqaudit]\n"
        'transforms = "d4"\n'
        "[tool.eqaudit.label_action]\n"
        'rot90 = "cycle:up,left,down,right"\n'
        'flip_h = "swap:left,right"\n'
    )
    import numpy as np

    images = torch.rand(16, 15, 15, 3).numpy()
    np.save(tmp_path / "images.npy", images)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "check",
            "m.pt2",
            "--data",
            "images.npy",
            "--labels",
            "classes.txt",
            "--no-layers",
            "-o",
            "out",
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["label_action"]["mode"] == "equivariance"
    assert summary["label_action"]["permutations"]["rot90"] == [1, 2, 3, 0]
    assert all(row["agreement"] == 1.0 for row in summary["outputs"])

"""The Python API as a researcher calls it: the forms the command line takes as text, the
caller's state left alone, and one-line errors for what it cannot take."""

from __future__ import annotations

import pytest
import torch
from models_zoo import symmetric_cnn
from torch import nn

import eqaudit
from eqaudit.errors import UsageError


def test_the_callers_random_stream_is_not_reseeded() -> None:
    # audit() seeded torch's global generator with its own seed and left it so: a training
    # loop that audits each checkpoint got the same dropout and shuffling every time (review).
    model = symmetric_cnn()  # (which seeds torch itself)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    eqaudit.audit(model, "flips", input_size=33, num_images=2)
    assert torch.equal(torch.rand(3), expected)


def test_options_take_python_values_as_well_as_the_command_lines_text() -> None:
    model = symmetric_cnn()
    as_text = eqaudit.audit(
        model, "flips,rot:30", input_size="33", num_images=2, mean="0.5,0.5,0.5", std="0.5,0.5,0.5"
    )
    as_python = eqaudit.audit(
        model,
        ["flips", "rot:30"],
        input_size=[33, 33],
        num_images=2,
        mean=[0.5] * 3,
        std=(0.5,) * 3,
        device=torch.device("cpu"),
    )
    assert as_text.to_frame("layers").equals(as_python.to_frame("layers"))
    assert as_text.summary["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert eqaudit.AuditConfig(input_size=17).input_size == (17, 17)
    assert eqaudit.AuditConfig(output_name=1).output_name == "1"  # a tuple index


def test_unknown_options_and_mixed_config_are_one_line_usage_errors() -> None:
    model = symmetric_cnn()
    with pytest.raises(UsageError, match="no option 'num_image': did you mean num_images"):
        eqaudit.audit(model, input_size=33, num_image=2)
    with pytest.raises(UsageError, match="no option 'no_layers': did you mean layers=False"):
        eqaudit.audit(model, input_size=33, no_layers=True)
    # config= and keywords together: the keywords (and transforms) were silently ignored.
    config = eqaudit.AuditConfig(input_size=(33, 33), layers=False)
    with pytest.raises(UsageError, match="not both: transforms, num_images would be ignored"):
        eqaudit.audit(model, "flips", config=config, num_images=2)
    with pytest.raises(UsageError, match="is not a list of numbers"):
        eqaudit.AuditConfig(mean="0.5;0.5;0.5")


def _with_modules_that_are_no_layers() -> nn.Module:
    """'1' an Identity, '4' a Flatten (the pool's values again), '5' the class scores."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Identity(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def test_identity_modules_are_not_layers() -> None:
    # An Identity hands out its input: the previous layer's numbers again, and its name is
    # not in the exported graph, so its grid was unknown and its pairs unscored (review).
    model = _with_modules_that_are_no_layers()
    result = eqaudit.audit(model, "flips", input_size=9, num_images=2)
    # (nor is the Flatten: it hands out the pool's values)
    assert sorted({row["layer"] for row in result.layers}) == ["0", "2", "3"]
    assert result.summary["geometry"]["unknown_pairs"] == 0


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("1", "an nn.Identity hands out its input unchanged"),
        ("4", "it hands out the values of '3' again"),
        ("5", "it gives the class scores, audited as the outputs"),
    ],
)
def test_layers_naming_a_module_that_is_no_layer_say_why(pattern, why) -> None:
    # '--layers 4' (the Flatten) said only "matches no layer": the module is right there.
    from eqaudit.errors import UsageError

    model = _with_modules_that_are_no_layers()
    with pytest.raises(UsageError) as error:
        eqaudit.audit(model, "flips", input_size=9, num_images=2, layer_patterns=(pattern,))
    assert str(error.value) == (
        f"--layers {pattern} names '{pattern}', which is not a layer: {why}; run 'eqaudit "
        "inspect MODEL' to list the layers"
    )


def test_the_api_exports_what_a_script_needs() -> None:
    for name in ("audit", "compare", "write_report", "AuditConfig", "AuditResult"):
        assert name in eqaudit.__all__ and hasattr(eqaudit, name)


def test_an_arrays_images_fix_a_modules_input_size() -> None:
    images = torch.rand(2, 3, 33, 33)
    result = eqaudit.audit(symmetric_cnn(), "flips", images, layers=False)
    assert result.summary["model"]["input"]["height"] == 33
    assert "input size 33x33: the array's images" in result.summary["preprocessing"]["notes"][0]


def test_audits_of_two_arrays_are_not_paired_by_their_positions(tmp_path) -> None:
    # Two arrays' images are both array[0], array[1] ...: compare paired unrelated images and
    # a baseline accepted another array (review). Their images are hashed now.
    from eqaudit.errors import ConfigError, DataError
    from eqaudit.gate import evaluate_gate, load_baseline, save_baseline

    model, one, other = symmetric_cnn(), torch.rand(4, 3, 33, 33), torch.rand(4, 3, 33, 33)
    a = eqaudit.audit(model, "flips", one, layers=False)
    again = eqaudit.audit(model, "flips", one.clone(), layers=False)
    b = eqaudit.audit(model, "flips", other, layers=False)
    assert a.summary["data"]["sha256"] == again.summary["data"]["sha256"]
    assert eqaudit.compare(a, again)[0].data["outputs"]
    with pytest.raises(DataError, match="different image arrays"):
        eqaudit.compare(a, b)
    path = save_baseline(a, tmp_path / "base.json")
    with pytest.raises(ConfigError, match=r"data\.sha256"):
        evaluate_gate(b, eqaudit.config.GateConfig(baseline=str(path)), load_baseline(path))


def test_a_result_prints_as_one_short_line() -> None:
    result = eqaudit.audit(symmetric_cnn(), "flips", input_size=33, num_images=2)
    text = repr(result)
    assert text.startswith("AuditResult(model='<module>', transforms='flips', images=2, score=")
    assert len(text) < 200 and text.endswith(f"layers={len({r['layer'] for r in result.layers})})")


def test_audit_config_takes_every_form_the_keywords_take() -> None:
    from eqaudit import AuditConfig

    aligned = AuditConfig(input_size="aligned:16")
    assert (aligned.input_size, aligned.align_input) == ((16, 16), True)
    assert AuditConfig(label_action={"rot90": "cycle:0,1,2,3"}).label_action == (
        ("rot90", "cycle:0,1,2,3"),
    )
    assert AuditConfig(label_action=["rot90=1,2,3,0"]).label_action == (("rot90", "1,2,3,0"),)
    assert AuditConfig(shard="1/2").shard == (1, 2)
    assert AuditConfig(layer_patterns=None, providers="A, B").providers == ("A", "B")
    assert AuditConfig(layer_patterns="conv*,fc").layer_patterns == ("conv*", "fc")
    with pytest.raises(UsageError, match="whole pixels"):
        AuditConfig(input_size=(16.5, 16))  # (it was cut to 16)


def test_compare_refuses_config_mixed_with_options_and_takes_an_array_beside_it() -> None:
    from eqaudit import AuditConfig

    images, config = torch.rand(2, 3, 33, 33), AuditConfig(transforms="flips", layers=False)
    comparison, a, _ = eqaudit.compare(
        symmetric_cnn(), symmetric_cnn(1), data=images, config=config
    )
    assert a.summary["data"]["source"] == "array" and comparison.data["outputs"]
    with pytest.raises(UsageError, match="not both: num_images would be ignored"):
        eqaudit.compare(symmetric_cnn(), symmetric_cnn(1), data=images, config=config, num_images=1)


def test_a_binary_model_keeps_its_random_state_and_merges_with_an_empty_shard(tmp_path) -> None:
    # The binary reading's note was part of the shards' compared context: a shard that got no
    # image never read a score, and the merge refused it (review).
    from test_oracles import SignedHalves

    from eqaudit.shard import merge_shards

    images = torch.rand(2, 3, 16, 16)
    model = SignedHalves().eval()
    single = eqaudit.audit(model, "flips", images, layers=False)
    for index in (1, 2, 3):
        part = eqaudit.audit(model, "flips", images, layers=False, shard=(index, 3))
        eqaudit.write_report(part, tmp_path / f"s{index}")
        if not part.summary["shard"]["images"]:
            assert "score=None" in repr(part)  # (an empty shard: its repr raised KeyError)
    merged = merge_shards([tmp_path / f"s{i}" for i in (1, 2, 3)])
    assert merged.outputs == single.outputs
    assert merged.summary["preprocessing"]["notes"] == single.summary["preprocessing"]["notes"]


@pytest.mark.parametrize(("classes", "ending"), [(5, "reshape"), (1, "squeeze")])
def test_a_module_whose_scores_lose_their_batch_axis_is_still_audited(classes, ending) -> None:
    # (B * K,) from reshape(-1), and a binary head's squeeze() (shape () for one image) were
    # audited, then refused by the run-time check of the scores' rows (review).
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores = self.fc(self.conv(x).mean((2, 3)))
            return scores.reshape(-1) if ending == "reshape" else scores.squeeze()

    torch.manual_seed(0)
    model = Flat().eval()
    images = torch.rand(6, 3, 16, 16)
    result = eqaudit.audit(model, "flips", images, layers=False)
    assert result.summary["model"]["num_classes"] == max(classes, 2)
    with torch.no_grad():
        expected = model.fc(model.conv(images).mean((2, 3)))
    top1 = result.predictions.query("transform == 'id'")["top1"].to_numpy()
    if classes > 1:
        assert (top1 == expected.argmax(1).numpy()).all()
    else:  # a logit z read as [0, z]
        assert (top1 == (expected[:, 0] > 0).long().numpy()).all()


def test_a_model_giving_one_images_scores_for_a_batch_is_refused_saying_how_it_was_read():
    # 16 scores of the first image for a batch of 8 read as 8 rows of 2 classes: the class
    # count check refused it, naming 2 classes the model never had (review).
    from eqaudit.errors import ModelRunError

    class FirstOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))[0]

    torch.manual_seed(0)
    with pytest.raises(ModelRunError) as error:
        eqaudit.audit(FirstOnly().eval(), "d4", torch.rand(4, 3, 9, 9), layers=False, batch_size=8)
    assert "(its output of shape (16,) for 8 images was read as 8 rows of 2 scores: does it " in (
        str(error.value)
    )


class _ScalesItself(torch.nn.Module):
    """Expects 0-255 pixels: divides (or multiplies by 1/255) first, as many exported models."""

    def __init__(self, multiply: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.multiply = multiply
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * (1 / 255) if self.multiply else x / 255.0
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("multiply", [False, True])
def test_a_model_that_divides_its_input_by_255_is_said_to_see_nearly_black_images(
    tmp_path, multiply
) -> None:
    # Fed [0, 1] pixels it was audited on images 1/255 as bright, its numbers ~500x too
    # invariant, and nothing said so (helper-53).
    from models_zoo import export_onnx

    from eqaudit.grids import export_grid_graph, onnx_grid_graph

    model = _ScalesItself(multiply).eval()
    graph, _ = export_grid_graph(model, torch.zeros(1, 3, 9, 9))
    assert graph is not None and graph.input_divisor == pytest.approx(255)
    path = export_onnx(model, tmp_path / "m.onnx", 9)
    import onnx

    proto = onnx.load(path)
    found = onnx_grid_graph(proto, proto.graph.input[0].name, "NCHW").input_divisor
    assert found == pytest.approx(255)
    said = "the model divides its input by 255 first (it expects 0-255 pixels)"
    for source in (path, model):
        warned = eqaudit.audit(source, "flips", input_size=9, num_images=2).summary["warnings"]
        assert any(w.startswith(said) for w in warned), warned
        fed = eqaudit.audit(source, "flips", input_size=9, num_images=2, preset="raw255")
        assert not any(w.startswith(said) for w in fed.summary["warnings"])
    # a model that does not: no warning
    plain = eqaudit.audit(torch.nn.Sequential(model.conv, torch.nn.Flatten()), "flips",
                          input_size=9, num_images=2)  # fmt: skip
    assert not any(w.startswith(said) for w in plain.summary["warnings"])


def test_a_dynamically_quantized_module_is_run_one_image_at_a_time() -> None:
    # quantize_dynamic scales each batch's activations by the batch: an image's numbers
    # depended on the batch size (0.0079 at 8, 0.0073 at 64, helper-53), and shards on theirs.
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 5),
    ).eval()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's deprecation of its quantized tensors)
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        runs = [
            eqaudit.audit(quantized, "d4", input_size=9, num_images=8, batch_size=size, seed=0)
            for size in (8, 64)
        ]
    record = runs[0].summary["model"]["fixed_batch"]
    assert record["run"] == "one image at a time" and "module '4'" in record["why"]
    assert runs[0].summary["outputs"] == runs[1].summary["outputs"]
    assert runs[0].summary["layers"] == runs[1].summary["layers"]

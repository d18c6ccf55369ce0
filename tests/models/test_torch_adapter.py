"""The PyTorch adapter on real tiny models saved in every format it reads (no mocks)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eqaudit.errors import (
    EXIT_MODEL,
    EXIT_USAGE,
    EqauditError,
    ModelLoadError,
    ModelRunError,
    UnsupportedModelError,
    UsageError,
)
from eqaudit.models.base import InputSpec
from eqaudit.models.torch_adapter import TorchAdapter, load_torch

SIZE = 8


class TinyNet(nn.Module):
    """conv -> relu -> conv/2 -> shared relu -> GAP -> shared relu -> fc (5 classes)."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1),
        )
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.features(x))
        x = self.relu(self.pool(x).flatten(1) - 0.1)
        return self.fc(x)


# Execution order of TinyNet's module calls, with canonical per-image shapes at SIZE x SIZE
# (a 1x1 pooled map is flat: it has no spatial axes left). Not ``fc``: its output is the
# model's, which the output metrics audit (as an ONNX graph's outputs are never layers).
TINY_LAYERS = [
    ("features.0", "Conv2d", (4, 8, 8)),
    ("features.1", "ReLU", (4, 8, 8)),
    ("features.2", "Conv2d", (6, 4, 4)),
    ("relu", "ReLU", (6, 4, 4)),
    ("pool", "AdaptiveAvgPool2d", (6,)),
    ("relu:1", "ReLU", (6,)),
]


class DictNet(nn.Module):
    """Returns ``{"logits": ..., "features": ...}`` like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.conv(x).mean((2, 3))
        return {"logits": self.head(pooled), "features": pooled}


class InplaceNet(nn.Module):
    """A conv followed by ``ReLU(inplace=True)``: the conv's output buffer is overwritten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


class NanNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4] * float("nan")


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x + y).mean((2, 3))


class Payload:
    """Unpickling this runs code that creates ``marker``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


# -- helpers ---------------------------------------------------------------------------------------
def tiny(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet(**kwargs).eval()


def images(batch: int = 3, channels: int = 3, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def reference(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores and every non-container module output of ``module``, named like the adapter."""
    captured: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, sub in module.named_modules():
        if not name or isinstance(sub, nn.Sequential):
            continue

        def hook(_m, _i, out, name=name):
            index = calls.get(name, 0)
            calls[name] = index + 1
            captured[name if index == 0 else f"{name}:{index}"] = out.detach().clone()

        handles.append(sub.register_forward_hook(hook))
    with torch.no_grad():
        scores = module(x)
    for handle in handles:
        handle.remove()
    return scores, captured


def write_factory(tmp_path: Path, name: str = "factory.py", builder: str = "TinyNet()") -> Path:
    source = textwrap.dedent(inspect.getsource(TinyNet))
    file = tmp_path / name
    file.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        f"{source}\n\ndef build():\n    return {builder}\n\n\ndef not_a_module():\n    return 42\n"
    )
    return file


def spec(channels: int = 3, size: int | None = SIZE) -> InputSpec:
    return InputSpec(
        name="x", layout="NCHW", channels=channels, height=size, width=size, batch=None
    )


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message and len(message) < 500
    return message


def no_hooks_left(module: nn.Module) -> bool:
    return all(not sub._forward_hooks for sub in module.modules())


@pytest.fixture
def state_dict_file(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = tiny()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


# -- state dict + factory ------------------------------------------------------------------------
def test_state_dict_with_factory_file_gives_the_module_scores(state_dict_file, tmp_path):
    model, path = state_dict_file
    factory = f"{write_factory(tmp_path)}:build"
    adapter = load_torch(path, factory=factory, input_size=(SIZE, SIZE))
    x = images()
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)
    assert adapter.describe()["format"] == "state_dict"
    assert adapter.describe()["factory"] == factory
    assert adapter.input_spec.to_dict() == {
        "name": "x",
        "layout": "NCHW",
        "layout_source": "default",
        "channels": 3,
        "height": SIZE,
        "width": SIZE,
        "batch": None,
        "dtype": "float32",
    }
    assert not adapter.module.training


def test_state_dict_with_factory_from_a_package_on_sys_path(state_dict_file, tmp_path, monkeypatch):
    model, path = state_dict_file
    package = tmp_path / "eqaudit_test_zoo"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_factory(package, "nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        adapter = load_torch(path, factory="eqaudit_test_zoo.nets:build")
        x = images()
        torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)
    finally:
        for name in [n for n in sys.modules if n.startswith("eqaudit_test_zoo")]:
            del sys.modules[name]


def test_state_dict_with_factory_from_a_module_in_the_current_directory(
    state_dict_file, tmp_path, monkeypatch
):
    # `eqaudit` is a console script: its sys.path does not hold the directory it runs in, so
    # `--factory nets:build` beside nets.py was "cannot be found" where `python -m` finds it.
    model, path = state_dict_file
    write_factory(tmp_path, "eqaudit_cwd_nets.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        adapter = load_torch(path, factory="eqaudit_cwd_nets:build")
        torch.testing.assert_close(adapter.run(images()).scores, model(images()), rtol=0, atol=0)
        assert str(tmp_path) not in sys.path  # only while it is imported and called
    finally:
        sys.modules.pop("eqaudit_cwd_nets", None)
    with pytest.raises(UsageError, match="installed, on PYTHONPATH or in the current directory"):
        load_torch(path, factory="eqaudit_not_here:build")


def test_state_dict_with_the_demo_factory(tmp_path):
    demo = pytest.importorskip("eqaudit.demo.model")
    torch.manual_seed(0)
    model = demo.build().eval()
    path = tmp_path / "demo.pth"
    torch.save(model.state_dict(), path)
    adapter = load_torch(path, factory="eqaudit.demo.model:build", input_size=(33, 33))
    x = images(2, size=33)
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dicts_load(tmp_path, wrapper):
    model = tiny()
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: model.state_dict(), "epoch": 3}, path)
    adapter = load_torch(path, factory=f"{write_factory(tmp_path)}:build")
    x = images()
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_data_parallel_and_compile_prefixes_are_stripped(tmp_path, prefix):
    # DataParallel/DDP save 'module.' keys; a torch.compile'd module saves '_orig_mod.' keys.
    model = tiny()
    path = tmp_path / "dp.pt"
    torch.save({f"{prefix}{k}": v for k, v in model.state_dict().items()}, path)
    adapter = load_torch(path, factory=f"{write_factory(tmp_path)}:build")
    x = images()
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)


# -- layers ----------------------------------------------------------------------------------------
def test_layers_in_execution_order_with_names_ops_and_shapes(state_dict_file, tmp_path):
    _, path = state_dict_file
    adapter = load_torch(path, factory=f"{write_factory(tmp_path)}:build", input_size=(SIZE, SIZE))
    assert [(layer.name, layer.op) for layer in adapter.layers()] == [
        (name, op) for name, op, _ in TINY_LAYERS
    ]
    probed = adapter.probe_layers(images(1))
    assert [(layer.name, layer.op, layer.shape) for layer in probed] == TINY_LAYERS
    assert [layer.index for layer in probed] == list(range(len(TINY_LAYERS)))
    assert no_hooks_left(adapter.module)


def test_execution_order_differs_from_registration_order():
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.head(self.body(x).mean((2, 3)))  # (head: a layer, not the output)

    adapter = TorchAdapter.from_module(Reversed(), input_spec=spec())
    assert [layer.name for layer in adapter.layers()] == ["body", "head"]
    unknown_size = TorchAdapter.from_module(Reversed(), input_spec=spec(size=None))
    assert [layer.name for layer in unknown_size.layers()] == ["head", "body"]


def test_shared_relu_gives_one_layer_per_call(tmp_path):
    model = tiny()
    adapter = TorchAdapter.from_module(model, input_spec=spec())
    x = images()
    out = adapter.run(x, ["relu", "relu:1"])
    assert set(out.activations) == {"relu", "relu:1"}
    with torch.no_grad():
        first = torch.relu(model.features(x))
        second = torch.relu(model.pool(first).flatten(1) - 0.1)
    torch.testing.assert_close(out.activations["relu"], first, rtol=0, atol=0)
    torch.testing.assert_close(out.activations["relu:1"], second, rtol=0, atol=0)


def test_run_captures_only_requested_layers_and_removes_its_hooks():
    adapter = TorchAdapter.from_module(tiny(), input_spec=spec())
    out = adapter.run(images(), ["features.2"])
    assert set(out.activations) == {"features.2"}
    assert not out.activations["features.2"].requires_grad
    assert no_hooks_left(adapter.module)
    assert adapter.run(images()).activations == {}


def test_activation_is_not_overwritten_by_a_later_inplace_op():
    torch.manual_seed(0)
    model = InplaceNet().eval()
    adapter = TorchAdapter.from_module(model, input_spec=spec())
    x = images()
    out = adapter.run(x, ["conv", "act"])
    with torch.no_grad():
        conv = model.conv(x)
    assert (out.activations["conv"] < 0).any()
    torch.testing.assert_close(out.activations["conv"], conv, rtol=0, atol=0)
    torch.testing.assert_close(out.activations["act"], conv.clamp(min=0), rtol=0, atol=0)


def test_dict_outputs_give_the_logits():
    torch.manual_seed(0)
    model = DictNet().eval()
    adapter = TorchAdapter.from_module(model, input_spec=spec())
    x = images()
    torch.testing.assert_close(adapter.run(x).scores, model(x)["logits"], rtol=0, atol=0)
    assert adapter.describe()["output"] == "logits"  # the part taken, recorded in the summary


@pytest.mark.parametrize(
    ("output", "taken"),
    [
        (torch.zeros(1), None),
        ({"aux": 1, "scores": torch.zeros(1)}, "scores"),
        ({"features": torch.zeros(1), "logits": torch.zeros(1)}, "logits"),
        ((None, torch.zeros(1)), "1"),
        (type("Out", (), {"logits": torch.zeros(1)})(), "logits"),
    ],
)
def test_the_part_of_an_output_taken_as_scores_is_named(output, taken):
    from eqaudit.models.torch_adapter import pick_scores, picked_part

    assert picked_part(output) == taken
    if taken is not None:  # the part named is the one pick_scores takes
        assert pick_scores(output) is (
            output[int(taken)]
            if isinstance(output, tuple)
            else output[taken]
            if isinstance(output, dict)
            else output.logits
        )


def test_nan_scores_raise_a_model_run_error():
    adapter = TorchAdapter.from_module(NanNet(), input_spec=spec())
    with pytest.raises(ModelRunError) as error:
        adapter.run(images())
    assert "NaN" in assert_one_line(error)
    assert error.value.exit_code == EXIT_MODEL


@pytest.mark.parametrize(
    ("model", "channels", "expected"),
    [(TinyNet(in_channels=1), None, 1), (NanNet(), None, 3), (TinyNet(), 1, 1)],
)
def test_channels_come_from_the_option_or_the_first_conv(tmp_path, model, channels, expected):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    adapter = load_torch(path, trust_pickle=True, channels=channels)
    assert adapter.input_spec.channels == expected
    assert adapter.input_spec.height is None and adapter.input_spec.batch is None


# -- torch.export ----------------------------------------------------------------------------------
def export(tmp_path: Path, model: nn.Module, example: torch.Tensor, **kwargs) -> Path:
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (example,), **kwargs), path)
    return path


def test_export_with_static_batch_reads_the_spec_and_matches_the_module(tmp_path):
    model = tiny()
    path = export(tmp_path, model, images(2))
    adapter = load_torch(path)
    assert adapter.input_spec.to_dict() == {
        "name": "x",
        "layout": "NCHW",
        "layout_source": "default",
        "channels": 3,
        "height": SIZE,
        "width": SIZE,
        "batch": 2,
        "dtype": "float32",
    }
    assert adapter.describe()["format"] == "export"
    x = images(5)  # not a multiple of the fixed batch: the base class pads the last chunk
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)


def test_export_with_dynamic_batch_has_no_fixed_batch(tmp_path):
    model = tiny()
    path = export(tmp_path, model, images(2), dynamic_shapes=({0: torch.export.Dim("batch")},))
    adapter = load_torch(path)
    assert adapter.input_spec.batch is None
    assert adapter.input_spec.size == (SIZE, SIZE)
    x = images(7)
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)


def test_export_with_dynamic_size_needs_an_input_size(tmp_path):
    model = tiny()
    side = torch.export.Dim("side", min=4, max=64)
    path = export(tmp_path, model, images(2, size=16), dynamic_shapes=({2: side, 3: side},))
    adapter = load_torch(path)
    assert (adapter.input_spec.height, adapter.input_spec.width) == (None, None)
    with pytest.raises(UsageError):
        _ = adapter.input_spec.size
    adapter.with_input_size(12, 12)
    x = images(2, size=12)
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)


def test_export_per_layer_activations_equal_the_module_hooks(tmp_path):
    model = tiny()
    path = export(tmp_path, model, images(2), dynamic_shapes=({0: torch.export.Dim("batch")},))
    adapter = load_torch(path)
    probed = adapter.probe_layers(images(1))
    assert [(layer.name, layer.op, layer.shape) for layer in probed] == TINY_LAYERS
    x = images(4)
    out = adapter.run(x, [layer.name for layer in probed])
    scores, expected = reference(model, x)
    torch.testing.assert_close(out.scores, scores, rtol=0, atol=0)
    assert set(out.activations) == set(expected) - {"fc"}  # (fc: the scores themselves)
    for name, value in expected.items():
        if name == "fc":
            continue
        # Canonical form: a globally pooled (B, C, 1, 1) map is compared flat.
        value = value.flatten(1) if value.ndim == 4 and value.shape[2:] == (1, 1) else value
        torch.testing.assert_close(out.activations[name], value, rtol=0, atol=0)
    assert no_hooks_left(adapter.module)


def test_export_of_a_residual_block_names_layers_by_module_path(tmp_path):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.bn1(self.conv1(x)) + x)

    class ResNetish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.layer1 = nn.Sequential(Block(), Block())
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.layer1(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = ResNetish().eval()
    for block in model.layer1:  # non-trivial running statistics
        block.bn1.running_mean.uniform_(-1, 1)
        block.bn1.running_var.uniform_(0.5, 2)
    path = export(tmp_path, model, images(2))
    exported = load_torch(path).probe_layers(images(2)[:1])
    eager = TorchAdapter.from_module(model, input_spec=spec()).probe_layers(images(1))
    assert [(layer.name, layer.op, layer.shape) for layer in exported] == [
        (layer.name, layer.op, layer.shape) for layer in eager
    ]
    # The block hands out its in-place ReLU's output: one layer, named by the block.
    assert [layer.name for layer in exported][:5] == [
        "stem",
        "layer1.0.conv1",
        "layer1.0.bn1",
        "layer1.0",
        "layer1.1.conv1",
    ]
    x = images(2)
    got = load_torch(path).run(x, ["layer1.0.bn1", "layer1.1"]).activations
    _, expected = reference(model, x)
    for name in ("layer1.0.bn1", "layer1.1"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)


def test_export_with_dict_output(tmp_path):
    torch.manual_seed(0)
    model = DictNet().eval()
    adapter = load_torch(export(tmp_path, model, images(2)))
    x = images(2)
    torch.testing.assert_close(adapter.run(x).scores, model(x)["logits"], rtol=0, atol=0)


def test_export_with_two_inputs_is_unsupported(tmp_path):
    path = tmp_path / "two.pt2"
    program = torch.export.export(TwoInputs(), (images(1), images(1)))
    torch.export.save(program, path)
    with pytest.raises(UnsupportedModelError) as error:
        load_torch(path)
    assert "single image input" in assert_one_line(error)


def test_export_options_that_contradict_the_program_are_usage_errors(tmp_path):
    path = export(tmp_path, tiny(), images(1))
    with pytest.raises(UsageError) as error:
        load_torch(path, channels=1)
    assert "--channels" in assert_one_line(error)
    with pytest.raises(UsageError) as error:
        load_torch(path, input_size=(16, 16))
    assert "--input-size" in assert_one_line(error)
    with pytest.raises(UsageError) as error:
        load_torch(path, factory="x.py:build")
    assert "--factory" in assert_one_line(error)


def test_corrupt_pt2_is_a_load_error(tmp_path):
    path = tmp_path / "broken.pt2"
    path.write_bytes(os.urandom(256))
    with pytest.raises(ModelLoadError) as error:
        load_torch(path)
    assert "torch.export" in assert_one_line(error)


# -- TorchScript -----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_gives_the_module_scores_without_layers(tmp_path, how):
    model = tiny(in_channels=1)
    path = tmp_path / "scripted.pt"
    x = images(3, channels=1)
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    scripted.save(str(path))
    adapter = load_torch(path, input_size=(SIZE, SIZE))
    assert adapter.input_spec.channels == 1
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=1e-6, atol=1e-6)
    assert adapter.layers() == []
    assert adapter.describe()["format"] == "torchscript"
    assert "torch.export" in adapter.describe()["layers_note"]


# -- pickles ---------------------------------------------------------------------------------------
def test_pickled_module_is_refused_without_trust_and_loads_with_it(tmp_path):
    model = tiny()
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(ModelLoadError) as error:
        load_torch(path)
    message = assert_one_line(error)
    assert "pickled Python object" in message and "--trust-pickle" in message
    adapter = load_torch(path, trust_pickle=True)
    x = images()
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)
    assert adapter.describe()["format"] == "pickle"


def test_legacy_torch_save_format(tmp_path):
    model = tiny()
    weights, full = tmp_path / "legacy.pt", tmp_path / "legacy_full.pt"
    torch.save(model.state_dict(), weights, _use_new_zipfile_serialization=False)
    torch.save(model, full, _use_new_zipfile_serialization=False)
    x = images()
    adapter = load_torch(weights, factory=f"{write_factory(tmp_path)}:build")
    torch.testing.assert_close(adapter.run(x).scores, model(x), rtol=0, atol=0)
    with pytest.raises(ModelLoadError) as error:
        load_torch(full)
    assert "pickled Python object" in assert_one_line(error)
    torch.testing.assert_close(
        load_torch(full, trust_pickle=True).run(x).scores, model(x), rtol=0, atol=0
    )


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "torch.save":
        torch.save({"weights": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    for factory in (None, f"{write_factory(tmp_path)}:build"):
        with pytest.raises(ModelLoadError) as error:
            load_torch(path, factory=factory)
        assert "--trust-pickle" in assert_one_line(error)
        assert not marker.exists()
    # The payload is real: trusting the file runs it (and the result is still no model).
    with pytest.raises(ModelLoadError):
        load_torch(path, trust_pickle=True)
    assert marker.exists()


# -- unreadable files and bad options ----------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [os.urandom(1000), b"", b"PK\x03\x04 truncated zip", b"\x80\x04not really a pickle"],
    ids=["random", "empty", "truncated-zip", "bad-pickle"],
)
def test_unreadable_files_are_load_errors(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as error:
        load_torch(path, trust_pickle=True)
    assert "not a PyTorch archive" in assert_one_line(error)


def test_truncated_checkpoint_is_a_load_error(state_dict_file):
    _, path = state_dict_file
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelLoadError) as error:
        load_torch(path, factory="unused.py:build")
    assert "not a PyTorch archive" in assert_one_line(error)


def test_missing_path_and_directory_are_load_errors(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        load_torch(tmp_path / "nope.pt")
    assert "does not exist" in assert_one_line(error)
    with pytest.raises(ModelLoadError) as error:
        load_torch(tmp_path)
    assert "directory" in assert_one_line(error)
    assert error.value.exit_code == EXIT_MODEL


def test_state_dict_without_factory_is_a_usage_error(state_dict_file):
    _, path = state_dict_file
    with pytest.raises(UsageError) as error:
        load_torch(path)
    assert "--factory" in assert_one_line(error) and "is a state dict" in str(error.value)
    assert error.value.exit_code == EXIT_USAGE


def test_factory_with_other_keys_or_shapes_is_a_load_error(state_dict_file, tmp_path):
    _, path = state_dict_file
    factory = write_factory(tmp_path, "other.py", builder="nn.Sequential(nn.Linear(2, 2))")
    with pytest.raises(ModelLoadError) as error:
        load_torch(path, factory=f"{factory}:build")
    message = assert_one_line(error)
    assert "missing keys: 0.weight, 0.bias" in message
    assert "unexpected keys: features.0.weight" in message
    wider = write_factory(tmp_path, "wider.py", builder="TinyNet(in_channels=1)")
    with pytest.raises(ModelLoadError) as error:
        load_torch(path, factory=f"{wider}:build")
    assert "features.0.weight (4, 3, 3, 3) in the file vs (4, 1, 3, 3)" in assert_one_line(error)


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("{tmp}/missing.py:build", "does not exist"),
        ("{tmp}/factory.py:nothing", "has no 'nothing'"),
        ("{tmp}/factory.py:not_a_module", "not a torch.nn.Module"),
        ("eqaudit_no_such_package.nets:build", "cannot be found"),
        ("no-colon-here", "path/to/file.py:build"),
    ],
)
def test_bad_factories_are_usage_errors(state_dict_file, tmp_path, factory, expected):
    _, path = state_dict_file
    write_factory(tmp_path)
    with pytest.raises(UsageError) as error:
        load_torch(path, factory=factory.format(tmp=tmp_path))
    assert expected in assert_one_line(error)


def test_factory_that_raises_is_a_load_error(state_dict_file, tmp_path):
    _, path = state_dict_file
    factory = write_factory(tmp_path, "raises.py", builder="1 / 0")
    with pytest.raises(ModelLoadError) as error:
        load_torch(path, factory=f"{factory}:build")
    assert "raised" in assert_one_line(error)


def test_every_error_is_an_eqaudit_error_with_one_line(tmp_path):
    path = tmp_path / "multi.pt"
    path.write_bytes(b"\n\n\nnot\na\nmodel\n")
    with pytest.raises(EqauditError) as error:
        load_torch(path)
    assert_one_line(error)


def test_only_outputs_overwritten_in_place_are_cloned_after_the_first_run():
    torch.manual_seed(0)
    model = InplaceNet().eval()
    adapter = TorchAdapter.from_module(model, input_spec=spec())
    x = images()
    adapter.run(x, ["conv", "act"])  # learns which captures a later op overwrites
    assert adapter._overwritten == {"conv"}
    with torch.no_grad():
        conv = model.conv(x)
    for _ in range(2):
        out = adapter.run(x, ["conv", "act"])
        torch.testing.assert_close(out.activations["conv"], conv, rtol=0, atol=0)
        torch.testing.assert_close(out.activations["act"], conv.clamp(min=0), rtol=0, atol=0)
    # Inference tensors carry no version counter: everything is cloned there, still right.
    with torch.inference_mode():
        out = adapter.run(x, ["conv", "act"])
    torch.testing.assert_close(out.activations["conv"], conv, rtol=0, atol=0)


class SometimesInplace(nn.Module):
    """Writes into the conv's output only for inputs with a large mean (data-dependent)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if float(x.mean()) > 10:
            h.mul_(0)
        return self.head(h.mean(dim=(2, 3)))


def test_a_data_dependent_inplace_write_is_caught_and_the_batch_rerun():
    torch.manual_seed(0)
    model = SometimesInplace().eval()
    adapter = TorchAdapter.from_module(model, input_spec=spec())
    adapter.run(images(), ["conv"])  # learns: nothing is overwritten
    assert adapter._overwritten == set()
    big = images() + 100
    with torch.no_grad():
        conv = model.conv(big)
        out = adapter.run(big, ["conv"])
    torch.testing.assert_close(out.activations["conv"], conv, rtol=0, atol=0)
    assert adapter._overwritten == {"conv"}


# -- streaming: activations handed to a sink while the forward runs --------------------------------
def test_a_sink_sees_each_output_before_a_later_inplace_op_and_nothing_is_returned():
    torch.manual_seed(0)
    model = InplaceNet().eval()
    adapter = TorchAdapter.from_module(model, input_spec=spec())
    x = images()
    seen: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def sink(name: str, value: torch.Tensor) -> None:
        order.append(name)
        seen[name] = value.clone()  # the test keeps a copy; the engine reduces in place

    out = adapter.run(x, ["conv", "act"], sink=sink)
    assert out.activations == {}
    assert order == ["conv", "act"]  # streamed in execution order, during the forward
    with torch.no_grad():
        conv = model.conv(x)
    assert (seen["conv"] < 0).any(), "the conv output was handed over before the ReLU ran"
    torch.testing.assert_close(seen["conv"], conv, rtol=0, atol=0)
    torch.testing.assert_close(seen["act"], conv.clamp(min=0), rtol=0, atol=0)
    # Streaming never learns or clones: only a returned capture needs the version counters.
    assert adapter._overwritten is None
    assert no_hooks_left(adapter.module)


def test_a_sink_error_is_the_callers_not_the_models():
    adapter = TorchAdapter.from_module(InplaceNet().eval(), input_spec=spec())

    def broken(name: str, value: torch.Tensor) -> None:
        raise ZeroDivisionError("engine bug")

    with pytest.raises(ZeroDivisionError, match="engine bug"):
        adapter.run(images(), ["conv"], sink=broken)

    def short_of_memory(name: str, value: torch.Tensor) -> None:
        raise MemoryError("no room for the comparison")

    with pytest.raises(MemoryError, match="no room"):  # the CLI's exit 3, advice included
        adapter.run(images(), ["conv"], sink=short_of_memory)
    assert no_hooks_left(adapter.module)


def test_a_fixed_batch_model_hands_the_whole_batch_to_the_sink_after_the_run(tmp_path):
    model = tiny()
    adapter = load_torch(export(tmp_path, model, images(2)))  # batch fixed at 2
    names = [layer.name for layer in adapter.probe_layers(images(1))]
    x = images(5)  # three chunks, the last padded
    seen: dict[str, torch.Tensor] = {}
    out = adapter.run(x, names, sink=lambda name, value: seen.setdefault(name, value))
    assert out.activations == {} and list(seen) == names
    whole = adapter.run(x, names).activations
    for name in names:
        assert seen[name].shape[0] == 5
        torch.testing.assert_close(seen[name], whole[name], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_callers_module_that_is_not_float32_is_audited_as_a_copy(dtype) -> None:
    # Converting it in place would round a float64 model's weights for good.
    import eqaudit

    model = TinyNet().eval().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = eqaudit.audit(model, "flips", input_size=SIZE, num_images=2)
    assert result.outputs[0]["n"] == 2
    after = model.state_dict()
    assert all(after[k].dtype == dtype and torch.equal(after[k], before[k]) for k in before)
    # ... and the summary says it ran in float32 (a float16 module was silently widened).
    name = str(dtype).removeprefix("torch.")
    assert result.summary["preprocessing"]["notes"][0].startswith(
        f"the module's weights are {name}: audited in float32"
    )


def test_a_float16_state_dict_model_says_it_is_audited_in_float32(tmp_path) -> None:
    model = TinyNet().eval().half()
    path = tmp_path / "half.pt"
    torch.save(model.state_dict(), path)
    factory = f"{write_factory(tmp_path, builder='TinyNet().half()')}:build"
    adapter = load_torch(path, factory=factory)
    assert adapter.load_notes == [
        "the module's weights are float16: audited in float32; to audit it in its own "
        "precision, export it (torch.export .pt2 or ONNX)"
    ]
    assert next(adapter.module.parameters()).dtype == torch.float32
    assert load_torch(path, factory=f"{write_factory(tmp_path)}:build").load_notes == []


def test_a_float16_program_with_large_activations_is_audited_as_its_float32_twin(tmp_path):
    # Its conv maps reach ~3e3 over 4 x 32 x 32 cells: norms past float16's 65 504. Summed in
    # float16 they were inf, and the audit died in its float64 accumulators ("ExactSum takes
    # finite values only"). The numbers match the float32 program's to float16's precision.
    import eqaudit

    model = tiny()
    with torch.no_grad():
        model.features[0].weight.mul_(5000.0)
        model.features[0].bias.mul_(5000.0)
    x = images(1, size=32)
    results = {}
    for dtype in (torch.float32, torch.float16):
        folder = tmp_path / str(dtype).removeprefix("torch.")
        folder.mkdir()
        path = export(folder, copy.deepcopy(model).to(dtype), x.to(dtype))
        results[dtype] = eqaudit.audit(str(path), "d4", input_size=32, num_images=2, seed=0)
    wide, half = (results[d].to_frame("layers") for d in (torch.float32, torch.float16))
    conv = half[half["layer"] == "features.0"]
    assert len(conv) == 8 and conv["relative_error"].notna().all()
    assert (conv["relative_error"].iloc[1:] > 0.1).all()  # random weights: far from equivariant
    np.testing.assert_allclose(half["relative_error"], wide["relative_error"], rtol=2e-3)


class PerImageScale(nn.Module):
    """Divides each image's conv maps by their norm, with the batch read from the shape: a
    constant once traced (``torch.jit.trace`` records the batch it saw, as a Swin's window
    reverse does), so a trace at batch 1 divides a whole batch by one joint norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b = int(y.shape[0])
        y = y / y.reshape(b, -1).norm(dim=1).view(b, 1, 1, 1)
        return self.fc(y.mean((2, 3)))


def test_a_torchscript_trace_that_kept_its_batch_runs_one_image_at_a_time(tmp_path):
    # It ran batched with no error and gave other numbers than the module it was traced from.
    import warnings

    import eqaudit

    torch.manual_seed(0)
    model = PerImageScale().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warning about int(y.shape[0])
        torch.jit.save(torch.jit.trace(model, images(1)), tmp_path / "traced.pt")
    options = dict(input_size=SIZE, num_images=4, seed=0, layers=False)
    traced = eqaudit.audit(str(tmp_path / "traced.pt"), "d4", **options)
    fixed = traced.summary["model"]["fixed_batch"]
    assert fixed["run"] == "one image at a time"
    assert fixed["why"].startswith("its output 0 differs for images run together")
    eager = eqaudit.audit(model, "d4", **options)
    for got, want in zip(traced.outputs, eager.outputs, strict=True):
        assert got["logit_error"] == pytest.approx(want["logit_error"], rel=1e-5, abs=1e-9)
    # A trace of a batch-agnostic module is left batched, with nothing to say.
    torch.jit.save(torch.jit.trace(tiny(), images(1)), tmp_path / "plain.pt")
    plain = eqaudit.audit(str(tmp_path / "plain.pt"), "d4", **options)
    assert "fixed_batch" not in plain.summary["model"]


class WidthSeven(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == 7, "width must be 7"
        return self.conv(x).mean((2, 3))


def test_layers_on_a_torchscript_archive_says_it_has_none(tmp_path):
    # It said "matches no layer (first layers: none): run 'eqaudit inspect MODEL'".
    import eqaudit
    from eqaudit.errors import UsageError as Usage

    torch.jit.save(torch.jit.script(tiny()), tmp_path / "m.pt")
    with pytest.raises(Usage, match=r"has no layers to audit \(TorchScript archives expose no"):
        eqaudit.audit(str(tmp_path / "m.pt"), "flips", input_size=SIZE, layer_patterns=["f*"])


def test_a_torchscript_failure_is_reported_by_its_cause_not_its_heading(tmp_path):
    # TorchScript's message starts "The following operation failed in the TorchScript
    # interpreter." and ends with the cause, after a TorchScript traceback.
    import eqaudit
    from eqaudit.errors import ModelRunError

    torch.jit.save(torch.jit.script(WidthSeven().eval()), tmp_path / "m.pt")
    with pytest.raises(ModelRunError, match=r"AssertionError: width must be 7"):
        eqaudit.audit(str(tmp_path / "m.pt"), "flips", input_size=SIZE, num_images=2)


class ClassifierOutput:
    """A model output type of its own, as ``transformers``' ``ModelOutput``."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class ReturnsOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        return ClassifierOutput(self.conv(x).mean((2, 3)))


def test_a_program_whose_output_type_is_not_registered_here_says_so(tmp_path):
    # torch.export.load logs the cause and raises "check the warnings above": the error line
    # said only that, and advised saving under this torch (it had been).
    from torch.utils import _pytree

    _pytree.register_pytree_node(
        ClassifierOutput,
        lambda out: ([out.logits], None),
        lambda values, _: ClassifierOutput(values[0]),
        serialized_type_name="elsewhere.ClassifierOutput",
    )
    try:
        path = export(tmp_path, ReturnsOutput().eval(), images(1))
    finally:
        _pytree._deregister_pytree_node(ClassifierOutput)  # as in a process that never imports it
    with pytest.raises(ModelLoadError) as error:
        load_torch(path)
    message = assert_one_line(error)
    assert (
        "returns an object of type elsewhere.ClassifierOutput, registered with torch's" in message
    )
    assert "export a wrapper whose forward returns the scores tensor" in message


class WithConstants(nn.Module):
    """A tensor made in forward (a lifted constant once exported, not a buffer) and a factory op
    whose device the export writes into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
        y = y + torch.arange(y.shape[-1], dtype=y.dtype)
        return self.fc(y.mean((2, 3)))


def test_an_exported_program_moves_to_another_device_whole(tmp_path):
    # "meta" stands in for a GPU: Module.to would leave the lifted constant and the arange's
    # device on the CPU, and the forward would fail with a device mismatch.
    adapter = load_torch(export(tmp_path, WithConstants().eval(), images(1)))
    cpu_layers = sorted(adapter._candidates)
    adapter.to_device("meta")
    out = adapter._forward(torch.zeros(1, 3, 8, 8))
    assert out.device.type == "meta" and tuple(out.shape) == (1, 5)
    tensors = [t for m in adapter.module.modules() for t in vars(m).values()]
    tensors += list(adapter.module.parameters()) + list(adapter.module.buffers())
    assert all(t.device.type == "meta" for t in tensors if isinstance(t, torch.Tensor))
    assert sorted(adapter._candidates) == cpu_layers  # hooks go on the moved module


def test_a_model_left_partly_on_the_cpu_says_so():
    # Tensors made in forward stay on the CPU whatever the module is moved to ("meta" stands in
    # for a GPU): the one-line error says what happened and what to do.
    from eqaudit.models import load_model

    adapter = load_model(WithConstants().eval(), input_size=(SIZE, SIZE))
    adapter.to_device("meta")
    with pytest.raises(ModelRunError, match=r"failed on its device: .* or use --device cpu\)"):
        adapter.run(torch.zeros(1, 3, SIZE, SIZE))


def test_a_program_the_move_pass_refuses_moves_as_a_module(tmp_path, monkeypatch):
    import torch.export.passes

    def refuse(program, device):
        raise RuntimeError("not this program")

    monkeypatch.setattr(torch.export.passes, "move_to_device_pass", refuse)
    adapter = load_torch(export(tmp_path, tiny(), images(1)))
    adapter.to_device("meta")
    assert {p.device.type for p in adapter.module.parameters()} == {"meta"}


@dataclasses.dataclass
class HeadsOutput:
    aux: torch.Tensor
    scores: torch.Tensor


class LogitsAttribute:
    """An output object with a ``logits`` attribute and nothing else to read it by."""

    def __init__(self, aux: torch.Tensor, logits: torch.Tensor) -> None:
        self.aux, self.logits = aux, logits


class TwoHeads(nn.Module):
    """Returns an auxiliary head first and the class scores second, as a tuple, a named tuple,
    a dict, a dataclass or an object with a ``logits`` attribute (``kind``)."""

    Outputs = __import__("collections").namedtuple("Outputs", ["aux", "logits"])

    def __init__(self, kind: str = "tuple") -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.aux, self.logits = nn.Linear(4, 3), nn.Linear(4, 7)

    def forward(self, x: torch.Tensor):
        f = self.pool(self.conv(x))
        aux, logits = self.aux(f), self.logits(f)
        if self.kind == "named":
            return self.Outputs(aux, logits)
        if self.kind == "dict":
            return {"aux": aux, "scores": logits}
        if self.kind == "dataclass":
            return HeadsOutput(aux, logits)
        if self.kind == "attribute":
            return LogitsAttribute(aux, logits)
        return aux, logits


def test_a_model_with_several_outputs_needs_the_scores_picked(tmp_path) -> None:
    import eqaudit

    torch.manual_seed(0)
    # Taking the first tensor would audit the 3-class auxiliary head without a word.
    with pytest.raises(UsageError, match=r"a tuple of 2 tensors \(0: \(.*, 3\), 1: "):
        eqaudit.audit(TwoHeads(), "flips", input_size=9, num_images=2)
    with pytest.raises(UsageError, match=r"keys aux, scores: .*--output-name KEY"):
        eqaudit.audit(TwoHeads("dict"), "flips", input_size=9, num_images=2)
    model = TwoHeads()
    picked = eqaudit.audit(model, "flips", input_size=9, num_images=2, output_name="1")
    assert picked.summary["model"]["num_classes"] == 7
    assert picked.summary["model"]["output"] == "1"
    # A named tuple's logits field and a dict's key.
    named = eqaudit.audit(TwoHeads("named"), "flips", input_size=9, num_images=2)
    assert named.summary["model"]["num_classes"] == 7
    as_dict = TwoHeads("dict")
    as_dict.load_state_dict(model.state_dict())
    keyed = eqaudit.audit(as_dict, "flips", input_size=9, num_images=2, output_name="scores")
    assert keyed.outputs[1] == picked.outputs[1]  # the same head, the same numbers
    # A dataclass's field (its two tensors need the pick) and an object's logits attribute:
    # both were refused ("wrap it"), and --output-name then said "nothing to pick from".
    as_dataclass = TwoHeads("dataclass")
    as_dataclass.load_state_dict(model.state_dict())
    with pytest.raises(UsageError, match=r"keys aux, scores: .*--output-name KEY"):
        eqaudit.audit(as_dataclass, "flips", input_size=9, num_images=2)
    fielded = eqaudit.audit(as_dataclass, "flips", input_size=9, num_images=2, output_name="scores")
    assert fielded.outputs[1] == picked.outputs[1]
    with_attribute = TwoHeads("attribute")
    with_attribute.load_state_dict(model.state_dict())
    by_attribute = eqaudit.audit(with_attribute, "flips", input_size=9, num_images=2)
    assert by_attribute.outputs[1] == picked.outputs[1]
    aux = eqaudit.audit(with_attribute, "flips", input_size=9, num_images=2, output_name="aux")
    assert aux.summary["model"]["num_classes"] == 3

    # --lie differentiates the picked scores, as a model returning only them.
    class LogitsOnly(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)[1]

    lie = {"transforms": "rot:10", "input_size": 9, "num_images": 2, "layers": False, "lie": True}
    picked_lie = eqaudit.audit(model, output_name="1", **lie).summary["lie"]["outputs"]
    only_lie = eqaudit.audit(LogitsOnly(model), **lie).summary["lie"]["outputs"]
    assert [r["mean"] for r in picked_lie] == [r["mean"] for r in only_lie]
    with pytest.raises(UsageError, match=r"'2' is not an index of the model's 2 outputs"):
        eqaudit.audit(TwoHeads(), "flips", input_size=9, num_images=2, output_name="2")
    with pytest.raises(UsageError, match=r"returns one Tensor, nothing to pick from"):
        single = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        eqaudit.audit(single, "flips", input_size=9, num_images=2, output_name="0")


def test_output_name_picks_the_scores_of_a_torch_export_on_the_command_line(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from eqaudit.cli import app

    torch.manual_seed(0)
    program = torch.export.export(TwoHeads().eval(), (torch.zeros(2, 3, 9, 9),))
    torch.export.save(program, tmp_path / "two.pt2")
    runner = CliRunner()
    refused = runner.invoke(
        app, ["check", str(tmp_path / "two.pt2"), "-n", "2", "-o", str(tmp_path / "a")]
    )
    assert refused.exit_code == 2 and "--output-name INDEX" in refused.output
    assert "Traceback" not in refused.output
    out = tmp_path / "b"
    done = runner.invoke(
        app, ["check", str(tmp_path / "two.pt2"), "-n", "2", "--output-name", "1", "-o", str(out)]
    )
    assert done.exit_code == 0, done.output
    assert json.loads((out / "summary.json").read_text())["model"]["num_classes"] == 7


def test_compare_passes_output_name_to_two_pytorch_models() -> None:
    from eqaudit.compare import run_both

    torch.manual_seed(0)
    a, b = TwoHeads(), TwoHeads()
    result_a, result_b = run_both(
        a, b, None, transforms="flips", input_size=9, num_images=2, output_name="1"
    )
    assert result_a.summary["model"]["num_classes"] == result_b.summary["model"]["num_classes"] == 7


def test_a_blank_probe_does_not_drop_layers_that_happen_to_equal_the_scores() -> None:
    # The probe image is blank: a bias-free net gives zero activations and zero scores there,
    # so a 10-feature layer "equals" 10 zero scores. Only the module whose output is the scores
    # tensor itself (the last Linear) is the output.
    import eqaudit

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 10, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(10, 10, bias=False),
    )
    result = eqaudit.audit(model, "flips", input_size=16, num_images=2)
    # (not the Flatten "5": it hands out the pool's values)
    assert sorted({row["layer"] for row in result.layers}) == ["0", "1", "2", "3", "4"]


class Noisy(nn.Module):
    """Dropout and batch statistics: what a model mid-training relies on; ``fail`` makes the
    forward raise once the audit has started."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.fail = False
        # Updated by every forward, in eval mode too (as a fake-quant observer's range is).
        self.register_buffer("seen", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += torch.stack([x.new_tensor(1.0), x.abs().max()])
        if self.fail and x.shape[0] > 1:
            return x.new_full((x.shape[0], 3), float("nan"))
        return self.head(self.drop(self.bn(self.conv(x))))


def test_a_callers_module_comes_back_in_the_modes_it_was_given() -> None:
    # Audited between training steps, a model must resume training with dropout and batch
    # statistics on, whether the audit succeeds or fails; one part kept in eval stays so.
    import eqaudit
    from eqaudit.errors import ModelRunError

    model = Noisy().train()
    model.bn.eval()
    model(torch.rand(2, 3, 9, 9))  # a training step's worth of state
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = model.seen
    eqaudit.audit(model, "flips", input_size=9, num_images=2, lie=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    # Every buffer as it was, the object and its values (bit for bit).
    assert model.seen is seen
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.fail = True
    with pytest.raises(ModelRunError):
        eqaudit.audit(model, "flips", input_size=9, num_images=2, lie=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    from eqaudit.inspect import inspect_model

    model.fail = False
    assert inspect_model(model, input_size=(9, 9))["num_classes"] == 3
    assert {name: m.training for name, m in model.named_modules()} == modes

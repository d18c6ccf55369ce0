"""Reproducible numbers, the memory guard, and interrupted runs (SIGTERM / SIGINT)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from models_zoo import export_onnx, symmetric_cnn
from typer.testing import CliRunner

import eqaudit
from eqaudit.cli import app
from eqaudit.errors import UsageError

# ``eqaudit.audit`` is also the name of the function the package exports.
engine_module = importlib.import_module("eqaudit.audit")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# The data files of a report; report.html, junit.xml and summary.md show the run's time.
DATA_FILES = {"summary.json", "outputs.csv", "layers.csv", "predictions.csv", "gallery.json"}


def test_same_inputs_give_byte_identical_reports_apart_from_the_run_block(tmp_path):
    model = export_onnx(symmetric_cnn(), tmp_path / "m.onnx", 33)
    runner = CliRunner()
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = runner.invoke(
            app,
            [
                "check",
                str(model),
                "-t",
                "d4,rot:20,shift:2",
                "-n",
                "10",
                "--seed",
                "4",
                "-o",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        outs.append(_files(out))
    a, b = outs
    assert a.keys() == b.keys() and a.keys() >= DATA_FILES
    for name in DATA_FILES:
        if name == "summary.json":
            sa, sb = json.loads(a[name]), json.loads(b[name])
            assert sa.pop("run") != {} and sb.pop("run") != {}
            assert sa == sb
            # Byte-identical too once the run block is dropped from the text.
            assert json.dumps(sa, indent=2) == json.dumps(sb, indent=2)
        else:
            assert a[name] == b[name], name


MAPS = 8 * 33 * 33 * 2 + 16 * 17 * 17 * 2 + 16 * 9 * 9 * 2  # conv + relu maps of symmetric_cnn


@pytest.mark.parametrize(
    ("backend", "held"),
    [
        # PyTorch streams each layer to the engine during the forward: four copies of the
        # largest layer (conv1 / relu1, 8 x 33 x 33) bound what the comparisons hold.
        ("torch", 4 * 4 * (8 * 33 * 33)),
        # onnxruntime hands every output out at the end: three copies of every layer (runtime,
        # engine, float64 work); + pool and the norm's Sub and Div (16 each).
        ("onnx", 3 * 4 * (MAPS + 16 * 3)),
    ],
)
def test_memory_guard_shrinks_the_batch_or_refuses(monkeypatch, tmp_path, backend, held):
    model = symmetric_cnn()
    if backend == "onnx":
        model = str(export_onnx(model, tmp_path / "sym.onnx", 33))
    # Room for 2 images x 8 elements within half of "available" memory.
    room = 2 * 8 * 2 * held
    monkeypatch.setattr(engine_module, "available_memory", lambda: room + 1)
    result = eqaudit.audit(model, "d4", input_size=33, num_images=6, batch_size=64)
    assert result.summary["run"]["images_per_step"] == 2
    assert "batch shrunk from 8 to 2" in result.summary["run"]["notes"][0]
    # Two bytes less and only one image fits: the budget is exactly that.
    monkeypatch.setattr(engine_module, "available_memory", lambda: room - 2)
    tighter = eqaudit.audit(model, "d4", input_size=33, num_images=2, batch_size=64)
    assert tighter.summary["run"]["images_per_step"] == 1
    # Same numbers as an unconstrained run: the batch size does not change the results.
    monkeypatch.setattr(engine_module, "available_memory", lambda: None)
    free = eqaudit.audit(model, "d4", input_size=33, num_images=6, batch_size=64)
    assert free.summary["run"]["images_per_step"] == 8
    # Batched convolutions may differ in the last bits between batch sizes.
    for a, b in zip(result.outputs, free.outputs, strict=True):
        assert a["agreement"] == b["agreement"]
        assert a["js_divergence"] == pytest.approx(b["js_divergence"], rel=1e-6, abs=1e-15)
    for a, b in zip(result.layers, free.layers, strict=True):
        assert a["relative_error"] == pytest.approx(b["relative_error"], rel=1e-9, abs=1e-12)
    monkeypatch.setattr(engine_module, "available_memory", lambda: 8 * held)
    with pytest.raises(UsageError, match="--no-layers"):
        eqaudit.audit(model, "d4", input_size=33, num_images=6)
    # Outputs only needs no activation memory.
    eqaudit.audit(model, "d4", input_size=33, num_images=2, layers=False)


@pytest.mark.parametrize(("backend", "held"), [("torch", 4 * 4 * 8 * 33 * 33), ("onnx", None)])
def test_gpu_batch_sizing_budgets_the_forward_and_what_the_comparisons_hold(
    monkeypatch, tmp_path, backend, held
):
    # Without --batch-size on a GPU, forward images per call = half the free memory over (the
    # model's own peak per forward image + what the comparisons hold per forward image).
    model = symmetric_cnn()
    if backend == "onnx":
        model = str(export_onnx(model, tmp_path / "sym.onnx", 33))
        held = 3 * 4 * (MAPS + 16 * 3)
    engines = []
    sizing = engine_module.Engine.images_per_step

    def spy(self, *args, **kwargs):
        engines.append(self)
        return sizing(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "images_per_step", spy)
    eqaudit.audit(model, "d4", input_size=33, num_images=2)
    (engine,) = engines
    assert engine.held_bytes_per_image(engine.adapter.streams(None)) == held
    forward = 3_000_000  # bytes per forward image, as a GPU probe would measure
    for free in (10 * 2**30, 2**30, 64 * 2**20):
        batch = min(4096, max(8, (free // 2) // (forward + held)))
        assert engine.images_per_step(None, free, forward_bytes=forward) == batch // 8


class InplaceResidual(torch.nn.Module):
    """Batch norm into ReLU(inplace=True) and ``out += identity``: captured outputs that the
    forward overwrites later, the case streaming must get right without cloning."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(identity))
        out += identity
        return self.fc(self.relu(out).mean((2, 3)))


def test_streamed_layers_give_the_numbers_of_returned_ones(monkeypatch):
    torch.manual_seed(0)
    model = InplaceResidual().eval()
    for bn in (model.bn1, model.bn2):  # non-trivial statistics: outputs with negative parts
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    kwargs = {"input_size": 17, "num_images": 5, "batch_size": 24, "transforms": "d4,shift:1"}
    streamed = eqaudit.audit(model, **kwargs)
    adapter_module = importlib.import_module("eqaudit.models.torch_adapter")
    monkeypatch.setattr(adapter_module.TorchAdapter, "streams_activations", False)
    returned = eqaudit.audit(model, **kwargs)
    assert len(streamed.layers) == len(returned.layers) > 20
    layers = {row["layer"] for row in streamed.layers}
    assert {"bn1", "bn2", "relu", "relu:1"} <= layers
    # Same batches, same comparisons: equal to the last bit, rows and summary alike.
    assert streamed.layers == returned.layers
    assert streamed.outputs == returned.outputs
    bn2 = [r for r in streamed.layers if r["layer"] == "bn2" and r["transform"] == "rot90"]
    assert bn2[0]["relative_error"] > 0.1  # a random residual block is far from equivariant


def test_layers_handed_out_together_are_compared_on_the_runtimes_threads(monkeypatch, tmp_path):
    # onnxruntime runs an ONNX model on its own threads, one per physical core, whatever torch's
    # setting: the layers it hands out are compared on as many threads (it is idle meanwhile).
    model = str(export_onnx(symmetric_cnn(), tmp_path / "sym.onnx", 33))
    kwargs = {"input_size": 33, "num_images": 5, "batch_size": 24, "transforms": "d4,rot:30"}
    onnx_module = importlib.import_module("eqaudit.models.onnx_adapter")
    threads: set[str] = set()
    update = engine_module.Engine._update_layer

    def spy(self, state, act, fit):
        threads.add(threading.current_thread().name)
        return update(self, state, act, fit)

    monkeypatch.setattr(engine_module.Engine, "_update_layer", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(onnx_module, "physical_cpus", lambda: 1)
        one = eqaudit.audit(model, **kwargs)
        assert threads == {"MainThread"}
        threads.clear()
        torch.set_num_threads(1)
        monkeypatch.setattr(onnx_module, "physical_cpus", lambda: 2)
        two = eqaudit.audit(model, **kwargs)
    finally:
        torch.set_num_threads(before)
    assert threads and all(name.startswith("eqaudit-compare") for name in threads)
    assert not any(t.name.startswith("eqaudit-compare") for t in threading.enumerate())
    # The schedule does not change a number: exact, resampled and flat rows alike.
    assert one.layers == two.layers
    assert {row["comparison"] for row in one.layers} >= {"exact", "resampled", "invariance"}


def test_threads_option_sets_both_runtimes_for_the_audit_only(monkeypatch, tmp_path) -> None:
    from eqaudit.data import prefetch
    from eqaudit.models import load_model

    monkeypatch.setattr(prefetch, "CGROUP_ROOT", tmp_path / "no-cgroup")  # not a container's
    path = export_onnx(symmetric_cnn(), tmp_path / "sym.onnx", 33)

    onnx = load_model(path, threads=1)
    assert onnx._session(()).get_session_options().intra_op_num_threads == 1
    assert onnx.host_threads() == 1

    model, seen = symmetric_cnn(), []
    model.conv1.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    kwargs = {"input_size": 33, "num_images": 4, "seed": 1}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        one = eqaudit.audit(model, threads=1, **kwargs)
        assert set(seen) == {1} and torch.get_num_threads() == 2  # the caller's setting is back
        seen.clear()
        two = eqaudit.audit(model, **kwargs)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
    assert (one.summary["run"]["cpu_threads"], two.summary["run"]["cpu_threads"]) == (1, 2)
    assert one.layers == two.layers and one.outputs == two.outputs
    ran_onnx = eqaudit.audit(str(path), threads=1, **kwargs)
    assert ran_onnx.summary["run"]["cpu_threads"] == 1


def test_a_containers_cpu_limit_keeps_both_runtimes_within_it(monkeypatch, tmp_path) -> None:
    from eqaudit.data import prefetch
    from eqaudit.models import load_model

    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("100000 100000\n")  # one CPU's worth of time
    monkeypatch.setattr(prefetch, "CGROUP_ROOT", cgroup)
    path = export_onnx(symmetric_cnn(), tmp_path / "sym.onnx", 33)
    onnx = load_model(path)
    assert onnx._session(()).get_session_options().intra_op_num_threads == 1
    assert load_model(path, threads=2).host_threads() == 2  # --threads is obeyed as given

    model, seen = symmetric_cnn(), []
    model.conv1.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = eqaudit.audit(model, input_size=33, num_images=2)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert result.summary["run"]["cpu_threads"] == 1


def test_more_threads_than_cpus_are_run_but_warned_about(monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "usable_cpus", lambda: 1)
    before = torch.get_num_threads()
    try:
        result = eqaudit.audit(symmetric_cnn(), input_size=33, num_images=2, threads=2)
    finally:
        torch.set_num_threads(before)
    assert result.summary["run"]["cpu_threads"] == 2
    assert any(
        w.startswith("--threads 2 is more than the 1 CPUs this process may use")
        and w.endswith("use --threads 1 or fewer")
        for w in result.warnings
    )


def test_an_audit_leaves_torchs_threads_as_it_found_them(monkeypatch, tmp_path) -> None:
    # The comparison threads set theirs to 1, which also becomes the default of any thread made
    # later: the audit puts the caller's setting back, also without --threads.
    from eqaudit.transforms import geometry

    model = str(export_onnx(symmetric_cnn(), tmp_path / "sym.onnx", 33))
    onnx_module = importlib.import_module("eqaudit.models.onnx_adapter")
    monkeypatch.setattr(onnx_module, "physical_cpus", lambda: 2)  # a pool of 2 comparers
    before, seen = torch.get_num_threads(), []
    try:
        torch.set_num_threads(2)
        eqaudit.audit(model, "d4,rot:30", input_size=33, num_images=3)
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert torch.get_num_threads() == 2 and seen == [2]
    finally:
        torch.set_num_threads(before)
    assert not geometry._DEVICE_PLANS  # the cell-map tensors go with the audit


def test_runtime_threads_are_torchs_for_torch_and_onnxruntimes_for_onnx(tmp_path) -> None:
    from eqaudit.data.prefetch import physical_cpus
    from eqaudit.models import load_model

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        onnx = load_model(export_onnx(symmetric_cnn(), tmp_path / "sym.onnx", 33))
        assert onnx.host_threads() == physical_cpus()
        torch.set_num_threads(2)
        assert load_model(symmetric_cnn()).host_threads() == 2
    finally:
        torch.set_num_threads(before)


SLOW_FACTORY = """
import os, time, pathlib
import torch
from torch import nn

class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        marker = pathlib.Path(os.environ["SLOW_MARKER"])
        marker.touch()
        if os.environ.get("SLOW_DELAY"):
            time.sleep(float(os.environ["SLOW_DELAY"]))
        return self.fc(self.conv(x).mean((2, 3)))

def build():
    torch.manual_seed(0)
    return Slow()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(("script", "traceback"), [("/bin/eqaudit", False), ("/bin/other", True)])
def test_ctrl_c_while_the_script_imports_torch_is_one_line(script, traceback):
    # Ctrl-C in the first seconds (importing torch) printed a traceback from inside torch.
    # The hook is the eqaudit script's only: a program that imports eqaudit keeps Python's.
    code = f"import sys; sys.argv = [{script!r}]; import eqaudit; raise KeyboardInterrupt"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == -signal.SIGINT  # ended by SIGINT, as Python does: 130 in a shell
    if traceback:
        assert "Traceback" in run.stderr
    else:
        assert run.stderr == "error: interrupted (SIGINT): no new report was written\n"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_run_leaves_the_previous_report(tmp_path, sig, code):
    factory = tmp_path / "slow.py"
    factory.write_text(SLOW_FACTORY)
    weights = tmp_path / "w.pt"
    sys.path.insert(0, str(tmp_path))
    try:
        import slow

        torch.save(slow.build().state_dict(), weights)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("slow", None)
    eqaudit_bin = shutil.which("eqaudit") or ""
    command = [eqaudit_bin] if eqaudit_bin else [sys.executable, "-m", "eqaudit"]
    out = tmp_path / "out"
    marker = tmp_path / "started"
    args = [
        *command,
        "check",
        str(weights),
        "--factory",
        f"{factory}:build",
        "--input-size",
        "9",
        "-t",
        "c4",
        "-n",
        "40",
        "--batch-size",
        "4",
        "-o",
        str(out),
    ]
    env = {**os.environ, "SLOW_MARKER": str(marker)}
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    before = _files(out)

    marker.unlink()
    proc = subprocess.Popen(
        [*args, "-n", "200"],
        env={**env, "SLOW_DELAY": "0.2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the audit
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), stderr
    assert "Traceback" not in stderr
    assert _files(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".eqaudit-")]


def test_a_model_with_noise_in_its_forward_is_reported_as_non_deterministic() -> None:
    import torch
    from torch import nn

    import eqaudit

    class Noisy(nn.Module):  # randomness that eval() does not switch off
        def __init__(self, noise: float) -> None:
            super().__init__()
            self.noise = noise
            self.body = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(324, 3)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x + self.noise * torch.randn_like(x))

    torch.manual_seed(0)
    result = eqaudit.audit(Noisy(0.5), "flips", input_size=9, num_images=4, layers=False)
    assert any("not deterministic" in w for w in result.warnings)
    clean = eqaudit.audit(Noisy(0.0), "flips", input_size=9, num_images=4, layers=False)
    assert not any("not deterministic" in w for w in clean.warnings)


def test_batch_norm_in_training_mode_is_reported_as_depending_on_the_batch() -> None:
    # Each run of the same two images agrees with the other; the scores of those images
    # inside the first batch (12 images: 4 under 3 elements) do not.
    import torch
    import torch.nn.functional as F
    from torch import nn

    import eqaudit

    class BatchStatistics(nn.Module):  # batch statistics that eval() does not switch off
        def __init__(self, on: bool) -> None:
            super().__init__()
            self.on = on
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(324, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            return self.head(F.batch_norm(x, None, None, training=True) if self.on else x)

    torch.manual_seed(0)
    result = eqaudit.audit(BatchStatistics(True), "flips", input_size=9, num_images=4)
    assert any("depend on the other images of its batch" in w for w in result.warnings)
    clean = eqaudit.audit(BatchStatistics(False), "flips", input_size=9, num_images=4)
    assert not any("not deterministic" in w for w in clean.warnings)


def test_an_onnx_graph_handing_out_its_layers_is_not_called_non_deterministic(tmp_path) -> None:
    # onnxruntime fuses Conv + Add (a residual) only when the sum is not handed out, and the
    # fused kernel rounds differently: the plain and the layer-exposing graph give different
    # logits (here ~3e-4 of their scale, a ResNet's size). The check must re-run the images the
    # way the batch ran, with the layers handed out, or it calls rounding randomness.
    import numpy as np
    import onnx
    import onnxruntime as ort
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(width, width, 3, padding=1)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(x + self.conv2(self.relu(self.conv1(x))))

    class Residual(nn.Module):  # features far from zero, standardised: rounding shows
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.body = nn.Sequential(nn.ReLU(), Block(16), Block(16), nn.AdaptiveAvgPool2d(1))
            self.register_buffer("mean", torch.zeros(16))
            self.register_buffer("std", torch.ones(16))
            self.fc = nn.Linear(16, 5)

        def features(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(self.stem(x)).flatten(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc((self.features(x) - self.mean) / self.std)

    torch.manual_seed(0)
    model = Residual().eval()
    x = np.random.default_rng(0).random((8, 3, 17, 17), dtype=np.float32)  # pixels in 0-1
    with torch.no_grad():
        model.stem.bias.add_(100.0)
        features = model.features(torch.from_numpy(x))
        model.mean.copy_(features.mean(0))
        model.std.copy_(features.std(0) + 1e-6)
    path = export_onnx(model, tmp_path / "residual.onnx", 17)
    graph = onnx.load(str(path))
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for node in graph.graph.node:
        if node.op_type in ("Conv", "Relu", "Add"):
            graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    exposed = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = plain.run(["scores"], {"image": x})[0], exposed.run(["scores"], {"image": x})[0]
    assert np.abs(a - b).max() > 1e-5 * np.abs(a).max(), "the two graphs round alike here"
    result = eqaudit.audit(path, "flips", data=x.transpose(0, 2, 3, 1), preset="unit")
    assert result.layers, "the layers were audited"
    assert not any("not deterministic" in w for w in result.warnings), result.warnings


def test_a_model_that_gives_every_image_one_class_is_warned_about() -> None:
    # Scores that vary but always rank class 2 first (an untrained net, a wrong --scale):
    # agreement is then certain, whatever the transforms do.
    import pandas as pd
    from torch import nn

    import eqaudit
    from eqaudit.audit import one_class_warning

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    with torch.no_grad():
        model[3].bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    result = eqaudit.audit(model, "flips", input_size=9, num_images=8, layers=False)
    assert any(
        w.startswith("all 8 images get the same top-1 class (2; if") for w in result.warnings
    )
    assert result.score == 100.0
    fewer = eqaudit.audit(model, "flips", input_size=9, num_images=7, layers=False)
    assert not any("same top-1 class" in w for w in fewer.warnings)

    def frame(top1: list[int], labels: list[int]) -> pd.DataFrame:
        return pd.DataFrame({"transform": "id", "top1": top1, "label": labels})

    names = ["cat", "dog", "fox"]
    assert "1 'dog'; though the labels span 2 classes" in one_class_warning(
        frame([1] * 8, [0, 1] * 4), "id", names
    )
    assert one_class_warning(frame([1] * 8, [1] * 8), "id", names) is None  # one class audited
    assert one_class_warning(frame([1] * 7 + [0], [-1] * 8), "id", names) is None


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_a_move_that_fails_midway_puts_the_previous_report_back(tmp_path, monkeypatch) -> None:
    # A move into --out that failed after some files had moved left the folder half new, half
    # old (review): the moves are undone now.
    from eqaudit.reports import write_report

    model = symmetric_cnn()
    out = tmp_path / "out"
    write_report(eqaudit.audit(model, "flips", input_size=33, num_images=2), out)
    before = _tree(out)
    moves = []
    real_replace = os.replace

    def failing(source, target):  # type: ignore[no-untyped-def]
        moves.append(Path(target).name)
        if len(moves) == 8:  # (once: the undo succeeds); os.replace names its source
            raise OSError(28, "No space left on device", str(source), None, str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing)
    result = eqaudit.audit(model, "c4", input_size=33, num_images=3)
    with pytest.raises(UsageError, match="No space left on device") as error:
        write_report(result, out)
    # The report's path, not the staging folder's (deleted by then).
    assert f"cannot write to '{out}{os.sep}" in str(error.value)
    assert ".eqaudit-" not in str(error.value)
    assert _tree(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".eqaudit-")]


def test_a_folder_where_a_report_file_goes_is_refused_before_anything_moves(tmp_path) -> None:
    from eqaudit.reports import write_report

    model = symmetric_cnn()
    out = tmp_path / "out"
    write_report(eqaudit.audit(model, "flips", input_size=33, num_images=2), out)
    (out / "summary.md").unlink()
    (out / "summary.md").mkdir()
    (out / "summary.md" / "notes.txt").write_text("mine")
    before = _tree(out)
    result = eqaudit.audit(model, "c4", input_size=33, num_images=3)
    with pytest.raises(UsageError, match=r"summary.md' is a folder where the report writes"):
        write_report(result, out)
    assert _tree(out) == before
    # The command line says so before anything runs (not after the audit): before it even
    # finds that the model does not exist.
    for command in (["check", "missing.onnx"], ["compare", "missing.onnx", "missing.onnx"]):
        run = CliRunner().invoke(app, [*command, "-o", str(out)])
        assert run.exit_code == 2 and "is a folder where the report writes" in run.output
    assert _tree(out) == before


def test_a_comparison_and_its_two_audits_are_written_as_one(tmp_path, monkeypatch) -> None:
    # compare wrote a/, b/ and then the comparison in three steps: an interrupt between them
    # left b/ describing one model and compare.json another (review).
    from eqaudit.compare import compare, write_comparison

    model = symmetric_cnn()
    out = tmp_path / "cmp"
    first = compare(model, model, transforms="flips", input_size=33, num_images=2)
    write_comparison(first[0], out, audits=(first[1], first[2]))
    assert {"compare.json", "a/summary.json", "b/summary.json"} <= set(_tree(out))
    before = _tree(out)
    moves = []
    real_replace = os.replace

    def failing(source, target):  # type: ignore[no-untyped-def]
        moves.append(Path(target))
        failing_at = out / "b" / "summary.json"  # (b's files are replaced one by one)
        if Path(target) == failing_at and moves.count(failing_at) == 1:  # (the undo succeeds)
            raise OSError(5, "Input/output error", str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing)
    second = compare(model, model, transforms="c4", input_size=33, num_images=3)
    with pytest.raises(UsageError, match="Input/output error"):
        write_comparison(second[0], out, audits=(second[1], second[2]))
    assert _tree(out) == before
    monkeypatch.setattr(os, "replace", real_replace)
    write_comparison(second[0], out, audits=(second[1], second[2]))
    saved = json.loads((out / "b" / "summary.json").read_text())
    assert saved["transforms"]["spec"] == "c4"
    assert json.loads((out / "compare.json").read_text())["data"]["transforms"] == "c4"
    # Files of the user's own in a/ stay, and do not stop the next comparison (review).
    (out / "a" / ".DS_Store").write_bytes(b"x")
    (out / "a" / "notes.txt").write_text("mine")
    third = compare(model, model, transforms="flips", input_size=33, num_images=2)
    write_comparison(third[0], out, audits=(third[1], third[2]))
    assert (out / "a" / "notes.txt").read_text() == "mine" and (out / "a" / ".DS_Store").exists()
    assert json.loads((out / "a" / "summary.json").read_text())["transforms"]["spec"] == "flips"
    # A folder of the user's where a report file of a/ goes is refused, not moved away with
    # the previous report (it was deleted with the staging folder, review).
    (out / "b" / "layers.csv").unlink()
    (out / "b" / "layers.csv").mkdir()
    (out / "b" / "layers.csv" / "precious.txt").write_text("mine")
    before = _tree(out)
    with pytest.raises(UsageError, match=r"b/layers.csv' is a folder where the report writes"):
        write_comparison(third[0], out, audits=(third[1], third[2]))
    assert _tree(out) == before


def _one_error(result) -> str:  # type: ignore[no-untyped-def]
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    ("source", "said"),
    [
        (  # argparse at import time printed its own usage and exited 2, eqaudit's usage code
            "import argparse\nparser = argparse.ArgumentParser()\nparser.add_argument("
            "'--lr', required=True)\nparser.parse_args()\ndef build():\n    return None\n",
            "SystemExit 2",
        ),
        ("import sys\ndef build():\n    sys.exit(1)\n", "SystemExit 1"),  # 1: a failed gate
    ],
)
def test_a_factory_that_exits_is_a_model_error(tmp_path, source, said) -> None:
    from eqaudit.errors import EXIT_MODEL

    (tmp_path / "fac.py").write_text(source)
    weights = tmp_path / "w.pt"
    torch.save(symmetric_cnn().state_dict(), weights)
    out = tmp_path / "out"
    args = ["check", str(weights), "--factory", f"{tmp_path / 'fac.py'}:build", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--input-size", "33"])
    assert result.exit_code == EXIT_MODEL
    # (argparse's own usage lines, printed by the factory, stay above eqaudit's line)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and lines[-1].startswith("error: ")
    assert f"exited ({said})" in lines[-1]
    assert not out.exists()


def test_an_empty_out_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch) -> None:
    # -o "$OUT" with OUT unset wrote the report into the current folder, deleting a
    # compare.json and shard state there (review).
    from eqaudit.errors import EXIT_USAGE

    monkeypatch.chdir(tmp_path)
    (tmp_path / "compare.json").write_text("{}")
    model = export_onnx(symmetric_cnn(), tmp_path / "m.onnx", 33)
    for command in (["check", str(model)], ["demo"], ["merge", "x"], ["compare", "a", "b"]):
        run = subprocess.run(
            [sys.executable, "-m", "eqaudit", *command, "-o", ""],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == EXIT_USAGE, run.stderr
        assert run.stdout == "" and len(run.stderr.splitlines()) == 1, run.stderr
        assert run.stderr.startswith("error: Invalid value for '--out' / '-o': it is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json", "m.onnx"]


def test_a_baseline_path_that_cannot_be_written_fails_before_the_audit(tmp_path) -> None:
    # --save-baseline was checked after the report had replaced the previous one (review).
    from eqaudit.errors import EXIT_USAGE

    model = export_onnx(symmetric_cnn(), tmp_path / "m.onnx", 33)
    out = tmp_path / "out"
    first = CliRunner().invoke(app, ["check", str(model), "-t", "flips", "-n", "2", "-o", str(out)])
    assert first.exit_code == 0, first.output
    before = _tree(out)
    (tmp_path / "afile").write_text("x")
    for target, said in ((tmp_path, "is a folder"), (tmp_path / "afile" / "b.json", "a file")):
        for command in (
            ["check", str(model), "-t", "c4", "-n", "3", "-o", str(out)],
            ["merge", str(out), "-o", str(tmp_path / "merged")],  # (checked before the shards)
        ):
            result = CliRunner().invoke(app, [*command, "--save-baseline", str(target)])
            assert result.exit_code == EXIT_USAGE, result.output
            assert said in _one_error(result)
            assert _tree(out) == before and not (tmp_path / "merged").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_an_interrupt_after_the_report_is_written_lets_the_run_finish(tmp_path) -> None:
    # SIGINT between the report's last move and the process's exit gave exit 130 and "no new
    # report was written" (it was), or a traceback from the interpreter's exit (review).
    model = export_onnx(symmetric_cnn(), tmp_path / "m.onnx", 33)
    out = tmp_path / "out"
    code = (
        "import os, signal, sys, time\n"
        "import eqaudit.cli as cli\n"
        "finish = cli._finish\n"
        "def interrupted(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    return finish(*args, **kwargs)\n"
        "cli._finish = interrupted\n"
        f"sys.argv = ['eqaudit', 'check', {str(model)!r}, '-t', 'flips', '-n', '2', '-o', "
        f"{str(out)!r}]\n"
        "cli.main()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "interrupted" not in run.stderr and "Traceback" not in run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("PASSED")
    assert (out / "report.html").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_signals_held_after_the_report_are_not_ignored_by_programs_it_starts(monkeypatch) -> None:
    # SIG_IGN is inherited through exec: once a test had run the script's main() in-process,
    # every later report left the test process ignoring SIGINT, and an interrupt test's child
    # ran to its end (a flaky failure of test_interrupted_run_leaves_the_previous_report).
    import eqaudit.cli as cli

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(cli, "_SCRIPT", True)
    try:
        cli._report_in_place()
        assert signal.getsignal(signal.SIGINT) is cli._ignored
        child = subprocess.run(
            [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "default_int_handler" in child.stdout, child.stdout
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_factory_keeps_the_real_stderr(tmp_path) -> None:
    # Catching a factory's SystemExit swapped sys.stderr for a buffer: faulthandler.enable()
    # at import failed ("fileno"), and logging handlers made there wrote nowhere (review).
    (tmp_path / "fac.py").write_text(
        "import faulthandler, sys\nfaulthandler.enable()\nSTREAM = sys.stderr\n"
        "from models_zoo import symmetric_cnn\ndef build():\n    return symmetric_cnn()\n"
    )
    weights = tmp_path / "w.pt"
    torch.save(symmetric_cnn().state_dict(), weights)
    result = eqaudit.audit(
        str(weights),
        "flips",
        factory=f"{tmp_path / 'fac.py'}:build",
        input_size=33,
        num_images=2,
        layers=False,
    )
    assert result.summary["model"]["num_classes"] == 5
    import hashlib

    digest = hashlib.sha256(str((tmp_path / "fac.py").resolve()).encode()).hexdigest()[:12]
    assert sys.modules[f"_eqaudit_factory_{digest}"].STREAM is sys.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_program_that_runs_main_stays_interruptible(tmp_path, monkeypatch) -> None:
    # After main() wrote a report in-process, SIGINT and SIGTERM did nothing for the rest of
    # the calling program (review): the script's own exit is what they are held for.
    from eqaudit.cli import main

    model = export_onnx(symmetric_cnn(), tmp_path / "m.onnx", 33)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    argv = ["eqaudit", "check", str(model), "-t", "flips", "-n", "2", "-o", str(tmp_path / "o")]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0 and (tmp_path / "o" / "report.html").is_file()
    assert {sig: signal.getsignal(sig) for sig in before} == before

"""--device and the memory the engine budgets for: clear refusals here, real runs on a GPU.

The GPU tests run only where torch sees a CUDA device (CI has none: they skip with the reason).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from models_zoo import SmallCNN, calibrate_, export_onnx, symmetric_cnn

import eqaudit
from eqaudit.errors import ModelLoadError, UsageError
from eqaudit.metrics import triton_d4
from eqaudit.transforms import parse_transforms
from eqaudit.transforms.elements import d4_cell_index

engine_module = importlib.import_module("eqaudit.audit")  # the module, not the function

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device visible to torch on this machine")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return calibrate_(SmallCNN(), 17).eval()


def test_a_device_that_is_not_a_device_is_refused(model) -> None:
    with pytest.raises(UsageError, match="'gpu' is not a device: use cpu, cuda or cuda:N"):
        eqaudit.audit(model, "flips", input_size=17, num_images=2, device="gpu")


@pytest.mark.skipif(CUDA, reason="this machine has a GPU: the refusal cannot be observed")
def test_cuda_without_a_gpu_says_what_is_missing(model, tmp_path) -> None:
    with pytest.raises(UsageError, match="no CUDA device is visible to torch"):
        eqaudit.audit(model, "flips", input_size=17, num_images=2, device="cuda")
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    with pytest.raises(UsageError, match="pip install onnxruntime-gpu"):
        eqaudit.audit(path, "flips", num_images=2, device="cuda")


def fake_cuda_onnxruntime(
    monkeypatch, starts: bool, fails_with: str | None = None
) -> tuple[list[list], list[list]]:
    """onnxruntime-gpu stood in for: CUDA is among the available providers, and a session asked
    for it is made on the CPU, reporting CUDA among its providers when the provider ``starts``
    (as onnxruntime does when it falls back for a missing CUDA library: it does not). Returns
    the providers each session was asked for, in order, and those of each session that ran."""
    import onnxruntime

    real, real_run = onnxruntime.InferenceSession, onnxruntime.InferenceSession.run
    asked: list[list] = []
    live: dict[int, list] = {}  # a live session's id -> its providers (ids are reused)
    ran: list[list] = []

    def session(source, sess_options=None, providers=None):
        names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        if fails_with is not None and "CUDAExecutionProvider" in names:
            raise RuntimeError(fails_with)
        made = real(source, sess_options=sess_options, providers=["CPUExecutionProvider"])
        asked.append(providers)
        live[id(made)] = providers
        if starts and "CUDAExecutionProvider" in names:
            made.get_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return made

    def run(self, *args, **kwargs):
        ran.append(live[id(self)])
        return real_run(self, *args, **kwargs)

    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(real, "run", run)
    return asked, ran


def test_onnx_on_cuda_runs_every_session_on_the_cuda_provider(model, tmp_path, monkeypatch) -> None:
    # The plain session made when the model loaded (on the CPU provider) must not be the one
    # that runs the audit; and onnxruntime's CUDA provider must not round to TF32.
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    asked, ran = fake_cuda_onnxruntime(monkeypatch, starts=True)
    index = torch.cuda.device_count() - 1 if CUDA else 1  # on a GPU machine, one that exists
    result = eqaudit.audit(path, "flips", num_images=3, device=f"cuda:{index}", lie=False)
    cuda = ("CUDAExecutionProvider", {"device_id": str(index), "use_tf32": "0"})
    assert asked[0] == ["CPUExecutionProvider"]  # at load, before --device is applied
    # At load, the declared dynamic batch is checked on the CPU (two images alone, then
    # together); every run of the audit after that is on the CUDA provider.
    assert ran[:3] == [["CPUExecutionProvider"]] * 3
    assert ran[3:] and all(providers == [cuda, "CPUExecutionProvider"] for providers in ran[3:])
    assert result.summary["model"]["providers"] == [list(cuda), "CPUExecutionProvider"]


def test_onnx_on_a_cuda_device_torch_does_not_see_is_refused(model, tmp_path, monkeypatch) -> None:
    # Where torch sees the GPUs, a device index past them is a usage error before onnxruntime
    # or the memory query meets it (seen on a one-GPU H100: "CUDA error: invalid device
    # ordinal" from torch.cuda.mem_get_info, with a traceback).
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    fake_cuda_onnxruntime(monkeypatch, starts=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match=r"--device cuda:3: this machine has 1 CUDA device\(s\)"):
        eqaudit.audit(path, "flips", num_images=3, device="cuda:3", lie=False)


def test_onnx_on_cuda_refuses_to_fall_back_to_the_cpu(model, tmp_path, monkeypatch) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    fake_cuda_onnxruntime(monkeypatch, starts=False)
    with pytest.raises(UsageError, match=r"could not start its CUDA provider .* use --device cpu"):
        eqaudit.audit(path, "flips", num_images=3, device="cuda", lie=False)


@pytest.mark.parametrize(
    ("message", "error", "says"),
    [
        ("CUDA failure 100: no CUDA-capable device is detected", UsageError, "CUDA provider"),
        ("Load model failed: Could not find an implementation for Foo", ModelLoadError, "operator"),
    ],
)
def test_onnx_on_cuda_says_which_failed_the_provider_or_the_graph(
    model, tmp_path, monkeypatch, message, error, says
) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    fake_cuda_onnxruntime(monkeypatch, starts=True, fails_with=message)
    with pytest.raises(error, match=says):
        eqaudit.audit(path, "flips", num_images=3, device="cuda", lie=False)


def test_onnx_on_cuda_loads_images_on_threads(model, tmp_path, monkeypatch) -> None:
    # The model runs on the GPU while the host loads the next images, though the activations
    # of an ONNX model come to the host (its engine's device is the CPU).
    from eqaudit.data import default_load_workers

    path = export_onnx(model, tmp_path / "m.onnx", 17)
    fake_cuda_onnxruntime(monkeypatch, starts=True)
    chosen, original = [], engine_module._load_workers
    monkeypatch.setattr(
        engine_module, "_load_workers", lambda engine: chosen.append(original(engine)) or chosen[-1]
    )
    eqaudit.audit(path, "flips", num_images=3, device="cuda", lie=False)
    assert chosen == [default_load_workers()]


def test_lie_input_tangent_stays_on_the_pixels_device() -> None:
    from eqaudit.data import make_preprocessing
    from eqaudit.lie import input_tangent

    tangent = torch.ones(2, 3, 4, 4, device="meta")  # stands in for a GPU: any other device
    assert input_tangent(make_preprocessing(preset="imagenet"), tangent).device.type == "meta"


def test_cuda_audits_run_in_ieee_float32_and_restore_the_callers_settings() -> None:
    from eqaudit.device import ieee_float32

    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    saved = [flag.allow_tf32 for flag in flags]
    try:
        for flag in flags:
            flag.allow_tf32 = True
        with ieee_float32("cuda:0"):
            assert [flag.allow_tf32 for flag in flags] == [False, False]
        assert [flag.allow_tf32 for flag in flags] == [True, True]
        with ieee_float32("cpu"):  # nothing to change on the CPU
            assert [flag.allow_tf32 for flag in flags] == [True, True]
    finally:
        for flag, value in zip(flags, saved, strict=True):
            flag.allow_tf32 = value


def test_available_memory_takes_the_tightest_limit(monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "_meminfo_available", lambda: 20 * 2**30)
    monkeypatch.setattr(engine_module, "_cgroup_available", lambda: 3 * 2**30)
    monkeypatch.setattr(engine_module, "_address_space_available", lambda: None)
    assert engine_module.available_memory() == 3 * 2**30
    monkeypatch.setattr(engine_module, "_cgroup_available", lambda: None)
    assert engine_module.available_memory() == 20 * 2**30


def test_cgroup_limit_is_read_from_memory_max(monkeypatch) -> None:
    files = {"/sys/fs/cgroup/memory.max": 4 * 2**30, "/sys/fs/cgroup/memory.current": 2**30}
    monkeypatch.setattr(engine_module, "_read_int", files.get)
    assert engine_module._cgroup_available() == 3 * 2**30
    files["/sys/fs/cgroup/memory.max"] = None  # "max": no limit
    assert engine_module._cgroup_available() is None


def test_a_tight_container_shrinks_the_batch_instead_of_dying(model, monkeypatch) -> None:
    # All-layer activations of 8 images x 2 elements need ~9 MB here; a container with 12 MB
    # free leaves room for one image per step.
    monkeypatch.setattr(engine_module, "available_memory", lambda: 12 * 2**20)
    result = eqaudit.audit(model, "flips", input_size=65, num_images=3, batch_size=16)
    assert result.summary["run"]["images_per_step"] < 8
    assert any("batch shrunk" in n for n in result.summary["run"]["notes"])
    assert result.outputs[1]["n"] == 3


ROW = ("layer", "transform", "comparison")


def assert_same_audit(cpu, gpu, rel: float, abs_: float, keys: tuple[str, ...] = ROW) -> None:
    """A device's audit gives the CPU audit's numbers: the same agreements, JS divergences to
    float rounding, the same layer rows (``keys`` equal) with relative errors within
    ``rel``/``abs_`` (float32 sums taken in another order)."""
    for a, b in zip(cpu.outputs, gpu.outputs, strict=True):
        assert a["agreement"] == b["agreement"]
        assert b["js_divergence"] == pytest.approx(a["js_divergence"], rel=1e-3, abs=1e-7)
    for a, b in zip(cpu.layers, gpu.layers, strict=True):
        assert {k: b[k] for k in keys} == {k: a[k] for k in keys}, (a["layer"], a["transform"])
        assert (a["relative_error"] is None) == (b["relative_error"] is None)
        if a["relative_error"] is not None:
            assert b["relative_error"] == pytest.approx(a["relative_error"], rel=rel, abs=abs_)


@needs_gpu
def test_cuda_audit_matches_the_cpu_audit(model) -> None:
    options = dict(input_size=17, num_images=6, seed=1, channel_map=True, lie=True)
    cpu = eqaudit.audit(model, "d4,rot:20,shift:0.5", **options)
    gpu = eqaudit.audit(model, "d4,rot:20,shift:0.5", device="cuda", **options)
    # The grids are read from the same graph: a failed export on the device would leave them
    # guessed, and the resampled comparisons would move.
    grid = ("stride_source", "stride_h", "stride_w", "offset_h", "offset_w")
    assert_same_audit(cpu, gpu, 1e-3, 1e-6, ROW + grid)


def whole_layer_rows(model, monkeypatch, whole: bool, **options) -> tuple[list[dict], set[str]]:
    """The layer rows of a D4 audit with every layer's elements compared at once (the GPU's
    path, :meth:`Engine._own_grid_d4_layer`) or one by one (the CPU's), and the layers that
    took the first path."""
    taken: set[str] = set()
    original = engine_module.Engine._own_grid_d4_layer

    def spy(engine, state, act) -> None:
        taken.add(state.info.name)
        original(engine, state, act)

    monkeypatch.setattr(engine_module.Engine, "_whole_layers", staticmethod(lambda act: whole))
    monkeypatch.setattr(engine_module.Engine, "_own_grid_d4_layer", spy)
    return eqaudit.audit(model, "d4", **options).layers, taken


@pytest.mark.parametrize("size", [17, 16])  # grids centred (exact comparisons) or not (naive)
def test_comparing_a_layers_elements_at_once_gives_the_one_by_one_numbers(
    model, monkeypatch, size
) -> None:
    options = dict(input_size=size, num_images=5, seed=2, batch_size=24)
    together, taken = whole_layer_rows(model, monkeypatch, True, **options)
    apart, none = whole_layer_rows(model, monkeypatch, False, **options)
    assert {"conv1", "relu1", "conv2", "conv3"} <= taken and not none
    for a, b in zip(apart, together, strict=True):
        assert (a["layer"], a["transform"], a["comparison"]) == (
            b["layer"],
            b["transform"],
            b["comparison"],
        )
        for key in (
            "relative_error",
            "relative_error_p95",
            "relative_error_max",
            "cosine_distance",
        ):
            if a[key] is None or a["transform"] == "id":
                assert b[key] == a[key], (a["layer"], a["transform"], key)
            else:  # float32 norms, summed in another order
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), (a["layer"], key)


def test_comparing_a_layers_elements_at_once_sees_an_equivariant_net_as_one(monkeypatch) -> None:
    # A D4-symmetrised CNN at an aligned (odd) size: every exact comparison is float32 rounding
    # (DESIGN.md 2 and 6: ~1e-7), through the identity's exact zero included.
    rows, taken = whole_layer_rows(
        symmetric_cnn(size=33), monkeypatch, True, input_size=33, num_images=3, seed=0
    )
    exact = [r for r in rows if r["comparison"] == "exact" and r["layer"] in taken]
    assert {r["layer"] for r in exact} == taken and len(exact) == 8 * len(taken)
    assert all(r["relative_error"] == 0.0 for r in exact if r["transform"] == "id")
    assert max(r["relative_error_max"] for r in exact) < 1e-6


@needs_gpu
def test_cuda_layers_compared_at_once_match_the_cpu(model, monkeypatch) -> None:
    options = dict(input_size=17, num_images=6, seed=3)
    fused: list[tuple[int, ...]] = []
    kernel = triton_d4.d4_plane_sums

    def spy(act, index):
        fused.append(tuple(act.shape))
        return kernel(act, index)

    monkeypatch.setattr(triton_d4, "d4_plane_sums", spy)
    cpu = eqaudit.audit(model, "d4", **options)
    assert not fused  # the CPU compares one element at a time
    gpu = eqaudit.audit(model, "d4", device="cuda", **options)
    assert_same_audit(cpu, gpu, 1e-4, 1e-7)
    # with Triton there (CUDA builds of torch bring it), the layers went through the kernel,
    # and it built: no fallback warning
    assert bool(fused) == triton_d4.triton_installed()
    assert not [w for w in gpu.warnings if "Triton" in w]


def a_kernel_that_does_not_build(calls: list) -> object:
    def broken(act, index):
        calls.append(tuple(act.shape))
        raise RuntimeError("PTXAS error: Internal Triton PTX codegen error\n`ptxas` stderr: ...")

    return broken


def test_a_comparison_kernel_that_does_not_build_leaves_the_torch_ops(model, monkeypatch) -> None:
    # On a GPU whose Triton cannot build the fused kernel (an old architecture, a broken
    # toolchain) the audit goes on with the torch ops: the same rows, and one warning.
    options = dict(input_size=17, num_images=5, seed=2, batch_size=24)
    plain, taken = whole_layer_rows(model, monkeypatch, True, **options)
    calls: list = []
    monkeypatch.setattr(triton_d4, "usable", lambda act: True)
    monkeypatch.setattr(triton_d4, "d4_plane_sums", a_kernel_that_does_not_build(calls))
    result = eqaudit.audit(model, "d4", **options)
    assert len(calls) == 1 and taken  # tried once, then torch ops for every layer after
    assert result.layers == plain
    assert [w for w in result.warnings if "Triton" in w] == [
        "the Triton kernel that compares a layer's D4 elements failed on cpu (PTXAS error: "
        "Internal Triton PTX codegen error); layers were compared with torch ops instead: the "
        "same numbers, more GPU time"
    ]


def test_running_out_of_memory_while_comparing_a_layer_is_a_memory_error(model, monkeypatch):
    # Not a kernel that failed to build (no fallback, no warning): the CLI's out-of-memory
    # line (exit 3), as when the model's own forward runs out.
    def full(act, index):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine_module.Engine, "_whole_layers", staticmethod(lambda act: True))
    monkeypatch.setattr(triton_d4, "usable", lambda act: True)
    monkeypatch.setattr(triton_d4, "d4_plane_sums", full)
    with pytest.raises(MemoryError, match=r"^CUDA out of memory\. Tried to allocate 2\.00 GiB$"):
        eqaudit.audit(model, "d4", input_size=17, num_images=4, seed=0)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_comparison_kernel_gives_the_torch_norms(dtype) -> None:
    pytest.importorskip("triton")
    torch.manual_seed(0)
    for shape in [(3, 5, 1, 1), (4, 64, 56, 56), (2, 3, 33, 33), (64, 512, 7, 7), (1, 1, 300, 300)]:
        act = torch.randn(8, *shape, device="cuda").to(dtype)
        index = d4_cell_index(parse_transforms("d4"), *shape[-2:], "cuda")
        fused = engine_module.d4_orbit_norms(act, index, fused=True)
        ops = engine_module.d4_orbit_norms(act.float(), index)
        assert float(((fused - ops).abs() / ops.abs()).max()) < 1e-6, shape


@needs_gpu
def test_cuda_comparison_kernel_addresses_maps_past_two_gibi_elements() -> None:
    # 8 x 5 x 64 x 1024 x 1024 float16 cells (5.4 GB): the last image's planes start past
    # 2^31 elements, beyond an int32 offset. Its norms equal the torch ops' on it alone.
    pytest.importorskip("triton")
    torch.manual_seed(1)
    act = torch.randn(8, 5, 64, 1024, 1024, device="cuda", dtype=torch.float16)
    assert act.numel() > 2**31
    index = d4_cell_index(parse_transforms("d4"), 1024, 1024, "cuda")
    fused = engine_module.d4_orbit_norms(act, index, fused=True)[:, :, -1]
    ops = engine_module.d4_orbit_norms(act[:, -1:].float(), index)[:, :, 0]
    del act
    assert float(((fused - ops).abs() / ops.abs()).max()) < 1e-5


def _onnxruntime_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(
    not (CUDA and _onnxruntime_has_cuda()),
    reason="needs a GPU and onnxruntime-gpu (onnxruntime's CUDAExecutionProvider)",
)
def test_onnx_on_cuda_matches_the_cpu(model, tmp_path) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    options = dict(num_images=6, seed=4, lie=False)
    cpu = eqaudit.audit(path, "d4,rot:20", **options)
    gpu = eqaudit.audit(path, "d4,rot:20", device="cuda", **options)
    assert_same_audit(cpu, gpu, 1e-3, 1e-6)


@pytest.mark.skipif(
    not CUDA or _onnxruntime_has_cuda(),
    reason="needs a GPU beside a CPU-only onnxruntime (the refusal cannot be observed otherwise)",
)
def test_onnx_on_cuda_with_a_cpu_only_onnxruntime_says_what_to_install(model, tmp_path) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    with pytest.raises(UsageError, match="pip install onnxruntime-gpu, or use --device cpu"):
        eqaudit.audit(path, "flips", num_images=2, device="cuda", lie=False)


class NHWCSymmetric(torch.nn.Module):
    """A D4-symmetric CNN behind a permute: it takes channels-last images."""

    def __init__(self) -> None:
        super().__init__()
        self.body = symmetric_cnn(size=33)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 3, 1, 2))


class TwoHeads(torch.nn.Module):
    """An auxiliary head first, the class scores second."""

    def __init__(self) -> None:
        super().__init__()
        self.body = symmetric_cnn(size=33)
        self.aux = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.body(x)
        return self.aux(scores), scores


@needs_gpu
def test_cuda_symmetric_nets_are_exact_through_a_permute_an_export_and_a_picked_output(
    tmp_path,
) -> None:
    # DESIGN.md 6: a D4-symmetrised CNN at an aligned size is equivariant to float32 rounding
    # at every layer. On the GPU too, whether it takes NHWC images (grids read through the
    # permute, in memory and as a .pt2) or returns its scores second in a tuple.
    nhwc = NHWCSymmetric().eval()
    program = torch.export.export(nhwc, (torch.zeros(2, 33, 33, 3),))
    torch.export.save(program, tmp_path / "nhwc.pt2")
    options = dict(num_images=6, seed=2, device="cuda")
    reference = eqaudit.audit(nhwc.body, "d4", input_size=33, **options)
    results = [
        reference,
        eqaudit.audit(nhwc, "d4", input_size=33, layout="NHWC", **options),
        eqaudit.audit(tmp_path / "nhwc.pt2", "d4", **options),
        eqaudit.audit(TwoHeads().eval(), "d4", input_size=33, output_name="1", **options),
    ]
    for result in results:
        assert result.summary["scores"]["robustness_score"] == pytest.approx(100.0, abs=1e-3)
        assert all(row["agreement"] == 1.0 for row in result.outputs)
        exact = [r for r in result.layers if r["comparison"] == "exact"]
        assert len(exact) == 8 * 6  # conv and relu 1-3, under each element
        assert max(r["relative_error_max"] for r in result.layers) < 1e-5  # pooled too
    assert results[3].summary["model"]["num_classes"] == 5


@needs_gpu
def test_a_callers_module_comes_back_on_its_own_device() -> None:
    # Audited on the GPU, a CPU model stays on the CPU (until this was fixed the module-scoped
    # fixture went on to the next test on cuda:0); a CUDA model audited on the CPU stays on CUDA.
    torch.manual_seed(0)
    model = SmallCNN()

    def devices() -> set[str]:
        grads = [p.grad for p in model.parameters()]
        return {t.device.type for t in [*model.parameters(), *model.buffers(), *grads]}

    def train_step() -> None:  # gradients accumulate: they must sit with their parameters
        model(torch.rand(2, 3, 17, 17, device=next(model.parameters()).device)).sum().backward()

    train_step()
    eqaudit.audit(model, "flips", input_size=17, num_images=2, device="cuda", lie=False)
    assert devices() == {"cpu"}
    train_step()
    model.cuda()
    eqaudit.audit(model, "flips", input_size=17, num_images=2, device="cpu", lie=False)
    assert devices() == {"cuda"}
    train_step()


@needs_gpu
def test_cuda_runs_a_batch_1_export_in_batches(model, tmp_path) -> None:
    # The program moves to the device and is unflattened again there: its input checks come
    # back with the new module and must be turned off again.
    program = torch.export.export(model, (torch.zeros(1, 3, 17, 17),))
    torch.export.save(program, tmp_path / "b1.pt2")
    options = dict(num_images=6, seed=5, lie=False, batch_size=24)
    cpu = eqaudit.audit(tmp_path / "b1.pt2", "d4", **options)
    gpu = eqaudit.audit(tmp_path / "b1.pt2", "d4", device="cuda", **options)
    assert gpu.summary["model"]["fixed_batch"] == {"size": 1, "run": "batched"}
    assert_same_audit(cpu, gpu, 1e-4, 1e-7)


@needs_gpu
def test_cuda_batch_is_sized_from_free_memory(model) -> None:
    result = eqaudit.audit(model, "d4", input_size=17, num_images=4, device="cuda")
    assert result.summary["run"]["images_per_step"] >= 1
    assert result.summary["options"]["device"] == "cuda"


def test_a_runtime_out_of_memory_error_says_out_of_memory(tmp_path) -> None:
    import subprocess
    import sys
    import textwrap

    # A model whose forward fails the way torch's CPU allocator does when memory runs out.
    script = tmp_path / "oom.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Hungry(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.conv = nn.Conv2d(3, 2, 3)

                def forward(self, x):
                    raise RuntimeError(
                        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                        "allocate memory: you tried to allocate 1073741824 bytes"
                    )

            def build():
                return Hungry()
            """
        )
    )
    torch.save(
        {"conv.weight": torch.zeros(2, 3, 3, 3), "conv.bias": torch.zeros(2)}, tmp_path / "w.pt"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eqaudit",
            "check",
            str(tmp_path / "w.pt"),
            "--factory",
            f"{script}:build",
            "--input-size",
            "9",
            "-n",
            "2",
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: out of memory while auditing")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_model_input_is_every_element_applied_to_the_batch(model, monkeypatch) -> None:
    # On the CPU the D4 elements are copied into the input buffer from numpy views and made
    # again only for the gallery (_D4Images): both must be apply_image's pixels, bit for bit,
    # beside resampled elements (rotation, sub-pixel shift) and with a margin for them.
    seen = []
    original = engine_module.Engine._assemble

    def spy(engine, pixels):
        images = original(engine, pixels)
        seen.append((engine, pixels.clone(), engine._input_buffer.clone(), images))
        return images

    monkeypatch.setattr(engine_module.Engine, "_assemble", spy)
    eqaudit.audit(model, "d4,rot:20,shift:0.5,shift:2", input_size=17, num_images=5, batch_size=48)
    assert sum(pixels.shape[0] for _, pixels, _, _ in seen) == 5 and len(seen) > 1
    for engine, pixels, buffer, images in seen:
        expected = [e.apply_image(pixels, engine.margin) for e in engine.elements]
        assert engine.margin > 0 and len(expected) == len(engine.elements) > 8
        assert torch.equal(buffer, torch.cat(expected))
        lazy = [i for i, got in enumerate(images) if isinstance(got, engine_module._D4Images)]
        assert lazy == list(range(8))  # the D4 elements, and only them
        for got, want in zip(images, expected, strict=True):
            for b in range(pixels.shape[0]):
                assert torch.equal(got[b], want[b])


def test_free_gpu_memory_counts_the_blocks_torch_holds_unused(monkeypatch) -> None:
    from eqaudit.device import free_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2**30)
    assert free_memory("cuda:0") == 7 * 2**30  # 3 free for the driver + 4 cached, unused
    assert free_memory("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # onnxruntime-gpu, CPU torch
    assert free_memory("cuda:0") is None


def test_onnx_on_cuda_keeps_its_batch_within_the_gpus_free_memory(
    model, tmp_path, monkeypatch
) -> None:
    # The layers onnxruntime hands out sit on the GPU until the end of the run: a GPU with less
    # room than the host shrinks the batch.
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    fake_cuda_onnxruntime(monkeypatch, starts=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(engine_module, "available_memory", lambda: 64 * 2**30)
    monkeypatch.setattr(engine_module, "free_memory", lambda device: 40 * 2**30)
    held, measure = [], engine_module.Engine.held_bytes_per_image

    def spy(engine, streams):
        held.append(measure(engine, streams) * len(engine.elements))
        return held[-1] // len(engine.elements)

    monkeypatch.setattr(engine_module.Engine, "held_bytes_per_image", spy)
    roomy = eqaudit.audit(path, "flips", num_images=4, device="cuda", lie=False)
    per_image = held[-1]  # bytes one image holds under the 3 elements
    monkeypatch.setattr(engine_module, "free_memory", lambda device: 4 * per_image + 1)
    tight = eqaudit.audit(path, "flips", num_images=4, device="cuda", lie=False)
    assert roomy.summary["run"]["images_per_step"] == 64 // 3  # the default: 64 forward images
    assert tight.summary["run"]["images_per_step"] == 2  # half the GPU's free memory: 2 images
    assert any("batch shrunk" in note for note in tight.summary["run"]["notes"])

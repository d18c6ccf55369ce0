"""``--device``: where the model runs (``cpu``, ``cuda``, ``cuda:N``).

PyTorch models move to the device; their activations stay there and the engine reduces them in
place (per-image norms, histograms, channel moments), so only small statistics come back to the
CPU. ONNX models run with onnxruntime's CUDA execution provider (``pip install onnxruntime-gpu``).
Asking for a device that is not there is a usage error (exit 2) that says what is missing.

Precision: on a GPU the audit runs in IEEE float32, as on the CPU. PyTorch lets cuDNN run float32
convolutions in TF32 by default (10-bit mantissa, ~1e-3 relative error per product sum), which
would show an exactly equivariant network as ~1e-3 from equivariant on a GPU and not on a CPU;
:func:`ieee_float32` turns TF32 off for the audit and restores the caller's settings after.

Host threads: beside a GPU the CPU's torch work is the per-batch bookkeeping on small tensors
(scores, per-image norms), while loader threads draw and decode the next images. A team of one
torch thread per core would then wait at every parallel region for threads the loaders have
descheduled (seen on a 16-core H200 host: 35 ms for an isfinite over 512 x 1000 scores);
:func:`host_threads` runs that bookkeeping on one torch thread and restores the count after.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from eqaudit.errors import UsageError
from eqaudit.models.base import ModelAdapter

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str) -> str:
    """The device string, validated against this machine."""
    if not DEVICE_PATTERN.fullmatch(device):
        raise UsageError(f"--device '{device}' is not a device: use cpu, cuda or cuda:N")
    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise UsageError(
            f"--device {device}: no CUDA device is visible to torch {torch.__version__} "
            f"({build}): run on a machine with a GPU and a CUDA build of torch, or use --device cpu"
        )
    _check_index(device)
    return device


def _check_index(device: str) -> None:
    """Refuse ``cuda:N`` beyond the devices torch sees (torch's own error is a CUDA error)."""
    index = int(device.split(":")[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(
            f"--device {device}: this machine has {count} CUDA device(s) "
            f"(cuda:0 .. cuda:{count - 1}): use one of those"
        )


def place(adapter: ModelAdapter, device: str) -> None:
    """Run ``adapter`` on ``device``, or say (exit 2) why it cannot."""
    if not DEVICE_PATTERN.fullmatch(device):
        raise UsageError(f"--device '{device}' is not a device: use cpu, cuda or cuda:N")
    if device == "cpu":
        return
    if adapter.backend == "onnx":
        import onnxruntime as ort

        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise UsageError(
                f"--device {device}: onnxruntime has no CUDAExecutionProvider here (available: "
                f"{', '.join(available)}): pip install onnxruntime-gpu, or use --device cpu"
            )
        if torch.cuda.is_available():  # else onnxruntime-gpu beside a CPU build of torch
            _check_index(device)
        index = device.split(":")[1] if ":" in device else "0"
        # onnxruntime's CUDA provider rounds convolutions and matrix products to TF32 unless
        # told not to (see ieee_float32 for why the audit needs IEEE float32).
        cuda = ("CUDAExecutionProvider", {"device_id": index, "use_tf32": "0"})
        adapter.use_providers([cuda, "CPUExecutionProvider"])  # type: ignore[attr-defined]
        return
    check_device(device)
    adapter.to_device(device)  # type: ignore[attr-defined]


def free_memory(device: str) -> int | None:
    """Free bytes on a CUDA device (None for the CPU, and where torch sees no CUDA device:
    onnxruntime-gpu beside a CPU build of torch)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    where = torch.device(device)
    free, _total = torch.cuda.mem_get_info(where)
    # Blocks that torch's caching allocator holds and no tensor uses (the probe forward's, say)
    # are the driver's "used" but this process's to reuse.
    cached = torch.cuda.memory_reserved(where) - torch.cuda.memory_allocated(where)
    return int(free + max(cached, 0))


@contextmanager
def ieee_float32(device: str) -> Iterator[None]:
    """Within the block, float32 convolutions and matrix products on CUDA run in IEEE float32
    (no TF32); the caller's settings come back afterwards. Nothing changes for the CPU."""
    if not device.startswith("cuda"):
        yield
        return
    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    try:
        saved = [flag.allow_tf32 for flag in flags]
    except RuntimeError:  # the caller set torch's newer fp32_precision API: leave it to them
        yield
        return
    try:
        for flag in flags:
            flag.allow_tf32 = False
        yield
    finally:
        for flag, value in zip(flags, saved, strict=True):
            flag.allow_tf32 = value


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Within the block, torch runs on ``count`` intra-op threads (``--threads``; None: torch's
    setting as it is). The caller's setting comes back afterwards in every case: the engine's
    comparison threads set theirs to 1, which also becomes the default of threads made later."""
    saved = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def host_threads(device: str) -> Iterator[None]:
    """Within the block, torch's CPU work runs on one thread when ``device`` (where the
    activations are reduced) is a GPU (see the module docstring); the caller's thread count
    comes back afterwards. An ONNX model on onnxruntime's CUDA provider hands its layers to the
    host, where they are compared on threads: the engine passes ``cpu`` for it."""
    if not device.startswith("cuda"):
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)

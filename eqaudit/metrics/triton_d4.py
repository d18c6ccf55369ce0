"""The per-layer D4 comparison of a GPU audit in one Triton kernel per layer.

For a layer whose every D4 element acts on its own grid, the engine needs, per (element ``g``,
image), ``||a||`` and ``||T'b - a||`` where ``a = act[g]`` and ``b = act[0]`` (the identity's
map), ``act`` of shape ``(G, B, C, H, W)`` (:func:`eqaudit.audit.d4_orbit_norms`). With torch
ops that is a gather of ``b`` under every element (a temporary as large as 7/8 of the layer), a
subtraction and two norms: about 5.5 passes over each activation, which on an H100 cost the
device ~0.9x the model's own forward (benchmarks/RESULTS.md, "Where the all-layers time goes").

:func:`d4_plane_sums` reads each activation once instead. One program takes one element ``g``
and a tile of ``ROWS`` planes (a plane: one image's channel, ``H W`` cells) and walks the cells
in runs of ``BLOCK``: it loads ``a`` contiguously and ``b`` through the element's cell index
(the cells :func:`~eqaudit.transforms.elements.d4_apply` reads: the same values), and keeps two
float32 sums of squares per lane, ``a^2`` and ``(T'b - a)^2``. Programs are numbered element
first, so the 8 programs that read one tile of ``b`` run side by side and find it in L2.
Output: ``(3, G - 1, planes)`` float32 sums, laid out as the engine records them (``a^2``;
the identity's ``b^2``, which its program writes for every pair; ``(T'b - a)^2``), so that
:func:`eqaudit.audit.d4_orbit_norms` only adds a plane's channels in float64 (as
:func:`~eqaudit.metrics.image_norms` adds its plane norms) and takes square roots: two torch
calls per layer after the kernel, where each small call costs the host more than the device. The
kernel and the torch ops give the same numbers to float32 rounding of a plane's sum (about 1e-7
relative), and two equal maps give exactly 0 (``b - a`` is 0 cell for cell).

Used when Triton is importable and the maps are float32, float16 or bfloat16 on a CUDA device
(torch's Linux CUDA wheels ship Triton); otherwise, or when the kernel fails to build for the
device, the torch ops give the same norms. With ``TRITON_INTERPRET=1`` set before Triton is
imported, the kernel runs on CPU tensors (Triton's interpreter): the tests use that to check it
on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

#: Dtypes the kernel reads (and sums in float32); other maps take the torch ops.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Cells a program holds at once (ROWS x BLOCK): 16 per thread of 8 warps.
_TILE = 4096


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def _kernel():  # a triton.JITFunction; Triton is imported when first used
    import triton
    import triton.language as tl

    @triton.jit
    def d4_sums(
        act,
        index,
        out,
        planes,
        cells,
        elements,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
        SLOTS: tl.constexpr,
    ):
        program = tl.program_id(0)
        g = (program % elements).to(tl.int64)
        first = (program // elements).to(tl.int64) * ROWS
        rows = first + tl.arange(0, ROWS).to(tl.int64)
        row_ok = rows < planes
        a_rows = act + (g * planes + rows) * cells  # element g's planes
        b_rows = act + rows * cells  # the identity's planes
        sum_a = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        sum_d = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, cells, BLOCK):
            cell = start + tl.arange(0, BLOCK)
            cell_ok = cell < cells
            source = tl.load(index + g * cells + cell, mask=cell_ok, other=0)
            ok = row_ok[:, None] & cell_ok[None, :]
            a = tl.load(a_rows[:, None] + cell[None, :], mask=ok, other=0.0).to(tl.float32)
            b = tl.load(b_rows[:, None] + source[None, :], mask=ok, other=0.0).to(tl.float32)
            d = b - a
            sum_a += a * a
            sum_d += d * d
        # out is (3, G - 1, planes): ||a||^2, ||b||^2, ||T'b - a||^2 per pair, the engine's
        # layout, so that only a sum over channels and a square root follow.
        total_a = tl.sum(sum_a, axis=1)
        pair = tl.maximum(g - 1, 0)
        element = tl.zeros([ROWS], dtype=tl.int64) + g  # a block: masks mix no scalars
        moved = row_ok & (element > 0)
        tl.store(out + pair * planes + rows, total_a, mask=moved)
        tl.store(
            out + (2 * (elements - 1) + pair) * planes + rows, tl.sum(sum_d, axis=1), mask=moved
        )
        # the identity's program: its ||b||^2 is every pair's
        slot = tl.arange(0, SLOTS).to(tl.int64)
        into = out + ((elements - 1) + slot[:, None]) * planes + rows[None, :]
        mine = (slot[:, None] < elements - 1) & (row_ok & (element == 0))[None, :]
        tl.store(into, tl.broadcast_to(total_a[None, :], [SLOTS, ROWS]), mask=mine)

    return d4_sums


def _block(cells: int) -> int:
    """Cells per run: the smallest of 16, 64, 256, 1024 that holds a plane, else 1024 (four
    sizes, so four compilations at most per process; Triton caches them on disk)."""
    for block in (16, 64, 256):
        if cells <= block:
            return block
    return 1024


def d4_plane_sums(act: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(3, G - 1, planes)`` float32: per non-identity element and plane, ``sum a^2``, ``sum
    b^2`` and ``sum (T'b - a)^2``, the rows of :func:`eqaudit.audit.d4_orbit_norms`.

    ``act``: ``(G, B, ..., H, W)`` with the identity first (made contiguous if it is not);
    ``index``: ``(G, H W)`` integer, row ``g`` the cells of ``b`` that element ``g`` reads
    (row 0 the identity's ``0 .. H W - 1``). Runs the kernel whatever the device: callers check
    :func:`usable` first (the tests run it on the CPU under Triton's interpreter).
    """
    act = act.contiguous()
    elements, cells = index.shape
    planes = act[0].numel() // cells
    out = torch.empty(3, elements - 1, planes, dtype=torch.float32, device=act.device)
    block = _block(cells)
    rows = _TILE // block
    grid = (elements * -(-planes // rows),)
    slots = 1 << max(0, elements - 2).bit_length()  # a power of 2 >= G - 1
    _kernel()[grid](
        act, index, out, planes, cells, elements, ROWS=rows, BLOCK=block, SLOTS=slots, num_warps=8
    )
    return out


def usable(act: torch.Tensor) -> bool:
    """Whether :func:`d4_plane_sums` is the way to compare ``act``: a CUDA map of a dtype the
    kernel reads, with Triton installed."""
    return act.device.type == "cuda" and act.dtype in KERNEL_DTYPES and triton_installed()

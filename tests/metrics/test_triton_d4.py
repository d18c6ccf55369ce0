"""The fused D4 comparison kernel (eqaudit.metrics.triton_d4) against the torch ops.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton
is imported, so in a fresh process): the same program, each block's arithmetic done in numpy.
On a GPU it runs compiled (tests/test_device.py). Skipped where Triton is not installed (CI
installs it: see the Makefile) or its interpreter cannot run the kernel's loop (Triton 3.6
beside NumPy 2.4 or later; the compiled kernel is not affected).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# Each case: (images, channels, height, width, dtype). Cells per plane cover every run length
# (1, 16, 64, 256 and 1024 cells, a plane of several runs with a short last one) and tiles of
# planes cut short (the plane count is not a multiple of the rows per program).
CASES = [
    (2, 3, 1, 1, "float32"),
    (3, 5, 4, 4, "float32"),
    (2, 3, 7, 7, "float32"),
    (1, 7, 16, 16, "float32"),
    (2, 2, 33, 33, "float32"),
    (1, 1, 70, 70, "float32"),
    (2, 3, 9, 9, "float16"),
    (2, 3, 9, 9, "bfloat16"),
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    import triton
    import triton.language as tl
    from eqaudit.audit import d4_orbit_norms
    from eqaudit.transforms import parse_transforms
    from eqaudit.transforms.elements import d4_apply, d4_cell_index

    elements = parse_transforms("d4")

    def compare(act, group=elements):
        idx = d4_cell_index(group, *act.shape[-2:])
        fused = d4_orbit_norms(act, idx, fused=True)
        ops = d4_orbit_norms(act, idx)  # half maps: both subtract in float32
        return fused, ops

    # Some interpreters cannot run a loop to a bound given at run time (Triton 3.6's calls
    # int() on a one-element array, which NumPy 2.4 refuses): then there is nothing to check.
    @triton.jit
    def count(out, n):
        total = 0.0
        for _ in range(0, n, 1):
            total += 1.0
        tl.store(out, total)

    try:
        count[(1,)](torch.zeros(1), 3)
    except Exception as error:
        print(json.dumps({"skip": f"Triton {triton.__version__}'s interpreter cannot loop to a "
                          f"run-time bound beside NumPy {np.__version__}: {error!r}"}))
        sys.exit(0)

    out = {"cases": []}
    torch.manual_seed(0)
    for images, channels, height, width, dtype in json.loads(sys.argv[1]):
        act = torch.randn(8, images, channels, height, width).to(getattr(torch, dtype))
        fused, ops = compare(act)
        worst = ((fused - ops).abs() / ops.abs()).max().item()
        out["cases"].append([list(fused.shape), list(ops.shape), str(fused.dtype), worst])

    # float16 maps near the end of their range: the identity's +60000 everywhere, the others'
    # -60000, so T'b - a is 120000 in every cell: past float16's 65504, not float32's range
    big = torch.full((8, 2, 3, 5, 5), -60000.0, dtype=torch.float16)
    big[0] = 60000
    fused, ops = compare(big)
    worst = ((fused - ops).abs() / ops.abs()).max().item()
    out["overflow"] = [ops.isfinite().all().item(), worst, fused[2].min().item(), fused[2].max().item()]

    # The four rotations alone (G = 4: three pairs, the identity's norm written to each)
    c4 = parse_transforms("c4")
    fused, ops = compare(torch.randn(4, 3, 2, 6, 6), c4)
    out["c4"] = [list(fused.shape), ((fused - ops).abs() / ops.abs()).max().item()]

    # An exactly equivariant stack: every element's map is its element applied to the
    # identity's, so T'b - a is 0 cell for cell.
    b = torch.randn(3, 4, 11, 11)
    act = torch.stack([d4_apply(b, e.k, e.flip) for e in elements])
    fused, ops = compare(act)
    out["equivariant"] = [fused[2].abs().max().item(), fused[0].sub(ops[0]).abs().max().item()]

    # A NaN in one image of one element reaches that element's norms of that image only.
    act = torch.randn(8, 3, 2, 5, 5)
    act[3, 1, 0, 2, 4] = float("nan")
    fused, _ = compare(act)
    out["nan"] = fused.isnan().nonzero().tolist()
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in found:
        pytest.skip(found["skip"])
    return found


def test_the_kernel_gives_the_torch_norms(interpreted) -> None:
    for (images, *_), (shape, ops_shape, dtype, worst) in zip(
        CASES, interpreted["cases"], strict=True
    ):
        assert shape == ops_shape == [3, 7, images]
        assert dtype == "torch.float64"
        # float32 sums of one plane taken in another order (half-precision maps are read
        # exactly into float32 by both, so they match as closely)
        assert worst < 1e-6


def test_half_precision_maps_are_subtracted_in_float32(interpreted) -> None:
    finite, worst, low, high = interpreted["overflow"]
    assert finite and worst < 1e-6  # the torch ops too: their difference was inf before
    # ||T'b - a|| over 3 channels x 5 x 5 cells of 120000
    assert low == high == pytest.approx(120000 * 75**0.5, rel=1e-7)


def test_a_battery_of_four_elements_gives_the_torch_norms(interpreted) -> None:
    shape, worst = interpreted["c4"]
    assert shape == [3, 3, 3] and worst < 1e-6


def test_an_exactly_equivariant_stack_reads_exactly_zero(interpreted) -> None:
    difference, norm_gap = interpreted["equivariant"]
    assert difference == 0.0
    assert norm_gap < 1e-5  # ||a|| itself: float32 sums in another order, norms ~ 20


def test_a_nan_reaches_only_its_own_image_and_element(interpreted) -> None:
    # element 3 is row 2 of the (3, G - 1, B) norms; image 1. ||a|| and ||T'b - a|| are NaN,
    # ||b|| (the identity's) is not.
    assert interpreted["nan"] == [[0, 2, 1], [2, 2, 1]]

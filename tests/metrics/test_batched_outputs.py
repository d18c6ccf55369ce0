"""Output bookkeeping computed for all elements at once gives the per-element numbers exactly:
the JS divergence without a mask, OutputStats.update_rows, and whole audits whatever the batch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from models_zoo import SmallCNN, calibrate_

import eqaudit
from eqaudit.metrics import OutputStats, js_divergence


def _js_masked(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The definition as first written: ``0 log 0 = 0`` by a mask (``torch.where``)."""
    p, q = p.to(torch.float64), q.to(torch.float64)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        ratio = torch.where(a > 0, a / m.clamp_min(1e-300), torch.ones_like(a))
        return (a * torch.log2(ratio)).sum(dim=1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)


@pytest.mark.parametrize("classes", [1, 2, 7, 1000])
def test_js_divergence_is_the_masked_definition_bit_for_bit(classes: int) -> None:
    g = torch.Generator().manual_seed(classes)
    rows = 37
    p = torch.softmax(torch.randn(rows, classes, generator=g, dtype=torch.float64) * 20, dim=1)
    q = torch.softmax(torch.randn(rows, classes, generator=g, dtype=torch.float64) * 20, dim=1)
    p[: rows // 3] = q[: rows // 3]  # identical rows: exactly 0
    p[torch.rand(rows, classes, generator=g) < 0.3] = 0.0  # zero classes: 0 log 0
    q[torch.rand(rows, classes, generator=g) < 0.2] = math.ulp(0.0)  # the smallest subnormal
    p[-1], q[-1] = 0.0, 0.0  # all-zero rows
    p[-2, 0] = -0.0
    for a, b in ((p, q), (q, p), (p.float(), q)):
        expected, got = _js_masked(a, b), js_divergence(a, b)
        assert torch.equal(got, expected)
        assert torch.equal(torch.signbit(got), torch.signbit(expected))
    assert torch.equal(js_divergence(p, p), torch.zeros(rows, dtype=torch.float64))


def test_js_divergence_of_a_point_mass_and_a_fair_coin() -> None:
    # m = (3/4, 1/4): KL(p||m) = log2(4/3), KL(q||m) = (log2(2/3) + log2 2) / 2
    js = js_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]))
    by_hand = 0.5 * math.log2(4 / 3) + 0.25 * (math.log2(2 / 3) + 1.0)
    assert js.item() == pytest.approx(by_hand, rel=1e-15)


@pytest.mark.parametrize("extras", [False, True])
def test_output_stats_update_rows_is_update_per_element(extras: bool) -> None:
    rng = np.random.default_rng(0)
    g, b = 5, 9
    agree = rng.random((g, b)) < 0.7
    js = rng.random((g, b)) ** 12  # many exponents
    js[0] = 0.0
    js[1, :3] = [math.ulp(0.0), 1.0, 5e-310]
    logit = rng.random((g, b)) * 3 if extras else None
    correct = rng.random((g, 4)) < 0.5 if extras else None
    floors = [rng.random(b) if extras and gi % 2 else None for gi in range(g)]
    rows = [OutputStats() for _ in range(g)]
    for _ in range(2):  # a second batch adds to the first
        OutputStats.update_rows(rows, agree, js, logit, correct, floors)
    for gi in range(g):
        one = OutputStats()
        for _ in range(2):
            one.update(
                torch.from_numpy(agree[gi]),
                torch.from_numpy(js[gi]),
                None if logit is None else torch.from_numpy(logit[gi]),
                None if correct is None else torch.from_numpy(correct[gi]),
                None if floors[gi] is None else torch.from_numpy(floors[gi]),
            )
        assert rows[gi] == one
        assert rows[gi].compute() == one.compute() or math.isnan(one.compute()["agreement"])


def _audit_files(model: torch.nn.Module, batch_size: int, **options: object) -> dict[str, str]:
    result = eqaudit.audit(
        model, "d4,rot:30", input_size=17, num_images=11, batch_size=batch_size, **options
    )
    summary = {k: v for k, v in result.summary.items() if k not in ("run", "options")}
    return {
        "summary": json.dumps(summary, sort_keys=True, default=str),
        "predictions": result.predictions.to_csv(index=False),
        "gallery": json.dumps(result.gallery, sort_keys=True),
    }


@pytest.mark.parametrize("options", [{"layers": False}, {"layers": False, "outputs": "probs"}])
def test_output_results_do_not_depend_on_the_batching(options: dict) -> None:
    torch.manual_seed(0)
    model = calibrate_(SmallCNN(classes=6), 17).eval()
    if options.get("outputs") == "probs":
        model = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    g = 9  # d4 and one resampled rotation
    one, three, whole = (_audit_files(model, g * n, **options) for n in (1, 3, 11))
    assert one == three == whole
    result = eqaudit.audit(
        model, "d4,rot:30", input_size=17, num_images=11, batch_size=g * 3, **options
    )
    frame = result.predictions
    names = [e["name"] for e in result.summary["transforms"]["elements"]]
    # rows: images in audited order, elements in battery order
    assert len(names) == g and frame["transform"].tolist() == names * 11
    assert frame["image"].tolist() == [f"synthetic[{i}]" for i in range(11) for _ in range(g)]

"""The loss scale over GradScaler's whole range (2^0..2^127): exact fractions at large scales
against numpy, skipped steps against a real `torch.amp.GradScaler`, and a loss scaled by
1e-14 planned without fp32 units and exported with an unusual `initial_scale_power`."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

import precision_doctor as pd
from precision_doctor.analysis.engine import LOSS_SCALES, loss_scale_curve, tensor_stats
from precision_doctor.analysis.loss_scale import (
    MAX_SCALE_LOG2,
    finite_scale_log2,
    overflow_threshold,
)
from precision_doctor.capture.lowrun import low_precision
from precision_doctor.capture.statistics import SummaryBatch, Workspace, summarize
from precision_doctor.options import LowDtype
from precision_doctor.planning.export import (
    DEEPSPEED_USUAL_MAX_SCALE_POWER,
    deepspeed_config,
    export_caveats,
)
from precision_doctor.planning.plan import plan_model

LARGE_SCALES = [25, 40, 60, 90, 101, 102, 103, 110, 127]


def _reference(g: np.ndarray, k: int) -> tuple[float, float, float]:
    """Fractions at fp16 loss scale 2^k straight from the values (float64, no histogram)."""
    a = np.abs(g[g != 0]).astype(np.float64)
    scaled = a * 2.0**k
    flushed = scaled < 2.0**-24
    lost = float(flushed.mean())
    over = float((scaled >= 2.0**16).mean())
    norm = math.sqrt(float((a[flushed] ** 2).sum() / (a**2).sum()))
    return lost, over, norm


def _tiny_gradients(seed: int, n: int) -> np.ndarray:
    """Normal fp32 values spread over 2^-125..2^-10, signs mixed, some zeros."""
    rng = np.random.default_rng(seed)
    exps = rng.integers(-125, -10, n)
    g = (rng.uniform(1, 2, n) * 2.0**exps * rng.choice([-1, 1], n)).astype(np.float32)
    g[: n // 40] = 0.0
    return g


@pytest.mark.parametrize("batched", [False, True], ids=["one tensor", "batched"])
def test_fractions_at_large_scales_match_numpy(batched: bool) -> None:
    """Every scale up to 2^127 flushes only values below 2^-24, whose per-bin sums of squares
    the summaries keep: the curve, the summary and the saved report's histogram agree with
    numpy on the raw values at large scales (both summary paths: one tensor, a batch)."""
    g = _tiny_gradients(1, 6000)
    if batched:
        batch = SummaryBatch(Workspace(), with_sumsq=True)
        summary = batch.add(torch.from_numpy(g))
        batch.compute()
    else:
        summary = summarize(torch.from_numpy(g), with_sumsq=True)
    stats = tensor_stats(summary)
    curve = loss_scale_curve(summary)
    assert [p.scale_log2 for p in curve] == list(LOSS_SCALES) == list(range(MAX_SCALE_LOG2 + 1))
    for k in LARGE_SCALES:
        truth = _reference(g, k)
        point = curve[k]
        assert (point.underflow_fraction, point.overflow_fraction) == pytest.approx(truth[:2], abs=1e-12), k
        assert point.underflow_norm_fraction == pytest.approx(truth[2], rel=1e-6, abs=1e-12), k
        assert stats.loss_scale_fractions(k) == pytest.approx(truth, rel=1e-6, abs=1e-12), k
        assert summary.scaled_lost_fractions(k) == pytest.approx(truth, rel=1e-6, abs=1e-12), k


def test_overflow_threshold_and_finite_scale_are_exact() -> None:
    assert overflow_threshold(LowDtype.FP16) == 65520.0
    assert torch.tensor(65519.99).half().isfinite() and not torch.tensor(65520.0).half().isfinite()
    assert finite_scale_log2(1.0, LowDtype.FP16) == 15  # 2^16 is inf in fp16
    assert finite_scale_log2(0.99, LowDtype.FP16) == 16  # 64880.6 rounds to 64896
    assert finite_scale_log2(1e-40, LowDtype.FP16) == MAX_SCALE_LOG2
    # the fp32 side: 2.0 * 2^127 overflows fp32
    assert finite_scale_log2(1e-40, LowDtype.FP16, fp32_max_abs=2.0) == 126


# --- skipped steps against a real GradScaler ---------------------------------------------------


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batch() -> torch.Tensor:
    return torch.randn(32, 8, generator=torch.Generator().manual_seed(1))


def _loss(weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    # fp32 loss (GradScaler scales an fp32 loss); its gradient enters the low run in fp16 at
    # the last Linear's output
    return lambda out, batch: weight * out.float().pow(2).mean()


def _scaled_to(max_target: float) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The MLP with a loss weight that puts its largest low-precision gradient at
    `max_target`: backward is linear in the loss, so the weight scales every gradient."""
    model = _mlp()
    first = pd.recommend_loss_scale(pd.analyze(model, _batch(), _loss(1.0), policy="cpu"))
    return model, _loss(max_target / first.max_grad_abs)


def _real_skips(
    model: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steps: int
) -> int:
    """Steps a real GradScaler (init 2^16, backoff 0.5) skips on a fixed batch with lr=0
    (gradients repeat), the model run by the package's training-loop emulation of fp16."""
    batch = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.get_scale() == 2.0**16 and scaler.get_backoff_factor() == 0.5
    skipped = 0
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with low_precision(model, torch.float16, regime="autocast", policy="cpu"):
            loss = loss_fn(model(batch), batch)
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
    return skipped


@pytest.mark.parametrize("expected", [0, 1, 3], ids=lambda n: f"{n} skipped")
def test_skipped_steps_equal_a_real_gradscalers(expected: int) -> None:
    """The largest low gradient set to 1.4 * 2^(expected - 1), mid-binade: at 2^16 the
    scaled gradients overflow until the scale has halved `expected` times (1.4 * 2^15 =
    45875 fits fp16, 1.4 * 2^16 does not)."""
    model, loss_fn = _scaled_to(1.4 * 2.0 ** (expected - 1))
    report = pd.analyze(model, _batch(), loss_fn, policy="cpu")
    advice = pd.recommend_loss_scale(report)
    assert advice.max_grad_abs == pytest.approx(1.4 * 2.0 ** (expected - 1), rel=1e-3)
    assert advice.skipped_steps_from_default == expected
    assert f"{expected} skipped step(s) to back off" in advice.summary()
    assert _real_skips(model, loss_fn, steps=expected + 4) == expected
    # the recommendation keeps its 2^2 headroom below the scale the scaler settles at
    assert advice.recommended_scale_log2 == 16 - expected - 2


# --- a loss scaled by 1e-14 ------------------------------------------------------------------


def test_tiny_loss_gets_a_scale_above_2_to_the_32_and_no_fp32_unit() -> None:
    """Gradients ~1e-17 need ~2^50: the recommendation goes there (GradScaler holds any fp32
    scale), every gradient survives it, the plan moves no unit to fp32 for underflow, and
    the DeepSpeed export writes that power and says it is unusual."""
    model, batch = _mlp(), _batch()
    loss_fn = _loss(1e-14)
    report = pd.analyze(model, batch, loss_fn, policy="cpu")
    advice = pd.recommend_loss_scale(report)
    k = advice.recommended_scale_log2
    assert DEEPSPEED_USUAL_MAX_SCALE_POWER < k <= MAX_SCALE_LOG2
    # the largest safe scale: 4x headroom below fp16's max, 8x would not be
    assert advice.max_grad_abs * 2.0 ** (k + 2) <= 65504 < advice.max_grad_abs * 2.0 ** (k + 3)
    assert advice.underflow_fraction_at_recommended == 0.0
    assert advice.skipped_steps_from_default == 0

    # every unit's gradients vanish at GradScaler's 2^16 (and at the old cap, 2^32) ...
    assert all(f.flag is pd.Flag.GRAD_UNDERFLOW for u in report.units for f in u.flags)
    assert {u.name for u in report.units if u.flags} == {"0", "1", "2"}
    # ... and the plan keeps them all low at 2^k (datasheet costs: `cpu`'s are measured)
    plan = plan_model(model, batch, loss_fn, report, target="h100")
    assert plan.loss_scale is not None and plan.loss_scale.recommended_scale_log2 == k
    flushed = [f for f in plan.fp32_units if "flush" in f.reason]
    assert flushed == [], flushed
    assert all(d == "fp16" for u, d in plan.units.items() if u != "<loss>")
    config = deepspeed_config(plan, "0.14.0")
    assert config["fp16"]["initial_scale_power"] == k  # type: ignore[index]
    caveats = export_caveats(plan, "deepspeed", "0.14.0")
    assert any(f"initial_scale_power {k} is above its usual range" in c for c in caveats), caveats

    # A real GradScaler at 2^k: no skipped step, and the unscaled gradients are the fp32
    # ones (nothing flushed); at the old 2^32 cap most of the first layer's flush to 0.
    def grads(init_scale: float) -> tuple[int, list[torch.Tensor]]:
        m = _mlp()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        with low_precision(m, torch.float16, regime="autocast", policy="cpu"):
            loss = loss_fn(m(batch), batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        return int(scaler.get_scale() < before), [p.grad.detach().clone() for p in m.parameters()]

    ref_model = _mlp()
    loss_fn(ref_model(batch), batch).backward()
    ref = [p.grad for p in ref_model.parameters()]
    skipped, got = grads(2.0**k)
    assert skipped == 0
    for g, r in zip(got, ref, strict=True):
        assert r is not None
        assert float((g - r).norm() / r.norm()) < 1e-2
    errors = [float((g - r).norm() / r.norm()) for g, r in zip(got, ref, strict=True) if r is not None]
    _, at_cap = grads(2.0**32)
    capped = [float((g - r).norm() / r.norm()) for g, r in zip(at_cap, ref, strict=True) if r is not None]
    # at 2^32 the first layer's gradients are fp16 subnormals: ~27-43% error, against <0.1%
    assert max(errors) < 1e-2 < 0.1 < max(capped)


def test_the_plans_fp32_reasons_hold_at_its_own_scale() -> None:
    """deep_narrow_underflow: the plan keeps its early layers in fp32 because their gradients
    flush to 0 at every scale that keeps the low units' gradients finite. The reason states
    what flushes at that scale and no advice past it (a unit's own flag says GradScaler could
    grow to 2^41, where the plan's low units overflow)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "sample_models" / "deep_narrow_underflow.py"
    spec = importlib.util.spec_from_file_location("deep_narrow_underflow_range", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, batch = mod.build_model(), mod.make_batch()
    report = pd.analyze(model, batch, mod.loss_fn)
    plan = plan_model(model, batch, mod.loss_fn, report, target="h100")
    low = {u: d == "fp16" for u, d in plan.units.items()}
    finite = pd.recommend_loss_scale(report, low_units=low).finite_scale_log2
    flushed = [f for f in plan.fp32_units if "flush to 0" in f.reason]
    assert len(flushed) >= 3, plan.fp32_units
    for f in flushed:
        assert f"even at 2^{finite}," in f.reason and f.reason.endswith(f"flush to 0 at 2^{finite}"), f.reason
        assert "GradScaler can grow" not in f.reason, f.reason
        # What it keeps the unit for: more of the norm than the flag allows, not "its gradients
        # flush" (layers.4 loses 8.6% of its norm).
        assert f.reason.startswith(
            "more of its gradients' L2 norm flushes to 0 in fp16 than GRAD_UNDERFLOW allows (5.0%)"
        )

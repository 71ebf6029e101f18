"""Initial loss scale: hand-built histograms with known answers, and GradScaler training proofs
in emulated fp16 on the CPU."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import precision_doctor as pd
from precision_doctor.analysis.loss_scale import (
    HEADROOM_LOG2,
    advise_from_histogram,
    recommend_loss_scale,
    underflow_fraction,
)
from precision_doctor.capture.emulation import emulated_precision
from precision_doctor.options import LowDtype

# Numbers compared with an independent reference: CI runs these again at one thread (.ci/run).
pytestmark = pytest.mark.numerics

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_sample_{name}", SAMPLES / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hand_built_histogram() -> None:
    # 10 gradients in [2^-30, 2^-29), 30 in [2^-10, 2^-9), 60 in [2^0, 2^1); max |g| = 1.5.
    hist = {-30: 10, -10: 30, 0: 60}
    a = advise_from_histogram(hist, 1.5, "fp16")
    # 1.5 * 2^k * 2^2 <= 65504  ->  k <= log2(65504 / 6) = 13.4  ->  13
    assert a.recommended_scale_log2 == math.floor(math.log2(65504 / (1.5 * 2**HEADROOM_LOG2))) == 13
    assert a.underflow_fraction_at_recommended == 0.0  # -30 + 13 = -17 >= -24: kept
    assert a.underflow_fraction_at_default == 0.0
    assert underflow_fraction(hist, 0, LowDtype.FP16) == 0.1  # the 2^-30 bin flushes unscaled
    # GradScaler backs off from 2^16 only until the scaled gradients are finite: 1.5 * 2^15 =
    # 49152 fits, so one skipped step (not 16 - 13: the headroom is no overflow).
    assert a.finite_scale_log2 == 15 and a.skipped_steps_from_default == 1
    assert a.scaler_needed
    assert a.to_extras().model_dump() == {
        "recommended_scale_log2": 13,
        "default_scale_log2": 16,
        "underflow_fraction_at_recommended": 0.0,
        "underflow_fraction_at_default": 0.0,
        "skipped_steps_from_default": 1,
        "scaler_needed": True,
    }


def test_small_gradients_get_a_scale_above_the_default() -> None:
    hist = {-45: 25, -35: 25, -20: 50}
    a = advise_from_histogram(hist, 2.0**-19, "fp16")
    assert a.recommended_scale_log2 > 16
    assert a.skipped_steps_from_default == 0
    assert a.underflow_fraction_at_default == 0.25  # only -45 + 16 < -24
    assert a.underflow_fraction_at_recommended < a.underflow_fraction_at_default


def test_bf16_needs_no_scaler() -> None:
    a = advise_from_histogram({-40: 10, 3: 5}, 10.0, "bf16", unscaled_underflow_fraction=0.0)
    assert not a.scaler_needed and a.recommended_scale_log2 == 0


def test_bf16_needs_no_scaler_for_what_it_flushes_below_2_to_the_minus_133() -> None:
    """Gradients below bf16's smallest subnormal (fp32 subnormals, ~1e-45) move no weight
    under any optimizer: no scaler for them (one was asked for while the exports said bf16
    trains without). A gradient beyond bf16's range still needs one."""
    tiny = float(np.float32(1e-45))
    assert np.float32(tiny).astype(np.float64) > 0 and tiny < 2.0**-133
    a = advise_from_histogram({-149: 131, -10: 10_000}, 1.0, "bf16", unscaled_underflow_fraction=131 / 10_131)
    assert a.underflow_fraction_at_recommended > 0
    assert not a.scaler_needed and a.recommended_scale_log2 == 0
    big = advise_from_histogram({-10: 10}, 1e39, "bf16", unscaled_underflow_fraction=0.0)
    assert big.scaler_needed


@pytest.mark.parametrize("scale_log2", [-3, 0, 9, 16, 24, 29, 32], ids=lambda k: f"2^{k}")
def test_report_fractions_at_any_scale_match_numpy(scale_log2: int) -> None:
    """What preflight judges a plan's scale by (a saved report's histogram at 2^k, beyond the
    2^0..2^24 curve too) against numpy on hand-built gradients spanning 2^-60..2^14."""
    from precision_doctor.analysis.engine import loss_scale_curve, tensor_stats
    from precision_doctor.capture.statistics import summarize

    rng = np.random.default_rng(0)
    exps = rng.integers(-60, 15, 4000)
    g = (rng.uniform(1, 2, 4000) * 2.0**exps * rng.choice([-1, 1], 4000)).astype(np.float32)
    g[:100] = 0.0
    summary = summarize(torch.from_numpy(g), with_sumsq=True)
    stats = tensor_stats(summary)
    lost, over, norm = stats.loss_scale_fractions(scale_log2)

    a = np.abs(g[g != 0]).astype(np.float64)
    b = np.floor(np.log2(a))
    flushed = b < -24 - scale_log2
    assert lost == pytest.approx(flushed.mean())
    assert over == pytest.approx((b >= 16 - scale_log2).mean())
    truth = math.sqrt((a[flushed] ** 2).sum() / (a**2).sum())
    if scale_log2 >= 0:
        assert norm == pytest.approx(truth, rel=1e-5)
    else:  # bins above 2^-24 count 4^bin per value: within 2x below the truth
        assert truth / 2 <= norm <= truth * (1 + 1e-6)
    if 0 <= scale_log2 <= 24:  # the report's own curve says the same
        point = loss_scale_curve(summary)[scale_log2]
        assert point.scale_log2 == scale_log2
        curve = (point.underflow_fraction, point.overflow_fraction, point.underflow_norm_fraction)
        assert curve == pytest.approx((lost, over, norm))


@pytest.mark.parametrize("name", ["ffn_overflow", "grad_overflow", "deep_narrow_underflow"], ids=str)
def test_rejudging_at_the_reports_own_scale_gives_its_flags(name: str) -> None:
    """What preflight uses for a plan's scale, run at the analysis' own 2^16, reproduces the
    analysis' gradient flags: values, and the exemption of a unit fed overflowed values
    (ffn_overflow's `block.ff.wo`, whose huge gradients come from `wi`'s overflow)."""
    from precision_doctor.analysis.flags import gradient_flags_at_scale, report_scale_ceiling
    from precision_doctor.formats import FP16
    from precision_doctor.options import Flag, Thresholds

    mod = load(name)
    report = pd.analyze(mod.build_model(), mod.make_batch(), mod.loss_fn)
    th = Thresholds()
    grad = (Flag.GRAD_OVERFLOW, Flag.GRAD_UNDERFLOW)
    for u in report.units:
        # As the analysis judges: no larger scale counts as a fix above the one where the
        # model's other gradients overflow.
        again = gradient_flags_at_scale(u, th.grad_scale_log2, FP16, th, ceiling_log2=report_scale_ceiling(report))
        assert [(f.flag, f.evidence.values) for f in again] == [
            (f.flag, f.evidence.values) for f in u.flags if f.flag in grad
        ], u.name
    if name == "ffn_overflow":
        assert report.by_module()["block.ff.wo"].backward.reads_overflow


def test_no_low_gradient_needs_no_scaler() -> None:
    """A plan that runs no unit low (or gradients that are exactly 0) has nothing to scale:
    not the largest scale, which an export would write as DeepSpeed's initial_scale_power."""
    a = advise_from_histogram({}, 0.0, "fp16")
    assert not a.scaler_needed and a.recommended_scale_log2 == 0 and a.skipped_steps_from_default == 0
    assert "no loss scaler needed" in a.summary()
    report = pd.analyze(torch.nn.Linear(3, 2), torch.ones(4, 3), loss_fn=lambda out, b: out.pow(2).mean())
    assert pd.recommend_loss_scale(report).scaler_needed  # every unit low: its gradients count
    none_low = pd.recommend_loss_scale(report, low_units={"": False})
    assert not none_low.scaler_needed and none_low.recommended_scale_log2 == 0


def train_skips(mod: ModuleType, init_scale: float, steps: int = 100, lr: float = 1e-3) -> tuple[int, list[float]]:
    """Steps GradScaler skipped training `mod`'s model in emulated fp16 on the CPU."""
    model = mod.build_model()
    batch = mod.make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    skipped = 0
    losses = []
    with emulated_precision(model, torch.float16):
        for _ in range(steps):
            out = model(*batch) if isinstance(batch, tuple) else model(batch)
            loss = mod.loss_fn(out, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < before
            losses.append(float(loss.detach()))
    return skipped, losses


def advice_for(mod: ModuleType) -> pd.loss_scale.LossScaleAdvice:  # type: ignore[name-defined]
    report = pd.analyze(mod.build_model(), mod.make_batch(), mod.loss_fn)
    return pd.recommend_loss_scale(report)


@pytest.mark.slow  # 16 layers x 100 emulated steps: ~10-25 s on 2 cores
def test_small_gradients_train_without_skips_at_the_recommended_scale() -> None:
    mod = load("deep_narrow_underflow")
    advice = advice_for(mod)
    assert advice.recommended_scale_log2 > 16
    skipped, losses = train_skips(mod, 2.0**advice.recommended_scale_log2)
    assert skipped == 0
    assert all(math.isfinite(v) for v in losses)


def test_overflowing_gradients_skip_at_the_default_but_not_at_the_recommended_scale() -> None:
    mod = load("grad_overflow")
    advice = advice_for(mod)
    assert advice.recommended_scale_log2 < 16 and advice.skipped_steps_from_default > 0
    # A summed loss: the gradients are large, so is the learning rate's effect.
    skipped_default, _ = train_skips(mod, 2.0**16, lr=1e-6)
    assert skipped_default >= 1
    skipped, losses = train_skips(mod, 2.0**advice.recommended_scale_log2, lr=1e-6)
    assert skipped == 0
    assert losses[-1] < losses[0]


def test_next_steps_give_plain_autocasts_scale_where_the_plan_keeps_units_fp32() -> None:
    """A plan that keeps units in fp32 recommends the scale of the units it runs low (none:
    "no loss scaler needed"); the verdict clears plain autocast, every unit low, and a user
    training so gets that run's scale too (skip_one_step's plan keeps both units fp32 for their
    cost: its next steps gave no scale at all)."""
    from precision_doctor.views.terminal import next_steps

    mod = load("skip_one_step")
    model, batch = mod.build_model(), mod.make_batch()
    report = pd.analyze(model, batch, mod.loss_fn)
    assert report  # the verdict clears plain autocast
    planned = pd.plan_report(model, batch, mod.loss_fn, report)
    plan_scale, all_low = planned.extras.loss_scale, recommend_loss_scale(report)
    assert plan_scale is not None and all_low.scaler_needed
    # The plan keeps both units fp32 for their cost (a roofline: the same on any CPU).
    assert not plan_scale.scaler_needed
    lines = [s for s in next_steps(planned, ["precision-doctor", "analyze", "m.py"]) if "loss scale" in s]
    assert len(lines) == 1 and "under plain autocast" in lines[0]
    assert f"2^{all_low.recommended_scale_log2}" in lines[0].split("under plain autocast")[1]


def test_a_recommendation_below_a_default_that_fits_says_it_keeps_headroom() -> None:
    """A new user asked why 2^14 when the line itself says 2^16 skips nothing and loses
    nothing: the 4x headroom for gradients that grow in the first steps. A recommendation
    above the default, or below one that skips steps, needs no such word."""
    from precision_doctor.extras import LossScaleSection

    def line(k: int, skipped: int) -> str:
        return LossScaleSection(
            recommended_scale_log2=k, default_scale_log2=16, underflow_fraction_at_recommended=0.0,
            underflow_fraction_at_default=0.0, skipped_steps_from_default=skipped, scaler_needed=True,
        ).describe(LowDtype.FP16)  # fmt: skip

    assert "4x headroom" in line(14, 0)
    assert "headroom" not in line(20, 0) and "headroom" not in line(10, 4)


def test_a_gradient_underflow_warning_says_how_long_gradscaler_takes_to_grow() -> None:
    """ "GradScaler can grow to 2^25, which keeps them" left out that it doubles once per 2000
    clean steps (its `growth_interval`): the warning gives the steps from the judged scale
    and says to start higher (the recommended scale, one for every unit, with headroom)."""
    import inspect

    interval = inspect.signature(torch.amp.GradScaler.__init__).parameters["growth_interval"].default
    from precision_doctor.model.spec import load_model_file

    spec = load_model_file(SAMPLES / "tiny_loss_gradients.py")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn)
    warned = [f for f in report.flags() if f.flag.value == "GRAD_UNDERFLOW" and f.severity.value == "warning"]
    assert warned, [f.evidence.message for f in report.flags()]  # the precondition
    for f in warned:
        fix, scale = int(f.evidence.values["fixing_scale_log2"]), int(f.evidence.values["scale_log2"])
        assert f"after {(fix - scale) * interval:,} steps at its default growth: start it higher" in f.evidence.message

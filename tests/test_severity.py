"""Severities and verdicts: each finding's severity from rules with known answers on small
hand-built models, and a verdict that never contradicts the report's numbers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import precision_doctor as pd
from precision_doctor.model.spec import load_model_file
from precision_doctor.options import Flag, Severity, Thresholds
from precision_doctor.planning.plan import DEFAULT_TOLERANCE
from precision_doctor.report import Report
from precision_doctor.training.preflight import RISK_NAMES, parse_fail_on

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _zero_linear() -> nn.Linear:
    model = nn.Linear(1, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def _grad_flags(report: Report, flag: Flag) -> list[pd.report.FlagRecord]:
    return [f for f in report.flags() if f.flag is flag]


def test_gradient_overflowing_only_at_2_16_is_a_warning_with_one_backoff() -> None:
    """(w x + b - 0.75)^2 at w = b = 0, x = 1: gradients of magnitude 1.5, which overflow fp16
    at GradScaler's 2^16 (98304) and fit at 2^15: one halving, one skipped step."""
    model = _zero_linear()

    def loss_fn(out: torch.Tensor, batch: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out, torch.full_like(out, 0.75))

    report = pd.analyze(model, torch.ones(1, 1), loss_fn, dtype="fp16")
    flags = _grad_flags(report, Flag.GRAD_OVERFLOW)
    assert flags, report.flags()
    for f in flags:
        assert f.severity is Severity.WARNING
        assert f.evidence.values["backoff_steps"] == 1
        assert "overflow fp16 at 2^16: GradScaler backs off in 1 step(s)" in f.evidence.message
    assert bool(report), report.verdict
    assert report.verdict.endswith(f"Safe to train in this dtype with {len(flags)} warning(s).")


def test_gradient_overflowing_at_every_scale_is_an_error() -> None:
    """A loss weight of 1e5: gradients of 1e5 exceed fp16's 65504 before any scaling."""
    model = _zero_linear()
    report = pd.analyze(model, torch.ones(4, 1), lambda out, b: 1e5 * out.sum(), dtype="fp16")
    flags = _grad_flags(report, Flag.GRAD_OVERFLOW)
    assert flags, report.flags()
    for f in flags:
        assert f.severity is Severity.ERROR
        assert "backoff_steps" not in f.evidence.values
        assert "at every loss scale down to 2^0" in f.evidence.message
    assert not report and report.verdict.endswith("Not safe as-is.")
    assert f"{len(flags)} error(s)" in report.verdict


@pytest.mark.parametrize(
    ("weight_log2", "fixing"),
    [(-44, (17, 24)), (-62, (35, 45))],
    ids=["a-larger-scale-keeps-them", "a-scale-past-2^24-keeps-them"],
)
def test_gradient_underflow_fixed_by_a_larger_scale_is_a_warning(weight_log2: int, fixing: tuple[int, int]) -> None:
    """Gradients of ~2^-44 flush at 2^16 but fit from ~2^21; gradients of ~2^-62 need ~2^39,
    which GradScaler's fp32 scale holds too (the plan recommends such a start): warnings."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    batch = torch.rand(16, 8) + 0.5
    report = pd.analyze(model, batch, lambda out, b: 2.0**weight_log2 * out.sum(), dtype="fp16")
    flags = _grad_flags(report, Flag.GRAD_UNDERFLOW)
    assert flags, report.flags()
    assert {f.severity for f in flags} == {Severity.WARNING}
    assert all(fixing[0] <= f.evidence.values["fixing_scale_log2"] <= fixing[1] for f in flags)
    assert bool(report), report.verdict


class _TwoRanges(nn.Module):
    """Two branches whose gradients lie ~2^54 apart: the scale that keeps `small`'s
    gradients overflows `big`'s."""

    def __init__(self) -> None:
        super().__init__()
        self.big, self.small = nn.Linear(8, 1), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) * 2.0**4 + self.small(x) * 2.0**-50


def test_gradient_underflow_no_usable_scale_fixes_is_an_error() -> None:
    """GradScaler settles below the scale where any gradient overflows (`big`'s, ~2^11): at
    that scale `small`'s gradients (~2^-50) still flush, so no scale it can settle at keeps
    them: an error."""
    torch.manual_seed(0)
    model, batch = _TwoRanges(), torch.rand(16, 8) + 0.5
    report = pd.analyze(model, batch, lambda out, b: out.sum(), dtype="fp16")
    flags = [f for f in _grad_flags(report, Flag.GRAD_UNDERFLOW) if f.unit == "small"]
    assert flags, report.flags()
    assert {f.severity for f in flags} == {Severity.ERROR}
    assert not report, report.verdict


def _well_fit_regressor() -> tuple[nn.Module, torch.Tensor, Any]:
    """A linear regressor at its optimum: the fp32 loss is the tiny noise; fp16's rounding of
    the predictions (~1e-3 relative) is far larger than the residuals."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    model = nn.Linear(8, 1)
    with torch.no_grad():
        y = model(x) + 1e-5 * torch.randn(256, 1)

    def loss_fn(out: torch.Tensor, batch: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out, y)

    return model, x, loss_fn


def test_loss_far_over_tolerance_is_never_safe() -> None:
    model, x, loss_fn = _well_fit_regressor()
    report = pd.analyze(model, x, loss_fn, dtype="fp16")
    assert report.losses.rel_error > 100 * report.thresholds.loss_rel_error
    assert not report
    assert "Safe to train" not in report.verdict and report.verdict.endswith("Not safe as-is.")
    assert "over the tolerance 0.01" in report.verdict
    # The units most responsible are named: where the error grows most on its way to the loss.
    growth = report.error_growth()
    assert growth and all(factor > 1 for _, factor in growth)
    names = [name for name, _ in growth[:3]]
    assert "the error grows most in " + names[0] in report.verdict
    assert set(names) <= {u.name for u in report.units}


def test_loss_tolerance_is_a_threshold() -> None:
    assert Thresholds().loss_rel_error == DEFAULT_TOLERANCE
    loose = Thresholds.from_overrides({"loss_rel_error": "1e9"})
    model, x, loss_fn = _well_fit_regressor()
    report = pd.analyze(model, x, loss_fn, dtype="fp16", thresholds=loose)
    assert report.thresholds.loss_rel_error == 1e9
    assert bool(report) == (not any(f.severity is Severity.ERROR for f in report.flags()))


def test_error_growth_multiplies_along_the_path() -> None:
    """The growth factors of the units on the path multiply to (about) the final-loss error
    over the rounding floor: cumulated, not only one large jump."""
    model, x, loss_fn = _well_fit_regressor()
    report = pd.analyze(model, x, loss_fn, dtype="fp16")
    product = 1.0
    for _, factor in report.error_growth():
        product *= factor
    assert product >= report.losses.rel_error / 2.0**-11 / 10


def test_fail_on_takes_severities() -> None:
    assert parse_fail_on("error") == ("error",)
    assert parse_fail_on("Warning,SKIPPED_STEPS") == ("warning", "SKIPPED_STEPS")
    assert parse_fail_on(None) == ("error",)  # the default: error-severity risks
    assert parse_fail_on("ALL") == RISK_NAMES  # every risk, whatever its severity
    with pytest.raises(pd.PrecisionDoctorError, match="error, warning, info"):
        parse_fail_on("fatal")
    # NONE parses to no risk, and parsed risks parse to themselves (the CLI parses --fail-on
    # before loading the model, then hands the parsed risks on).
    assert parse_fail_on("NONE") == () == parse_fail_on(["none"]) == parse_fail_on(parse_fail_on("NONE"))
    assert parse_fail_on(parse_fail_on("warning,SKIPPED_STEPS")) == ("warning", "SKIPPED_STEPS")
    # An empty string is refused (an unset CI variable), NONE said so is not.
    for empty in ("", " , "):
        with pytest.raises(pd.PrecisionDoctorError, match="fail_on is empty"):
            parse_fail_on(empty)


def test_api_thresholds_take_a_mapping() -> None:
    """`thresholds=` takes a Thresholds or a mapping of names to numbers; anything else, an
    unknown name or a value that is no number is one line (a dict raised AttributeError)."""
    model, batch = torch.nn.Linear(4, 1), torch.randn(2, 4)
    report = pd.analyze(model, batch, lambda o, b: o.sum(), thresholds={"loss_rel_error": 0.1})
    assert report.thresholds.loss_rel_error == 0.1
    assert report.thresholds.underflow_fraction == pd.Thresholds().underflow_fraction
    for bad, message in (
        ({"bogus": 1}, "unknown threshold 'bogus'"),
        ({"loss_rel_error": "x"}, "is not a number"),
        ({"loss_rel_error": None}, "is not a number"),
        ([("loss_rel_error", 0.1)], "must be a Thresholds or a mapping"),
    ):
        with pytest.raises(pd.PrecisionDoctorError, match=message):
            pd.analyze(model, batch, lambda o, b: o.sum(), thresholds=bad)  # type: ignore[arg-type]
        with pytest.raises(pd.PrecisionDoctorError, match=message):
            pd.preflight(model, batch, lambda o, b: o.sum(), steps=1, plan=False, thresholds=bad)  # type: ignore[arg-type]


def test_preflight_fail_on_error_leaves_warnings_as_notes() -> None:
    """grad_overflow's gradients overflow at 2^16 and fit a few halvings lower: warnings.
    `fail_on="error"` (the default) keeps them as notes."""
    spec = load_model_file(SAMPLES / "grad_overflow.py")
    result = pd.preflight(spec.model, spec.batch, spec.loss_fn, steps=4, plan=False, fail_on="error")
    warned = [r for r in result.notes if r.risk == "GRAD_OVERFLOW"]
    assert warned and all(r.severity is Severity.WARNING for r in warned)
    assert all(r.severity is Severity.ERROR for r in result.reasons)
    assert not any(r.risk == "GRAD_OVERFLOW" for r in result.reasons)


# --- the verdict never contradicts the numbers ---------------------------------------------

_PERCENT = re.compile(r"(?<![<>\d.])0\.0+%")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(p.stem for p in SAMPLES.glob("*.py")), ids=str)
def test_verdict_agrees_with_the_numbers(name: str, dtype: str) -> None:
    spec = load_model_file(SAMPLES / f"{name}.py")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype=dtype, name=name)
    errors = [f for f in report.flags() if f.severity is Severity.ERROR]
    err, tol = report.losses.rel_error, report.thresholds.loss_rel_error
    within = err <= tol  # False for NaN
    safe = "Safe to train in this dtype" in report.verdict
    assert safe != ("Not safe as-is" in report.verdict), report.verdict
    assert bool(report) == safe
    if safe:
        assert not errors and within, report.verdict
    else:
        assert errors or not within, report.verdict
    if not within:
        assert f"over the tolerance {tol:g}" in report.verdict
    counts = report.severity_counts()
    for severity, n in counts.items():
        assert f"{n} {severity}(s)" in report.verdict, report.verdict
    for f in report.flags():
        assert not _PERCENT.search(f.evidence.message), f.evidence.message
        if f.flag is Flag.GRAD_OVERFLOW and f.severity is Severity.WARNING:
            assert f.evidence.values["backoff_steps"] >= 1

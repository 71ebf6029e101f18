"""Gradient fidelity: the report's per-unit parameter-gradient error and cosine against an
independent computation (a real `torch.autocast("cpu", low)` run or a real `model.to(low)`
run and a plain fp32 run, backward at the report's loss scale, compared by hand in float64
numpy), GRAD_DIVERGENCE on the planted cases only, and the model handed back as it came."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import precision_doctor as pd
from precision_doctor.analysis import gradients, jobs
from precision_doctor.analysis.gradients import GradComparer
from precision_doctor.analysis.loss_scale import recommend_loss_scale
from precision_doctor.model.spec import LossFn, load_model_file, resolve_loss, run_model

from .fixtures import build
from .test_model_state import assert_restored, snapshot

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}


def real_gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    dtype: str | None,
    regime: str,
    scale_log2: int,
    rng: torch.Tensor,
) -> dict[str, np.ndarray]:
    """Parameter gradients of a real run on a copy: fp32 (`dtype` None), `torch.autocast("cpu",
    low)` (real CPU kernels) or `model.to(low)` with float inputs cast; the loss scaled by
    2^k as GradScaler scales it (an fp32 scale), the gradients unscaled in float64."""
    m = copy.deepcopy(model)
    torch.set_rng_state(rng)  # the analysis starts from this state: same dropout masks
    if dtype is not None and regime == "pure":
        m.to(LOW[dtype])
        batch = pytree.tree_map(
            lambda t: t.to(LOW[dtype]) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, batch
        )
    ctx = (
        torch.autocast("cpu", dtype=LOW[dtype])
        if dtype is not None and regime == "autocast"
        else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        loss = resolve_loss(run_model(m, batch), batch, loss_fn)
    (loss * torch.tensor(2.0**scale_log2)).backward()
    return {
        n: p.grad.detach().double().numpy() * 2.0**-scale_log2
        for n, p in m.named_parameters(remove_duplicate=False)
        if p.grad is not None
    }


def by_hand(ref: dict[str, np.ndarray], low: dict[str, np.ndarray]) -> dict[str, tuple[float, float | None]]:
    """Per unit (the module owning each parameter): relative L2 error and cosine, in float64."""
    sums: dict[str, list[float]] = {}
    for name, r in ref.items():
        lo = low.get(name, np.zeros_like(r))
        s = sums.setdefault(name.rpartition(".")[0] or "<root>", [0.0, 0.0, 0.0, 0.0])
        s[0] += float(((lo - r) ** 2).sum())
        s[1] += float((r * r).sum())
        s[2] += float((lo * lo).sum())
        s[3] += float((lo * r).sum())
    return {
        u: (math.sqrt(err / ref_sq), dot / math.sqrt(ref_sq * low_sq) if low_sq > 0 else None)
        for u, (err, ref_sq, low_sq, dot) in sums.items()
    }


def compare(
    case_model: nn.Module, batch: Any, loss_fn: LossFn | None, dtype: str, regime: str
) -> tuple[pd.Report, dict[str, tuple[float, float | None]]]:
    rng = torch.get_rng_state()
    report = pd.analyze(case_model, batch, loss_fn, dtype=dtype, regime=regime, policy="cpu")
    assert report.grad_fidelity is not None
    k = report.grad_fidelity.scale_log2
    ref = real_gradients(case_model, batch, loss_fn, None, regime, 0, rng)
    low = real_gradients(case_model, batch, loss_fn, dtype, regime, k, rng)
    return report, by_hand(ref, low)


@pytest.mark.parametrize("regime", ["autocast", "pure"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "functional", "gpt2"])
def test_bf16_gradients_equal_a_real_run(name: str, regime: str) -> None:
    """bf16 runs on the CPU's real kernels in the analysis too: the per-unit numbers are the
    real run's (float64 sums against the report's fp32-accumulated norms)."""
    case = build(name)
    report, expected = compare(case.model, case.batch, case.loss_fn, "bf16", regime)
    got = report.grad_fidelity_by_unit()
    assert set(got) == set(expected)
    for unit, (rel, cos) in expected.items():
        assert got[unit].rel_l2_error == pytest.approx(rel, rel=1e-4, abs=1e-9), unit
        assert rel > 1e-4  # bf16 rounding shows: the comparison is not of a run with itself
        assert cos is not None and got[unit].cosine is not None
        assert 1 - got[unit].cosine == pytest.approx(1 - cos, rel=1e-3, abs=1e-9), unit


@pytest.mark.parametrize("regime", ["autocast", "pure"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "functional"])
def test_fp16_gradients_match_a_real_run(name: str, regime: str) -> None:
    """fp16 is emulated (fp32 kernels, results rounded to fp16); the CPU's real fp16 kernels
    round the same values, so the errors agree closely, not to the bit."""
    case = build(name)
    report, expected = compare(case.model, case.batch, case.loss_fn, "fp16", regime)
    got = report.grad_fidelity_by_unit()
    assert set(got) == set(expected)
    for unit, (rel, cos) in expected.items():
        assert 1e-5 < got[unit].rel_l2_error < 1e-2
        assert got[unit].rel_l2_error == pytest.approx(rel, rel=0.25), unit
        assert cos is not None and got[unit].cosine == pytest.approx(cos, abs=1e-5), unit


def test_model_wide_numbers_count_a_tied_weight_once() -> None:
    """GPT-2's embedding and head share one weight: both units see its gradient, the model's
    sums count it once."""
    case = build("gpt2")
    rng = torch.get_rng_state()
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="bf16", policy="cpu")
    assert report.grad_fidelity is not None
    ref = real_gradients(case.model, case.batch, case.loss_fn, None, "autocast", 0, rng)
    low = real_gradients(case.model, case.batch, case.loss_fn, "bf16", "autocast", 0, rng)
    unique = {id(p): n for n, p in case.model.named_parameters()}.values()
    err = sum(float(((low[n] - ref[n]) ** 2).sum()) for n in unique)
    ref_sq = sum(float((ref[n] ** 2).sum()) for n in unique)
    assert report.grad_fidelity.rel_l2_error == pytest.approx(math.sqrt(err / ref_sq), rel=1e-4)
    assert report.grad_fidelity.numel == sum(ref[n].size for n in unique)
    units = report.by_module()
    tied = units["lm_head"].backward.param_grad_fidelity["lm_head.weight"]
    assert tied == units["transformer.wte"].backward.param_grad_fidelity["transformer.wte.weight"]


def _sample(name: str) -> Any:
    return load_model_file(SAMPLES / f"{name}.py")


def test_planted_unscaled_gradients_are_lost_in_pure_fp16() -> None:
    """Pure fp16 has no loss scaler: embed's ~1e-9 gradients are all 0 at 2^0 in a real
    `model.half()` run too; under autocast the recommended scale keeps them."""
    spec = _sample("unscaled_gradients")
    rng = torch.get_rng_state()
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="fp16", regime="pure")
    assert report.grad_fidelity is not None and report.grad_fidelity.scale_log2 == 0
    real = by_hand(
        real_gradients(spec.model, spec.batch, spec.loss_fn, None, "pure", 0, rng),
        real_gradients(spec.model, spec.batch, spec.loss_fn, "fp16", "pure", 0, rng),
    )
    assert real["embed"] == (1.0, None)  # every gradient flushed in the real run
    embed = report.by_module()["embed"]
    assert embed.backward.grad_fidelity is not None
    assert (embed.backward.grad_fidelity.rel_l2_error, embed.backward.grad_fidelity.cosine) == (1.0, None)
    [flag] = embed.flags
    assert (flag.flag, flag.severity) == (pd.Flag.GRAD_DIVERGENCE, pd.Severity.ERROR)
    assert flag.evidence.values["scale_log2"] == 0 and "every parameter gradient is 0" in flag.evidence.message
    assert [f.unit for f in report.flags()] == ["embed"] and report.losses.rel_error < 1e-6
    assert not report and "GRAD_DIVERGENCE" in report.verdict

    scaled = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="fp16", regime="autocast")
    assert scaled.grad_fidelity is not None and scaled.grad_fidelity.scale_log2 > 16
    assert not scaled.flags() and scaled.by_module()["embed"].backward.grad_fidelity.rel_l2_error < 1e-3  # type: ignore[union-attr]


def test_deep_narrow_early_layers_diverge_at_the_recommended_scale() -> None:
    """At the recommended 2^29 the first layers' gradients still flush (GRAD_UNDERFLOW says no
    scale keeps them): GRAD_DIVERGENCE errors there; the last layers are exact to fp16."""
    report = pd.analyze(*_args("deep_narrow_underflow"), dtype="fp16")
    assert report.grad_fidelity is not None
    assert report.grad_fidelity.scale_log2 == recommend_loss_scale(report).recommended_scale_log2 == 29
    units = report.by_module()
    for i in range(5):
        fid = units[f"layers.{i}"].backward.grad_fidelity
        assert fid is not None and fid.rel_l2_error == 1.0 and fid.cosine is None
        assert any(
            f.flag is pd.Flag.GRAD_DIVERGENCE and f.severity is pd.Severity.ERROR for f in units[f"layers.{i}"].flags
        )
    for name in ("layers.13", "layers.14", "layers.15", "head"):
        fid = units[name].backward.grad_fidelity
        assert fid is not None and fid.rel_l2_error < 2e-3 and not units[name].flags


def test_sample_docstrings_grad_divergence() -> None:
    """What deep_narrow_underflow, lost_update and tiny_loss_gradients state about it."""

    def divergent(name: str, dtype: str, regime: str, policy: str = "cuda") -> dict[str, pd.Severity]:
        report = pd.analyze(*_args(name), dtype=dtype, regime=regime, policy=policy)
        return {f.unit: f.severity for f in report.flags() if f.flag is pd.Flag.GRAD_DIVERGENCE}

    assert divergent("deep_narrow_underflow", "fp16", "pure") == {f"layers.{i}": pd.Severity.ERROR for i in range(16)}
    assert divergent("deep_narrow_underflow", "bf16", "autocast") == {}
    assert divergent("lost_update", "fp16", "pure") == {"<root>": pd.Severity.WARNING}
    assert divergent("lost_update", "bf16", "pure") == {"<root>": pd.Severity.ERROR}
    assert divergent("lost_update", "bf16", "autocast") == {}
    assert divergent("tiny_loss_gradients", "fp16", "autocast") == {}
    for regime, policy in (("autocast", "cpu"), ("pure", "cuda")):
        assert divergent("tiny_loss_gradients", "fp16", regime, policy) == {
            "fc1": pd.Severity.ERROR,
            "fc2": pd.Severity.ERROR,
        }


def test_a_loss_held_low_bounds_the_scale_the_flags_offer() -> None:
    """tiny_loss_gradients under CPU autocast's op lists: the loss is an fp16 `mean`, which
    takes the scale as its fp16 gradient, 2^15 at most. No GRAD_UNDERFLOW says GradScaler can
    grow to a scale that keeps the gradients (they said 2^32); each is an error naming the
    loss. A loss whose value flushes but that is reduced in fp32 (`(out * 1e-10).float()`)
    takes any scale, and its warnings keep their scale: GradScaler scales the backward's seed,
    not the loss' value."""
    held = pd.analyze(*_args("tiny_loss_gradients"), policy="cpu")
    assert held.losses.low_dtype == "fp16"
    under = [f for f in held.flags() if f.flag is pd.Flag.GRAD_UNDERFLOW]
    assert under and all(f.severity is pd.Severity.ERROR for f in under)
    assert all("up to 2^15" in f.evidence.message and "loss itself is held low" in f.evidence.message for f in under)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    fp32_loss = pd.analyze(model, x, lambda out, b: (out * 1e-10).float().mean())
    assert fp32_loss.losses.low == 0 and fp32_loss.losses.low_dtype == "fp32"  # its value flushed
    kept = [f for f in fp32_loss.flags() if f.flag is pd.Flag.GRAD_UNDERFLOW]
    assert kept and all("GradScaler can grow" in f.evidence.message for f in kept)


def _args(name: str) -> tuple[Any, Any, Any]:
    spec = _sample(name)
    return spec.model, spec.batch, spec.loss_fn


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "functional", "gpt2", "bert", "t5", "llama"])
def test_healthy_models_get_no_grad_divergence(name: str, dtype: str) -> None:
    case = build(name)
    for regime, policy in (("autocast", "cuda"), ("autocast", "cpu"), ("pure", "cuda")):
        report = pd.analyze(case.model, case.batch, case.loss_fn, dtype=dtype, regime=regime, policy=policy)
        assert report.grad_fidelity is not None and report.grad_fidelity.rel_l2_error < 0.05
        assert not [f for f in report.flags() if f.flag is pd.Flag.GRAD_DIVERGENCE], (regime, policy)


def test_thresholds_are_overridable() -> None:
    """A warning over grad_rel_error with the direction kept; an error below grad_cosine_min."""
    case = build("mlp")
    strict = pd.analyze(
        case.model, case.batch, case.loss_fn, dtype="bf16", thresholds=pd.Thresholds(grad_rel_error=1e-6)
    )
    flags = [f for f in strict.flags() if f.flag is pd.Flag.GRAD_DIVERGENCE]
    assert {f.unit for f in flags} == {"fc1", "fc2"} and {f.severity for f in flags} == {pd.Severity.WARNING}
    assert all("the direction holds" in f.evidence.message for f in flags)
    assert strict  # warnings only: still safe
    direction = pd.analyze(
        case.model, case.batch, case.loss_fn, dtype="bf16", thresholds=pd.Thresholds(grad_cosine_min=1.0)
    )
    assert {f.severity for f in direction.flags() if f.flag is pd.Flag.GRAD_DIVERGENCE} == {pd.Severity.ERROR}
    assert not direction
    with pytest.raises(pd.PrecisionDoctorError, match=r"grad_cosine_min=1\.5 is a cosine"):
        pd.Thresholds(grad_cosine_min=1.5)


def test_forward_breakage_is_not_blamed_on_the_gradients() -> None:
    """plan_rescue overflows in its forward: every gradient is off, but the forward flags say
    why; no GRAD_DIVERGENCE (as a unit that receives Inf is not flagged OVERFLOW)."""
    report = pd.analyze(*_args("plan_rescue"), dtype="fp16")
    worst = next(iter(report.grad_fidelity_by_unit().values()))
    assert worst.rel_l2_error > 0.5
    assert pd.Flag.OVERFLOW in {f.flag for f in report.flags()}
    assert pd.Flag.GRAD_DIVERGENCE not in {f.flag for f in report.flags()}


def test_scale_is_the_recommendation_and_an_fp16_loss_caps_it() -> None:
    """Autocast fp16: the backward runs at the recommended initial scale. Under the CPU's op
    lists the mlp's loss (pow, mean) is an fp16 value, which the scale reaches as its gradient:
    2^15 at most, and a real GradScaler started at 2^16 skips one step there."""
    case = build("mlp")
    cuda = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp16")
    assert cuda.losses.low_dtype == "fp32"
    assert (
        cuda.grad_fidelity is not None
        and cuda.grad_fidelity.scale_log2 == recommend_loss_scale(cuda).recommended_scale_log2 == 16
    )
    cpu = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp16", policy="cpu")
    advice = recommend_loss_scale(cpu)
    assert cpu.losses.low_dtype == "fp16"
    assert cpu.grad_fidelity is not None and cpu.grad_fidelity.scale_log2 == advice.recommended_scale_log2 == 15
    assert advice.skipped_steps_from_default == 1
    assert cpu.grad_fidelity.nonfinite_count == 0

    net = copy.deepcopy(case.model)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    skipped = 0
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = case.loss_fn(net(case.batch), case.batch)  # type: ignore[misc]
        assert loss.dtype == torch.float16
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
    assert skipped == advice.skipped_steps_from_default


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2"])
def test_model_comes_back_as_it_went_in(name: str) -> None:
    """Parameters, user gradients (set before), buffers, modes, requires_grad and RNG: the
    low backward's gradients are collected and the user's `.grad` put back."""
    case = build(name)
    for p in case.model.parameters():
        p.grad = torch.full_like(p, 0.5)
    next(case.model.parameters()).requires_grad_(False)
    before = snapshot(case.model)
    for regime in ("autocast", "pure"):
        pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp16", regime=regime)
        assert_restored(case.model, before)


def test_parameter_written_in_forward_still_gets_a_comparison() -> None:
    """A forward that writes a parameter in place invalidates the kept graph when the model
    is restored: the low run is rerun with its backward at once, the same numbers."""

    class Clamped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.fc.weight.clamp_(-0.4, 0.4)  # a max-norm constraint applied in forward
            return self.fc(x)

    torch.manual_seed(0)
    model = Clamped()
    x = torch.randn(8, 4)
    before = snapshot(model)
    report = pd.analyze(model, x, lambda o, b: o.pow(2).mean(), dtype="bf16", policy="cpu")
    assert_restored(model, before)
    fid = report.by_module()["fc"].backward.grad_fidelity
    assert fid is not None and 1e-4 < fid.rel_l2_error < 0.05
    rng = torch.get_rng_state()
    expected = by_hand(
        real_gradients(model, x, lambda o, b: o.pow(2).mean(), None, "autocast", 0, rng),
        real_gradients(model, x, lambda o, b: o.pow(2).mean(), "bf16", "autocast", 0, rng),
    )
    assert fid.rel_l2_error == pytest.approx(expected["fc"][0], rel=1e-4)


def test_report_round_trips_and_queries() -> None:
    spec = _sample("unscaled_gradients")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="fp16", regime="pure")
    again = pd.Report.from_json(report.to_json())
    assert again == report
    assert list(again.grad_fidelity_by_unit()) == ["embed", "head"]  # worst first
    assert set(again.by_module()["embed"].backward.param_grad_fidelity) == {"embed.weight"}


def test_emulated_backward_dtypes_follow_the_output_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulation caches each op's output dtypes by its argument dtypes; a layer norm's
    backward returns no input gradient under mask [False, ...]: that answer must not stand
    for a call that asks for one (it left GPT-2's input gradient unrounded, fp32)."""
    from precision_doctor.capture import lowrun

    monkeypatch.setattr(lowrun, "_OUT_DTYPES", {})
    mode = lowrun.EmulateLowMode()
    h = torch.float16
    args = [
        torch.randn(4, 8, dtype=h),
        torch.randn(4, 8, dtype=h),
        [8],
        torch.zeros(4, 1, dtype=h),
        torch.ones(4, 1, dtype=h),
        torch.ones(8, dtype=h),
        torch.zeros(8, dtype=h),
    ]
    op = torch.ops.aten.native_layer_norm_backward.default
    none_first = mode.run(op, (*args, [False, True, True]), {})
    assert none_first[0] is None
    full = mode.run(op, (*args, [True, True, True]), {})
    assert [t.dtype for t in full] == [h, h, h]


class ShiftedScores(nn.Module):
    """`shift` adds one value per row to the scores of an fp32 softmax (as attention's key
    bias adds one per query): the softmax ignores it, so its gradient is 0 in exact
    arithmetic and cancellation residue in fp32 (the row sum of softmax's backward); the
    low run leaves a residue of its own. The scores are upcast before the shift is added,
    so both residues are fp32 sums, as in a fused attention kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(16, 32)
        self.shift = nn.Linear(16, 1)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.softmax(self.score(x).float() + self.shift(x).float(), dim=-1))


def _shifted_case() -> tuple[nn.Module, torch.Tensor, LossFn]:
    torch.manual_seed(0)
    target = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    return (
        ShiftedScores(),
        torch.randn(64, 16, generator=torch.Generator().manual_seed(1)),
        lambda o, b: (o - target).pow(2).mean(),
    )


def _unit_norms(grads: dict[str, np.ndarray]) -> tuple[dict[str, float], float]:
    """Each unit's gradient L2 norm and the model's, in float64."""
    sq: dict[str, float] = {}
    for name, g in grads.items():
        unit = name.rpartition(".")[0] or "<root>"
        sq[unit] = sq.get(unit, 0.0) + float((g * g).sum())
    return {u: math.sqrt(v) for u, v in sq.items()}, math.sqrt(sum(sq.values()))


def _model_cosine(ref: dict[str, np.ndarray], low: dict[str, np.ndarray]) -> float:
    r = np.concatenate([g.ravel() for g in ref.values()])
    lo = np.concatenate([low[n].ravel() for n in ref])
    return float(r @ lo / (np.linalg.norm(r) * np.linalg.norm(lo)))


def _real_pair(model: Any, batch: Any, loss_fn: Any, dtype: str, scale_log2: int) -> tuple[Any, Any, Any, float]:
    """Real fp32 and low autocast gradients (same RNG draws) and fp32's per-unit and model norms."""
    rng = torch.get_rng_state()
    ref = real_gradients(model, batch, loss_fn, None, "autocast", 0, rng)
    low = real_gradients(model, batch, loss_fn, dtype, "autocast", scale_log2, rng)
    norms, model_norm = _unit_norms(ref)
    return ref, low, norms, model_norm


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_gradient_that_carries_nothing_is_not_a_divergence(dtype: str) -> None:
    """`shift`'s gradient is ~1e-8 of the model's and lost to rounding in a real
    `torch.autocast("cpu")` run (cosine with fp32's far below 0.9) while the model's gradient
    keeps its direction: its error weighs nothing in the model's gradient
    (`grad_error_share_min`), and no flush explains it, so no GRAD_DIVERGENCE."""
    model, x, loss_fn = _shifted_case()
    report, real = compare(model, x, loss_fn, dtype, "autocast")
    assert report.grad_fidelity is not None
    ref, low, norms, model_norm = _real_pair(model, x, loss_fn, dtype, report.grad_fidelity.scale_log2)
    th = report.thresholds
    # The real run: shift's direction is lost, its share tiny, the model's direction kept.
    rel, cosine = real["shift"]
    assert cosine is None or cosine < th.grad_cosine_min
    assert rel * norms["shift"] / model_norm < th.grad_error_share_min / 10
    assert _model_cosine(ref, low) > 0.9999
    # The report sees the same: shift over the per-unit thresholds, at that share.
    shift = report.by_module()["shift"].backward.grad_fidelity
    assert shift is not None and shift.rel_l2_error > th.grad_rel_error
    assert shift.fp32_l2_norm / report.grad_fidelity.fp32_l2_norm == pytest.approx(
        norms["shift"] / model_norm, rel=1e-2
    )
    assert report.grad_fidelity.cosine is not None and report.grad_fidelity.cosine > 0.9999
    assert not [f for f in report.flags() if f.flag is pd.Flag.GRAD_DIVERGENCE]
    assert report  # safe to train

    # The threshold is what spares it: at 0 the same residue is a finding.
    strict = pd.analyze(
        model, x, loss_fn, dtype=dtype, policy="cpu", thresholds=pd.Thresholds(grad_error_share_min=0.0)
    )
    assert {f.unit for f in strict.flags() if f.flag is pd.Flag.GRAD_DIVERGENCE} == {"shift"}


def test_the_same_gradient_carrying_the_models_share_is_a_divergence() -> None:
    """Control: with `score` and `head` frozen, `shift`'s residue is the model's whole
    gradient (share 1 by hand), and its direction lost in a real autocast run is the model's:
    GRAD_DIVERGENCE, an error, with the error's share in the evidence."""
    model, x, loss_fn = _shifted_case()
    for p in (*model.score.parameters(), *model.head.parameters()):  # type: ignore[union-attr]
        p.requires_grad_(False)
    report, real = compare(model, x, loss_fn, "fp16", "autocast")
    assert report.grad_fidelity is not None
    rng = torch.get_rng_state()
    ref = real_gradients(model, x, loss_fn, None, "autocast", 0, rng)
    low = real_gradients(model, x, loss_fn, "fp16", "autocast", report.grad_fidelity.scale_log2, rng)
    norms, model_norm = _unit_norms(ref)
    assert set(norms) == {"shift"} and norms["shift"] == model_norm
    rel, cosine = real["shift"]
    th = report.thresholds
    assert rel > th.grad_rel_error and (cosine is None or cosine < th.grad_cosine_min) and _model_cosine(ref, low) < 0.9
    [flag] = [f for f in report.flags() if f.flag is pd.Flag.GRAD_DIVERGENCE]
    assert (flag.unit, flag.severity) == ("shift", pd.Severity.ERROR)
    assert flag.evidence.values["error_norm_share"] == pytest.approx(flag.evidence.values["rel_l2_error"], rel=1e-6)
    assert not report


def test_fp32_norm_is_fp32s_own_where_every_low_gradient_overflows() -> None:
    """Pure fp16: `big.weight`'s gradient (~1e5 per entry) is Inf everywhere in a real
    `model.half()` run. The fp32 gradient norms the report gives - the parameter's, its
    unit's and the model's - are still fp32's own, as `torch.linalg.vector_norm` of a real
    fp32 run's gradients gives them."""

    class Overflowing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big = nn.Linear(4, 1)
            self.other = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.big(x) + self.other(x / 100)

    torch.manual_seed(0)
    model = Overflowing()
    x = 100 + torch.randn(16, 4, generator=torch.Generator().manual_seed(3))

    def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return 1000 * out.float().mean()  # d loss / d big.weight = 1000 * mean(x) ~ 1e5 > 65504

    rng = torch.get_rng_state()
    report = pd.analyze(model, x, loss_fn, dtype="fp16", regime="pure")
    assert report.grad_fidelity is not None and report.grad_fidelity.scale_log2 == 0
    low = real_gradients(model, x, loss_fn, "fp16", "pure", 0, rng)
    assert np.isinf(low["big.weight"]).all() and np.isfinite(low["big.bias"]).all()

    m = copy.deepcopy(model)
    loss_fn(m(x), x).backward()
    norm = {n: float(torch.linalg.vector_norm(p.grad.double())) for n, p in m.named_parameters() if p.grad is not None}
    units = report.by_module()
    big = units["big"].backward
    assert big.param_grad_fidelity["big.weight"].fp32_l2_norm == pytest.approx(norm["big.weight"], rel=1e-6)
    assert big.param_grad_fidelity["big.weight"].nonfinite_count == 4
    assert big.grad_fidelity is not None
    assert big.grad_fidelity.fp32_l2_norm == pytest.approx(math.hypot(norm["big.weight"], norm["big.bias"]), rel=1e-6)
    assert (big.grad_fidelity.rel_l2_error, big.grad_fidelity.cosine) == (math.inf, None)
    assert report.grad_fidelity.fp32_l2_norm == pytest.approx(math.sqrt(sum(v * v for v in norm.values())), rel=1e-6)
    assert report.grad_fidelity.nonfinite_count == 4


def _tiny_clip() -> tuple[nn.Module, dict[str, Any]]:
    """A stock CLIPModel from a tiny config, random weights, its contrastive loss. The text
    tower pools its first token (no token is the config's EOS id), which the causal mask
    lets attend only to itself: the text query/key projections' gradients are 0 in exact
    arithmetic, and what fp32's SDPA backward leaves there is residue."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()  # the default EOS/BOS ids lie outside the tiny vocabulary
    text = transformers.CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    ).train()
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, 99, (4, 8), generator=g),
        "pixel_values": torch.randn(4, 3, 16, 16, generator=g),
        "return_loss": True,
    }
    return model, batch


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_stock_clip_query_key_residue_is_not_a_divergence(dtype: str) -> None:
    """Issue 23's stock case: CLIP's text q_proj/k_proj lose their direction in a real
    `torch.autocast("cpu")` run, but weigh ~1e-8 of the model's gradient, whose own direction
    holds: no GRAD_DIVERGENCE, safe to train."""
    model, batch = _tiny_clip()
    report, real = compare(model, batch, None, dtype, "autocast")
    assert report.grad_fidelity is not None
    ref, low, norms, model_norm = _real_pair(model, batch, None, dtype, report.grad_fidelity.scale_log2)
    qk = [u for u in norms if u.startswith("text_model.") and u.endswith(("q_proj", "k_proj"))]
    assert len(qk) == 4
    if not any(norms[u] for u in qk):
        pytest.skip("this CPU's SDPA backward leaves no residue: nothing to weigh")
    th = report.thresholds
    assert all(norms[u] / model_norm < th.grad_error_share_min / 10 for u in qk)
    assert any(real[u][1] is None or real[u][1] < th.grad_cosine_min for u in qk)  # lost in the real run
    assert _model_cosine(ref, low) > 0.999
    units = report.by_module()
    assert any(  # ...and in the report: the old per-unit rule would flag them
        (f := units[u].backward.grad_fidelity) is not None and f.rel_l2_error > th.grad_rel_error for u in qk
    )
    assert not [f for f in report.flags() if f.flag is pd.Flag.GRAD_DIVERGENCE]
    assert report


def test_compared_fp32_gradients_leave_when_dropped_and_the_sums_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    """`GradComparer(drop_compared=True)`: each fp32 gradient leaves the dict once compared
    (every name of a tied one) and is freed, the heap trimmed each time enough has gone; the
    fidelity is that of a comparer that keeps them, and a gradient the low run never gave is
    still compared with zeros."""
    trims: list[int] = []
    monkeypatch.setattr(gradients, "return_free_heap", lambda: trims.append(1))
    monkeypatch.setattr(gradients, "TRIM_AFTER_BYTES", 4096 * 4)  # the tied gradient's bytes
    g = torch.Generator().manual_seed(3)
    tied = torch.randn(4096, generator=g)
    fp32 = {"a": torch.randn(5000, generator=g), "emb": tied, "head": tied, "lost": torch.randn(70, generator=g)}
    low = {n: t.to(torch.float16).float() for n, t in fp32.items() if n != "lost"}
    report = pd.analyze(*_mlp_args())
    copy_of_tied = tied.clone()
    kept = GradComparer({"a": fp32["a"].clone(), "emb": copy_of_tied, "head": copy_of_tied, "lost": fp32["lost"]})
    dropping_dict = dict(fp32)
    dropping = GradComparer(dropping_dict, drop_compared=True)
    for comparer in (kept, dropping):
        comparer.add(["a"], low["a"])
        comparer.add(["emb", "head"], low["emb"])
    assert set(dropping_dict) == {"lost"}
    assert len(trims) == 2  # after "a" (5000 values), after the tied one (4096)
    alive = weakref.ref(fp32.pop("a"))
    a, b = kept.with_fidelity(report, 0), dropping.with_fidelity(report, 0)
    gc.collect()
    assert alive() is None  # the comparer, still alive, holds no compared gradient
    assert a.grad_fidelity == b.grad_fidelity and a.grad_fidelity is not None
    assert a.grad_fidelity.numel == 5000 + 4096 + 70


def _mlp_args() -> tuple[Any, ...]:
    case = build("mlp")
    return case.model, case.batch, case.loss_fn


@pytest.mark.parametrize("stepped", [False, True], ids=["no-step", "optimizer-step"])
def test_the_fp32_gradients_go_during_the_low_backward_unless_a_step_reads_them(
    stepped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an optimizer step nothing reads an fp32 gradient after its comparison: by the
    end of the low backward none is left (the analysis' peak on GPT-2 was them, all held
    through it); the optimizer step reads them, so they stay for it."""
    seen: list[dict[str, torch.Tensor]] = []
    real = jobs.SingleProcess.gradient_fidelity

    def spy(self: jobs.SingleProcess, low: jobs.LowGradients) -> pd.Report:
        seen.append(low.grads)
        compared: list[str] = []

        def low_backward(sink: Callable[[list[str], torch.Tensor], None]) -> None:
            def arrived(names: list[str], g: torch.Tensor) -> None:
                # the ones compared before this one are gone already, not at the end
                assert not set(compared) & set(low.grads) or stepped
                sink(names, g)
                compared.extend(names)

            low.low_backward(arrived)

        out = real(self, dataclasses.replace(low, low_backward=low_backward))
        assert len(compared) > 1
        assert stepped or all(p.grad is None for p in low.model.parameters())  # the model lets go of them too
        return out

    monkeypatch.setattr(jobs.SingleProcess, "gradient_fidelity", spy)
    case = build("gpt2")
    before = snapshot(case.model)
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp16", lr=1e-3 if stepped else None)
    assert_restored(case.model, before)
    [grads] = seen
    assert (len(grads) > 0) == stepped
    assert report.grad_fidelity is not None and report.grad_fidelity.numel == sum(
        p.numel() for p in {id(p): p for p in case.model.parameters()}.values()
    )

"""The outputs users act on - the recommended loss scale, the culprit the verdict names, the
pre-flight of a plan - held to real execution on the small models issue 23 built them from.

The reference is always computed here: real `torch.autocast("cpu")` runs with real CPU fp16
and bf16 kernels, the backward outside the autocast region as PyTorch prescribes, gradients
read from `.grad` (fp32 under autocast) after the loss is scaled by a power of two as
`GradScaler.scale` scales it. The analyses run with `policy="cpu"`, the op lists those real
runs execute.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import precision_doctor as pd
from precision_doctor.analysis.loss_scale import DEFAULT_SCALE_LOG2
from precision_doctor.capture.emulation import unit_overrides
from precision_doctor.capture.lowrun import low_precision, low_precision_backward
from precision_doctor.options import Flag, Severity
from precision_doctor.views import figures
from tests.fixtures import Case, build, build_amplifier, build_deep_se, build_one_token_lm

# Numbers compared with an independent reference: CI runs these again at one thread (.ci/run).
pytestmark = pytest.mark.numerics


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def _loss(case: Case, model: torch.nn.Module) -> torch.Tensor:
    out = _call(model, case.batch)
    return case.loss_fn(out, case.batch) if case.loss_fn is not None else out.loss


def real_grads_finite(case: Case, scale_log2: int) -> bool:
    """Whether a real fp16 autocast step (CPU kernels) at loss scale 2^k leaves every
    parameter gradient finite: what GradScaler's `unscale_` checks before it steps."""
    model = copy.deepcopy(case.model)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = _loss(case, model)
    (loss.float() * 2.0**scale_log2).backward()
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def largest_finite_scale(case: Case) -> int:
    """GradScaler's settled scale, by real execution: the largest k <= 16 whose step is finite."""
    k = DEFAULT_SCALE_LOG2
    while not real_grads_finite(case, k):
        k -= 1
    return k


@pytest.mark.parametrize("build", [build_one_token_lm, build_amplifier], ids=["one_token_lm", "amplifier_3e4"])
def test_weight_gradients_held_in_fp16_set_the_loss_scale(build: Callable[[], Case]) -> None:
    """Under autocast a Linear's weight is cast to fp16 per op, so its gradient is first held
    in fp16 (the gradient of the fp16 copy): it counts for the loss scale and GRAD_OVERFLOW."""
    case = build()
    report = pd.analyze(case.model, case.batch, loss_fn=case.loss_fn, dtype="fp16", policy="cpu")
    advice = pd.recommend_loss_scale(report)
    k_fit = largest_finite_scale(case)
    assert k_fit < DEFAULT_SCALE_LOG2  # the case is what it claims: 2^16 overflows for real
    # The recommendation keeps every gradient finite in the real run, and GradScaler's
    # back-off from 2^16 is the real one.
    assert advice.recommended_scale_log2 <= k_fit and real_grads_finite(case, advice.recommended_scale_log2)
    assert advice.skipped_steps_from_default == DEFAULT_SCALE_LOG2 - k_fit
    # The weight whose fp16 gradient overflows is named, a warning with the real back-off.
    overflow = [f for f in report.flags() if f.flag == Flag.GRAD_OVERFLOW]
    assert overflow and all(f.severity == Severity.WARNING for f in overflow)
    worst = max(overflow, key=lambda f: f.evidence.values["backoff_steps"])
    assert worst.evidence.values["backoff_steps"] == DEFAULT_SCALE_LOG2 - k_fit
    fp32_model = copy.deepcopy(case.model)
    _loss(case, fp32_model).backward()
    largest = max(fp32_model.named_parameters(), key=lambda np_: float(np_[1].grad.abs().max()))
    assert worst.evidence.op is not None and largest[0] in worst.evidence.op
    # The gradient-fidelity backward runs at the recommended scale: finite, no divergence.
    assert report.grad_fidelity is not None and report.grad_fidelity.nonfinite_count == 0
    assert not [f for f in report.flags() if f.flag == Flag.GRAD_DIVERGENCE and f.severity == Severity.ERROR]


@pytest.mark.parametrize("name", ["bert", "llama"], ids=str)
def test_stock_models_recommended_scale_keeps_real_gradients_finite(name: str) -> None:
    """Stock transformers MLM and causal LM heads: the recommendation is one at which real
    autocast fp16 keeps every gradient finite, and the back-off it predicts from 2^16 is the
    real one."""
    pytest.importorskip("transformers")
    case = build(name)
    report = pd.analyze(case.model, case.batch, loss_fn=case.loss_fn, dtype="fp16", policy="cpu")
    advice = pd.recommend_loss_scale(report)
    assert real_grads_finite(case, advice.recommended_scale_log2)
    assert advice.skipped_steps_from_default == DEFAULT_SCALE_LOG2 - largest_finite_scale(case)


def first_nonfinite_module(case: Case) -> str:
    """The first module, in execution order, whose output a real fp16 autocast forward makes
    non-finite from finite inputs."""
    model = copy.deepcopy(case.model)
    found: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def check(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            ins_finite = all(bool(torch.isfinite(a).all()) for a in args if isinstance(a, torch.Tensor))
            if ins_finite and not bool(torch.isfinite(out).all()):
                found.append(name)

        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    with torch.autocast("cpu", dtype=torch.float16):
        _call(model, case.batch)
    for h in handles:
        h.remove()
    return found[0]


def test_the_verdict_names_the_unit_that_overflows_not_the_root() -> None:
    """The root holds a functional relu and returns the head's output: it made no Inf. The
    culprit is the first unit whose own output turns non-finite from finite inputs."""
    case = build_amplifier(gain=2e5)
    report = pd.analyze(case.model, case.batch, loss_fn=case.loss_fn, dtype="fp16", policy="cpu")
    culprit = first_nonfinite_module(case)
    assert culprit == "amplifier"
    assert report.error_growth()[0][0] == culprit
    assert f"grows most in {culprit}" in report.verdict and "<root>" not in report.verdict
    takeoff = figures.takeoff_unit(report)
    assert takeoff is not None and takeoff.name == culprit
    # The root returns the head's output: its Inf is read there, not made (and what the root's
    # own relu hands on to `amplifier` carries `inp`'s error).
    root, amplifier = report.by_module()["<root>"], report.by_module()["amplifier"]
    assert root.forward.input_rel_l2_error == math.inf and not root.flags
    inp = report.by_module()["inp"].forward.propagated
    assert inp is not None and amplifier.forward.input_rel_l2_error == pytest.approx(inp.rel_l2_error)


def test_an_all_fp32_plan_steps_as_fp32_does() -> None:
    """A plan that keeps every unit fp32, applied inside the low-precision context, trains as
    fp32: the backward runs outside autocast (`low_precision_backward`), so the region does
    not cast an fp32 unit's weight-gradient matmul to fp16 (squash's reads activations ~1e5)."""
    case = build_amplifier(gain=2e5)
    assert case.loss_fn is not None
    ref = copy.deepcopy(case.model)
    case.loss_fn(ref(case.batch), case.batch).backward()
    model = copy.deepcopy(case.model)
    units = {name or "<root>": False for name, _ in model.named_modules()}
    with unit_overrides(model, units, torch.float16):
        with low_precision(model, torch.float16, regime="autocast", policy="cuda"):
            loss = case.loss_fn(model(case.batch), case.batch)
        with low_precision_backward(model, torch.float16):
            loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_the_planned_run_of_an_overflowing_model_has_finite_steps() -> None:
    """The pre-flight's planned run (the plan's units fp32 where the analysis says so) takes
    every step: with lr 0 every step is step 0, which the plain fp16 run cannot take."""
    case = build_amplifier(gain=2e5)
    result = pd.preflight(
        case.model,
        case.batch,
        case.loss_fn,
        steps=3,
        build_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0),
    )
    planned, low = result.runs["planned"], result.runs["low"]
    assert low.nonfinite_steps  # the plain fp16 run overflows at every step
    assert not planned.nonfinite_steps and not planned.skipped_steps


def test_no_growth_is_read_from_a_parents_functional_op() -> None:
    """SE's convs read the mean its own forward computes: what they read carries the error of
    the 32 bf16 blocks before it, so their propagated error is no growth from 0."""
    case = build_deep_se()
    report = pd.analyze(case.model, case.batch, loss_fn=case.loss_fn, dtype="bf16", policy="cpu")
    assert not [f for f in report.flags() if f.flag == Flag.ERROR_GROWTH]
    blocks_out = report.by_module()["blocks.31.act"].forward.propagated
    assert blocks_out is not None
    reduce = report.by_module()["se.reduce"]
    assert reduce.forward.input_rel_l2_error == pytest.approx(blocks_out.rel_l2_error)
    # Real bf16 autocast: the SE's convs do not grow the error they read.
    errors = real_module_errors(case, torch.bfloat16, ("blocks", "se.reduce"))
    assert errors["se.reduce"] < 8 * errors["blocks"]


def real_module_errors(case: Case, dtype: torch.dtype, names: tuple[str, ...]) -> dict[str, float]:
    """Relative L2 error of the named modules' outputs: a real autocast run against fp32."""
    outs: dict[bool, dict[str, torch.Tensor]] = {False: {}, True: {}}
    for low in (False, True):
        model = copy.deepcopy(case.model)
        mods = dict(model.named_modules())
        handles = [
            mods[n].register_forward_hook(lambda m, a, o, n=n, low=low: outs[low].__setitem__(n, o.detach().float()))
            for n in names
        ]
        with torch.autocast("cpu", dtype=dtype, enabled=low):
            _call(model, case.batch)
        for h in handles:
            h.remove()
    return {
        n: float(torch.linalg.vector_norm(outs[True][n] - outs[False][n]) / torch.linalg.vector_norm(outs[False][n]))
        for n in names
    }

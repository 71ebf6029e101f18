"""Each sample model's planted fault is flagged with the right flag, and nothing else is."""

from __future__ import annotations

from pathlib import Path

import pytest

import precision_doctor as pd
from precision_doctor.model.spec import load_model_file

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"

# model file -> {unit: flag} expected under fp16 in every regime; every other unit must carry
# no flag. Regime-specific expectations (as each sample's docstring says) in BY_REGIME.
EXPECTED: dict[str, dict[str, pd.Flag]] = {
    "tiny_transformer": {},
    "control_flow": {},
    "ffn_overflow": {"block.ff.wi": pd.Flag.OVERFLOW},
    "attention_unscaled": {"attn": pd.Flag.OVERFLOW},
    "reduction_overflow": {"norm": pd.Flag.OVERFLOW},
    "deep_narrow_underflow": {f"layers.{i}": pd.Flag.GRAD_UNDERFLOW for i in range(6)},
    "rmsnorm_upcast": {},
    "rmsnorm_no_upcast": {"norm": pd.Flag.OVERFLOW},
    "pure_only_overflow": {},
    "skip_one_step": {"head": pd.Flag.GRAD_OVERFLOW},
    "tiny_loss_gradients": {u: pd.Flag.GRAD_UNDERFLOW for u in ("fc1", "act", "fc2")},
    "lost_update": {},
    "masked_softmax": {},
    "sentinel_fill": {},
    "unscaled_gradients": {},
    "bf16_finetune_stall": {},  # its findings need the optimizer step: tests/test_optimizer_step.py
}
# Samples whose findings are warnings (GradScaler absorbs them) and whose loss error is within
# tolerance: "Safe to train ... with warnings". Others with findings are not safe.
SAFE_WITH_WARNINGS: set[tuple[str, str]] = {
    ("skip_one_step", "autocast-cuda"),
    ("skip_one_step", "autocast-cpu"),
    ("skip_one_step", "pure"),
    ("tiny_loss_gradients", "autocast-cuda"),
}
# (regime, policy) as the CLI's --regime/--policy take them.
REGIMES = {"autocast-cuda": ("autocast", "cuda"), "autocast-cpu": ("autocast", "cpu"), "pure": ("pure", "cuda")}
BY_REGIME: dict[tuple[str, str], dict[str, pd.Flag]] = {
    # CUDA's autocast runs pow and sum in fp32: the squares are never summed in fp16 there.
    ("reduction_overflow", "autocast-cuda"): {},
    # Under autocast the residual stream stays fp32; after model.half() it does not.
    ("pure_only_overflow", "pure"): {"blocks.2": pd.Flag.OVERFLOW},
    # Pure fp16 holds u + 512 in steps of 0.5: the update is partly lost inside `step`, and
    # with it a third of the gain's gradient.
    ("lost_update", "pure"): {"step": pd.Flag.ERROR_GROWTH, "<root>": pd.Flag.GRAD_DIVERGENCE},
    # Pure fp16 trains without a loss scaler: embed's ~1e-9 gradients flush at 2^0.
    ("unscaled_gradients", "pure"): {"embed": pd.Flag.GRAD_DIVERGENCE},
}


def _analyze(name: str, dtype: str = "fp16", regime: str = "autocast-cuda") -> pd.Report:
    spec = load_model_file(SAMPLES / f"{name}.py")
    run_regime, policy = REGIMES[regime]
    return pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype=dtype, name=name, regime=run_regime, policy=policy)


@pytest.mark.parametrize("regime", sorted(REGIMES), ids=str)
@pytest.mark.parametrize("name", sorted(EXPECTED), ids=str)
def test_planted_faults_flagged_and_healthy_units_clean(name: str, regime: str) -> None:
    report = _analyze(name, regime=regime)
    assert report.environment.regime.value == REGIMES[regime][0]
    expected = BY_REGIME.get((name, regime), EXPECTED[name])
    units = report.by_module()
    for unit, flag in expected.items():
        assert flag in {f.flag for f in units[unit].flags}, (unit, units[unit].flags)
    planted_region = set(expected)
    if name == "deep_narrow_underflow":
        # The first layers are planted; the vanishing gradient fades out somewhere in the middle
        # (at GradScaler's scales; pure fp16 has none, and at 2^0 every layer's gradients flush).
        planted_region |= {f"layers.{i}" for i in range(16) if i < 12 or regime == "pure"}
    stray = {u.name: [f.flag for f in u.flags] for u in report.units if u.flags and u.name not in planted_region}
    assert not stray, stray
    if (name, regime) in SAFE_WITH_WARNINGS:
        assert report and {f.severity for f in report.flags()} == {pd.Severity.WARNING}, report.verdict
    else:
        assert bool(report) == (not expected), report.verdict


def test_samples_the_verdict_issue_names() -> None:
    """skip_one_step: one GradScaler back-off, a warning; tiny_loss_gradients: a larger scale
    keeps the gradients (a warning naming it); lost_update in pure bf16: the sub named."""
    flag = _analyze("skip_one_step").by_module()["head"].flags[0]
    assert flag.severity is pd.Severity.WARNING and flag.evidence.values["backoff_steps"] == 1
    for f in _analyze("tiny_loss_gradients").flags():
        assert f.severity is pd.Severity.WARNING and f.evidence.values["fixing_scale_log2"] > 24
    lost = _analyze("lost_update", "bf16", "pure").by_module()["step"].flags
    assert [(f.flag, f.severity, f.evidence.op) for f in lost] == [
        (pd.Flag.ERROR_GROWTH, pd.Severity.ERROR, "sub.Tensor")
    ]


@pytest.mark.parametrize("regime", sorted(REGIMES), ids=str)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize(("name", "unit"), [("masked_softmax", "attn"), ("sentinel_fill", "wkv")], ids=str)
def test_masks_and_sentinels_are_no_finding(name: str, unit: str, dtype: str, regime: str) -> None:
    """Swin's -100 mask and RWKV's -1e38 sentinel, recognised from the dataflow: no finding and
    "Safe to train" without warnings in every regime and dtype, as their docstrings say, with
    the mask values counted apart (the masked probabilities; the sentinel, beyond fp16)."""
    report = _analyze(name, dtype, regime)
    assert not report.flags(), report.flags()
    # (The pure regime's verdict adds that no optimizer step was checked: none was given.)
    assert bool(report) and "Safe to train in this dtype" in report.verdict, report.verdict
    assert "warning" not in report.verdict
    stats = report.by_module()[unit].forward.stats
    assert stats is not None and stats.masked_count > 0
    assert stats.fp16.underflow_count == stats.fp16.overflow_count == 0


def test_deep_narrow_last_layers_keep_their_gradients() -> None:
    units = _analyze("deep_narrow_underflow").by_module()
    for name in ("layers.15", "head"):
        assert not units[name].flags
    lost_early = units["layers.0"].flags[0].evidence.values["norm_fraction_lost"]
    assert lost_early > 0.99


def test_overflow_evidence_names_the_op_and_counts() -> None:
    report = _analyze("reduction_overflow", regime="pure")
    flag = report.by_module()["norm"].flags[0]
    assert flag.evidence.op is not None and flag.evidence.op.startswith("sum")
    # 8 rows, each a sum of 1024 squares of ~30: all 8 sums exceed 65504.
    assert flag.evidence.values["overflow_count"] == 8
    assert flag.evidence.values["max_abs"] > 65504


def test_downstream_of_overflow_is_not_blamed_but_shows_propagated_damage() -> None:
    report = _analyze("ffn_overflow")
    wo = report.by_module()["block.ff.wo"]
    assert not wo.flags
    assert wo.forward.propagated is not None and wo.forward.propagated.nonfinite_count > 0
    assert report.losses.low != report.losses.low or report.losses.rel_error == float("inf")


@pytest.mark.parametrize("regime", sorted(REGIMES), ids=str)
@pytest.mark.parametrize(
    "name",
    ["ffn_overflow", "attention_unscaled", "reduction_overflow", "rmsnorm_no_upcast", "pure_only_overflow"],
    ids=str,
)
def test_bf16_range_holds_where_fp16_overflows(name: str, regime: str) -> None:
    report = _analyze(name, "bf16", regime)
    assert not any(f.flag is pd.Flag.OVERFLOW for f in report.flags())


@pytest.mark.parametrize("regime", sorted(REGIMES), ids=str)
def test_upcast_rmsnorm_is_healthy_in_bf16_too(regime: str) -> None:
    assert not _analyze("rmsnorm_upcast", "bf16", regime).flags()


def test_control_flow_model_uses_dispatch_path() -> None:
    report = _analyze("control_flow")
    assert report.environment.capture_path is pd.CapturePath.DISPATCH
    assert not report.environment.fx_traceable and report.environment.fx_error


def test_parameter_beyond_fp16_max_is_charged_to_its_unit() -> None:
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    with torch.no_grad():
        net[0].weight.fill_(7e4)  # > 65504: the weight itself cannot be held in fp16
    report = pd.analyze(net, torch.randn(8, 4), loss_fn=lambda o, b: o.pow(2).mean())
    assert pd.Flag.OVERFLOW in {f.flag for f in report.by_module()["0"].flags}
    assert not report.by_module()["1"].flags

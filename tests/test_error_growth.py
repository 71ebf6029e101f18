"""Error growth inside a unit: an op whose output error is far above its inputs' (a small
update lost against a large value, then the large value taken away again) is charged to its
unit with the op named, even when the unit's own output error is small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import precision_doctor as pd
from precision_doctor.model.spec import load_model_file
from precision_doctor.options import Flag
from tests.fixtures import UnscaledAttention

LOST_UPDATE = Path(__file__).resolve().parents[1] / "sample_models" / "lost_update.py"


def _analyze(regime: str) -> tuple[pd.Report, torch.Tensor]:
    """sample_models/lost_update.py, `base + ((u + 512) - 512)`, in bf16: held in bf16, u + 512
    moves in steps of 4, so the update u (~0.1) is lost inside `step` while its output (~100)
    carries only a small error. Returns the report and u."""
    spec = load_model_file(LOST_UPDATE)
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="bf16", regime=regime)
    return report, spec.batch[1]


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).bfloat16().double().numpy()


def test_lost_update_is_charged_to_its_unit_with_the_op() -> None:
    """Pure bf16: the sub's local error is that of numpy's bf16 casts, its unit is charged
    with the op named though the unit's output error is small, and the verdict agrees."""
    report, u = _analyze("pure")
    unit = report.by_module()["step"]
    growth = [f for f in unit.flags if f.flag is Flag.ERROR_GROWTH]
    assert growth, unit.flags
    assert growth[0].evidence.op == "sub.Tensor"
    un = u.double().numpy()
    lost = _bf16(_bf16(_bf16(un) + 512.0) - 512.0)
    expected = float(np.linalg.norm(lost - un) / np.linalg.norm(un))
    assert expected > 0.5
    assert growth[0].evidence.values["rel_l2_error"] == pytest.approx(expected, rel=1e-3)
    prop = unit.forward.propagated
    assert prop is not None and prop.rel_l2_error < 0.05 < growth[0].evidence.values["rel_l2_error"]
    assert not report


def test_lost_update_under_autocast_is_no_finding() -> None:
    """Under autocast the adds of fp32 values stay fp32 (no autocast op touches them): the
    real run loses nothing, and the analysis says so."""
    report, _ = _analyze("autocast")
    assert report.losses.rel_error == 0.0
    assert not report.flags() and report


def test_matmul_accumulation_is_no_growth() -> None:
    """A healthy Linear in bf16: its output error is a few roundings of its inputs', not growth."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    report = pd.analyze(net, torch.randn(32, 64), lambda o, b: o.pow(2).mean(), dtype="bf16", regime="pure")
    assert not any(f.flag is Flag.ERROR_GROWTH for f in report.flags()), report.flags()


class _AttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = UnscaledAttention()
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.attn(x))


def test_a_parents_own_overflow_is_charged_to_it_not_to_the_child_that_reads_it() -> None:
    """The verdict named the output projection as where the error grows (Inf/NaN): it read
    the parent's Inf/NaN, measured as its producer's (finite) inputs' error, because values no
    module returns have no propagated error of their own. The parent made them."""
    torch.manual_seed(0)
    model = _AttentionModel()
    x = torch.randn(2, 16, 32) * 300
    # Independent check with real fp16 autocast: the projection's input is already non-finite.
    seen: list[torch.Tensor] = []
    hook = model.attn.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.autocast("cpu", dtype=torch.float16):
        model(x)
    hook.remove()
    assert not torch.isfinite(seen[0]).all()  # the precondition
    report = pd.analyze(model, x, lambda out, b: out.float().square().mean())
    units = report.by_module()
    assert units["attn.proj"].forward.input_rel_l2_error == float("inf")  # inherited damage
    worst = report.error_growth()
    assert worst and worst[0] == ("attn", float("inf")), worst
    assert "attn.proj" not in dict(worst)
    assert "grows most in attn (Inf/NaN)" in report.verdict, report.verdict

"""ScalerMonitor: a GradScaler pass-through that records scale history and skipped steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import precision_doctor as pd
from precision_doctor import ScalerMonitor
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import PreflightPrediction


def _step(mon: ScalerMonitor, net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    mon.scale(net(x).pow(2).mean()).backward()
    mon.step(opt)
    mon.update()


def test_records_skipped_steps_and_scale_history(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = ScalerMonitor(torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2))
    good = torch.randn(4, 3)
    bad = torch.tensor([[float("inf"), 0.0, 0.0]])
    before = net.weight.detach().clone()
    for x in (bad, bad, good, good, good):
        _step(mon, net, opt, x)
    assert mon.skipped_steps == [0, 1]
    assert mon.step_count == 5
    # halved twice, then doubled after 2 clean steps
    assert mon.scale_history == [[0, 65536.0], [1, 32768.0], [2, 16384.0], [4, 32768.0]]
    assert mon.scale_at(3) == 16384.0 and mon.scale_at(10) == 32768.0
    assert not torch.equal(before, net.weight)  # the clean steps did step
    assert mon.get_scale() == 32768.0  # forwarded to the scaler

    path = mon.save(tmp_path / "run" / "scaler.json")
    doc = json.loads(path.read_text())
    assert doc["skipped_steps"] == [0, 1] and doc["steps"] == 5 and doc["init_scale"] == 65536.0
    assert ScalerMonitor.load(path).scale_history[-1] == (4, 32768.0)
    assert not list(path.parent.glob("*.tmp"))  # atomic: no temp file left


def test_autosave_and_prediction(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    path = tmp_path / "m.json"
    prediction = PreflightPrediction(
        go=True,
        dtype=pd.LowDtype.FP16,
        judge="low",
        steps=2,
        init_scale_log2=16,
        skipped_steps=[],
        nonfinite_steps=[],
        max_divergence=0.0,
        reasons=[],
        recommended_scale_log2=None,
    )
    mon = ScalerMonitor(torch.amp.GradScaler("cpu"), path=path, save_every=2, prediction=prediction)
    _step(mon, net, opt, torch.randn(2, 2))
    assert not path.exists()
    _step(mon, net, opt, torch.randn(2, 2))
    doc = ScalerMonitor.load(path)
    assert doc.steps == 2 and doc.prediction == prediction and doc.skipped_steps == []


def test_disabled_scaler_and_bad_input(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    mon = ScalerMonitor(torch.amp.GradScaler("cpu", enabled=False))
    _step(mon, net, opt, torch.randn(2, 2))
    assert mon.skipped_steps == [] and mon.to_dict()["enabled"] is False
    with pytest.raises(PrecisionDoctorError, match="GradScaler"):
        ScalerMonitor(object())  # type: ignore[arg-type]
    with pytest.raises(PrecisionDoctorError, match="needs a path"):
        mon.save()
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(PrecisionDoctorError, match="not a precision-doctor scaler monitor"):
        ScalerMonitor.load(tmp_path / "x.json")

"""The cost model: profiles, roofline unit costs, cast costs at dtype boundaries, autocast."""

from __future__ import annotations

import pytest

import precision_doctor as pd
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.options import Phase
from precision_doctor.planning.cost import (
    PROFILES,
    Target,
    autocast_assignment,
    build_cost_model,
    profile_for,
)
from precision_doctor.report import OpCost
from tests import fixtures


@pytest.fixture(scope="module")
def report() -> pd.Report:
    case = fixtures.build_mlp()
    return pd.analyze(case.model, case.batch, case.loss_fn)


def test_profiles_are_datasheet_figures() -> None:
    h100 = PROFILES[Target.H100]
    assert h100.peak_flops_per_s("fp16") == pytest.approx(989e12)
    assert h100.peak_flops_per_s("tf32") == pytest.approx(495e12)
    assert h100.bandwidth_bytes_per_s == pytest.approx(3.35e12)
    assert PROFILES[Target.A100].peak_flops_per_s("bf16") == pytest.approx(312e12)
    assert PROFILES[Target.RTX4090].peak_flops_per_s("fp32") == pytest.approx(82.6e12)
    with pytest.raises(PrecisionDoctorError, match="unknown target"):
        profile_for("tpu")


def test_unit_costs_and_casts(report: pd.Report) -> None:
    costs = build_cost_model(report, PROFILES[Target.H100])
    names = [u.name for u in costs.units]
    assert {"fc1", "act", "fc2"} <= set(names)
    fc1 = next(u for u in costs.units if u.name == "fc1")
    assert fc1.low_activation_bytes == fc1.fp32_activation_bytes // 2
    all32 = {n: False for n in names}
    all_low = {n: True for n in names}
    assert costs.step_time_s(all_low) < costs.step_time_s(all32)
    # An fp32 island inside a low region pays casts on both of its edges.
    island = {**all_low, "act": False}
    edge_casts = sum(e.cast_time_s for e in costs.edges if "act" in (e.src, e.dst))
    act = next(u for u in costs.units if u.name == "act")
    assert edge_casts > 0
    assert costs.step_time_s(island) == pytest.approx(
        costs.step_time_s(all_low) - act.low_time_s + act.fp32_time_s + edge_casts
    )
    assert costs.activation_bytes(all_low) < costs.activation_bytes(all32)


def test_autocast_baseline_follows_op_lists(report: pd.Report) -> None:
    low = autocast_assignment(report)
    assert low["fc1"] and low["fc2"]  # addmm: autocast's low list
    assert low["act"]  # relu runs in its (low) input's dtype
    assert not low["<loss>"]  # pow/mean loss: fp32


def test_cpu_profile_is_measured() -> None:
    cpu = profile_for("cpu")
    assert cpu.fp32_flops_per_s > 1e8 and cpu.bandwidth_bytes_per_s > 1e8


def test_op_costs_hold_each_op_flops_and_bytes(report: pd.Report) -> None:
    # fc1 is Linear(8, 16) on a 6x8 batch: addmm(bias, x, W^T) reads bias, x and W, writes y.
    fc1 = report.by_module()["fc1"]
    b, n_in, n_out = 6, 8, 16
    addmm = [c for c in fc1.op_costs if c.op.startswith("addmm") and c.phase == "forward"]
    assert len(addmm) == 1 and addmm[0].calls == 1
    assert addmm[0].flops == 2 * b * n_in * n_out
    assert addmm[0].bytes == 4 * (n_out + b * n_in + n_in * n_out + b * n_out)
    assert all(c.bytes == 0 for c in fc1.op_costs if c.op.startswith("t."))  # views move nothing
    assert any(c.phase == "backward" for c in fc1.op_costs)


def test_roofline_is_per_op_not_per_unit(report: pd.Report) -> None:
    profile = PROFILES[Target.A100]
    costs = build_cost_model(report, profile)
    bw, peak = profile.bandwidth_bytes_per_s, profile.peak_flops_per_s("fp32")
    for unit in report.units:
        expected = sum(c.calls * max(c.flops / peak, c.bytes / bw) for c in unit.op_costs)
        got = next(u for u in costs.units if u.name == unit.name).fp32_time_s
        assert got == pytest.approx(expected, rel=1e-12), unit.name
    # A unit mixing a compute-bound matmul with memory-bound elementwise ops costs the sum
    # of both rooflines, more than one roofline over its summed work would say.
    mixed = report.by_module()["fc1"].model_copy(
        update={
            "op_costs": [
                OpCost(op="mm", phase=Phase.FORWARD, flops=10**12, bytes=10**6, calls=1),
                OpCost(op="add.Tensor", phase=Phase.FORWARD, flops=10**6, bytes=10**10, calls=2),
            ]
        }
    )
    one = build_cost_model(report.model_copy(update={"units": [mixed], "edges": []}), profile).units[0]
    assert one.fp32_time_s == pytest.approx(10**12 / peak + 2 * 10**10 / bw)
    assert one.fp32_time_s > max((10**12 + 2 * 10**6) / peak, (10**6 + 2 * 10**10) / bw)
    # Low: half the bytes, the low dtype's peak, plus the weights' cast.
    plow = profile.peak_flops_per_s("fp16")
    assert one.low_time_s == pytest.approx(10**12 / plow + 2 * 10**10 / 2 / bw + 1.5 * mixed.param_bytes / bw)

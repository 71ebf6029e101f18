"""Measured unit costs (`--cost measured`): timing per unit and dtype, own time, model state."""

from __future__ import annotations

import torch
from torch import nn
from typer.testing import CliRunner

import precision_doctor as pd
from precision_doctor.cli import app
from precision_doctor.planning.cost import unit_roofline_s
from precision_doctor.planning.plan import plan_model
from precision_doctor.planning.timing import (
    _Call,
    measure_cost_model,
    record_module_calls,
    time_module_s,
)
from tests.test_model_state import assert_restored, prepare, snapshot, stateful_seq


class Block(nn.Module):
    """A unit with its own (cheap) ops around a child holding the expensive matmul."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu() + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # A block ~1000x the head's work, so a busy machine's noise cannot swap their order.
        self.small = nn.Linear(4, 768)
        self.block = Block(768)
        self.head = nn.Linear(768, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.small(x)))


def _loss(out: torch.Tensor, batch: object) -> torch.Tensor:
    return out.pow(2).mean()


def test_measured_units_scale_with_work_and_subtract_children() -> None:
    torch.manual_seed(0)
    # A wide gap in work (the least of 9 repeats), timed on one thread: with a core busy with
    # other work, every parallel region of a 2-thread pool waits for it (a 768x1 head took
    # 24 ms in each of 9 repeats), which must not close a 768x gap in arithmetic.
    net, x = Net(), torch.randn(1024, 4)
    report = pd.analyze(net, x, _loss, dtype="bf16")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        costs = measure_cost_model(net, x, report, repeats=9)
    finally:
        torch.set_num_threads(threads)
    by_name = {u.name: u for u in costs.units}
    # 2*1024*768*768 MACs fwd, twice that bwd, against a 768x1 head.
    assert by_name["block.fc"].fp32_time_s > 3 * by_name["head"].fp32_time_s
    # The block's own ops are elementwise: its own time excludes the child's matmul.
    assert by_name["block"].fp32_time_s < by_name["block.fc"].fp32_time_s
    assert all(u.fp32_time_s >= 0 and u.low_time_s >= 0 for u in costs.units)
    # The loss has no module: it keeps its per-op roofline on the measured profile.
    loss_unit = report.by_module()["<loss>"]
    bw = costs.profile.bandwidth_bytes_per_s
    assert by_name["<loss>"].fp32_time_s == unit_roofline_s(loss_unit, costs.profile.peak_flops_per_s("fp32"), bw)
    assert costs.profile.name == "measured cpu"


class AutocastProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        self.seen.append(y.dtype)
        return y


def test_low_timing_runs_under_autocast_and_fp32_without() -> None:
    probe, x = AutocastProbe(), torch.randn(3, 4)
    call = _Call((x,), {})
    time_module_s(probe, call, torch.device("cpu"), None, repeats=1)
    assert set(probe.seen) == {torch.float32}
    probe.seen.clear()
    time_module_s(probe, call, torch.device("cpu"), torch.bfloat16, repeats=1)
    assert set(probe.seen) == {torch.bfloat16}
    assert probe.fc.weight.grad is None  # autograd.grad: no .grad written


def test_recorded_calls_count_repeated_modules() -> None:
    act = nn.ReLU()
    net = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act)
    calls = record_module_calls(net, torch.randn(2, 3))
    assert calls["1"].calls == 2 and calls["0"].calls == 1 and calls["<root>"].calls == 1
    assert calls["0"].args[0].shape == (2, 3)
    assert not any(m._forward_pre_hooks for m in net.modules())


def test_measuring_leaves_the_model_as_it_was() -> None:
    model = stateful_seq(nn.ReLU())
    x = torch.randn(8, 6)
    report = pd.analyze(model, x, _loss)
    prepare(model)
    torch.manual_seed(3)
    before = snapshot(model)
    measure_cost_model(model, x, report, repeats=1)
    assert_restored(model, before)


def test_plan_with_measured_costs_names_them() -> None:
    torch.manual_seed(0)
    net, x = Net(), torch.randn(64, 4)
    report = pd.analyze(net, x, _loss, dtype="bf16")
    costs = measure_cost_model(net, x, report, repeats=1)
    plan = plan_model(net, x, _loss, report, target=costs.profile.name, costs=costs)
    assert plan.target == "measured cpu"
    all32 = {u: False for u in plan.units}
    assert plan.estimated_step_time_s.fp32 == costs.step_time_s(all32)
    assert plan.estimated_step_time_s.plan <= plan.estimated_step_time_s.fp32


def test_cli_measured_cost_excludes_target() -> None:
    res = CliRunner().invoke(
        app, ["analyze", "sample_models/tiny_transformer.py", "--cost", "measured", "--target", "a100"]
    )
    assert res.exit_code == 2
    assert "--cost measured" in res.output and "Traceback" not in res.output


def test_transformers_modules_with_a_growing_cache_replay_from_their_first_call() -> None:
    # GPT-2's attention appends to a Cache passed in its kwargs: each replay gets a copy of
    # the cache as the first call saw it, or the second replay's mask would not fit.
    from tests.fixtures import build

    case = build("gpt2")
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="bf16")
    before = snapshot(case.model)
    costs = measure_cost_model(case.model, case.batch, report, repeats=2)
    assert_restored(case.model, before)
    by_name = {u.name: u for u in costs.units}
    assert by_name["transformer.h.1.attn.c_attn"].fp32_time_s > 0
    assert by_name["transformer.h.1.attn"].low_time_s > 0

"""fp32 master weights for a pure-regime plan: `MasterWeights`, `apply_plan` of a pure plan, its
python export, and the training check that runs the plan's optimizer steps."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import precision_doctor as pd
from precision_doctor.extras import PlanBytes
from precision_doctor.model.spec import ModelSpec, load_model_file
from precision_doctor.options import ExportFormat, Regime
from precision_doctor.planning.cost import build_cost_model, profile_for
from precision_doctor.planning.export import export_caveats, render
from precision_doctor.planning.master import MasterWeights, hold_plan_weights
from precision_doctor.planning.plan import (
    PLAN_SCHEMA_VERSION,
    Plan,
    build_problem,
    error_contributions,
    hard_fp32_reasons,
    plan_model,
)
from precision_doctor.planning.pure import lost_update_units, pure_choices
from precision_doctor.planning.search import solve_exhaustive, solve_milp
from precision_doctor.planning.training_check import check_training

from .fixtures import plan_of

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest-even) and back, in numpy: the reference rounding."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_master_weights_accumulate_what_bf16_weights_round_away() -> None:
    """SGD on a bf16 parameter with a constant gradient: through `MasterWeights` the fp32 copy
    follows m - k*lr*g exactly (lr a power of two, g a bf16 value: each product is exact) and
    the low parameter is bf16(m); stepped in place the bf16 weight never moves."""
    rng = np.random.default_rng(0)
    w0 = (0.05 + 0.25 * rng.random((8, 8))).astype(np.float32) * rng.choice([-1, 1], (8, 8)).astype(np.float32)
    g = _bf16(rng.standard_normal((8, 8)).astype(np.float32))
    lr, steps = 2.0**-14, 40

    p = nn.Parameter(torch.from_numpy(w0.copy()))
    in_place = nn.Parameter(torch.from_numpy(w0.copy()).to(torch.bfloat16))
    masters = MasterWeights([p], torch.bfloat16)
    assert p.dtype == torch.bfloat16 and masters.master(p).dtype == torch.float32
    assert torch.equal(masters.master(p).detach(), torch.from_numpy(w0))  # copied before the cast: exact
    opt = torch.optim.SGD(masters.swap([p]), lr=lr)
    plain = torch.optim.SGD([in_place], lr=lr)
    m = w0.copy()
    for _ in range(steps):
        p.grad = torch.from_numpy(g).to(torch.bfloat16)
        in_place.grad = torch.from_numpy(g).to(torch.bfloat16)
        masters.step(opt)
        plain.step()
        m = (m - np.float32(lr) * g).astype(np.float32)
    assert p.grad is None  # moved onto the copy
    np.testing.assert_array_equal(masters.master(p).detach().numpy(), m)
    np.testing.assert_array_equal(p.detach().float().numpy(), _bf16(m))
    assert torch.equal(in_place.detach().float(), torch.from_numpy(_bf16(w0)))  # every update rounded away
    assert (p.detach().float() != in_place.detach().float()).float().mean() > 0.5


def test_use_in_points_a_built_optimizer_at_the_copies_and_refuses_a_stepped_one() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.AdamW([{"params": net[0].parameters(), "lr": 1e-3}, {"params": net[1].parameters()}], lr=2e-3)
    masters = hold_plan_weights(net, {"0": True, "1": False}, {"0"}, torch.bfloat16)
    masters.use_in(opt)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert [p.dtype for p in held] == [torch.float32] * 4
    assert held[0] is masters.master(net[0].weight) and held[2] is net[1].weight  # fp32 unit: itself
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3]
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    masters.step(opt)
    assert opt.state[masters.master(net[0].weight)]["exp_avg"].dtype == torch.float32  # the state is fp32
    with pytest.raises(ValueError, match="has not stepped"):
        MasterWeights([]).use_in(opt)


def _pure_plan(units: dict[str, str], masters: list[str], model: str = "net") -> Plan:
    plan: Plan = plan_of(units, model=model, regime="pure", masters=tuple(masters))
    return plan


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _train_applied(net: nn.Module, plan: Plan, x: torch.Tensor, hold: Any, steps: int = 5) -> list[float]:
    """Train `net` under `plan` as a user would with `hold(net)`'s master weights."""
    masters, remove = hold(net)
    opt = masters.use_in(torch.optim.AdamW(net.parameters(), lr=1e-2))
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x).float().pow(2).mean()
        loss.backward()
        masters.step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    remove()
    return losses


def test_apply_plan_holds_pure_weights_and_the_python_export_does_the_same() -> None:
    torch.manual_seed(0)
    base, x = _Net(), torch.randn(16, 6)
    plan = _pure_plan({"<root>": "bf16", "a": "bf16", "b": "bf16", "c": "fp32", "<loss>": "fp32"}, ["a"])

    net = copy.deepcopy(base)
    handle = pd.apply_plan(net, plan)
    dtypes = {n: p.dtype for n, p in net.named_parameters()}
    assert dtypes == {
        "a.weight": torch.bfloat16,
        "a.bias": torch.bfloat16,
        "b.weight": torch.bfloat16,
        "b.bias": torch.bfloat16,
        "c.weight": torch.float32,
        "c.bias": torch.float32,
    }
    assert len(handle.master_weights) == 2
    assert torch.equal(handle.master_weights.master(net.a.weight).detach(), base.a.weight.detach())
    assert handle.master_weights.master(net.b.weight) is net.b.weight  # low, stepped in place
    handle.remove()

    def by_library(m: nn.Module) -> tuple[MasterWeights, Any]:
        h = pd.apply_plan(m, plan)
        return h.master_weights, h.remove

    snippet = render(plan, ExportFormat.PYTHON)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "plan_export.py", "exec"), namespace)
    assert namespace["MASTER_UNITS"] == ["a"]

    def by_snippet(m: nn.Module) -> tuple[Any, Any]:
        masters = namespace["hold_plan_weights"](m)
        return masters, namespace["install_precision_plan"](m)

    ours = _train_applied(copy.deepcopy(base), plan, x, by_library)
    theirs = _train_applied(copy.deepcopy(base), plan, x, by_snippet)
    assert ours == theirs and ours[-1] < ours[0]


def test_apply_plan_of_a_pure_plan_refuses_a_model_already_low() -> None:
    plan = _pure_plan({"<root>": "bf16", "a": "bf16", "b": "bf16", "c": "fp32", "<loss>": "fp32"}, ["a"])
    net = _Net().to(torch.bfloat16)
    with pytest.raises(pd.PrecisionDoctorError, match="apply a pure-regime plan to the fp32 model"):
        pd.apply_plan(net, plan)
    assert all("forward" not in m.__dict__ for m in net.modules())  # the overrides taken off again


def test_a_version_1_plan_still_loads_as_an_autocast_plan(tmp_path: Path) -> None:
    raw = json.loads(_pure_plan({"a": "bf16"}, []).to_json())
    for key in ("regime", "master_weights", "state_bytes", "training_check"):
        raw.pop(key)
    raw["schema_version"] = 1
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(raw))
    plan = Plan.load(path)
    assert plan.regime is Regime.AUTOCAST and plan.master_weights == [] and plan.schema_version == PLAN_SCHEMA_VERSION
    raw["schema_version"] = 0
    path.write_text(json.dumps(raw))
    with pytest.raises(pd.PrecisionDoctorError, match="schema_version 1 or 2 or 3 "):
        Plan.load(path)


def _stall() -> ModelSpec:
    return load_model_file(SAMPLES / "bf16_finetune_stall.py")


def test_training_check_sees_the_stall_and_master_weights_end_it() -> None:
    """The issue's sample, AdamW at lr 1e-5: every weight low and stepped in place stays flat
    (backbone's and head's weights unchanged at every step) where fp32 descends; with master
    weights for the flagged units the plan's loss follows fp32's."""
    spec = _stall()
    low = {"<root>": True, "backbone": True, "head": True, "adapter": True, "<loss>": False}
    stalled = check_training(
        spec.model, spec.batch, spec.loss_fn, torch.bfloat16, low, set(), build_optimizer=spec.build_optimizer
    )
    assert stalled.fp32_descent > 0.01 * stalled.fp32_losses[0]
    assert not stalled.tracks and abs(stalled.plan_descent) < 0.05 * stalled.fp32_descent
    assert stalled.unchanged_fraction["backbone"] == 1.0 and stalled.unchanged_fraction["head"] == 1.0
    assert stalled.unchanged_fraction["adapter"] < 0.01  # zero-started: its updates survive in bf16
    fixed = check_training(
        spec.model,
        spec.batch,
        spec.loss_fn,
        torch.bfloat16,
        low,
        {"backbone", "head"},
        build_optimizer=spec.build_optimizer,
    )
    assert fixed.tracks and fixed.plan_descent > 0.8 * fixed.fp32_descent
    assert set(fixed.unchanged_fraction) == {"adapter"}  # the others are stepped as fp32 copies
    assert fixed.fp32_losses == stalled.fp32_losses  # the same fp32 run, from the same RNG state


# --- the pure plan: master weights as a choice per unit in the exact search ----------------------


@pytest.fixture(scope="module")
def stall_pure() -> tuple[ModelSpec, pd.Report]:
    spec = _stall()
    report = pd.analyze(
        spec.model, spec.batch, spec.loss_fn, dtype="bf16", regime="pure", build_optimizer=spec.build_optimizer
    )
    return spec, report


def test_pure_choices_cost_weights_and_state_and_keep_lost_units_off_plain_low(
    stall_pure: tuple[ModelSpec, pd.Report],
) -> None:
    """AdamW (two state tensors): fp32 4+8 bytes per parameter, bf16 2+4, bf16 + master
    2+4+8; backbone and head (LOST_UPDATE errors) are offered low only with master weights;
    the exact MILP picks what exhaustive enumeration picks on the same choices."""
    spec, report = stall_pure
    costs = build_cost_model(report, profile_for("h100"))
    forced = set(hard_fp32_reasons(report))
    needs = lost_update_units(report)
    assert set(needs) == {"backbone", "head"} and "100.00%" in needs["head"]
    choices = dict(
        zip(
            [c.name for c in costs.units],
            pure_choices(report, costs, error_contributions(report), forced, needs),
            strict=True,
        )
    )
    n = {name: p.numel() for name, p in spec.model.named_parameters()}
    head = n["head.weight"] + n["head.bias"]
    assert [c.label for c in choices["head"]] == ["fp32", "bf16+fp32-master"]
    assert [c.state_bytes for c in choices["head"]] == [12 * head, 14 * head]
    adapter = n["adapter.weight"]
    assert [c.label for c in choices["adapter"]] == ["fp32", "bf16", "bf16+fp32-master"]
    assert [c.state_bytes for c in choices["adapter"]] == [12 * adapter, 6 * adapter, 14 * adapter]
    assert choices["adapter"][1].time_s < choices["adapter"][2].time_s  # no weight cast held low
    assert [c.label for c in choices["<root>"]] == ["fp32", "bf16"]  # no parameters of its own
    assert [c.label for c in choices["<loss>"]] == ["fp32"]
    base = build_problem(report, costs, error_contributions(report), forced, 1e-2, 0.0)
    for weight, head_label in [(0.0, "bf16+fp32-master"), (1.0, "fp32")]:
        # Time only: master weights beat fp32 (low compute). Memory dominant: fp32's 12 bytes per
        # parameter beat the master copy's 14.
        problem = replace(base, choices=tuple(choices[name] for name in base.names), memory_weight_s_per_byte=weight)
        milp, exhaustive = solve_milp(problem), solve_exhaustive(problem)
        assert problem.labels(milp.chosen) == problem.labels(exhaustive.chosen)
        assert problem.labels(milp.chosen)["head"] == head_label
        assert problem.labels(milp.chosen)["adapter"] == "bf16"  # the cheapest in both


def _train(net: nn.Module, spec: ModelSpec, steps: int, mode: str, plan: Plan | None = None) -> list[float]:
    """`steps` real steps of the sample's optimizer: `fp32`, `pure` (model.to(bf16)), or
    `plan` (the plan applied, its master weights stepped)."""
    x, y = spec.batch
    assert spec.build_optimizer is not None and spec.loss_fn is not None
    masters = MasterWeights([])
    if mode == "pure":
        net = net.to(torch.bfloat16)
    opt = spec.build_optimizer(net)
    if mode == "plan":
        assert plan is not None
        masters = pd.apply_plan(net, plan).master_weights
        masters.use_in(opt)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "plan"):
            out = net(x.to(torch.bfloat16) if mode == "pure" else x)
            loss = spec.loss_fn(out, (x, y))
        loss.backward()
        masters.step(opt)
        losses.append(loss.item())
    return losses


def test_pure_plan_keeps_master_weights_for_the_flagged_units_and_trains_like_fp32(
    stall_pure: tuple[ModelSpec, pd.Report],
) -> None:
    """The issue's test: on the sample whose pure-bf16 fine-tuning stalls at lr 1e-5, the plan
    keeps fp32 master weights for backbone and head (not the zero-started adapter), its
    verification trained it beside fp32, and applied to the model it trains as fp32 does over
    60 real AdamW steps where model.to(bf16) stays flat."""
    spec, report = stall_pure
    plan = plan_model(spec.model, spec.batch, spec.loss_fn, report, build_optimizer=spec.build_optimizer)
    assert plan.regime is Regime.PURE
    assert {m.unit for m in plan.master_weights} == {"backbone", "head"}
    assert all("LOST_UPDATE" in m.reason for m in plan.master_weights)
    assert plan.units["adapter"] == "bf16" and plan.units["backbone"] == "bf16"
    check = plan.training_check
    assert check is not None and check.tracks and check.optimizer == "AdamW" and check.lr == 1e-5
    assert plan.state_bytes is not None and plan.state_bytes.plan != plan.state_bytes.fp32
    assert "tracks fp32" in plan.summary()

    fp32 = _train(copy.deepcopy(spec.model), spec, 60, "fp32")
    pure = _train(copy.deepcopy(spec.model), spec, 60, "pure")
    planned = _train(copy.deepcopy(spec.model), spec, 60, "plan", plan)
    fell = fp32[0] - fp32[-1]
    assert fell > 0.1 * fp32[0]
    assert abs(pure[-1] - pure[0]) < 0.01 * fell  # the stall
    assert planned[0] - planned[-1] > 0.9 * fell and abs(planned[-1] - fp32[-1]) < 0.05 * fell


def test_the_training_check_finds_the_stall_without_an_optimizer_step_in_the_report() -> None:
    """Analyzed without an optimizer (no LOST_UPDATE): every unit is offered low held low, the
    training check sees the weights stall and the search gives them master weights, one per
    round, until the plan trains."""
    spec = _stall()
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="bf16", regime="pure")
    assert report.optimizer_step is None
    plan = plan_model(spec.model, spec.batch, spec.loss_fn, report, build_optimizer=spec.build_optimizer)
    assert {m.unit for m in plan.master_weights} == {"backbone", "head"}
    assert all("training check" in m.reason for m in plan.master_weights)
    assert plan.training_check is not None and plan.training_check.tracks
    assert plan.verification_passes >= 3


def test_an_autocast_report_still_gets_an_autocast_plan(stall_pure: tuple[ModelSpec, pd.Report]) -> None:
    spec, _ = stall_pure
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="bf16", build_optimizer=spec.build_optimizer)
    plan = plan_model(spec.model, spec.batch, spec.loss_fn, report, build_optimizer=spec.build_optimizer)
    assert plan.regime is Regime.AUTOCAST and plan.master_weights == [] and plan.training_check is None
    assert "hold_plan_weights" not in render(plan, ExportFormat.PYTHON)


def test_mixed_precision_exports_of_a_pure_plan_say_what_they_do_not_carry() -> None:
    plan = _pure_plan({"<root>": "bf16", "a": "bf16", "b": "bf16", "c": "fp32", "<loss>": "fp32"}, ["a"])
    caveats = export_caveats(plan, ExportFormat.DEEPSPEED, deepspeed_version="0.18.0")
    assert len(caveats) == 1 and "fp32 master weights for 1 unit(s)" in caveats[0], caveats
    # TrainingArguments carry no per-module dtypes either: the fp32 module is named first.
    kept, master = export_caveats(plan, ExportFormat.HF)
    assert "the plan keeps c in fp32" in kept and "fp32 master weights for 1 unit(s)" in master
    assert export_caveats(plan, ExportFormat.PYTHON) == []
    assert export_caveats(plan.model_copy(update={"regime": Regime.AUTOCAST}), ExportFormat.HF) == [kept]
    # What the mixed-precision config costs against the plan, from the plan's own bytes: it
    # said "more memory" where the plan's master weights made it hold as much or more.
    saves = plan.model_copy(update={"state_bytes": PlanBytes(fp32=4096, autocast=4096, plan=2048)})
    (note,) = export_caveats(saves, ExportFormat.DEEPSPEED, deepspeed_version="0.18.0")
    assert "4 KiB of weights and optimizer state against the plan's 2 KiB" in note, note
    costs = plan.model_copy(update={"state_bytes": PlanBytes(fp32=4096, autocast=4096, plan=5120)})
    (note,) = export_caveats(costs, ExportFormat.DEEPSPEED, deepspeed_version="0.18.0")
    assert "no more memory than the plan's 5 KiB" in note and "more memory," not in note, note


def test_cli_exports_the_pure_plans_master_weights(tmp_path: Path) -> None:
    """`analyze --regime pure --export plan.py` on the stall sample: the python export names
    the master-weight units, and run on the fp32 model it holds the weights as planned."""
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    out = tmp_path / "plan.py"
    args = ["analyze", str(SAMPLES / "bf16_finetune_stall.py"), "--dtype", "bf16", "--regime", "pure"]
    result = CliRunner().invoke(app, [*args, "--export", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code in (0, 1), result.output  # 1: the analysis found errors (LOST_UPDATE)
    assert "bf16 + fp32 master weights: head" in result.output and "tracks fp32" in result.output
    namespace: dict[str, Any] = {}
    exec(compile(out.read_text(), str(out), "exec"), namespace)
    assert sorted(namespace["MASTER_UNITS"]) == ["backbone", "head"]
    net = _stall().model
    masters = namespace["hold_plan_weights"](net)
    assert len(masters) == 4 and net.adapter.weight.dtype == torch.bfloat16 and net.head.weight.dtype == torch.bfloat16
    assert masters.master(net.adapter.weight) is net.adapter.weight


def test_an_all_fp32_pure_plan_carries_no_failed_candidates_training_check() -> None:
    """reduction_overflow in the pure regime: a candidate with units held low goes NaN in its
    training check, and the search settles on every unit fp32. That plan trains as fp32 does:
    the failed check was the candidate's, and the plan said "loss ... -> nan under the plan
    (does NOT track fp32)" of itself. Its next step says which units stay fp32 for their cost
    alone, not that no unit runs safely low."""
    from precision_doctor.views.terminal import next_steps

    spec = load_model_file(SAMPLES / "reduction_overflow.py")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, regime="pure")
    planned = pd.plan_report(spec.model, spec.batch, spec.loss_fn, report)
    plan = pd.Plan.from_report(planned)
    assert all(d == "fp32" for d in plan.units.values()), plan.summary()
    assert plan.verification_passes >= 1  # a candidate ran: its training check failed
    assert plan.training_check is None
    assert "under the plan" not in plan.summary()
    cost = [f.unit for f in plan.fp32_units if f.reason.startswith("cheaper in fp32")]
    assert cost
    line = next(s for s in next_steps(planned, ["precision-doctor", "analyze", "m.py"]) if "every unit" in s)
    assert "no unit of this model runs safely" not in line and all(u in line for u in cost)


def test_master_weights_given_for_a_non_finite_training_check_say_so() -> None:
    """pure_only_overflow in pure fp16: candidates' training checks go NaN, and each round
    gives one more unit master weights. Its reason says the run went non-finite; it said the
    check "left 0% of its weights unchanged per step", which is not what failed."""
    spec = load_model_file(SAMPLES / "pure_only_overflow.py")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, regime="pure")
    plan = pd.Plan.from_report(pd.plan_report(spec.model, spec.batch, spec.loss_fn, report))
    from_checks = [m.reason for m in plan.master_weights if "training check" in m.reason]
    assert from_checks, plan.summary()
    for reason in from_checks:
        nan = "-> nan" in reason
        assert ("went non-finite" in reason) == nan and ("unchanged per step" in reason) == (not nan), reason


def test_a_pure_plan_holds_its_low_units_buffers_low_as_model_to_does() -> None:
    """A new user's pure bf16 plan of a CNN crashed in its training check ("expected scalar
    type BFloat16 but found Float"): BatchNorm's weights were cast and its running statistics
    not. `model.to(bf16)` casts both; the plan (and its python export) now does too, and the
    planned model trains under the CPU's own bf16 autocast."""

    def cnn() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))

    plan = _pure_plan(
        {"<root>": "bf16", "0": "bf16", "1": "bf16", "2": "bf16", "3": "bf16", "4": "fp32", "<loss>": "fp32"}, []
    )
    x = torch.randn(4, 3, 16, 16)
    for install in ("apply_plan", "export"):
        model = cnn()
        if install == "apply_plan":
            pd.apply_plan(model, plan)
        else:
            ns: dict[str, Any] = {}
            exec(compile(render(plan, ExportFormat.PYTHON), "plan.py", "exec"), ns)
            ns["hold_plan_weights"](model)
            ns["install_precision_plan"](model)
        bn = model[1]
        assert bn.weight.dtype == bn.running_mean.dtype == bn.running_var.dtype == torch.bfloat16, install
        assert bn.num_batches_tracked.dtype == torch.int64 and model[4].weight.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x.to(torch.bfloat16)).float().pow(2).mean()
        loss.backward()
        assert torch.isfinite(loss) and bn.weight.grad is not None, install

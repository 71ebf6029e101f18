"""The fp8 plan: per Linear fp8 (with recipe) / bf16 / fp32 in the exact search, verified and
exported for torchao and Transformer Engine, and checked by training the planned model."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchao.float8")

import torchao.float8 as float8
from torchao.float8.float8_linear import Float8Linear

import precision_doctor as pd
from precision_doctor.capture.fp8 import autocast_input
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.options import ExportFormat, Fp8Recipe, LowDtype, Target
from precision_doctor.planning.cost import PROFILES, build_cost_model, fp8_linear_time_s
from precision_doctor.planning.export import render
from precision_doctor.planning.fp8 import FP8_DIM_MULTIPLE, fp8_layers, planned_recipes
from precision_doctor.planning.fp8_plan import (
    _Fp8Search,
    analysed_labels,
    fp8_choices,
    fp8_problem,
    raw_errors,
    scale_to_loss,
)
from precision_doctor.planning.plan import Plan, Verification, apply_plan, plan_model
from precision_doctor.planning.search import solve_exhaustive, solve_milp
from precision_doctor.report import Report
from tests.fixtures import Case, build_outlier_weight_lm, gemm_unit

H100 = PROFILES[Target.H100]
COMPUTE_BOUND = dataclasses.replace(H100, name="H100 peaks, free memory traffic", bandwidth_bytes_per_s=1e30)
"""H100's peaks with memory traffic free: every op compute-bound, so fp8's doubled matmul rate
always pays. The test models' layers are far too small for fp8 on a real H100 (the casts cost
more than the matmul saves: `test_small_layers_stay_bf16_on_a_real_h100`); here the plan takes
fp8 wherever the numerics allow, which is what the training test checks."""


@pytest.fixture(scope="module")
def lm() -> tuple[Case, Report, Plan]:
    case = build_outlier_weight_lm()
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp8")
    plan = plan_model(case.model, case.batch, case.loss_fn, report, costs=build_cost_model(report, COMPUTE_BOUND))
    return case, report, plan


def test_the_plan_runs_the_healthy_linears_in_fp8_and_keeps_the_outlier_head_out(lm: tuple[Case, Report, Plan]) -> None:
    _, report, plan = lm
    assert plan.dtype is LowDtype.FP8 and plan.verification_passes >= 1
    assert plan.units["fc1"].startswith("fp8:") and plan.units["fc2"].startswith("fp8:")
    # The analysis' own verdict on the head: no recipe passes (FP8_ERROR under every one).
    head_flags = [f for f in report.by_module()["head"].flags if f.flag is pd.Flag.FP8_ERROR]
    assert head_flags and "no fp8 recipe passes" in head_flags[0].evidence.message
    assert plan.units["head"] == "bf16"
    reasons = plan.not_fp8_reasons
    assert set(reasons) == {"head"} and "FP8_ERROR" in reasons["head"]
    assert 0 <= plan.verified_loss_rel_error <= plan.tolerance
    summary = plan.summary()
    recipe = plan.units["fc1"].removeprefix("fp8:")
    assert f"fp8 ({recipe}): fc1" in summary and "bf16, not fp8: head" in summary


def test_the_search_is_exact_over_every_choice(lm: tuple[Case, Report, Plan]) -> None:
    """The MILP over fp32 / bf16 / fp8:<recipe> equals exhaustive search, with budgets from
    none to tight enough to force trades between recipes' errors and their times."""
    case, report, _ = lm
    costs = build_cost_model(report, COMPUTE_BOUND)
    layers = fp8_layers(case.model, report)
    raw = raw_errors(report, layers)
    choices = fp8_choices(costs, layers, report, raw, {"<loss>"}, {})
    labels = {c.label for cs in choices for c in cs}
    # H100 has no MX tensor cores: every recipe but mxfp8 (tests/test_fp8_plan_mx.py: on B200)
    assert {"fp32", "bf16"} | {r.unit_dtype for r in Fp8Recipe if r is not Fp8Recipe.MXFP8} <= labels
    assert "fp8:mxfp8" not in labels
    errors = sorted(c.error for cs in choices for c in cs if c.error > 0)
    for budget in (math.inf, sum(errors), errors[len(errors) // 2], errors[0]):
        problem = fp8_problem(costs, choices, budget, 0.0)
        milp, exhaustive = solve_milp(problem), solve_exhaustive(problem)
        assert milp.objective == pytest.approx(exhaustive.objective, rel=1e-9)
        assert problem.feasible(milp.chosen)


def test_small_layers_stay_bf16_on_a_real_h100(lm: tuple[Case, Report, Plan]) -> None:
    """On H100's roofline the 64-wide layers are memory-bound: the amax, scale and cast passes
    cost more than the fp8 matmul saves (what torchao's size cut-offs say too), so the plan
    keeps them out of fp8 and says so. (fc1 reads the embedding's fp32 output, which autocast
    casts for a bf16 fc1: at 64 wide that cast costs more than bf16 saves, and fc1 stays fp32.)"""
    case, report, _ = lm
    plan = plan_model(case.model, case.batch, case.loss_fn, report, target="h100")
    assert not planned_recipes(plan.units)
    reason = plan.not_fp8_reasons["fc1"]
    assert reason.startswith(("cheaper in bf16: fp8:tensorwise would cost +", "cheaper in fp32: bf16 would cost +"))
    assert "fp8:tensorwise would cost +" in reason, reason
    assert "would add" not in plan.not_fp8_reasons["fc1"]  # cost, not the error budget


@pytest.mark.parametrize("target", [Target.H100, Target.H200, Target.B200])
def test_fp8_cost_against_the_roofline_by_hand(target: Target) -> None:
    """A large Linear (8192 tokens, 4096 x 4096) is compute-bound: fp8 takes its three matmuls
    at the fp8 peak plus six casts of its operands (amax read, cast read + fp8 write, bytes by
    hand); a small one (64 tokens, 64 x 64) costs more in fp8 than in bf16."""
    p = PROFILES[target]
    assert p.fp8_flops_per_s == pytest.approx(2 * p.bf16_flops_per_s, rel=1e-3)  # the datasheets: fp8 doubles bf16
    m, k, n = 8192, 4096, 4096
    unit = gemm_unit(m, k, n)
    t = fp8_linear_time_s(unit, k, n, Fp8Recipe.TENSORWISE, p)
    matmuls = 3 * 2 * m * k * n / p.fp8_flops_per_s
    casts = (2 * (m * k * 5) + 2 * (m * n * 5) + 2 * (k * n * 9) + 6 * 4) / p.bandwidth_bytes_per_s
    assert t == pytest.approx(matmuls + casts, rel=1e-9)
    bf16 = 3 * 2 * m * k * n / p.bf16_flops_per_s
    assert t < bf16
    small = gemm_unit(64, 64, 64)
    t_small = fp8_linear_time_s(small, 64, 64, Fp8Recipe.TENSORWISE, p)
    bf16_small = sum(
        c.calls * max(c.flops / p.bf16_flops_per_s, c.bytes * 0.5 / p.bandwidth_bytes_per_s) for c in small.op_costs
    )
    assert t_small > bf16_small
    # rowwise_with_gw_hp: its weight gradient in bf16, two casts fewer
    t_gw = fp8_linear_time_s(unit, k, n, Fp8Recipe.ROWWISE_WITH_GW_HP, p)
    assert t_gw > 2 * 2 * m * k * n / p.fp8_flops_per_s + 2 * m * k * n / p.bf16_flops_per_s - 1e-15


def test_a_linear_torchao_cannot_run_gets_no_fp8_choice() -> None:
    """A 40x24 Linear (24 not divisible by 16): never fp8, and the plan says why."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 24))
    batch = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))

    def loss_fn(out: torch.Tensor, b: Any) -> torch.Tensor:
        return out.float().pow(2).mean()

    report = pd.analyze(model, batch, loss_fn, dtype="fp8")
    layers = fp8_layers(model, report)
    assert layers["0"].allowed and not layers["2"].allowed
    assert 24 % FP8_DIM_MULTIPLE and 64 % FP8_DIM_MULTIPLE == 0
    plan = plan_model(model, batch, loss_fn, report, costs=build_cost_model(report, COMPUTE_BOUND))
    assert plan.units["0"].startswith("fp8:") and not plan.units["2"].startswith("fp8:")
    assert f"divisible by {FP8_DIM_MULTIPLE}" in plan.not_fp8_reasons["2"]


def _exec(text: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(text, "<export>", "exec"), namespace)  # the export is code by design
    return namespace


def _fp8_paths(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}


def test_torchao_export_converts_exactly_the_planned_layers(lm: tuple[Case, Report, Plan]) -> None:
    case, _, plan = lm
    planned = {u for u, d in plan.units.items() if d.startswith("fp8:")}
    ns = _exec(render(plan, ExportFormat.TORCHAO))
    converted = ns["convert_planned"](copy.deepcopy(case.model), emulate=True)
    assert _fp8_paths(converted) == planned
    for name, m in converted.named_modules():
        if name in planned:
            expected = float8.Float8LinearConfig.from_recipe_name(plan.units[name].removeprefix("fp8:"))
            assert m.config == dataclasses.replace(expected, emulate=True)
    # The bare module_filter_fn, handed to torchao by hand
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name("tensorwise"), emulate=True)
    by_hand = float8.convert_to_float8_training(
        copy.deepcopy(case.model), config=config, module_filter_fn=ns["module_filter_fn"]
    )
    assert _fp8_paths(by_hand) == planned
    # A bf16 plan has no torchao export; an fp8 plan no autocast-override snippet
    with pytest.raises(PrecisionDoctorError, match="has no python export"):
        render(plan, ExportFormat.PYTHON)


def test_te_export_lists_the_planned_layers(lm: tuple[Case, Report, Plan]) -> None:
    _, _, plan = lm
    ns = _exec(render(plan, ExportFormat.TE))  # transformer_engine is imported only by swap_to_te
    assert ns["TE_LINEAR_MODULES"] == [u for u, d in plan.units.items() if d.startswith("fp8:")]
    assert ns["KEPT_OUT"] == {"head": "bf16"}
    assert set(ns["RECIPES"].values()) <= {r.value for r in Fp8Recipe}


def test_the_plan_json_round_trips_and_old_plans_load(lm: tuple[Case, Report, Plan], tmp_path: Path) -> None:
    _, _, plan = lm
    assert Plan.from_json(render(plan, ExportFormat.JSON)) == plan
    old = json.loads(plan.to_json())
    old.update(schema_version=1, units={u: ("bf16" if d != "fp32" else d) for u, d in old["units"].items()})
    old.pop("not_fp8_units")
    old["dtype"] = "bf16"
    assert Plan.from_json(json.dumps(old)).units["fc1"] == "bf16"
    old["schema_version"] = 99
    with pytest.raises(PrecisionDoctorError, match=r"schema_version 1 or 2 or 3 \(got 99\)") as info:
        Plan.from_json(json.dumps(old))
    assert "\n" not in str(info.value)


def test_apply_plan_refuses_unconverted_fp8_layers(lm: tuple[Case, Report, Plan]) -> None:
    case, _, plan = lm
    with pytest.raises(PrecisionDoctorError, match="convert them first"):
        apply_plan(copy.deepcopy(case.model), plan)


STEPS, LR = 20, 5e-3
CURVE_TOLERANCE = 0.02
"""Largest relative deviation of a loss curve from bf16's over the run. Measured (20 Adam
steps, lr 5e-3, this model memorizing its batch from 4.3 to ~0.6, on this CPU): the plan
4.4e-3 from bf16, all-Linear tensorwise fp8 7.2e-2 (its head's weights flushed); 2e-2 sits
between with a 4x margin to the plan's and 3.6x to all-Linear fp8's."""


def _train(model: torch.nn.Module, case: Case, *, hook_fp8: bool) -> list[float]:
    if hook_fp8:  # the input cast Float8Linear does under CUDA's autocast (torchao reads only that)
        for m in model.modules():
            if isinstance(m, Float8Linear):
                m.register_forward_pre_hook(autocast_input)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    losses = []
    assert case.loss_fn is not None
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = case.loss_fn(model(case.batch), case.batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_training_the_planned_model_tracks_bf16_where_all_linear_fp8_drifts(lm: tuple[Case, Report, Plan]) -> None:
    """The plan's claim checked by training: the same seed and batch, three ways - bf16
    autocast; every Linear under torchao's tensorwise recipe; the plan as a user runs it (the
    torchao export's convert_planned, then apply_plan for the rest)."""
    case, _, plan = lm
    bf16 = _train(copy.deepcopy(case.model), case, hook_fp8=False)
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name("tensorwise"), emulate=True)
    all_fp8 = _train(float8.convert_to_float8_training(copy.deepcopy(case.model), config=config), case, hook_fp8=True)
    planned_model = _exec(render(plan, ExportFormat.TORCHAO))["convert_planned"](
        copy.deepcopy(case.model), emulate=True
    )
    with apply_plan(planned_model, plan):
        planned = _train(planned_model, case, hook_fp8=True)

    def deviation(curve: list[float]) -> float:
        return max(abs(a - b) / b for a, b in zip(curve, bf16, strict=True))

    assert bf16[-1] < 0.5 * bf16[0]  # it learns
    print(f"max deviation from bf16: plan {deviation(planned):.2e}, all-Linear tensorwise {deviation(all_fp8):.2e}")
    assert deviation(planned) <= CURVE_TOLERANCE < deviation(all_fp8)


def test_cli_writes_the_torchao_export(tmp_path: Path) -> None:
    """`analyze --dtype fp8 --export plan.py`: the plan summary with each Linear's reason, the
    torchao snippet written (a .py export of an fp8 plan), and its next step. On H100 (the
    default target) the sample's 64-wide layers are too small for fp8, and its lm_head fails
    every recipe."""
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    sample = str(Path(__file__).resolve().parents[1] / "sample_models" / "fp8" / "lm_head_outlier_channel.py")
    export = tmp_path / "fp8_plan.py"
    result = CliRunner().invoke(
        app, ["analyze", sample, "--dtype", "fp8", "--export", str(export)], env={"COLUMNS": "200", "NO_COLOR": "1"}
    )
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "plan (fp8 on h100)" in result.stdout
    # (Out of fp8 in bf16, or in fp32 where the cast of ln_f's fp32 output costs more.)
    assert re.search(r"(bf16|fp32), not fp8: lm_head:", result.stdout) and "FP8_ERROR" in result.stdout
    # No layer to convert: the next step says to train in bf16, not "convert 0 layer(s)".
    flat = " ".join(result.stdout.split())
    assert "train in bf16: the plan converts no layer to fp8 on h100" in flat, flat
    assert "fp8 layer(s)" not in flat
    ns = _exec(export.read_text())
    from precision_doctor.model.spec import load_model_file

    linears = {n for n, m in load_model_file(Path(sample)).model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in linears and len(linears) > 2
    assert ns["FP8_LAYERS"] == {} and set(ns["KEPT_OUT"]) == linears


def test_a_verification_over_the_tolerance_bans_the_worst_choice_and_resolves(lm: tuple[Case, Report, Plan]) -> None:
    """The search loop on a verification result over the tolerance (as a real run of a worse
    model would give): the worst contributor's fp8 recipe is banned for that layer, the next
    solve picks its next-best choice, and the plan names why; a non-finite layer loses every
    fp8 choice."""
    case, report, _ = lm
    costs = build_cost_model(report, COMPUTE_BOUND)
    layers = fp8_layers(case.model, report)
    raw = raw_errors(report, layers)
    k = scale_to_loss(raw, analysed_labels(report, layers), report.losses.rel_error)
    raw = {n: {lab: e * k for lab, e in d.items()} for n, d in raw.items()}
    search = _Fp8Search(report, costs, layers, 1e-2, 0.0, raw, {"<loss>"}, calibrated=True)
    labels = search.candidate(search.problem())
    worst = max((n for n, lab in labels.items() if lab != "fp32"), key=lambda n: raw[n][labels[n]])
    assert labels[worst].startswith("fp8:")
    assert not search.settled(labels, Verification(loss_rel_error=0.5, first_nonfinite_unit=None))
    assert labels[worst] in search.banned[worst]
    again = search.candidate(search.problem())
    assert again[worst] != labels[worst] and again[worst] != "fp32"
    assert "exceeded the tolerance" in search.why_banned[(worst, labels[worst])]
    # a non-finite layer: no fp8 choice left for it
    assert not search.settled(again, Verification(loss_rel_error=math.inf, first_nonfinite_unit=worst))
    third = search.candidate(search.problem())
    assert third[worst] == "bf16"
    # within the tolerance: settled
    assert search.settled(third, Verification(loss_rel_error=1e-3, first_nonfinite_unit=None))


@pytest.mark.parametrize(
    ("recipe", "flagged"), [("tensorwise", True), ("rowwise", False)], ids=["tensorwise", "rowwise"]
)
def test_verification_judges_each_fp8_matmul_again_on_the_planned_runs_operands(recipe: str, flagged: bool) -> None:
    """The outlier-token sample planned as fp8 under each recipe: the planned run's forward
    matmul of `proj` is judged on that run's own operands. Tensorwise flushes the ordinary
    tokens (SQNR far below the fprop gate) and names the layer; rowwise scales each token by
    its own amax and passes."""
    from precision_doctor.model.spec import load_model_file
    from precision_doctor.planning.fp8_plan import verify_fp8_plan

    spec = load_model_file(Path(__file__).parent.parent / "sample_models" / "fp8" / "outlier_token.py")
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    result = verify_fp8_plan(spec.model, spec.batch, spec.loss_fn, {"proj": f"fp8:{recipe}"})
    assert ("proj" in result.below) is flagged, result.below
    if flagged:
        assert "fprop matmul under tensorwise" in result.below["proj"]
        assert result.check.loss_rel_error > 0.5  # the ordinary tokens' outputs are lost
    else:
        assert result.check.loss_rel_error < 0.1
    assert all(torch.equal(v, spec.model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, Float8Linear) for m in spec.model.modules())


def test_a_plan_no_pass_verified_says_so() -> None:
    """A tolerance no choice fits: the estimates keep every unit fp32, so no pass runs; the
    summary says the plan is unverified (it read "verified final-loss error 0.00e+00 ...
    0 verification pass(es)")."""
    from precision_doctor.model.spec import load_model_file

    spec = load_model_file(Path(__file__).resolve().parents[1] / "sample_models" / "fp8" / "healthy_mlp.py")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="fp8")
    plan = plan_model(spec.model, spec.batch, spec.loss_fn, report, tolerance=1e-12)
    assert plan.verification_passes == 0
    assert all(d == "fp32" for d in plan.units.values())
    summary = plan.summary()
    assert "not verified: every unit stays fp32" in summary and "verification pass(es)" not in summary


def test_a_run_under_a_refused_recipe_does_not_calibrate_the_estimates() -> None:
    """A wide outlier-token Linear analysed under tensorwise, which flushes the ordinary
    tokens (final-loss error ~1) and which the plan refuses for the layer: the estimates are
    calibrated on a verification pass instead. Scaled to that broken run, every choice's
    estimate was ~25x its real error and the layer stayed fp32 on the error budget; bf16
    (and rowwise) are well within the tolerance."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False))
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    x[0] *= 1e6

    def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return out[1:].float().pow(2).mean()

    report = pd.analyze(model, x, loss_fn, dtype="fp8")
    assert report.losses.rel_error > 0.5
    plan = plan_model(model, x, loss_fn, report)
    assert plan.units["0"] != "fp32", plan.summary()
    assert plan.verification_passes >= 1 and plan.verified_loss_rel_error <= 1e-2
    assert "error budget" not in plan.summary()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp", "mxfp8"])
def test_the_torchao_export_emulated_runs_under_cpu_autocast(tmp_path: Path, recipe: str) -> None:
    """`convert_planned(model, emulate=True)` (for a CPU) trains under torch.autocast("cpu",
    bf16): its Float8Linear layers cast their input as torchao casts it for CUDA's autocast
    (rowwise_with_gw_hp's backward raised "expected m1 and m2 to have the same dtype");
    MXFP8Linear runs as it is, on 32 rows (mxfp8 scales blocks of 32 along them)."""
    if recipe == "mxfp8":
        pytest.importorskip("torchao.prototype.moe_training.mxfp8_linear")
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    sample = str(Path(__file__).resolve().parents[1] / "sample_models" / "fp8" / "healthy_mlp.py")
    export = tmp_path / "fp8_plan.py"
    result = CliRunner().invoke(app, ["analyze", sample, "--dtype", "fp8", "--quiet", "--export", str(export)])
    assert result.exit_code == 0, result.output
    ns = _exec(export.read_text())
    ns["FP8_LAYERS"], ns["MODULE_COUNT"] = {"0": recipe, "2": recipe}, None
    torch.manual_seed(0)
    model = ns["convert_planned"](
        torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)), emulate=True
    )
    assert type(model[0]).__name__ == ("MXFP8Linear" if recipe == "mxfp8" else "Float8Linear")
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


class _Fp32Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


def test_an_fp8_layer_called_by_an_fp32_unit_reads_bf16_as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan's fp8 layer inside a unit kept fp32: the override enters bf16 autocast for the
    layer, and torchao on a GPU casts its input to bf16 there. The CPU emulation's cast is a
    forward pre-hook, which ran before that region, under the fp32 caller's disabled autocast:
    the layer quantized fp32 inputs. The override applies it again inside its region (and
    hands the result back to the fp32 caller in fp32)."""
    from torchao.float8.float8_linear import Float8Linear

    from precision_doctor.capture.emulation import unit_overrides
    from precision_doctor.planning.fp8 import convert_planned

    seen: list[torch.dtype] = []
    forward = Float8Linear.forward

    def spy(self: Float8Linear, x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return forward(self, x)

    monkeypatch.setattr(Float8Linear, "forward", spy)
    # The torchao export's own converter (its CPU cast carries the same mark).
    plan = Plan.from_report(pd.plan_report(*_healthy_mlp(), pd.analyze(*_healthy_mlp(), dtype="fp8")))
    ns = _exec(render(plan, ExportFormat.TORCHAO))
    ns["FP8_LAYERS"], ns["MODULE_COUNT"] = {"0.fc": "tensorwise"}, None
    for parent_low, exported in ((True, False), (False, False), (False, True)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(_Fp32Block(), torch.nn.Linear(32, 4))
        if exported:
            converted = ns["convert_planned"](model, emulate=True)
        else:
            converted = convert_planned(model, {"0.fc": "fp8:tensorwise"}, emulate=True)
        low = {"<root>": True, "0": parent_low, "0.fc": True, "1": True}
        seen.clear()
        with unit_overrides(converted, low, torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
            out = converted(torch.randn(64, 32))
        assert seen == [torch.bfloat16] and torch.isfinite(out.float()).all(), (parent_low, exported)


def _healthy_mlp() -> tuple[Any, Any, Any]:
    from precision_doctor.model.spec import load_model_file

    spec = load_model_file(Path(__file__).resolve().parents[1] / "sample_models" / "fp8" / "healthy_mlp.py")
    return spec.model, spec.batch, spec.loss_fn


def test_an_fp8_analysis_error_finding_leaves_the_layer_to_the_recipes(lm: tuple[Case, Report, Plan]) -> None:
    """An error-severity ERROR_GROWTH under the analysed recipe forced an fp8 layer to fp32,
    though another recipe or bf16 runs it well (a new user's default tensorwise plan came out
    slower than plain bf16, and differed from the rowwise analysis' plan). Only an fp16/bf16
    analysis' error findings pin a unit to fp32; an fp8 plan gates each recipe on its own."""
    from precision_doctor.analysis.flags import Evidence, FlagRecord
    from precision_doctor.options import Flag, Phase, Severity
    from precision_doctor.planning.plan import hard_fp32_reasons

    _, report, plan = lm
    layer = next(u for u, d in plan.units.items() if d.startswith("fp8:"))
    growth = FlagRecord(
        flag=Flag.ERROR_GROWTH, unit=layer, severity=Severity.ERROR,
        evidence=Evidence(op=None, phase=Phase.FORWARD, message="propagated error grows from 0.01 to 0.8"),
    )  # fmt: skip
    flagged = report.with_unit_flags({layer: [growth]})
    assert layer not in hard_fp32_reasons(flagged)
    as_bf16 = flagged.model_copy(
        update={
            "environment": flagged.environment.model_copy(update={"dtype": LowDtype.BF16}),
            "extras": flagged.extras.model_copy(update={"fp8": None}),
        }
    )
    assert hard_fp32_reasons(as_bf16)[layer].startswith("ERROR_GROWTH (error) in bf16")


def test_an_fp8_analysis_optimizer_step_is_said_of_bf16_weights() -> None:
    """The optimizer step of an fp8 analysis runs on bf16 weights (fp8 training casts weights
    per matmul, it holds none in fp8): its findings said "with fp8 weights ... model.to(fp8)"."""
    case = build_outlier_weight_lm()
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp8", lr=1e-6)
    lost = [f for f in report.flags() if f.flag.value == "LOST_UPDATE"]
    assert lost, [f.flag.value for f in report.flags()]  # the precondition: lr 1e-6 loses updates in bf16
    assert all("with bf16 weights" in f.evidence.message and "fp8" not in f.evidence.message for f in lost)


def test_the_preflight_judges_an_fp8_layers_error_finding_only_under_the_analysed_recipe() -> None:
    """The plan leaves an fp8 layer with an ERROR_GROWTH error to the recipes; the pre-flight
    counted the finding against any plan running it low (bf16, another recipe), so that plan
    was no-go. It counts where the plan runs the layer under the analysed recipe, as the fp8
    findings; a unit that is no converted Linear stays pinned fp32 by such a finding."""
    from precision_doctor.analysis.flags import Evidence, FlagRecord
    from precision_doctor.options import Flag, Phase, Severity, Thresholds
    from precision_doctor.planning.plan import hard_fp32_reasons
    from precision_doctor.training.preflight import _Judge

    case = build_outlier_weight_lm()
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp8")
    assert report.extras.fp8 is not None
    layer = report.extras.fp8.layers[0]
    other = next(u.name for u in report.units if u.name not in report.extras.fp8.layers and u.name != "<loss>")

    def growth(unit: str) -> FlagRecord:
        return FlagRecord(
            flag=Flag.ERROR_GROWTH, unit=unit, severity=Severity.ERROR,
            evidence=Evidence(op=None, phase=Phase.FORWARD, message="grows"),
        )  # fmt: skip

    flagged = report.with_unit_flags({layer: [growth(layer)], other: [growth(other)]})
    hard = hard_fp32_reasons(flagged)
    assert layer not in hard and hard[other].startswith("ERROR_GROWTH (error) in fp8")
    judge = _Judge(flagged, {}, LowDtype.FP8, False, Thresholds(), None, None, 0.05, 2)
    analysed = f"fp8:{report.extras.fp8.recipe}"

    def counted(label: str) -> set[str]:
        units = {"": "fp32", layer: label, other: "fp32"}
        return {r.unit or "" for r in judge.analysis_reasons(units, None) if r.risk == "ERROR_GROWTH"}

    assert counted(analysed) == {layer}
    assert (
        counted("bf16") == set() and counted("fp8:rowwise" if analysed != "fp8:rowwise" else "fp8:tensorwise") == set()
    )


def test_the_fp8_plan_refuses_the_analysed_recipe_for_a_layer_with_an_error_finding(
    lm: tuple[Case, Report, Plan],
) -> None:
    """The plan left an fp8 layer with an error-severity ERROR_GROWTH (measured under the
    analysed recipe) under that same recipe, and its own pre-flight refused it for the finding.
    The recipe is refused for the layer, with the finding as its reason; the plan's pre-flight
    judgment carries no such finding."""
    from precision_doctor.analysis.flags import Evidence, FlagRecord
    from precision_doctor.options import Flag, Phase, Severity, Thresholds
    from precision_doctor.training.preflight import _Judge

    case, report, plan = lm
    assert report.extras.fp8 is not None
    analysed = f"fp8:{report.extras.fp8.recipe}"
    layer = next(u for u, d in plan.units.items() if d == analysed)  # the precondition
    growth = FlagRecord(
        flag=Flag.ERROR_GROWTH, unit=layer, severity=Severity.ERROR,
        evidence=Evidence(op=None, phase=Phase.FORWARD, message="propagated error grows from 0.01 to 0.8"),
    )  # fmt: skip
    flagged = report.with_unit_flags({layer: [growth]})
    replanned = plan_model(
        case.model, case.batch, case.loss_fn, flagged, costs=build_cost_model(flagged, COMPUTE_BOUND)
    )
    assert replanned.units[layer] != analysed, replanned.units
    units = {**replanned.units, "": "fp32"}
    judge = _Judge(flagged, {}, LowDtype.FP8, False, Thresholds(), units, None, 0.05, 2)
    assert not [r for r in judge.analysis_reasons(units, None) if r.risk == "ERROR_GROWTH"]

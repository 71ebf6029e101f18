"""mxfp8 in the fp8 plan: offered only for a target with MX tensor cores (B200), under torchao's
MX shape rule, costed, converted and verified through torchao's MXFP8Linear, and exported."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchao.float8")
pytest.importorskip("torchao.prototype.moe_training.mxfp8_linear")

import torchao.prototype.mx_formats.mx_tensor as mx_tensor
from torchao.float8.float8_linear import Float8Linear
from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
from torchao.prototype.mx_formats.config import ScaleCalculationMode
from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

import precision_doctor as pd
from precision_doctor.capture.fp8 import autocast_input, mx_gemm_as_gpu
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.model.spec import ModelSpec, load_model_file
from precision_doctor.options import ExportFormat, Fp8Recipe, Target
from precision_doctor.planning.cost import MX_NEEDS, PROFILES, build_cost_model, fp8_linear_time_s
from precision_doctor.planning.export import render
from precision_doctor.planning.fp8 import convert_planned, fp8_layers
from precision_doctor.planning.fp8_plan import fp8_choices, fp8_problem, raw_errors
from precision_doctor.planning.plan import Plan, plan_model
from precision_doctor.planning.search import solve_exhaustive, solve_milp
from precision_doctor.report import Report
from tests.fixtures import build_outlier_weight_lm, gemm_unit

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "fp8" / "outlier_channel_block.py"


def _compute_bound(target: Target) -> Any:
    """The target's peaks with memory traffic free (as `test_fp8_plan.COMPUTE_BOUND`): the
    sample's one 256x64 layer is far too small for fp8 to pay on a real GPU's roofline."""
    p = PROFILES[target]
    return dataclasses.replace(p, name=f"{p.name} peaks, free memory traffic", bandwidth_bytes_per_s=1e30)


B200 = _compute_bound(Target.B200)
H100 = _compute_bound(Target.H100)
TOLERANCE = 2e-2
"""The sample's mxfp8 run costs 0.95 % of the final loss (measured: `verify_fp8_plan` on this
CPU), tensorwise 6.3 %, rowwise 5.4 %. The plan's estimate for mxfp8, scaled from the
tensorwise analysis, is 1.7 %: over the default 1 % budget, inside 2 %."""


@pytest.fixture(scope="module")
def channel() -> tuple[ModelSpec, Report]:
    spec = load_model_file(SAMPLE)
    return spec, pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="fp8")


def _loss(model: torch.nn.Module, spec: ModelSpec) -> torch.Tensor:
    assert spec.loss_fn is not None
    with mx_gemm_as_gpu(), torch.autocast("cpu", dtype=torch.bfloat16):
        return spec.loss_fn(model(spec.batch), spec.batch)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


def test_a_b200_plan_takes_mxfp8_where_it_is_the_fix(channel: tuple[ModelSpec, Report]) -> None:
    """The outlier channel sits in every row: tensorwise and the rowwise recipes fail `proj`,
    mxfp8 keeps the seven blocks without it. On B200 the plan picks fp8:mxfp8 for it, and the
    torchao export of the plan, trained on, costs the loss less than the tolerance where the
    same model under tensorwise does not."""
    spec, report = channel
    plan = plan_model(
        spec.model, spec.batch, spec.loss_fn, report, costs=build_cost_model(report, B200), tolerance=TOLERANCE
    )
    assert plan.units["proj"] == "fp8:mxfp8"
    assert "proj" not in plan.not_fp8_reasons
    assert 0 < plan.verified_loss_rel_error <= TOLERANCE
    fp32 = spec.loss_fn(spec.model(spec.batch), spec.batch).detach()  # type: ignore[misc]
    exported = _exec(render(plan, ExportFormat.TORCHAO))["convert_planned"](copy.deepcopy(spec.model), emulate=True)
    assert _rel(_loss(exported, spec).detach(), fp32) <= TOLERANCE
    tensorwise = convert_planned(spec.model, {"proj": "fp8:tensorwise"})
    assert _rel(_loss(tensorwise, spec).detach(), fp32) > TOLERANCE


def test_an_h100_plan_offers_no_mxfp8_and_says_why(channel: tuple[ModelSpec, Report]) -> None:
    """H100 has no MX tensor cores: the layer whose one fix is mxfp8 stays bf16, and the plan
    names the target that would run it."""
    spec, report = channel
    assert Fp8Recipe.MXFP8 in fp8_layers(spec.model, report, B200)["proj"].allowed
    refused = fp8_layers(spec.model, report, H100)["proj"].refused
    assert refused[Fp8Recipe.MXFP8].startswith(MX_NEEDS)
    plan = plan_model(
        spec.model, spec.batch, spec.loss_fn, report, costs=build_cost_model(report, H100), tolerance=TOLERANCE
    )
    assert plan.units["proj"] == "bf16"
    assert MX_NEEDS in plan.not_fp8_reasons["proj"] and "FP8_ERROR" in plan.not_fp8_reasons["proj"]
    with pytest.raises(PrecisionDoctorError, match="has no MX tensor cores"):
        fp8_linear_time_s(report.by_module()["proj"], 256, 64, Fp8Recipe.MXFP8, H100)


def test_torchaos_mx_shape_rule() -> None:
    """mxfp8 needs whole blocks of 32 along every cast dimension: a layer with 48 output
    features, and a layer fed 48 rows (its weight gradient's casts run along the rows), are
    refused on B200; torchao's own cast refuses the same shapes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 48))
    batch = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))

    def loss_fn(out: torch.Tensor, b: Any) -> torch.Tensor:
        return out.float().pow(2).mean()

    report = pd.analyze(model, batch, loss_fn, dtype="fp8")
    layers = fp8_layers(model, report, B200)
    assert "blocks of 32 along both dimensions" in layers["2"].refused[Fp8Recipe.MXFP8]
    assert "no mxfp8 measurement" in layers["0"].refused[Fp8Recipe.MXFP8]
    assert Fp8Recipe.TENSORWISE in layers["0"].allowed and Fp8Recipe.TENSORWISE in layers["2"].allowed

    def to_mx_refuses(t: torch.Tensor) -> bool:
        try:
            mx_tensor.to_mx(t.contiguous(), torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL)
        except AssertionError:
            return True
        return False

    assert to_mx_refuses(torch.randn(48, 48))  # layer 2's grad_output (48 rows x 48 out_features): dgrad's cast
    assert to_mx_refuses(torch.randn(64, 48))  # layer 0's input transposed (64 features x 48 rows): wgrad's cast
    assert not to_mx_refuses(torch.randn(48, 64))  # layer 0's input along in_features (fprop): whole blocks


def test_mx_cost_by_hand() -> None:
    """A large Linear (8192 tokens, 4096 x 4096) under mxfp8 on B200: its three matmuls at the
    fp8 peak, and six one-pass casts (read the operand in its dtype, write 1 byte of fp8 and
    1 byte of e8m0 scale per 32 values): input and grad_output bf16, the weight fp32."""
    p = PROFILES[Target.B200]
    m, k, n = 8192, 4096, 4096
    unit = gemm_unit(m, k, n)
    t = fp8_linear_time_s(unit, k, n, Fp8Recipe.MXFP8, p)
    matmuls = 3 * 2 * m * k * n / p.fp8_flops_per_s  # type: ignore[operator]
    x, g, w = m * k, m * n, k * n
    casts = (2 * x * (2 + 1 + 1 / 32) + 2 * g * (2 + 1 + 1 / 32) + 2 * w * (4 + 1 + 1 / 32)) / p.bandwidth_bytes_per_s
    assert t == pytest.approx(matmuls + casts, rel=1e-9)
    # fewer bytes than tensorwise's three passes per cast, the same matmuls
    assert t < fp8_linear_time_s(unit, k, n, Fp8Recipe.TENSORWISE, p)


def test_the_search_is_exact_with_mxfp8_choices() -> None:
    """On B200 the lm fixture's 64-wide layers, fed 64 rows, get fp8:mxfp8 beside the other
    recipes; the MILP over every choice equals exhaustive search for budgets from none to
    tight."""
    case = build_outlier_weight_lm(tokens=63)  # the model reads tokens + 1 ids: 64 rows
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp8")
    costs = build_cost_model(report, B200)
    layers = fp8_layers(case.model, report, B200)
    assert any(Fp8Recipe.MXFP8 in layer.allowed for layer in layers.values())
    choices = fp8_choices(costs, layers, report, raw_errors(report, layers), {"<loss>"}, {})
    assert "fp8:mxfp8" in {c.label for cs in choices for c in cs}
    errors = sorted(c.error for cs in choices for c in cs if c.error > 0)
    for budget in (math.inf, sum(errors), errors[len(errors) // 2], errors[0]):
        problem = fp8_problem(costs, choices, budget, 0.0)
        milp, exhaustive = solve_milp(problem), solve_exhaustive(problem)
        assert milp.objective == pytest.approx(exhaustive.objective, rel=1e-9)


def _exec(text: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(text, "<export>", "exec"), namespace)  # the export is code by design
    return namespace


class _Three(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 64)
        self.c = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_the_exports_convert_exactly_the_planned_mx_layers(channel: tuple[ModelSpec, Report]) -> None:
    """A plan mixing recipes (a: tensorwise, b: mxfp8, c: bf16): the torchao export swaps
    exactly b for torchao's MXFP8Linear (RCEIL, EMULATED on the CPU, the same parameters) and
    a for Float8Linear; the run of the exported model equals the run of the analysis' own
    conversion (`convert_planned`), loss and every gradient bit for bit. The TE export names
    MXFP8BlockScaling for b."""
    spec, report = channel
    base = plan_model(
        spec.model, spec.batch, spec.loss_fn, report, costs=build_cost_model(report, B200), tolerance=TOLERANCE
    )
    torch.manual_seed(0)
    model = _Three()
    units = {"<root>": "bf16", "a": "fp8:tensorwise", "b": "fp8:mxfp8", "c": "bf16", "<loss>": "fp32"}
    plan = Plan.model_validate(
        {**base.model_dump(), "units": units, "module_count": sum(1 for _ in model.named_modules())}
    )
    ns = _exec(render(plan, ExportFormat.TORCHAO))
    exported = ns["convert_planned"](copy.deepcopy(model), emulate=True)
    assert {n for n, m in exported.named_modules() if isinstance(m, MXFP8Linear)} == {"b"}
    assert {n for n, m in exported.named_modules() if isinstance(m, Float8Linear)} == {"a"}
    assert type(exported.c) is torch.nn.Linear
    b = exported.b
    assert b.kernel_preference is KernelPreference.EMULATED and b.scale_calculation_mode is ScaleCalculationMode.RCEIL
    assert not b.wgrad_with_hp and torch.equal(b.weight, model.b.weight) and torch.equal(b.bias, model.b.bias)
    assert ns["module_filter_fn"](None, "a") and not ns["module_filter_fn"](None, "b")

    # The input cast Float8Linear makes under CUDA's autocast (torchao reads only that one)
    exported.a.register_forward_pre_hook(autocast_input)
    ours = convert_planned(model, units)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    losses, grads = [], []
    for m in (exported, ours):
        with mx_gemm_as_gpu():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(x).float().pow(2).mean()
            loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert not any(p.grad is not None for p in model.parameters())  # the model itself untouched

    te = _exec(render(plan, ExportFormat.TE))
    assert te["TE_RECIPES"] == {"a": "Float8CurrentScaling", "b": "MXFP8BlockScaling"}
    assert te["RECIPES"] == {"a": "tensorwise", "b": "mxfp8"}


def test_verification_judges_an_mx_layer_on_the_planned_runs_operands() -> None:
    """The lm fixture's head (an outlier weight column: no recipe passes it) planned as
    fp8:mxfp8: the verification runs it as torchao's MXFP8Linear, records its matmuls and
    names it below the fprop threshold; the MLP's layers under mxfp8 pass."""
    from precision_doctor.planning.fp8_plan import verify_fp8_plan

    case = build_outlier_weight_lm(tokens=63)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    units = {"fc1": "fp8:mxfp8", "fc2": "fp8:mxfp8", "head": "fp8:mxfp8"}
    result = verify_fp8_plan(case.model, case.batch, case.loss_fn, units)
    assert set(result.below) == {"head"} and "fprop matmul under mxfp8 in the planned run" in result.below["head"]
    assert all(torch.equal(v, case.model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, MXFP8Linear) for m in case.model.modules())


def test_the_preflights_planned_run_trains_mx_layers(channel: tuple[ModelSpec, Report]) -> None:
    """The pre-flight's planned run (`Fp8Training` with a plan's units) on a plan mixing
    mxfp8 and tensorwise: the copy's layers converted each under its recipe, holding the
    copy's own parameters (the optimizer steps them), trained under bf16 autocast with the MX
    matmul as the GPU computes it: its losses equal the torchao export's model trained the
    same way, and the delayed-scaling model tracks both fp8 layers."""
    from precision_doctor.training.fp8_scaling import Fp8Training

    spec, report = channel
    base = plan_model(
        spec.model, spec.batch, spec.loss_fn, report, costs=build_cost_model(report, B200), tolerance=TOLERANCE
    )
    case = build_outlier_weight_lm(tokens=63)
    units = {"embed": "bf16", "fc1": "fp8:mxfp8", "<root>": "bf16", "fc2": "fp8:tensorwise", "head": "bf16"}
    count = sum(1 for _ in case.model.named_modules())
    plan = Plan.model_validate({**base.model_dump(), "units": {**units, "<loss>": "fp32"}, "module_count": count})
    assert case.loss_fn is not None

    def train(m: torch.nn.Module, running: Any, step: Any = None) -> list[float]:
        opt = torch.optim.Adam(m.parameters(), lr=5e-3)
        losses = []
        with running:
            for i in range(3):
                with step(i) if step is not None else contextlib.nullcontext():
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = case.loss_fn(m(case.batch), case.batch)  # type: ignore[misc]
                    loss.backward()
                    losses.append(float(loss.detach()))
                    opt.step()
        return losses

    training = Fp8Training(Fp8Recipe.TENSORWISE, units=units)
    copied = copy.deepcopy(case.model)
    params = {id(p) for p in copied.parameters()}
    converted = training.convert(copied)
    assert type(converted.fc1) is MXFP8Linear and type(converted.fc2) is Float8Linear
    assert type(converted.head) is torch.nn.Linear and {id(p) for p in converted.parameters()} == params
    ours = train(converted, training.running(), training.step)
    exported = _exec(render(plan, ExportFormat.TORCHAO))["convert_planned"](copy.deepcopy(case.model), emulate=True)
    exported.fc2.register_forward_pre_hook(autocast_input)  # the cast torchao makes under CUDA's autocast
    assert ours == train(exported, mx_gemm_as_gpu())
    assert training.scaling is not None and {t.layer for t in training.scaling.result("planned").tracks} == {
        "fc1",
        "fc2",
    }

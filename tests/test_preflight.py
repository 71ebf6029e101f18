"""The pre-flight gate: verdicts on the sample models, untouched user objects, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import precision_doctor as pd
from precision_doctor.cli import app
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.model.spec import load_model_file
from precision_doctor.options import Severity
from precision_doctor.training.preflight import RISK_NAMES, parse_fail_on

from .fixtures import HEALTHY_FILE, build_mlp, doubled_input_runs

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
STEPS = 3


def run_sample(name: str, **kw: Any) -> pd.PreflightResult:
    spec = load_model_file(SAMPLES / f"{name}.py")
    kw.setdefault("plan", False)
    kw.setdefault("steps", STEPS)
    return pd.preflight(spec.model, spec.batch, spec.loss_fn, name=name, **kw)


def test_healthy_sample_model_is_go() -> None:
    result = run_sample("tiny_transformer")
    assert result.go and bool(result), [r.line() for r in result.reasons]
    assert result.reasons == []
    low = result.runs["low"]
    assert low.skipped_steps == [] and low.nonfinite_steps == []
    assert low.max_divergence is not None and low.max_divergence < 1e-3
    assert len(result.runs["fp32"].losses) == STEPS


@pytest.mark.parametrize(
    ("name", "risk", "unit", "regime"),
    [
        ("ffn_overflow", "OVERFLOW", "block.ff.wi", "autocast"),
        ("attention_unscaled", "OVERFLOW", "attn", "autocast"),
        ("deep_narrow_underflow", "GRAD_UNDERFLOW", "layers.0", "autocast"),
        ("rmsnorm_no_upcast", "OVERFLOW", "norm", "autocast"),
        # CUDA's autocast runs pow and sum in fp32: reduction_overflow breaks only in pure fp16.
        ("reduction_overflow", "OVERFLOW", "norm", "pure"),
    ],
)
def test_faulty_sample_models_are_no_go_with_the_right_reason(name: str, risk: str, unit: str, regime: str) -> None:
    result = run_sample(name, regime=regime)
    assert not result.go
    assert any(r.risk == risk and r.unit == unit and r.mode == "analysis" for r in result.reasons), [
        r.line() for r in result.reasons
    ]
    if name in ("ffn_overflow", "attention_unscaled"):  # Inf in the forward: every step breaks
        low = result.runs["low"]
        assert low.nonfinite_steps == list(range(STEPS))
        assert low.skipped_steps == list(range(STEPS))
        assert {"NONFINITE_STEPS", "SKIPPED_STEPS", "DIVERGENT_LOSS"} <= {r.risk for r in result.reasons}


def test_planned_run_uses_the_plan_and_recommended_scale() -> None:
    result = run_sample("attention_unscaled", plan=True)
    planned = result.runs["planned"]
    assert planned.units["attn"] == "fp32"
    assert result.loss_scale is not None
    assert planned.init_scale_log2 == result.loss_scale.recommended_scale_log2
    assert planned.nonfinite_steps == [] and result.planned_go is True
    assert not result.go  # judged on the plain fp16 run
    judged = run_sample("attention_unscaled", plan=True, judge="planned")
    assert judged.go, [r.line() for r in judged.reasons]


def test_planned_gradient_risks_are_judged_at_the_planned_scale() -> None:
    """grad_overflow's gradients overflow at GradScaler's 2^16, not at the plan's lower
    scale: the planned configuration is go, although the plain one (judged at 2^16) is not,
    with warnings failing (GRAD_OVERFLOW is one: GradScaler backs off)."""
    result = run_sample("grad_overflow", plan=True, judge="planned", fail_on="warning")
    scale = result.runs["planned"].init_scale_log2
    assert scale is not None and scale < 16
    assert result.go and result.planned_go, [r.line() for r in result.reasons]
    low = run_sample("grad_overflow", plan=True, fail_on="warning")
    assert not low.go and low.planned_go
    assert {r.risk for r in low.reasons if r.mode == "analysis"} == {"GRAD_OVERFLOW"}
    assert all("2^16" in r.message for r in low.reasons if r.risk == "GRAD_OVERFLOW")
    n = sum(r.risk == "GRAD_OVERFLOW" for r in low.reasons)
    assert n > 1 and f"GRAD_OVERFLOW x{n}" in low.verdict


def test_plan_keeps_vanishing_gradients_fp32_and_is_go() -> None:
    """deep_narrow_underflow's early layers' gradients sit below 2^-53, beyond any one fp16
    scale (the plan's is above 2^24, past the report's curve: judged from the histograms).
    The plan keeps them fp32; the planned configuration then has no gradient risk."""
    result = run_sample("deep_narrow_underflow", plan=True, judge="planned")
    planned = result.runs["planned"]
    assert planned.init_scale_log2 is not None and planned.init_scale_log2 > 24
    assert planned.units["layers.0"] == "fp32" and "fp16" in planned.units.values()
    assert result.go, [r.line() for r in result.reasons]
    low = run_sample("deep_narrow_underflow", plan=True)
    assert not low.go and low.planned_go  # all-fp16 at 2^16 loses them
    assert low.verdict.endswith("; with the plan and recommended loss scale: go"), low.verdict


def test_a_pure_regime_plan_is_not_judged_by_the_low_weights_lost_updates() -> None:
    """bf16_finetune_stall in the pure regime: the bf16 weights round its updates away
    (LOST_UPDATE), so the low run is no-go; the plan trains under autocast, whose optimizer
    steps fp32 weights, and its run tracks fp32's: judged, it is go."""
    spec = load_model_file(SAMPLES / "bf16_finetune_stall.py")
    kw: dict[str, Any] = {"dtype": "bf16", "regime": "pure", "plan": True, "build_optimizer": spec.build_optimizer}
    low = run_sample("bf16_finetune_stall", **kw)
    assert not low.go and "LOST_UPDATE" in {r.risk for r in low.reasons}
    planned = run_sample("bf16_finetune_stall", **kw, judge="planned")
    assert planned.go, [r.line() for r in planned.reasons]
    assert low.planned_go is True
    assert low.verdict.endswith("; with the plan: go"), low.verdict  # bf16: no loss scale to name
    assert "LOST_UPDATE" not in {r.risk for r in planned.reasons}


def test_the_default_optimizer_is_the_one_the_analysis_steps() -> None:
    """No optimizer given: the runs train with AdamW, and the analysis steps that AdamW too,
    so pure fp16's non-finite run comes with its cause (eps is 0 in fp16: LOST_UPDATE)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(64, 1))
    batch = torch.randint(0, 50, (8, 4), generator=torch.Generator().manual_seed(1))
    result = pd.preflight(model, batch, lambda out, b: out.pow(2).mean(), regime="pure", steps=2, plan=False)
    assert result.runs["low"].nonfinite_steps
    lost = [r for r in result.reasons if r.risk == "LOST_UPDATE"]
    assert lost and all(r.mode == "analysis" for r in lost), [r.line() for r in result.reasons]
    assert any("eps" in r.message and "AdamW" in r.message for r in lost), [r.message for r in lost]


def test_each_step_reads_the_batch_as_given() -> None:
    """A forward that writes its input in place: every step of every run reads the batch as
    the caller gave it (as a loader's next batch), and the caller gets it back. Its fp32
    loss went x4 a step, and the low run started 70x off: a false DIVERGENT_LOSS."""
    in_place, copying = doubled_input_runs(
        lambda model, x: pd.preflight(model, x, lambda out, b: out.pow(2).mean(), steps=3, plan=False)
    )
    assert {k: r.losses for k, r in in_place.runs.items()} == {k: r.losses for k, r in copying.runs.items()}


class _InfGradOutsideOptimizer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)
        self.gain = torch.nn.Parameter(torch.zeros(3))  # d sqrt(x)/dx at 0: Inf, in fp32 too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).pow(2).mean() + torch.sqrt(self.gain).sum()


def test_steps_judge_only_the_gradients_the_optimizer_applies() -> None:
    """GradScaler and the update see the optimizer's parameters only: an Inf gradient of one
    it does not hold is no non-finite step (the analysis still reports it, as NONFINITE_FP32)."""
    torch.manual_seed(0)
    model = _InfGradOutsideOptimizer()
    opt = torch.optim.SGD(model.fc.parameters(), lr=1e-3)
    result = pd.preflight(model, torch.randn(8, 4), optimizer=opt, steps=2, plan=False)
    assert all(run.nonfinite_steps == [] for run in result.runs.values()), result.runs
    assert "NONFINITE_FP32" in {r.risk for r in result.reasons}
    assert all(r.mode == "analysis" for r in result.reasons)  # no run went non-finite


def test_a_skipped_first_step_is_a_skipped_step_not_divergence() -> None:
    """w starts at 0 and the loss is (w - 0.75)^2: its gradient 1.5 overflows fp16 at
    GradScaler's 2^16 (98304) and fits at 2^15, so the fp16 run skips exactly its first step
    and then trains as fp32 does. Compared on the optimizer steps really applied, it does not
    diverge (step by step it would differ by ~50%: each SGD step moves the loss ~36%)."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)

    def loss_fn(out: torch.Tensor, batch: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out, torch.full_like(out, 0.75))

    result = pd.preflight(
        model,
        torch.ones(1, 1),
        loss_fn,
        steps=4,
        plan=False,
        build_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    )
    low, fp32 = result.runs["low"], result.runs["fp32"].losses
    assert low.skipped_steps == [0] and low.nonfinite_steps == []
    assert abs(fp32[1] - fp32[0]) / fp32[0] > 0.3  # a one-step shift would be divergence
    assert low.max_divergence is not None and low.max_divergence < 1e-3, low
    assert "DIVERGENT_LOSS" not in {r.risk for r in result.reasons + result.notes}
    assert "SKIPPED_STEPS" not in {r.risk for r in result.reasons + result.notes}  # 1 <= 2 allowed
    assert low.steps[0].skipped and low.steps[0].scale == 2.0**16 and low.steps[1].scale == 2.0**15
    strict = pd.preflight(
        model,
        torch.ones(1, 1),
        loss_fn,
        steps=4,
        plan=False,
        max_skipped_steps=0,
        build_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        fail_on="DIVERGENT_LOSS,SKIPPED_STEPS",
    )
    assert [r.risk for r in strict.reasons] == ["SKIPPED_STEPS"], [r.line() for r in strict.reasons]
    assert "skipped 1/4 steps (steps 0)" in strict.reasons[0].message


def test_the_default_gate_fails_on_errors_not_on_a_gradscaler_back_off() -> None:
    """skip_one_step's only finding is a GRAD_OVERFLOW warning: GradScaler skips its first step
    and trains on at 2^15, as designed. The default (`error`) is go with it as a note;
    `fail_on="warning"` makes it fail. An error-severity finding fails by default."""
    result = run_sample("skip_one_step")
    assert result.fail_on == ["error"]
    assert result.go, [r.line() for r in result.reasons]
    assert [(r.risk, r.unit, r.severity) for r in result.notes] == [("GRAD_OVERFLOW", "head", Severity.WARNING)]
    assert result.runs["low"].skipped_steps == [0]  # the real GradScaler's one back-off
    assert "no error-severity risk in" in result.verdict
    strict = run_sample("skip_one_step", fail_on="warning")
    assert not strict.go and [r.risk for r in strict.reasons] == ["GRAD_OVERFLOW"]
    assert run_sample("skip_one_step", fail_on="ALL").go is False
    broken = run_sample("rmsnorm_no_upcast")
    assert not broken.go
    assert any(r.risk == "OVERFLOW" and r.severity is Severity.ERROR for r in broken.reasons)


def test_fail_on_selects_the_risks_that_fail() -> None:
    result = run_sample("deep_narrow_underflow", fail_on="DIVERGENT_LOSS,NONFINITE_STEPS")
    assert result.go
    assert any(r.risk == "GRAD_UNDERFLOW" for r in result.notes)
    assert parse_fail_on("ALL") == RISK_NAMES
    assert parse_fail_on("NONE") == ()
    with pytest.raises(PrecisionDoctorError, match="unknown risk 'BOGUS'"):
        parse_fail_on("OVERFLOW,BOGUS")


def test_user_model_and_optimizer_are_untouched() -> None:
    case = build_mlp()
    model = case.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    case.loss_fn(model(case.batch), case.batch).backward()
    opt.step()  # the optimizer has state now; the grads stay set
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    rng = torch.get_rng_state()
    result = pd.preflight(model, case.batch, case.loss_fn, optimizer=opt, steps=2, plan=False)
    assert result.optimizer.startswith("Adam")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    after = opt.state_dict()["state"]
    assert all(torch.equal(state[k][n], after[k][n]) for k in state for n in state[k])
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())


def test_make_batches_and_build_optimizer_are_used() -> None:
    case = build_mlp()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(6, 8, generator=g) for _ in range(2)]
    built: list[Any] = []

    def build(m: torch.nn.Module) -> torch.optim.Optimizer:
        built.append(m)
        return torch.optim.SGD(m.parameters(), lr=0.1)

    result = pd.preflight(
        case.model,
        case.batch,
        case.loss_fn,
        steps=3,
        plan=False,
        make_batches=lambda: iter(data),
        build_optimizer=build,
    )
    # The analysis' optimizer step (LOST_UPDATE), the fp32 and low runs: each over a copy.
    assert len(built) == 3 and all(m is not case.model for m in built)
    fp32 = result.runs["fp32"].losses
    assert fp32[0] != fp32[1]  # the batches change
    assert result.optimizer == "build_optimizer: build"


def test_bad_arguments_are_rejected_up_front() -> None:
    case = build_mlp()
    for kw, msg in [
        ({"steps": 0}, "steps"),
        ({"dtype": "fp4"}, "unknown dtype"),
        ({"dtype": "fp8", "regime": "pure"}, "--regime autocast with --dtype fp8"),
        ({"judge": "nope"}, "unknown judge"),
        ({"fail_on": "OVERFLOWS"}, "unknown risk"),
        ({"make_batches": lambda: iter([])}, "yielded no batch"),
    ]:
        with pytest.raises(PrecisionDoctorError, match=msg):
            pd.preflight(case.model, case.batch, case.loss_fn, plan=False, **kw)


def test_json_round_trip_and_report_extras() -> None:
    result = run_sample("ffn_overflow")
    doc = json.loads(result.to_json())
    assert doc["go"] is False and doc["runs"]["low"]["steps"][0]["loss"] == "NaN"
    assert {r["risk"] for r in doc["reasons"]} >= {"OVERFLOW", "NONFINITE_STEPS"}
    assert "report" not in doc
    assert pd.PreflightResult.model_validate_json(result.to_json()).go is False
    annotated = result.annotated_report()
    assert annotated is not None and annotated.extras.preflight is not None
    assert annotated.extras.preflight.go is False
    assert result.prediction().skipped_steps == list(range(STEPS))


# --- the command --------------------------------------------------------------------------

runner = CliRunner()


def test_cli_go_exit_0_with_json(tmp_path: Path) -> None:
    f = tmp_path / "healthy.py"
    f.write_text(HEALTHY_FILE)
    res = runner.invoke(app, ["preflight", str(f), "--steps", "2", "--no-plan", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["go"] is True and doc["steps"] == 2 and set(doc["runs"]) == {"fp32", "low"}


def test_cli_no_go_exit_1_text_and_json() -> None:
    path = str(SAMPLES / "ffn_overflow.py")
    res = runner.invoke(app, ["preflight", path, "--steps", "2", "--no-plan"])
    assert res.exit_code == 1, res.output
    assert "NO-GO" in res.stdout and "OVERFLOW (analysis) [block.ff.wi]" in res.stdout
    res = runner.invoke(app, ["preflight", path, "--steps", "2", "--no-plan", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout)["go"] is False
    # Only the named risks fail: GRAD_UNDERFLOW alone is not found here; NONE fails nothing.
    res = runner.invoke(app, ["preflight", path, "--steps", "2", "--no-plan", "--fail-on", "GRAD_UNDERFLOW"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["preflight", path, "--steps", "2", "--no-plan", "--fail-on", "NONE"])
    assert res.exit_code == 0 and res.stdout.startswith("GO"), res.output


def test_cli_default_gate_exits_0_on_a_warning_and_1_on_an_error() -> None:
    """`preflight` gates error-severity risks by default: skip_one_step's one GradScaler
    back-off (a GRAD_OVERFLOW warning) is printed as a note and exits 0; `--fail-on warning`
    exits 1 on it; ffn_overflow's OVERFLOW (an error) exits 1 by default."""
    path = str(SAMPLES / "skip_one_step.py")
    res = runner.invoke(app, ["preflight", path, "--steps", "2", "--no-plan", "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("GO") and "(note, warning) GRAD_OVERFLOW (analysis) [head]" in res.stdout
    res = runner.invoke(app, ["preflight", path, "--steps", "2", "--no-plan", "--quiet", "--fail-on", "warning"])
    assert res.exit_code == 1, res.output
    assert res.stdout.startswith("NO-GO") and "  - GRAD_OVERFLOW (analysis) [head]" in res.stdout
    res = runner.invoke(app, ["preflight", str(SAMPLES / "ffn_overflow.py"), "--steps", "2", "--no-plan", "--quiet"])
    assert res.exit_code == 1, res.output
    assert "  - OVERFLOW (analysis) [block.ff.wi]" in res.stdout


def test_cli_writes_the_report_with_the_preflight(tmp_path: Path) -> None:
    """`--out`/`--html`: the analysis report carrying the pre-flight (the app's Training tab,
    the HTML's Training section); with `--json`, stdout stays the result alone. Output paths
    are checked before anything runs."""
    out, html = tmp_path / "pf.json", tmp_path / "pf.html"
    path = str(SAMPLES / "skip_one_step.py")
    res = runner.invoke(
        app, ["preflight", path, "--steps", "2", "--quiet", "--json", "--out", str(out), "--html", str(html)]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # nothing else on stdout
    report = pd.Report.load(out)
    section = report.extras.preflight
    assert section is not None and section.go is doc["go"] and set(section.runs) == set(doc["runs"])
    assert report.extras.plan is not None  # it planned: the plan rides along
    text = html.read_text()
    assert "Training" in text and "skip_one_step" in text
    for args, message in (
        (["--out", str(tmp_path / "same"), "--html", str(tmp_path / "same")], "both name"),
        (["--html", str(tmp_path)], "directory"),
    ):
        marker = tmp_path / "ran"
        model = tmp_path / "marked.py"
        model.write_text(
            HEALTHY_FILE.replace("def build_model():\n", f"def build_model():\n    open({str(marker)!r}, 'w')\n")
        )
        res = runner.invoke(app, ["preflight", str(model), "--steps", "1", *args])
        assert res.exit_code == 2 and message in res.output, res.output
        assert not marker.exists()


def test_cli_bad_input_exit_2(tmp_path: Path) -> None:
    res = runner.invoke(app, ["preflight", str(tmp_path / "missing.py")])
    assert res.exit_code == 2 and "does not exist" in res.output
    # --fail-on is validated before the model file is even loaded.
    res = runner.invoke(app, ["preflight", str(tmp_path / "missing.py"), "--fail-on", "OVERFLOW,NOPE"])
    assert res.exit_code == 2 and "unknown risk 'NOPE'" in res.output
    res = runner.invoke(app, ["preflight", str(SAMPLES / "ffn_overflow.py"), "--steps", "0"])
    assert res.exit_code == 2 and "--steps" in res.output
    res = runner.invoke(app, ["preflight", str(SAMPLES / "ffn_overflow.py"), "--dtype", "fp8", "--regime", "pure"])
    assert res.exit_code == 2


def test_a_steps_batch_copy_keeps_aliases_and_the_mapping_type() -> None:
    """`labels` that is `input_ids` stays one tensor in the copy; a mapping pytree does not
    know (`UserDict`, like transformers' `BatchEncoding`) is copied too and keeps its type."""
    from collections import UserDict

    from precision_doctor.model.spec import copy_batch

    ids = torch.arange(6).view(2, 3)
    x = torch.randn(2, 3, requires_grad=True)
    for batch in ({"input_ids": ids, "labels": ids, "x": x}, UserDict(input_ids=ids, labels=ids, x=x)):
        out = copy_batch(batch)
        assert type(out) is type(batch)
        assert out["labels"] is out["input_ids"] and out["input_ids"] is not ids
        assert torch.equal(out["input_ids"], ids) and out["x"] is not x and out["x"].requires_grad


def test_an_fp32_reference_that_diverges_is_said_to() -> None:
    """ffn_overflow under the default AdamW (lr 1e-4): the fp32 run's own loss goes from 0.13
    to ~1e4, and nothing said so, so the pre-flight's verdicts read as precision's. A note
    says the fp32 reference diverges; `fail_on` can select it; a run that trains gets none."""
    result = run_sample("ffn_overflow", steps=8)
    losses = result.runs["fp32"].losses
    assert losses[-1] > 10 * losses[0] > 0  # the precondition, from the run itself
    (note,) = [r for r in result.notes if r.risk == "FP32_DIVERGES"]
    assert note.mode == "fp32" and note.severity.value == "info" and f"{losses[0]:.4g}" in note.message
    strict = run_sample("ffn_overflow", steps=8, fail_on="FP32_DIVERGES")
    assert any(r.risk == "FP32_DIVERGES" for r in strict.reasons) and not strict.go
    healthy = run_sample("tiny_transformer")
    assert not any(r.risk == "FP32_DIVERGES" for r in [*healthy.reasons, *healthy.notes])


def test_a_pure_plans_planned_run_holds_and_casts_as_apply_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planned run installs the plan's units as `apply_plan` does: a pure plan's low units
    cast their inputs (it ran them without, unlike the plan's verification) and hold their
    weights low; an autocast plan's take their inputs as autocast does."""
    import precision_doctor.training.preflight as pf

    seen: list[bool] = []
    weights: list[dict[str, torch.dtype]] = []
    real = pf.unit_overrides

    def spy(model: torch.nn.Module, *args: Any, cast_low_inputs: bool = False, **kwargs: Any) -> Any:
        seen.append(cast_low_inputs)
        weights.append({n: p.dtype for n, p in model.named_parameters()})
        return real(model, *args, cast_low_inputs=cast_low_inputs, **kwargs)

    monkeypatch.setattr(pf, "unit_overrides", spy)
    for regime, cast in (("pure", True), ("autocast", False)):
        seen.clear()
        weights.clear()
        result = run_sample("tiny_transformer", regime=regime, dtype="bf16", plan=True, steps=1)
        assert seen and set(seen) == {cast}, (regime, seen)
        # A pure plan's low units hold their weights in bf16 in the planned run, as the plan's
        # export holds them (they trained fp32 there); an autocast plan's stay fp32.
        units = result.runs["planned"].units
        low = {n for n, dt in weights[0].items() if units.get(n.rpartition(".")[0] or "<root>", "fp32") != "fp32"}
        assert low and {n for n, dt in weights[0].items() if dt == torch.bfloat16} == (low if cast else set())


def test_a_pure_fp16_plan_trains_unscaled_with_its_master_copies() -> None:
    """A pure fp16 plan's planned run trains as its export does: its low weights without
    master copies get fp16 gradients, which GradScaler refuses to unscale, so no scaler (the
    plan's gradients judged at 2^0, as the pure low run's are)."""
    result = run_sample("bf16_finetune_stall", regime="pure", dtype="fp16", plan=True, steps=3)
    planned = result.runs["planned"]
    assert "fp32 master copies" in planned.description and "no loss scaler" in planned.description
    assert planned.init_scale_log2 is None and not planned.nonfinite_steps, planned.description
    assert result.planned_go, [r.line() for r in result.reasons]
    assert not result.go and result.verdict.endswith("; with the plan: go"), result.verdict  # no scale to name


def test_a_stepped_optimizer_is_pointed_at_the_master_copies_with_its_state() -> None:
    """The user's optimizer, copied after it has stepped: the state of a weight with a master
    copy moves to the copy, in fp32 as it was made; a weight held low without one gets its
    state in the low dtype, as an optimizer over the low weights keeps it."""
    from precision_doctor.planning.master import hold_plan_weights
    from precision_doctor.training.preflight import _point_at_masters, _state_like_params

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    before = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    held = hold_plan_weights(model, {"0": True, "1": True}, ["0"], torch.bfloat16)
    _point_at_masters(opt, held)
    _state_like_params(opt)
    params = dict(model.named_parameters())
    for n in ("0.weight", "0.bias"):
        master = held.master(params[n])
        assert master is not params[n] and master.dtype == torch.float32 and params[n] not in opt.state
        assert torch.equal(opt.state[master]["exp_avg"], before[n])
    for n in ("1.weight", "1.bias"):
        assert held.master(params[n]) is params[n] and params[n].dtype == torch.bfloat16
        assert opt.state[params[n]]["exp_avg"].dtype == torch.bfloat16
    assert [p.dtype for g in opt.param_groups for p in g["params"]] == [torch.float32] * 2 + [torch.bfloat16] * 2
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.full_like(p, 1e-2)
    opt.step()  # each state in its parameter's dtype: AdamW's kernels take the mix


def test_a_pure_plans_low_weights_without_master_copies_carry_their_lost_updates() -> None:
    """A plan's LOST_UPDATE findings count only where its optimizer steps low weights: a pure
    plan's low units without master copies (an autocast plan's, and those with copies, step
    fp32 weights)."""
    from precision_doctor.options import Thresholds
    from precision_doctor.training.preflight import HeldPlan, _Judge

    result = run_sample("bf16_finetune_stall", regime="pure", dtype="bf16", plan=True, steps=2)
    assert result.report is not None and result.report.extras.plan is not None
    lost = {f.unit for f in result.report.flags() if f.flag.value == "LOST_UPDATE"}
    plan = result.report.extras.plan
    units = {**plan.units, "": "fp32"}
    flagged_low = {u for u in lost if plan.low_units.get(u)}
    assert flagged_low and set(plan.master_units) >= flagged_low  # the precondition: the plan copies them

    def judged(held: HeldPlan | None) -> set[str]:
        judge = _Judge(result.report, result.runs, pd.LowDtype.BF16, True, Thresholds(), units, None, 0.05, 0, held)
        return {r.unit or "" for r in judge.analysis_reasons(units, None) if r.risk == "LOST_UPDATE"}

    assert judged(None) == set()
    assert judged(HeldPlan(plan.low_units, tuple(plan.master_units))) == set()
    assert judged(HeldPlan(plan.low_units, ())) == flagged_low


def test_a_divergence_within_fp32s_own_sensitivity_is_information() -> None:
    """DIVERGENT_LOSS against the noise floor (fp32 from its weights rounded once to the low
    dtype): a run within twice it is information (a chaotic loss moves that far from any
    rounding), one far beyond it stays an error, the floor quoted either way."""
    from precision_doctor.extras import ModeRun, StepRecord
    from precision_doctor.training.preflight import NOISE_FLOOR_FACTOR, _run_reasons

    steps = [StepRecord(step=i, loss=1.0, grads_finite=True) for i in range(4)]

    def judged(divergence: float, floor: float | None) -> list[Any]:
        run = ModeRun(
            mode="low", description="", steps=steps, skipped_steps=[], nonfinite_steps=[],
            max_divergence=divergence, divergence_step=3, noise_floor=floor, seconds=0.0,
        )  # fmt: skip
        return _run_reasons(run, 0.05, 2)

    (chaotic,) = judged(0.5, 0.5 / NOISE_FLOOR_FACTOR)
    assert chaotic.risk == "DIVERGENT_LOSS" and chaotic.severity is Severity.INFO
    assert "25.00%" in chaotic.message and "no evidence of precision damage" in chaotic.message
    (damage,) = judged(0.5, 0.1)
    assert damage.severity is Severity.ERROR and "10.00%" in damage.message and "no evidence" not in damage.message
    (unmeasured,) = judged(0.5, None)
    assert unmeasured.severity is Severity.ERROR and "fp32 itself" not in unmeasured.message


def test_the_noise_floor_is_fp32_trained_from_weights_rounded_once() -> None:
    """The floor the pre-flight measures is an fp32 run from the weights rounded to bf16 once,
    on the same batches with the same optimizer: the same numbers as a plain training loop
    of that (same process), measured only where a run diverges beyond the tolerance."""
    import copy

    from .fixtures import build_raw_pixel_vit

    case = build_raw_pixel_vit()
    assert case.loss_fn is not None
    steps = 8  # its bf16 loss leaves fp32's far beyond the tolerance by then (at 3 steps: barely)
    result = pd.preflight(case.model, case.batch, case.loss_fn, dtype="bf16", plan=False, steps=steps)
    low = result.runs["low"]
    assert low.max_divergence is not None and low.max_divergence > 0.1  # the precondition

    def losses(model: torch.nn.Module) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the pre-flight's default
        out = []
        for _ in range(steps):
            opt.zero_grad()
            loss = case.loss_fn(model(case.batch), case.batch)  # type: ignore[misc]
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    rounded = copy.deepcopy(case.model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    ref, moved = losses(copy.deepcopy(case.model)), losses(rounded)
    assert result.runs["fp32"].losses == pytest.approx(ref, rel=1e-5)
    floor = max(abs(a - b) / abs(a) for a, b in zip(ref, moved, strict=True))
    assert low.noise_floor == pytest.approx(floor, rel=1e-4, abs=1e-7)
    (divergent,) = [r for r in result.reasons + result.notes if r.risk == "DIVERGENT_LOSS"]
    chaotic = low.max_divergence <= 2 * low.noise_floor
    assert divergent.severity is (Severity.INFO if chaotic else Severity.ERROR)
    assert run_sample("tiny_transformer").runs["low"].noise_floor is None  # within tolerance: not measured


def test_a_copied_optimizers_step_count_stays_fp32_beside_a_scalar_weight() -> None:
    """A scalar parameter (a learnable temperature) held low: Adam's `step`, a float scalar
    shaped like it, was cast too, and a bf16 step count stops at 256."""
    from precision_doctor.training.preflight import _to_low

    model = torch.nn.Module()
    model.temperature = torch.nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.temperature.grad = torch.tensor(0.5)
    opt.step()
    _to_low(model, opt, torch.bfloat16)
    state = opt.state[model.temperature]
    assert model.temperature.dtype == torch.bfloat16 and state["exp_avg"].dtype == torch.bfloat16
    assert state["step"].dtype == torch.float32


def test_a_sharded_models_runs_leave_it_as_it_was() -> None:
    """An FSDP2 model is trained itself (it cannot be copied) and put back: a run from weights
    rounded once (the noise floor) and a pure plan's run holding weights and a BatchNorm's
    statistics low changed them before the guard took its snapshot."""
    from precision_doctor.training.preflight import HeldPlan, _Place, _Trainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    place = _Place(model, model, None, True)  # what `_Place.of` builds for an FSDP2 model
    trainer = _Trainer(
        place,
        None,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        [torch.randn(16, 8)] * 2,
        lambda o, b: o.float().square().mean(),
    )
    trainer.run("fp32", "rounded", dtype=None, units=None, init_scale_log2=None, rounded_to=torch.bfloat16)
    held = HeldPlan({"0": True, "1": True, "2": False}, ("0",))
    units = {"0": "bf16", "1": "bf16", "2": "fp32", "": "fp32"}
    trainer.run("planned", "held", dtype=torch.bfloat16, units=units, init_scale_log2=None, held=held)  # type: ignore[arg-type]
    after = model.state_dict()
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
    assert all(torch.equal(after[k], v) for k, v in before.items()), [
        k for k, v in before.items() if not torch.equal(after[k], v)
    ]


@pytest.mark.parametrize(("lr", "stalls"), [(3e-5, True), (1e-2, False)], ids=["lost", "healthy"])
def test_a_stall_is_read_batch_by_batch_where_batches_vary(lr: float, stalls: bool) -> None:
    """Batches whose losses differ more than a few steps of training move them: the descent
    was read against the first batch's loss, and a pure bf16 run whose every update is rounded
    away passed (a new user's fine-tune, at the default 8 steps). Each batch's loss before
    training (the `untrained` run) is the reference now."""
    from precision_doctor.training.preflight import _stalled

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.0) * torch.randn_like(p).sign())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 32, generator=g) * (1 + i % 3) for i in range(8)]

    def loss_fn(out: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (out.float() - b[:, :1]).square().mean()

    result = pd.preflight(
        model, batches[0], loss_fn, dtype="bf16", regime="pure", plan=False, steps=8,
        make_batches=lambda: batches, fail_on="STALLED_LOSS",
        build_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=lr),
    )  # fmt: skip
    untrained = result.runs["untrained"]
    assert untrained.skipped_steps == list(range(8))  # no update applied: each batch's first loss
    assert [r.risk for r in result.reasons] == (["STALLED_LOSS"] if stalls else []), [r.line() for r in result.reasons]
    if stalls:  # against the first batch's loss, the batches' spread hid it
        assert _stalled(result.runs["low"], result.runs["master"]) == []
    one_batch = pd.preflight(model, batches[0], loss_fn, dtype="bf16", regime="pure", plan=False, steps=2)
    assert "untrained" not in one_batch.runs  # one batch: its first loss is the reference


def test_scalar_optimizer_state_torch_keeps_in_fp32_stays_fp32() -> None:
    """NAdam's mu_product and ASGD's eta and mu are fp32 scalars whatever the parameter's
    dtype, as Adam's step: beside a scalar weight held low they were cast too."""
    from precision_doctor.training.preflight import _to_low

    for cls, keys in ((torch.optim.NAdam, ("step", "mu_product")), (torch.optim.ASGD, ("step", "eta", "mu"))):
        model = torch.nn.Module()
        model.scale = torch.nn.Parameter(torch.tensor(1.0))
        opt = cls(model.parameters(), lr=1e-3)
        model.scale.grad = torch.tensor(0.5)
        opt.step()
        _to_low(model, opt, torch.bfloat16)
        state = opt.state[model.scale]
        assert all(state[k].dtype == torch.float32 for k in keys), {k: v.dtype for k, v in state.items()}


def test_the_master_run_counts_the_fp32_weights_it_steps() -> None:
    """`unchanged_fraction` of the master run is of the fp32 master copies the optimizer steps
    (it counted their bf16 copies, which round most small moves away: ~98% "unchanged", read as
    a stall); the low run's, of its bf16 weights."""
    result = run_sample("bf16_finetune_stall", regime="pure", dtype="bf16", steps=2, plan=False)
    low = [s.unchanged_fraction for s in result.runs["low"].steps[:-1]]
    master = [s.unchanged_fraction for s in result.runs["master"].steps[:-1]]
    assert all(f is not None and f > 0.5 for f in low), low  # the precondition: bf16 rounds most away
    assert all(f is not None and f < 0.1 for f in master), master  # Adam moves every fp32 weight


def test_a_rising_loss_is_said_to_rise_and_a_broken_control_measures_no_floor() -> None:
    """STALLED_LOSS on a low run whose loss rose said "falls -0.98%"; a noise-floor control that
    went non-finite gave an infinite floor, which excused any divergence."""
    from precision_doctor.extras import ModeRun, StepRecord
    from precision_doctor.options import LowDtype
    from precision_doctor.training.preflight import _compared, _stalled

    def run(mode: str, losses: list[float], skipped: tuple[int, ...] = ()) -> ModeRun:
        steps = [StepRecord(step=i, loss=v, grads_finite=True, skipped=i in skipped) for i, v in enumerate(losses)]
        return ModeRun(
            mode=mode, description="", steps=steps, skipped_steps=list(skipped), nonfinite_steps=[], seconds=0.0
        )

    (stall,) = _stalled(run("low", [1.0, 1.0, 1.01, 1.02]), run("master", [1.0, 0.9, 0.8, 0.7]))
    assert "the loss rises 2.00%" in stall.message, stall.message

    class BrokenControl:
        def run(self, *args: Any, **kwargs: Any) -> ModeRun:
            return run("fp32", [1.0, float("nan"), float("nan"), float("nan")])

    runs = {"fp32": run("fp32", [1.0, 0.9, 0.8, 0.7]), "low": run("low", [1.0, 1.2, 1.3, 1.4])}
    out = _compared(BrokenControl(), runs, lambda _m: None, {}, 0.05, LowDtype.BF16)  # type: ignore[arg-type]
    assert out["low"].max_divergence is not None and out["low"].max_divergence > 0.05
    assert out["low"].noise_floor is None


def test_a_batch_with_a_loss_near_zero_does_not_outweigh_the_others() -> None:
    """The batch-by-batch descent averaged relative changes: a last-quarter batch at 1e-4 beside
    one at 10 made a master run that fell 5% on the real batch read as rising, and hid the
    stall. Summed over the batches, it falls."""
    from precision_doctor.extras import ModeRun, StepRecord
    from precision_doctor.training.preflight import _stalled

    def run(mode: str, losses: list[float]) -> ModeRun:
        steps = [StepRecord(step=i, loss=v, grads_finite=True) for i, v in enumerate(losses)]
        return ModeRun(mode=mode, description="", steps=steps, skipped_steps=[], nonfinite_steps=[], seconds=0.0)

    untrained = run("untrained", [10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 1e-4])
    master = run("master", [10.0, 9.9, 9.8, 9.7, 9.6, 9.5, 9.5, 3e-4])
    low = run("low", [10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 1e-4])
    (stall,) = _stalled(low, master, untrained)
    assert stall.risk == "STALLED_LOSS" and "the loss falls 0%" in stall.message
    # A first batch whose loss is exactly 0 does not turn the batch-by-batch reading off.
    zero_first = [0.0, 5.0] * 4
    (stall,) = _stalled(run("low", zero_first), run("master", [0.0, 5.0] * 3 + [0.0, 4.5]), run("u", zero_first))
    assert stall.risk == "STALLED_LOSS"

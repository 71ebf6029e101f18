"""The pre-flight with --dtype fp8: torchao's converted copy trained for real beside bf16 and
fp32, and Transformer Engine's delayed scaling modelled over the steps, against real execution
and hand-computed casts."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchao.float8")

import torchao.float8 as float8
import torchao.float8.float8_linear as fl

import precision_doctor as pd
from precision_doctor.capture.fp8 import convert_fp8
from precision_doctor.capture.lowrun import EMULATE_BF16_ENV
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.training.fp8_scaling import DelayedScalingModel, clipping

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models" / "fp8"


def _sample(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"fp8_pf_{name}", SAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torchao_losses(model: torch.nn.Module, batch: torch.Tensor, loss_fn: Any, recipe: str, steps: int) -> list[float]:
    """A plain training loop a user writes: torchao's conversion (emulated) of a copy,
    AdamW(lr=1e-4), each step under CPU bf16 autocast (the Float8Linear input cast to bf16,
    as torchao does under CUDA's autocast)."""
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=True)
    m = float8.convert_to_float8_training(copy.deepcopy(model), config=config)
    for mod in m.modules():
        if isinstance(mod, fl.Float8Linear):
            mod.register_forward_pre_hook(lambda _m, args: (args[0].to(torch.bfloat16), *args[1:]))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    losses = []
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(m(batch), batch)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    return losses


@pytest.mark.parametrize(("recipe", "go"), [("tensorwise", False), ("rowwise_with_gw_hp", True)])
def test_preflight_fp8_trains_torchaos_model(recipe: str, go: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp8 run's losses are a plain torchao training loop's, step for step; beside it a
    bf16 run. The outlier token under tensorwise zeroes the loss: no-go, the fp8 loss diverging
    from bf16's and naming the layer; rowwise_with_gw_hp trains as bf16 does: go."""
    monkeypatch.setenv(EMULATE_BF16_ENV, "0")
    s = _sample("outlier_token")
    model = s.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pd.preflight(
        model, s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe=recipe, steps=3, policy="cpu", plan=False
    )
    assert set(result.runs) == {"fp32", "bf16", "low"}
    assert result.runs["low"].losses == _torchao_losses(s.build_model(), s.make_batch(), s.loss_fn, recipe, 3)
    assert result.go is go and result.plan is None and result.fp8_scaling is not None
    bf16_divergence = [r for r in result.reasons if r.risk == "DIVERGENT_LOSS" and "bf16" in r.message]
    if go:
        assert not bf16_divergence
    else:
        assert bf16_divergence and "the layers the analysis flags: proj" in bf16_divergence[0].message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    section = result.annotated_report().extras.preflight  # type: ignore[union-attr]
    assert (
        section is not None
        and pd.Report.model_validate_json(
            result.annotated_report().model_dump_json()  # type: ignore[union-attr]
        ).extras.preflight
        == section
    )


def _steps_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False))


def test_delayed_scaling_counts_equal_hand_computed_casts() -> None:
    """Three steps of a converted Linear; the input's amax jumps 100x at step 1. The delayed
    scale is TE's: 1 at step 0, then 448 / the largest amax of the *previous* steps; each
    step's flushed and saturated counts equal explicit e4m3/e5m2 casts with that scale (and
    with the step's own, current, scale)."""
    model = convert_fp8(_steps_model(), "tensorwise")
    tracker = DelayedScalingModel(model)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(16, 32, generator=g) for _ in range(3)]
    inputs[1][3, 5] = 100.0  # the spike: step 1 casts it with step 0's scale
    grads: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with tracker.watching():
        for i, x in enumerate(inputs):
            with tracker.step(i):
                opt.zero_grad()
                weights.append(model[0].weight.detach().clone())
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = model(x)
                y.register_hook(lambda gr: grads.append(gr.detach().float().clone()))
                (y.float() * 1e-6).pow(2).mean().backward()  # small gradients: e5m2 flushes some at scale 1
                opt.step()
    result = tracker.result()
    tracks = {(t.layer, t.role): t for t in result.tracks}
    assert set(tracks) == {("0", "input"), ("0", "weight"), ("0", "grad_output")}
    seen = {
        "input": [x.to(torch.bfloat16).float() for x in inputs],  # the layer's input under autocast
        "weight": weights,
        "grad_output": grads,
    }
    for role, values in seen.items():
        track = tracks[("0", role)]
        dtype = torch.float8_e5m2 if role == "grad_output" else torch.float8_e4m3fn
        assert track.fp8_dtype == ("e5m2" if role == "grad_output" else "e4m3")
        fmax = torch.finfo(dtype).max
        amaxes = [float(v.abs().max()) for v in values]
        for i, (step, v) in enumerate(zip(track.steps, values, strict=True)):
            delayed = 1.0 if i == 0 else fmax / max(amaxes[:i])
            current = fmax / amaxes[i]
            assert step.amax == amaxes[i]
            assert step.delayed_scale == pytest.approx(delayed, rel=1e-12)
            assert step.current_scale == pytest.approx(current, rel=1e-12)
            for scale, flushed, saturated in (
                (delayed, step.flushed_delayed, step.saturated_delayed),
                (current, step.flushed_current, step.saturated_current),
            ):
                scaled = v * scale
                cast = scaled.clamp(-fmax, fmax).to(dtype).float()
                assert flushed == int(((v != 0) & (cast == 0)).sum()), (role, i)
                assert saturated == int((scaled.abs() > fmax).sum()), (role, i)
    spike = tracks[("0", "input")].steps[1]
    assert spike.saturated_delayed >= 1 and spike.saturated_current == 0 and clipping(spike, "e4m3")
    assert tracks[("0", "grad_output")].steps[0].flushed_delayed > 0  # TE's initial scale 1 on 1e-6 gradients


def _app_shows(report: pd.Report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, column: str) -> None:
    pytest.importorskip("streamlit")
    import sys

    from streamlit.testing.v1 import AppTest

    import precision_doctor.views.streamlit_app as streamlit_app

    path = tmp_path / "r.json"
    report.save(path)
    monkeypatch.setattr(sys, "argv", ["streamlit_app.py", str(path)])
    monkeypatch.delenv("PRECISION_DOCTOR_REPORT", raising=False)
    at = AppTest.from_file(str(streamlit_app.__file__), default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(column in d.value.columns for d in at.dataframe)


def test_preflight_fp8_notes_a_delayed_scaling_spike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make_batches with an amax spike at step 2: the pre-flight notes FP8_DELAYED_SCALING for
    that layer's input (a warning: modelled, not a failed run), and fail_on=warning makes it
    no-go."""
    s = _sample("healthy_mlp")

    def make_batches() -> list[torch.Tensor]:
        batches = [s.make_batch() for _ in range(3)]
        batches[2] = batches[2].clone()
        batches[2][0, 0] = 50 * float(batches[2].abs().max())
        return batches

    result = pd.preflight(
        s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", steps=3, make_batches=make_batches, plan=False
    )
    notes = [r for r in result.notes if r.risk == "FP8_DELAYED_SCALING" and r.unit == "up"]
    assert notes and "the input (e4m3) of 'up' at step 2" in notes[0].message
    assert result.fp8_scaling is not None
    up_input = next(t for t in result.fp8_scaling.tracks if (t.layer, t.role) == ("up", "input"))
    assert up_input.steps[2].saturated_delayed >= 1 and up_input.steps[2].saturated_current == 0
    # the views show the model's own numbers: the HTML report and the app (which only reads it)
    from precision_doctor.views.fp8 import fp8_scaling_rows
    from precision_doctor.views.html_report import write_html

    row = next(r for r in fp8_scaling_rows(result.fp8_scaling) if (r["layer"], r["role"]) == ("up", "input"))
    assert row["worst_step"] == 2 and row["saturated_delayed"] == up_input.steps[2].saturated_delayed
    assert row["flushed%_delayed"] == 100 * up_input.steps[2].flushed_delayed_fraction
    annotated = result.annotated_report()
    assert annotated is not None
    write_html(annotated, tmp_path / "r.html")
    assert 'id="fp8-delayed-scaling"' in (tmp_path / "r.html").read_text()
    _app_shows(annotated, tmp_path, monkeypatch, "flushed%_delayed")
    strict = pd.preflight(
        s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", steps=3, make_batches=make_batches,
        fail_on="warning", plan=False,
    )  # fmt: skip
    assert not strict.go and any(r.risk == "FP8_DELAYED_SCALING" for r in strict.reasons)


def test_preflight_fp8_refusals_are_one_line() -> None:
    s = _sample("healthy_mlp")
    with pytest.raises(PrecisionDoctorError, match="--regime autocast"):
        pd.preflight(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", regime="pure")
    with pytest.raises(
        PrecisionDoctorError,
        match=r"judging the planned configuration needs the plan \(plan=True; the CLI without --no-plan\)",
    ):
        pd.preflight(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", judge="planned", plan=False)
    with pytest.raises(PrecisionDoctorError, match="needs dtype='fp8'"):
        pd.preflight(s.build_model(), s.make_batch(), s.loss_fn, dtype="bf16", fp8_recipe="rowwise")


def test_cli_preflight_fp8(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    runner = CliRunner()
    args = ["preflight", str(SAMPLES / "outlier_token.py"), "--dtype", "fp8", "--steps", "2"]
    bad = runner.invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert bad.exit_code == 1, (bad.stdout, bad.stderr)
    assert "NO-GO" in bad.stdout and "bf16" in bad.stdout
    good = runner.invoke(app, [*args, "--fp8-recipe", "rowwise_with_gw_hp", "--json"])
    assert good.exit_code == 0, (good.stdout, good.stderr)
    parsed = pd.PreflightResult.from_json(good.stdout)
    assert parsed.go and parsed.fp8_scaling is not None and set(parsed.runs) == {"fp32", "bf16", "low", "planned"}
    refused = runner.invoke(app, ["preflight", str(SAMPLES / "outlier_token.py"), "--fp8-recipe", "rowwise"])
    assert refused.exit_code == 2 and "--fp8-recipe needs --dtype fp8" in refused.stderr


# --- the pre-flight with the fp8 plan ---------------------------------------------------------

PLAN_STEPS, PLAN_LR, PLAN_TOLERANCE = 10, 5e-3, 0.02
"""The lm fixture (tests/test_fp8_plan.py's) memorizing its batch with Adam(lr=5e-3). Measured
over 10 steps on this CPU: the planned run (fc1, fc2 fp8, the head bf16) at most 2.8e-3 from
the bf16 run's loss, the all-Linear tensorwise run 3.8e-2 (its head's input flushed); 2e-2
sits between, 7x above the plan's and 1.9x below all-Linear fp8's."""


def _compute_bound_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-flight plans on H100 (its default target) with memory traffic free: the
    fixture's 64-wide layers are too small for fp8 to pay on H100's real roofline (the plan
    would keep every layer bf16: tests/test_fp8_plan.py)."""
    from precision_doctor.options import Target
    from precision_doctor.planning import cost

    h100 = cost.PROFILES[Target.H100]
    monkeypatch.setitem(cost.PROFILES, Target.H100, dataclasses.replace(h100, bandwidth_bytes_per_s=1e30))


def _adam(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(m.parameters(), lr=PLAN_LR)


def _planned_losses(case: Any, plan: Any) -> list[float]:
    """The plan as a user trains it: the torchao export's convert_planned on a copy, the fp32
    units by apply_plan, Adam, each step under CPU bf16 autocast (the Float8Linear input cast
    to bf16 as torchao does under CUDA's autocast)."""
    from precision_doctor.capture.fp8 import autocast_input
    from precision_doctor.options import ExportFormat
    from precision_doctor.planning.export import render

    namespace: dict[str, Any] = {}
    exec(compile(render(plan, ExportFormat.TORCHAO), "<export>", "exec"), namespace)  # the export is code
    m = namespace["convert_planned"](copy.deepcopy(case.model), emulate=True)
    for mod in m.modules():
        if isinstance(mod, fl.Float8Linear):
            mod.register_forward_pre_hook(autocast_input)
    opt = _adam(m)
    losses = []
    torch.manual_seed(0)
    with pd.apply_plan(m, plan):
        for _ in range(PLAN_STEPS):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = case.loss_fn(m(case.batch), case.batch)
            loss.backward()
            losses.append(float(loss.detach()))
            opt.step()
    return losses


def test_preflight_fp8_trains_and_judges_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp8 pre-flight with the plan: the planned run keeps the outlier head out of fp8 and
    trains as the torchao export of the plan trains (loss for loss); its loss tracks bf16's
    within the tolerance where the all-Linear tensorwise run's does not. judge='planned' is go
    (the analysis' FP8_ERROR on the head does not count: the plan runs it in bf16); the
    delayed-scaling model covers the planned run's fp8 layers; the model is handed back as it
    came."""
    from tests.fixtures import build_outlier_weight_lm

    _compute_bound_h100(monkeypatch)
    monkeypatch.setenv(EMULATE_BF16_ENV, "0")
    case = build_outlier_weight_lm()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    result = pd.preflight(
        case.model, case.batch, case.loss_fn, dtype="fp8", steps=PLAN_STEPS, policy="cpu", judge="planned",
        build_optimizer=_adam, loss_tolerance=PLAN_TOLERANCE,
    )  # fmt: skip
    assert result.plan is not None
    units = result.plan.units
    assert units["head"] == "bf16" and units["fc1"].startswith("fp8:") and units["fc2"].startswith("fp8:")
    assert set(result.runs) == {"fp32", "bf16", "low", "planned"}
    plan = pd.Plan.from_json(result.plan.exports["json"])
    assert result.runs["planned"].losses == _planned_losses(case, plan)

    bf16 = result.runs["bf16"].losses

    def deviation(run: str) -> float:
        return max(abs(a - b) / b for a, b in zip(result.runs[run].losses, bf16, strict=True))

    assert bf16[-1] < 0.5 * bf16[0]  # it learns
    assert deviation("planned") <= PLAN_TOLERANCE < deviation("low")
    assert result.judge == "planned" and result.go and result.planned_go
    assert not any(r.risk in ("FP8_ERROR", "DIVERGENT_LOSS") for r in result.reasons)
    assert result.fp8_scaling is not None and result.fp8_scaling.run == "planned"
    assert {t.layer for t in result.fp8_scaling.tracks} == {"fc1", "fc2"}
    assert all(torch.equal(v, case.model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, fl.Float8Linear) for m in case.model.modules())
    assert "GO:" in result.verdict and "planned configuration" in result.verdict
    # Saved and read back (schema 9); a version-8 report (no `run`: the low run's model) still loads
    annotated = result.annotated_report()
    assert annotated is not None
    assert pd.Report.from_json(annotated.model_dump_json()) == annotated
    old = json.loads(annotated.model_dump_json())
    old["schema_version"] = 8
    del old["extras"]["preflight"]["fp8_scaling"]["run"]
    scaling = pd.Report.from_json(json.dumps(old)).extras.preflight.fp8_scaling  # type: ignore[union-attr]
    assert scaling is not None and scaling.run == "low"


FIXTURE_FILE = """
import torch
from tests.fixtures import build_outlier_weight_lm, next_token_loss

def build_model():
    return build_outlier_weight_lm().model

def make_batch():
    return build_outlier_weight_lm().batch

loss_fn = next_token_loss

def build_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=5e-3)
"""


def test_cli_preflight_fp8_judge_planned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`preflight --dtype fp8 --judge planned`: exit 0, the plan's run judged (its JSON says
    so); the same model judged as every Linear in fp8: exit 1, FP8_ERROR naming the head;
    --judge planned --no-plan: exit 2."""
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    _compute_bound_h100(monkeypatch)
    model_file = tmp_path / "lm.py"
    model_file.write_text(FIXTURE_FILE)
    runner = CliRunner()
    args = ["preflight", str(model_file), "--dtype", "fp8", "--steps", "3", "--policy", "cpu"]
    planned = runner.invoke(app, [*args, "--judge", "planned", "--json"])
    assert planned.exit_code == 0, (planned.stdout, planned.stderr)
    parsed = pd.PreflightResult.from_json(planned.stdout)
    assert parsed.judge == "planned" and parsed.go and parsed.fp8_scaling is not None
    assert parsed.fp8_scaling.run == "planned" and parsed.runs["planned"].units["head"] == "bf16"
    low = runner.invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert low.exit_code == 1, (low.stdout, low.stderr)
    assert "NO-GO" in low.stdout and "FP8_ERROR" in low.stdout and "head" in low.stdout
    refused = runner.invoke(app, [*args, "--judge", "planned", "--no-plan"])
    assert refused.exit_code == 2 and "judging the planned configuration needs the plan" in refused.stderr

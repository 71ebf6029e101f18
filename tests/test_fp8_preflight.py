"""The pre-flight with --dtype fp8: torchao's converted copy trained for real beside bf16 and
fp32, and Transformer Engine's delayed scaling modelled over the steps, against real execution
and hand-computed casts."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
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
    result = pd.preflight(model, s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe=recipe, steps=3, policy="cpu")
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

    result = pd.preflight(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", steps=3, make_batches=make_batches)
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
        fail_on="warning",
    )  # fmt: skip
    assert not strict.go and any(r.risk == "FP8_DELAYED_SCALING" for r in strict.reasons)


def test_preflight_fp8_refusals_are_one_line() -> None:
    s = _sample("healthy_mlp")
    with pytest.raises(PrecisionDoctorError, match="--regime autocast"):
        pd.preflight(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", regime="pure")
    with pytest.raises(PrecisionDoctorError, match="no plan to judge"):
        pd.preflight(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", judge="planned")
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
    assert parsed.go and parsed.fp8_scaling is not None and set(parsed.runs) == {"fp32", "bf16", "low"}
    refused = runner.invoke(app, ["preflight", str(SAMPLES / "outlier_token.py"), "--fp8-recipe", "rowwise"])
    assert refused.exit_code == 2 and "--fp8-recipe needs --dtype fp8" in refused.stderr

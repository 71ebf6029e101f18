"""fp8 as a low-precision run executed by torchao (`--dtype fp8`), against real execution."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchao.float8")

import torchao.float8 as float8
import torchao.float8.float8_linear as fl

import precision_doctor as pd
from precision_doctor.capture.fp8 import Fp8Run
from precision_doctor.capture.lowrun import EMULATE_BF16_ENV, low_run
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.options import Flag

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
SAMPLES = Path(__file__).resolve().parents[1] / "sample_models" / "fp8"


def _sample(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"fp8_{name}", SAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 16)
    )


def _batch() -> torch.Tensor:
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    x[0, 3] *= 300.0  # an outlier token: some values flush under tensorwise scaling
    return x


def _loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def _plain_run(model: torch.nn.Module, batch: torch.Tensor, recipe: str) -> tuple[float, dict[str, torch.Tensor]]:
    """torchao's own conversion, emulated, under bf16 autocast, one backward: what a user runs.
    The input cast is the one `Float8Linear.forward` does under CUDA autocast (torchao reads
    only CUDA's autocast state)."""
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=True)
    m = float8.convert_to_float8_training(copy.deepcopy(model), config=config)
    for mod in m.modules():
        if isinstance(mod, fl.Float8Linear):
            mod.register_forward_pre_hook(lambda _m, args: (args[0].to(torch.bfloat16), *args[1:]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(m(batch), batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe", RECIPES)
def test_low_run_is_torchaos_run_bit_for_bit(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The analysis' fp8 low run (the same `Fp8Run`, `low_run` and kept-graph backward at the
    loss scale the analysis uses, 2^0) equals the plain run: loss and every gradient. Both on
    the real bf16 kernels: a CPU without fast ones would otherwise emulate bf16 in the analysis
    only, another path whose bits need not agree."""
    monkeypatch.setenv(EMULATE_BF16_ENV, "0")
    model, batch = _mlp(), _batch()
    loss_plain, grads_plain = _plain_run(model, batch, recipe)

    report = pd.analyze(model, batch, _loss, dtype="fp8", fp8_recipe=recipe, policy="cpu")
    assert report.losses.low == loss_plain
    assert report.grad_fidelity is not None and report.grad_fidelity.scale_log2 == 0
    assert report.extras.fp8 is not None and report.extras.fp8.recipe == recipe
    assert report.extras.fp8.torchao_version and report.extras.fp8.emulated

    run = Fp8Run.start(model, recipe)
    grads: dict[str, torch.Tensor] = {}
    with run.recording():
        low = low_run(run.model, batch, _loss, torch.bfloat16, regime="autocast", policy="cpu", keep_graph=True)
        assert low.graph is not None
        low.graph.backward(0, lambda names, g: grads.update(dict.fromkeys(names, g.clone())))
    assert low.loss == loss_plain
    assert grads.keys() == grads_plain.keys()
    for name, g in grads_plain.items():
        assert torch.equal(grads[name], g), name
    # the user's model is not converted
    assert not any(isinstance(m, fl.Float8Linear) for m in model.modules())


@pytest.mark.parametrize("recipe", RECIPES)
def test_cast_counts_equal_explicit_casts(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each recorded cast's flushed and saturated counts equal those of an explicit cast to
    torch.float8_e4m3fn / float8_e5m2 with the scale torchao used (its bits too)."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = fl.hp_tensor_to_float8_dynamic

    def spy(hp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(hp, *args, **kwargs)
        seen.append((hp.detach().clone(), out._scale.detach().clone(), out._data.detach().clone()))
        return out

    monkeypatch.setattr(fl, "hp_tensor_to_float8_dynamic", spy)
    model, batch = _mlp(), _batch()
    run = Fp8Run.start(model, recipe)
    with run.recording():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(run.model(batch), batch)
        loss.backward()
    casts = run.recorder.casts
    assert len(casts) == len(seen) > 0
    assert {c.role for c in casts} == {"input", "weight", "grad_output"}
    assert {c.gemm for c in casts} == (
        {"fprop", "dgrad"} if recipe == "rowwise_with_gw_hp" else {"fprop", "dgrad", "wgrad"}
    )
    total_flushed = 0
    for c, (hp, scale, bits) in zip(casts, seen, strict=True):
        dtype = torch.float8_e4m3fn if c.fp8_dtype == "e4m3" else torch.float8_e5m2
        fmax = torch.finfo(dtype).max
        scaled = hp.float() * scale
        explicit = scaled.clamp(-fmax, fmax).to(dtype)
        assert torch.equal(explicit.view(torch.uint8), bits.view(torch.uint8))
        assert c.flushed == int(((hp != 0) & (explicit.float() == 0)).sum())
        assert c.saturated == int((scaled.abs() > fmax).sum())
        assert c.amax == float(hp.float().abs().max())
        total_flushed += c.flushed
    if recipe == "tensorwise":
        assert total_flushed > 0  # the outlier token makes some


def test_outlier_token_flags_and_fix() -> None:
    """Tensorwise flushes the ordinary tokens (FP8_ERROR, FP8_UNDERFLOW on `proj`'s input),
    rowwise rescues the forward but not wgrad (the outlier token sits in every column),
    rowwise_with_gw_hp passes: measured with torchao."""
    s = _sample("outlier_token")
    flags, messages = {}, {}
    for recipe in RECIPES:
        report = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe=recipe)
        flags[recipe] = {(f.flag, f.unit, f.evidence.op) for f in report.flags() if f.flag.value.startswith("FP8")}
        messages[recipe] = [f.evidence.message for f in report.flags() if f.flag is Flag.FP8_ERROR]
    assert flags["tensorwise"] == {
        (Flag.FP8_ERROR, "proj", "fprop"),
        (Flag.FP8_UNDERFLOW, "proj", "fprop"),
        (Flag.FP8_UNDERFLOW, "proj", "wgrad"),  # the same input, cast again for the weight gradient
    }
    (tw,) = messages["tensorwise"]
    assert "worst cast: input" in tw and "the rowwise recipe fixes it" in tw
    assert "confirm with --fp8-recipe rowwise" in tw  # its gradients were all 0: the backward is unjudged
    assert (Flag.FP8_ERROR, "proj", "wgrad") in flags["rowwise"]
    assert {op for _, _, op in flags["rowwise"]} == {"wgrad"}  # the forward is rescued
    (rw,) = messages["rowwise"]
    assert "the rowwise_with_gw_hp recipe fixes it" in rw and "confirm" not in rw
    assert flags["rowwise_with_gw_hp"] == set()


def test_outlier_token_relative_error_per_recipe() -> None:
    """The ordinary tokens' output error under each recipe, from torchao's run itself."""
    s = _sample("outlier_token")
    model, x = s.build_model(), s.make_batch()
    with torch.no_grad():
        ref = model(x)[1:]
    errors = {}
    for recipe in RECIPES:
        run = Fp8Run.start(model, recipe)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = run.model(x)[1:].float()
        errors[recipe] = float((out - ref).norm() / ref.norm())
    print("outlier token, ordinary tokens' relative output error:", errors, file=sys.stderr)
    assert errors["tensorwise"] > 0.9  # measured 1.0: every ordinary token flushed
    assert errors["rowwise"] < 0.05  # measured 0.034


@pytest.mark.parametrize("recipe", RECIPES)
def test_healthy_mlp_takes_fp8(recipe: str) -> None:
    s = _sample("healthy_mlp")
    report = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe=recipe)
    # No finding at all: e4m3's rounding of the batch (~3.6% at `up`, from exact inputs) is
    # what fp8 is, no ERROR_GROWTH.
    assert report.flags() == [], [(f.flag, f.unit, f.evidence.message) for f in report.flags()]
    assert report.by_module()["up"].forward.propagated.rel_l2_error > 0.02  # what used to flag
    section = report.extras.fp8
    assert section is not None and section.layers == ["up", "down"]
    assert all(c.flushed_fraction < 0.05 for c in section.casts)
    # the report round-trips through its JSON
    assert pd.Report.model_validate_json(report.model_dump_json()).extras.fp8 == section


def test_refusals_are_one_line() -> None:
    model, batch = _mlp(), _batch()
    with pytest.raises(PrecisionDoctorError, match="needs dtype='fp8'"):
        pd.analyze(model, batch, _loss, dtype="bf16", fp8_recipe="rowwise")
    with pytest.raises(PrecisionDoctorError, match="unknown fp8 recipe"):
        pd.analyze(model, batch, _loss, dtype="fp8", fp8_recipe="delayed")
    with pytest.raises(PrecisionDoctorError, match="--regime autocast"):
        pd.analyze(model, batch, _loss, dtype="fp8", regime="pure")
    report = pd.analyze(model, batch, _loss, dtype="fp8")
    with pytest.raises(PrecisionDoctorError, match="measured costs time each unit in fp32 and bf16 only"):
        pd.plan_report(model, batch, _loss, report, cost_source="measured")
    with pytest.raises(PrecisionDoctorError, match="fp8 training needs no loss scale"):
        pd.recommend_loss_scale(report)


def test_without_torchao_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import fails
    with pytest.raises(PrecisionDoctorError, match=r"pip install 'precision-doctor\[fp8\]'"):
        pd.analyze(_mlp(), _batch(), _loss, dtype="fp8")


def _cli_one_line(args: list[str]) -> str:
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_cli_fp8(tmp_path: Path) -> None:
    """`--dtype fp8 --fp8-recipe`: the findings on the terminal, the section in the saved
    report with its fp8 plan; --fp8-recipe without fp8, a target without an fp8 peak and an
    export format not for fp8 refused in one line."""
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    sample = str(SAMPLES / "outlier_token.py")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app, ["analyze", sample, "--dtype", "fp8", "--fp8-recipe", "rowwise", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "FP8_ERROR" in result.stdout and "fp8" in result.stdout
    # the one layer is first and last: flagged (wgrad) under rowwise, passed by another recipe
    assert "proj (first and last): takes fp8 under the rowwise_with_gw_hp recipe, not rowwise" in result.stdout
    assert "this model needs none of these exclusions: each of these layers takes fp8 under a recipe" in result.stdout
    saved = pd.Report.load(out)
    assert saved.extras.fp8 is not None and saved.extras.fp8.recipe == "rowwise"
    assert saved.extras.plan is not None and saved.extras.plan.dtype == "fp8"  # --out plans, as for bf16
    exclusions = [(e.layer, e.flagged, e.fix, e.needed) for e in saved.extras.fp8.exclusions]
    assert exclusions == [("proj", True, "rowwise_with_gw_hp", False)]
    assert "--fp8-recipe needs --dtype fp8" in _cli_one_line(["analyze", sample, "--fp8-recipe", "rowwise"])
    assert "has no fp8 matmul peak" in _cli_one_line(["analyze", sample, "--dtype", "fp8", "--target", "a100"])
    assert "is not for fp8 plans" in _cli_one_line(["analyze", sample, "--dtype", "fp8", "--export-format", "hf"])
    bogus = _cli_one_line(["analyze", sample, "--dtype", "fp8", "--fp8-recipe", "delayed"])
    assert "unknown --fp8-recipe 'delayed'" in bogus and bogus.endswith("; or all (every recipe, compared)")


def test_html_report_has_the_fp8_tables(tmp_path: Path) -> None:
    from precision_doctor.views.html_report import write_html

    s = _sample("outlier_token")
    report = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8")
    write_html(report, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert 'id="fp8"' in html and 'id="fp8-gemms"' in html and 'id="fp8-casts"' in html
    assert "underflows%" in html and "recipe rowwise" in html
    assert 'id="fp8-exclusions"' in html and re.search(r"proj</td>\s*<td>first and last</td>", html)


def test_app_has_the_fp8_tab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An `--fp8-recipe all` report renders: the fp8 tab's tables (casts, roles, the recipes
    side by side with the report's own numbers) and its figure."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    import precision_doctor.views.streamlit_app as streamlit_app

    s = _sample("outlier_token")
    path = tmp_path / "r.json"
    report = pd.compare_fp8_recipes(s.build_model(), s.make_batch(), s.loss_fn, recipes=["tensorwise", "rowwise"])
    report.save(path)
    monkeypatch.setattr(sys, "argv", ["streamlit_app.py", str(path)])
    monkeypatch.delenv("PRECISION_DOCTOR_REPORT", raising=False)
    at = AppTest.from_file(str(streamlit_app.__file__), default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "fp8" in [t.label for t in at.tabs]
    frames = [d.value for d in at.dataframe]
    assert any("underflows%" in f.columns for f in frames)
    assert any("flushed%" in f.columns and "role" in f.columns for f in frames)
    losses = next(f for f in frames if "loss_rel_error" in f.columns)
    assert report.extras.fp8_recipes is not None
    assert list(losses["loss_rel_error"]) == [run.loss_rel_error for run in report.extras.fp8_recipes.runs]
    layers = next(f for f in frames if "rowwise" in f.columns and "fix" in f.columns)
    assert list(layers["layer"]) == ["proj"] and "FP8_ERROR fprop" in layers["tensorwise"][0]
    assert any(e.type == "plotly_chart" for e in at.get("plotly_chart"))
    assert report.extras.fp8 is not None
    exclusions = next(f for f in frames if "needed" in f.columns)
    assert (
        [tuple(r) for r in exclusions[["layer", "convention", "needed"]].itertuples(index=False)]
        == [(e.layer, e.convention, e.needed) for e in report.extras.fp8.exclusions]
        == [("proj", "first and last", False)]
    )  # rowwise_with_gw_hp passes the one layer: no bf16 needed


def _one_linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False))


def test_gradient_that_underflows_e5m2() -> None:
    """One token's loss weight 1e7 sets grad_output's tensorwise scale: the other tokens'
    gradients flush under e5m2's 2^-16 (FP8_UNDERFLOW on grad_output, FP8_ERROR on dgrad);
    rowwise scales dgrad's grad_output per token and keeps them. The flushed count is checked
    against an explicit e5m2 cast of the fp32 output gradient with torchao's tensorwise scale."""
    s = _sample("gradient_underflow_e5m2")
    tw = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe="tensorwise")
    found = {(f.flag, f.evidence.op) for f in tw.flags()}
    assert (Flag.FP8_UNDERFLOW, "dgrad") in found and (Flag.FP8_ERROR, "dgrad") in found
    error = next(f for f in tw.flags() if (f.flag, f.evidence.op) == (Flag.FP8_ERROR, "dgrad"))
    assert "the rowwise recipe fixes it" in error.evidence.message
    assert tw.extras.fp8 is not None
    go = [c for c in tw.extras.fp8.casts if c.role == "grad_output"]
    assert go and all(c.fp8_dtype == "e5m2" and c.flushed_fraction > 0.9 for c in go)
    # the reference: the output gradient (fp32 here, bf16 in the run: near enough for the count
    # of values 1e7 below the amax) cast to e5m2 with scale e5m2_max / amax
    model, x = s.build_model(), s.make_batch()
    out = model(x).detach().requires_grad_(True)
    s.loss_fn(out, x).backward()
    assert out.grad is not None
    g = out.grad
    scaled = g * (torch.finfo(torch.float8_e5m2).max / g.abs().max())
    flushed = int(((g != 0) & (scaled.to(torch.float8_e5m2).float() == 0)).sum())
    assert flushed / int((g != 0).sum()) > 0.9 and abs(flushed - go[0].flushed) <= 0.01 * g.numel()
    rw = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe="rowwise")
    assert not any(f.evidence.op == "dgrad" for f in rw.flags() if f.flag.value.startswith("FP8"))


def test_all_zero_row_under_rowwise_stays_finite() -> None:
    """torchao 0.18 bounds the amax from below (torchao #3356): an all-zero token under rowwise
    scaling gives no NaN, in torchao's own converted model and in the analysis; the cast records
    the zero row."""
    s = _sample("all_zero_row")
    model, x = s.build_model(), s.make_batch()
    config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name("rowwise"), emulate=True)
    m = float8.convert_to_float8_training(copy.deepcopy(model), config=config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.to(torch.bfloat16))
    s.loss_fn(out, x).backward()
    assert torch.isfinite(out).all() and bool((out[s.ZERO_ROW] == 0).all())
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    report = pd.analyze(model, x, s.loss_fn, dtype="fp8", fp8_recipe="rowwise")
    assert report.extras.fp8 is not None and report.grad_fidelity is not None
    assert torch.isfinite(torch.tensor(report.losses.low)) and report.grad_fidelity.nonfinite_count == 0
    fprop_input = next(c for c in report.extras.fp8.casts if c.gemm == "fprop" and c.role == "input")
    assert (fprop_input.zero_groups, fprop_input.groups) == (1, s.TOKENS)
    assert not [f for f in report.flags() if f.flag.value.startswith("FP8")]


def test_tensorwise_forward_equals_scaled_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulated tensorwise forward matmul equals torch._scaled_mm on torchao's own fp8
    operands and scales, where the CPU's oneDNN has an fp8 matmul (per-tensor scales). Two
    kernels sum the same exact products in their own order: their bf16 results agree to one
    bf16 rounding (2^-8 relative), not necessarily bit for bit."""
    seen: list[Any] = []
    original = fl.hp_tensor_to_float8_dynamic

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(fl, "hp_tensor_to_float8_dynamic", spy)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    run = Fp8Run.start(_one_linear(), "tensorwise")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = run.model(x)
    a, b = seen[0], seen[1]  # the input and the transposed weight
    try:
        ref = torch._scaled_mm(
            a._data, b._data, scale_a=a._scale.reciprocal(), scale_b=b._scale.reciprocal(), out_dtype=torch.float32
        )
    except RuntimeError as e:  # oneDNN without fp8 matmul (AVX2-only x86, many ARM CPUs)
        pytest.skip(f"this CPU has no fp8 matmul: {e}")
    torch.testing.assert_close(ref.to(y.dtype), y, rtol=2.0**-8, atol=0.0)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise_with_gw_hp", "mxfp8"])
def test_lm_head_outlier_channel_needs_bf16(recipe: str) -> None:
    """A tiny transformer whose lm_head reads an outlier channel that sits in every token's
    row: no recipe rescues the lm_head (its fix is bf16), the attention and MLP layers take fp8;
    the conventional exclusions are judged, not assumed, and the report says which are needed."""
    from precision_doctor.views.fp8 import conventional_lines, fp8_next_steps

    s = _sample("lm_head_outlier_channel")
    report = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe=recipe)
    fp8_flags = [f for f in report.flags() if f.flag in (Flag.FP8_ERROR, Flag.FP8_UNDERFLOW)]
    assert {f.unit for f in fp8_flags} == {"lm_head"}
    error = next(f for f in fp8_flags if f.flag is Flag.FP8_ERROR)
    assert error.evidence.op == "fprop" and "keep 'lm_head' in bf16" in error.evidence.message
    assert report.extras.fp8 is not None
    assert report.extras.fp8.layers == ["block.attn.qkv", "block.attn.out", "block.mlp.up", "block.mlp.down", "lm_head"]
    verdicts = [(e.layer, e.convention, e.flagged, e.needed) for e in report.extras.fp8.exclusions]
    assert verdicts == [("block.attn.qkv", "first", False, False), ("lm_head", "last", True, True)]
    assert conventional_lines(report) == [
        f"conventionally kept in high precision: block.attn.qkv (first): takes fp8 under {recipe}; "
        "lm_head (last): needs bf16",
        "this model needs the exclusion of lm_head (no fp8 recipe passes it)",
    ]
    assert pd.Report.model_validate_json(report.model_dump_json()).extras.fp8 == report.extras.fp8
    assert any("lm_head" in line and "module_filter_fn" in line for line in fp8_next_steps(report, ["x"]))


def test_lm_head_exclusion_is_what_torchao_needs() -> None:
    """The verdict against torchao itself: the tiny transformer converted whole (tensorwise,
    emulated, under bf16 autocast) gives logits below torchao's 18 dB against fp32; converted
    with the lm_head left out by `module_filter_fn` (the analysis' advice) it gives them above."""
    s = _sample("lm_head_outlier_channel")
    model, ids = s.build_model(), s.make_batch()
    with torch.no_grad():
        ref = model(ids).float()

    def logits_db(skip: set[str]) -> float:
        config = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name("tensorwise"), emulate=True)
        m = float8.convert_to_float8_training(
            copy.deepcopy(model), config=config, module_filter_fn=lambda _mod, name: name not in skip
        )
        for mod in m.modules():
            if isinstance(mod, fl.Float8Linear):  # the input cast torchao expects of CUDA autocast
                mod.register_forward_pre_hook(lambda _m, args: (args[0].to(torch.bfloat16), *args[1:]))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids).float()
        return float(20 * torch.log10(ref.norm() / (out - ref).norm()))

    assert logits_db(set()) < 18 <= logits_db({"lm_head"})


# --- mxfp8: torchao 0.18's MXFP8Linear ------------------------------------------------------


def _mx_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 32)
    )


def _mx_batch() -> torch.Tensor:
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))  # 32 tokens: whole blocks
    x[0, 3] *= 300.0
    x[1, 5] = 0  # one all-zero block of the first layer's input
    return x


def test_mxfp8_cast_counts_equal_explicit_casts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each recorded mxfp8 cast (torchao's `to_mx`, seen by a spy beneath the recorder): its
    bits equal an explicit e4m3 cast with a power-of-two scale per 32 values computed here from
    the block's amax (RCEIL: 2^ceil(log2(amax / 448))); flushed, saturated and zero-amax blocks
    counted from that cast."""
    import torchao.prototype.mx_formats.mx_tensor as mx_tensor

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = mx_tensor.to_mx
    run = Fp8Run.start(_mx_mlp(), "mxfp8")

    def spy(data_hp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(data_hp, *args, **kwargs)
        if run.recorder._mx_slots:  # the layer's own casts, not the recorder's per-recipe comparison
            seen.append((data_hp.detach().float().clone(), out[1].detach().clone()))
        return out

    monkeypatch.setattr(mx_tensor, "to_mx", spy)
    assert list(run.recorder.layers) == ["0", "3"] and run.emulated
    with run.recording():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(run.model(_mx_batch()), _mx_batch())
        loss.backward()
    casts = run.recorder.casts
    assert len(casts) == len(seen) == 12  # 2 layers x (2 fprop + 2 dgrad + 2 wgrad)
    assert {(c.gemm, c.role) for c in casts} == {
        ("fprop", "input"), ("fprop", "weight"), ("dgrad", "grad_output"),
        ("dgrad", "weight"), ("wgrad", "grad_output"), ("wgrad", "input"),
    }  # fmt: skip
    e4m3 = torch.float8_e4m3fn
    for c, (hp, bits) in zip(casts, seen, strict=True):
        blocks = hp.reshape(*hp.shape[:-1], -1, 32)
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        exponent = torch.ceil(torch.log2(amax / 448.0)).clamp(-127, 127)
        scale = torch.where(amax > 0, torch.exp2(-exponent), torch.ones_like(amax))
        scaled = (blocks * scale).reshape(hp.shape)
        explicit = scaled.clamp(-448, 448).to(e4m3)
        assert torch.equal(explicit.view(torch.uint8), bits.view(torch.uint8)), (c.layer, c.gemm, c.role)
        assert c.granularity == "block32" and c.fp8_dtype == "e4m3"
        assert c.flushed == int(((hp != 0) & (explicit.float() == 0)).sum())
        assert c.saturated == int((scaled.abs() > 448).sum())
        assert (c.zero_groups, c.groups) == (int((amax == 0).sum()), hp.numel() // 32)
        assert c.amax == float(hp.abs().max())
    first = next(c for c in casts if c.layer == "0" and c.gemm == "fprop" and c.role == "input")
    assert first.zero_groups == 1  # the zeroed token: its scale gives no NaN either
    assert all(torch.isfinite(p.grad).all() for p in run.model.parameters() if p.grad is not None)


def test_mxfp8_layer_is_torchaos_mxfp8_linear() -> None:
    """The run's layer is torchao's own MXFP8Linear: its output equals torchao's emulated fp32
    run of the same layer rounded to bf16 (the GPU kernel's `out_dtype`), and its weight
    gradient equals torchao's backward fed the same output gradient, rounded to bf16; the
    user's model is not converted."""
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    run = Fp8Run.start(model, "mxfp8")
    assert isinstance(run.model[0], MXFP8Linear) and type(model[0]) is torch.nn.Linear
    grad_out: list[torch.Tensor] = []
    with run.recording():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run.model(x)
        y.register_hook(lambda g: grad_out.append(g.clone()))
        y.float().pow(2).mean().backward()
    plain = MXFP8Linear(
        64,
        32,
        bias=False,
        kernel_preference=KernelPreference.EMULATED,
        scale_calculation_mode=ScaleCalculationMode.RCEIL,
    )
    with torch.no_grad():
        plain.weight.copy_(model[0].weight)
    y_plain = plain(x)  # fp32 in, fp32 weight: torchao's emulated path runs as is
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_plain.to(torch.bfloat16))
    y_plain.backward(grad_out[0].float())
    assert plain.weight.grad is not None and run.model[0].weight.grad is not None
    assert torch.equal(run.model[0].weight.grad, plain.weight.grad.to(torch.bfloat16).float())


def test_mxfp8_refuses_rows_not_in_blocks() -> None:
    """torchao's MX weight gradient casts along the tokens in blocks of 32: 33 rows are refused
    in one line naming the layer, not an assertion from inside torchao."""
    x = torch.randn(33, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(PrecisionDoctorError, match=r"^--fp8-recipe mxfp8: '0' is fed 33 rows.*multiple of 32"):
        pd.analyze(torch.nn.Sequential(torch.nn.Linear(32, 32)), x, _loss, dtype="fp8", fp8_recipe="mxfp8")
    # (said as it is: not as "the model's forward raised PrecisionDoctorError: ...")


@pytest.mark.parametrize("recipe", [*RECIPES, "mxfp8"])
def test_outlier_channel_block_needs_mxfp8(recipe: str) -> None:
    """An outlier channel in every row: no per-tensor or per-row recipe rescues the forward
    (FP8_ERROR on fprop naming mxfp8), mxfp8's blocks do (no fp8 finding): torchao's casts."""
    s = _sample("outlier_channel_block")
    report = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe=recipe)
    errors = [f for f in report.flags() if f.flag is Flag.FP8_ERROR]
    if recipe == "mxfp8":
        assert not [f for f in report.flags() if f.flag in (Flag.FP8_ERROR, Flag.FP8_UNDERFLOW)]
        return
    assert [(f.unit, f.evidence.op) for f in errors] == [("proj", "fprop")]
    assert "the mxfp8 recipe fixes it" in errors[0].evidence.message
    from precision_doctor.views.fp8 import fp8_next_steps

    # The next step names mxfp8 with what it needs (an H100 target has no MX tensor cores).
    assert any(line.startswith("check the mxfp8 recipe (Blackwell GPUs only") for line in fp8_next_steps(report, ["x"]))


def test_lm_head_outlier_channel_mxfp8_rescues_other_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under mxfp8 the lm_head's flushed inputs all sit in the outlier channel's block (channels
    0-31: every other block keeps its values), fewer than under rowwise; the layer still fails,
    and its fix stays bf16."""
    import torchao.prototype.mx_formats.mx_tensor as mx_tensor

    s = _sample("lm_head_outlier_channel")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = mx_tensor.to_mx

    def spy(data_hp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(data_hp, *args, **kwargs)
        seen.append((data_hp.detach().float().clone(), out[1].detach().clone()))
        return out

    monkeypatch.setattr(mx_tensor, "to_mx", spy)
    mx = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe="mxfp8")
    assert mx.extras.fp8 is not None
    index = next(
        i for i, c in enumerate(mx.extras.fp8.casts) if (c.layer, c.gemm, c.role) == ("lm_head", "fprop", "input")
    )
    # the lm_head's forward input: its first cast with the outlier channel's amax (the recorder's
    # own per-recipe casts of the same value come after it)
    hp, bits = next(
        (h, b) for h, b in seen if h.shape == (32, 64) and float(h.abs().max()) == mx.extras.fp8.casts[index].amax
    )
    flushed = (hp != 0) & (bits.float() == 0)
    assert int(flushed.sum()) == mx.extras.fp8.casts[index].flushed > 0
    assert int(flushed[:, 32:].sum()) == 0  # the blocks without the outlier keep every value
    monkeypatch.setattr(mx_tensor, "to_mx", original)
    rw = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe="rowwise")
    assert rw.extras.fp8 is not None
    rw_input = next(c for c in rw.extras.fp8.casts if (c.layer, c.gemm, c.role) == ("lm_head", "fprop", "input"))
    assert rw_input.flushed > mx.extras.fp8.casts[index].flushed
    error = next(f for f in mx.flags() if f.flag is Flag.FP8_ERROR)
    assert error.unit == "lm_head" and "keep 'lm_head' in bf16" in error.evidence.message


# --- views: the per-layer figure and the recipe comparison ---------------------------------


def test_fp8_role_table_and_figure_hold_the_reports_casts() -> None:
    """The per-layer-and-role rows and the figure's points are the report's casts: the largest
    amax, the smallest scale and the worst flushed fraction over each role's casts, recomputed
    here from `extras.fp8.casts`."""
    from precision_doctor.views.fp8 import fp8_figure, fp8_role_rows

    s = _sample("lm_head_outlier_channel")
    report = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe="rowwise")
    section = report.extras.fp8
    assert section is not None
    rows = fp8_role_rows(section)
    assert {(r["layer"], r["role"]) for r in rows} == {
        (layer, role) for layer in section.layers for role in ("input", "weight", "grad_output")
    }
    for r in rows:
        casts = [c for c in section.casts if c.layer == r["layer"] and c.role == r["role"]]
        assert r["amax"] == max(c.amax for c in casts)
        assert r["scale_min"] == min(c.scale_min for c in casts)
        assert r["flushed%"] == 100 * max(c.flushed / c.nonzero for c in casts if c.nonzero)
    lm_input = next(r for r in rows if (r["layer"], r["role"]) == ("lm_head", "input"))
    assert lm_input["flushed%"] > 5  # the outlier channel's flushes show
    fig = fp8_figure(section)
    by_panel: dict[tuple[str, str], list[float]] = {}
    for trace in fig.data:
        panel = {"y": "amax", "y2": "scale_min", "y3": "flushed%"}[trace.yaxis]
        by_panel[(trace.name, panel)] = list(trace.y)
    for role in ("input", "weight", "grad_output"):
        mine = [r for r in rows if r["role"] == role]
        for key in ("amax", "scale_min", "flushed%"):
            assert by_panel[(role, key)] == [r[key] for r in mine]


def test_recipe_comparison_equals_separate_analyses(tmp_path: Path) -> None:
    """`compare_fp8_recipes`: each recipe's final-loss error and findings equal its own
    `analyze`; the report is the first recipe's; the HTML report and the terminal show the
    comparison."""
    from precision_doctor.views.fp8 import fp8_recipe_lines
    from precision_doctor.views.html_report import write_html

    s = _sample("outlier_token")
    report = pd.compare_fp8_recipes(s.build_model(), s.make_batch(), s.loss_fn)
    comparison = report.extras.fp8_recipes
    assert comparison is not None and [r.recipe for r in comparison.runs] == [*RECIPES, "mxfp8"]
    assert report.extras.fp8 is not None and report.extras.fp8.recipe == "tensorwise"
    for run in comparison.runs:
        alone = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe=run.recipe)
        assert run.loss_rel_error == alone.losses.rel_error and run.loss_low == alone.losses.low
        found = {(f.unit, f"{f.flag.value} {f.evidence.op}") for f in alone.flags() if f.flag.value.startswith("FP8")}
        assert {(layer, text) for layer, texts in run.findings.items() for text in texts} == found
    assert comparison.runs[0].findings["proj"][0] == "FP8_ERROR fprop"
    assert "proj" not in comparison.runs[2].findings  # rowwise_with_gw_hp passes
    lines = fp8_recipe_lines(report)
    assert "rowwise_with_gw_hp" in lines[1] and f"{comparison.runs[1].loss_rel_error:.2e}" in lines[2]
    write_html(report, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert 'id="fp8-recipe-losses"' in page and 'id="fp8-recipe-layers"' in page and 'id="fp8-roles"' in page
    assert pd.Report.model_validate_json(report.model_dump_json()).extras.fp8_recipes == comparison
    with pytest.raises(PrecisionDoctorError, match="sets fp8_recipe itself"):
        pd.compare_fp8_recipes(s.build_model(), s.make_batch(), s.loss_fn, fp8_recipe="rowwise")


def test_cli_fp8_recipe_all(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        ["analyze", str(SAMPLES / "outlier_channel_block.py"), "--dtype", "fp8", "--fp8-recipe", "all",
         "--out", str(out), "--quiet"],
        env={"COLUMNS": "240", "NO_COLOR": "1"},
    )  # fmt: skip
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "fp8 recipes side by side" in result.stdout
    saved = pd.Report.load(out)
    assert saved.extras.fp8_recipes is not None
    assert {r.recipe: r.fixes["proj"] for r in saved.extras.fp8_recipes.runs} == dict.fromkeys(
        [*RECIPES, "mxfp8"], "mxfp8"
    )


def test_model_comes_back_as_it_went_in() -> None:
    """Every recipe's analysis (`compare_fp8_recipes`) and the fp8 pre-flight leave the user's
    model as it was: parameters, .grad objects and values, requires_grad, modes, buffers, RNG,
    no hook (torchao converts copies)."""
    import random

    import numpy as np

    from .test_model_state import assert_restored, prepare, snapshot

    s = _sample("healthy_mlp")
    model = s.build_model().train()
    prepare(model)
    model.act.eval()
    torch.manual_seed(99)
    random.seed(5)
    np.random.seed(6)
    before = snapshot(model)
    report = pd.compare_fp8_recipes(model, s.make_batch(), s.loss_fn)
    assert report.extras.fp8_recipes is not None and len(report.extras.fp8_recipes.runs) == 4
    assert_restored(model, before)
    result = pd.preflight(model, s.make_batch(), s.loss_fn, dtype="fp8", steps=2)
    assert result.fp8_scaling is not None
    assert_restored(model, before)


def test_conventional_exclusions_are_judged_from_the_matmuls() -> None:
    """Hand-built matmul SQNRs: the first and last Linear and the ModelOpt name patterns are
    picked (no other layer), each with the fix its own SQNRs give; only the layer no recipe
    passes is a needed exclusion."""
    from precision_doctor.analysis.fp8 import exclusions, fp8_flags
    from precision_doctor.extras import Fp8Gemm, Fp8Section
    from precision_doctor.options import Thresholds

    recipes = ("tensorwise", "rowwise", "rowwise_with_gw_hp", "mxfp8")
    db = {
        "in_proj": (30, 30, 30, 30),
        "blocks.0.mlp.gate": (10, 25, 25, 25),  # rowwise rescues it
        "blocks.0.mlp.up": (10, 10, 10, 10),  # fails, but no convention names it
        "blocks.0.moe.router": (10, 12, 12, 12),  # nothing does
        "lm_head": (30, 30, 30, 30),
    }
    by_recipe = {layer: dict(zip(recipes, v, strict=True)) for layer, v in db.items()}
    gemms = [
        Fp8Gemm(layer=layer, gemm=g, sqnr_db=by_recipe[layer], row_sqnr_db=by_recipe[layer], rel_error={})
        for layer in db
        for g in ("fprop", "dgrad", "wgrad")
    ]
    section = Fp8Section(recipe="tensorwise", torchao_version="x", emulated=True, layers=list(db), gemms=gemms)
    th = Thresholds()
    judged = exclusions(section, fp8_flags(section, th), th)
    assert [(e.layer, e.convention, e.flagged, e.fix, e.needed) for e in judged] == [
        ("in_proj", "first", False, "tensorwise", False),
        ("blocks.0.mlp.gate", "*mlp.gate*", True, "rowwise", False),
        ("blocks.0.moe.router", "*router*", True, "bf16", True),
        ("lm_head", "last", False, "tensorwise", False),
    ]


def test_a_warning_under_the_recipe_that_passes_names_no_other_recipe() -> None:
    """e5m2 gradients under rowwise: the wgrad cast flushes (FP8_UNDERFLOW, a warning) but
    every matmul passes under rowwise itself; the summary says so, not "-> recipe rowwise"
    as if the run needed a change."""
    from precision_doctor.views.fp8 import fp8_summary_lines

    s = _sample("gradient_underflow_e5m2")
    report = pd.analyze(s.build_model(), s.make_batch(), s.loss_fn, dtype="fp8", fp8_recipe="rowwise")
    assert [f.flag for f in report.flags() if f.unit == "proj"] == [pd.Flag.FP8_UNDERFLOW]
    lines = fp8_summary_lines(report)
    assert any(line.strip().startswith("proj:") and line.endswith("its matmuls pass under rowwise") for line in lines)
    assert not any("-> recipe rowwise" in line for line in lines)


def test_a_single_linear_is_excluded_as_first_and_last() -> None:
    """A model with one Linear: convention keeps it out as the first layer and as the last,
    and the report says both (it said only `first`)."""
    from precision_doctor.analysis.fp8 import exclusions
    from precision_doctor.extras import Fp8Section
    from precision_doctor.options import Thresholds

    section = Fp8Section(recipe="tensorwise", torchao_version="x", emulated=True, layers=["proj"])
    judged = exclusions(section, {}, Thresholds())
    assert [(e.layer, e.convention) for e in judged] == [("proj", "first and last")]


def test_an_fp8_analysis_logs_nothing_of_torchao_imports(tmp_path: Path) -> None:
    """A fresh process's fp8 analysis with the MX recipe compared too: torchao's import
    warnings (CUDA extensions a CPU build lacks, torch's note on its enum registration) are
    nothing a user can act on, so stderr stays empty."""
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "precision_doctor.cli",
            "analyze",
            str(SAMPLES / "healthy_mlp.py"),
            "--dtype",
            "fp8",
            "--fp8-recipe",
            "mxfp8",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # What this is about: torchao's import notes (another setup may warn of other things).
    noise = [ln for ln in proc.stderr.splitlines() if "torchao" in ln or "_pytree" in ln or "register_constant" in ln]
    assert noise == [], proc.stderr[-2000:]


def test_every_recipe_compared_leaves_out_an_mxfp8_the_shapes_do_not_fit(caplog: Any) -> None:
    """all_zero_row's layer is fed 16 tokens, not a multiple of mxfp8's blocks of 32: the
    default comparison (every recipe) compares the other three and says why mxfp8 is not
    there (the whole comparison failed); asked for by name, mxfp8 still fails in one line."""
    import logging

    s = _sample("all_zero_row")
    with caplog.at_level(logging.WARNING, logger="precision_doctor"):
        report = pd.compare_fp8_recipes(s.build_model(), s.make_batch(), s.loss_fn)
    section = report.extras.fp8_recipes
    assert section is not None and [r.recipe for r in section.runs] == list(RECIPES)
    assert "mxfp8 left out of the recipe comparison" in caplog.text and "multiple of 32" in caplog.text
    with pytest.raises(PrecisionDoctorError, match="multiple of 32"):
        pd.compare_fp8_recipes(s.build_model(), s.make_batch(), s.loss_fn, recipes=["tensorwise", "mxfp8"])

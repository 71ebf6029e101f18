"""The public API's shape: choices after the step's inputs are keyword-only, old spellings
still work with a DeprecationWarning and give the same result, one way to plan a report."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import precision_doctor as pd
from precision_doctor.planning.plan import Plan, plan_model
from precision_doctor.planning.timing import measure_cost_model
from tests.fixtures import build_mlp


def _same(a: pd.Report, b: pd.Report) -> bool:
    return json.loads(a.to_json()) == json.loads(b.to_json())


@pytest.mark.parametrize("fn", [pd.analyze, pd.preflight, pd.plan_report], ids=lambda f: f.__name__)
def test_choices_are_keyword_only_after_the_steps_inputs(fn: object) -> None:
    params = list(inspect.signature(fn).parameters.values())  # type: ignore[arg-type]
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional[:3] == ["model", "batch", "loss_fn"]
    assert set(positional) <= {"model", "batch", "loss_fn", "report"}
    for p in params:
        if p.name in ("dtype", "regime", "policy", "thresholds", "target", "judge"):
            assert p.kind is p.KEYWORD_ONLY, p.name


def test_positional_dtype_warns_and_means_the_same() -> None:
    case = build_mlp()
    keyword = pd.analyze(case.model, case.batch, case.loss_fn, dtype="bf16")
    with pytest.warns(DeprecationWarning, match=r"dtype='bf16'"):
        positional = pd.analyze(case.model, case.batch, case.loss_fn, "bf16")
    assert positional.environment.dtype is pd.LowDtype.BF16
    assert _same(positional, keyword)
    with pytest.raises(TypeError, match="multiple values"):
        pd.analyze(case.model, case.batch, case.loss_fn, "bf16", dtype="fp16")


def test_report_safe_is_its_truth_value() -> None:
    case = build_mlp()
    healthy = pd.analyze(case.model, case.batch, case.loss_fn)
    broken = pd.analyze(case.model, case.batch * 1e6, lambda out, b: 1e3 * out.pow(2).mean())
    assert healthy.safe is True and bool(healthy) is True
    assert broken.safe is False and bool(broken) is False


def test_one_way_to_plan_a_report() -> None:
    case = build_mlp()
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="bf16")
    planned = pd.plan_report(case.model, case.batch, case.loss_fn, report)
    plan = Plan.from_report(planned)
    assert plan == plan_model(case.model, case.batch, case.loss_fn, report)
    # The planned report goes straight to apply_plan: the same overrides as the Plan's.
    handle = pd.apply_plan(case.model, planned)
    try:
        assert handle.plan == plan
    finally:
        handle.remove()
    with pytest.raises(pd.PrecisionDoctorError, match="has no plan"):
        Plan.from_report(report)
    with pytest.warns(DeprecationWarning, match="plan_report"):
        old = pd.plan_model
    assert old is plan_model
    assert "plan_model" not in pd.__all__


def test_measure_cost_model_old_spelling_warns() -> None:
    case = build_mlp()
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="bf16")
    new = measure_cost_model(case.model, case.batch, report, repeats=1)
    with pytest.warns(DeprecationWarning, match="takes no loss_fn"):
        old = measure_cost_model(case.model, case.batch, case.loss_fn, report, repeats=1)  # type: ignore[arg-type]
    assert [u.name for u in old.units] == [u.name for u in new.units] and old.dtype == new.dtype


def test_model_state_after_a_deprecated_call() -> None:
    """The shim only moves arguments: the model still comes back as it went in."""
    case = build_mlp()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    with pytest.warns(DeprecationWarning):
        pd.analyze(case.model, case.batch, case.loss_fn, "fp16")
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_progress_reports_the_published_steps() -> None:
    """The CLI's progress bar counts `PROGRESS_STEPS`: the engine calls `progress` once per step."""
    from precision_doctor.analysis.engine import PROGRESS_STEPS

    case = build_mlp()
    said: list[str] = []
    pd.analyze(case.model, case.batch, case.loss_fn, progress=said.append)
    assert len(said) == len(PROGRESS_STEPS)


def test_pure_regime_casts_the_floats_of_a_mapping_pytree_does_not_know() -> None:
    """transformers' BatchEncoding/BatchFeature are UserDicts: the pure regime's inputs are
    cast through them, by the one cast the analysis and the pre-flight share."""
    from collections import UserDict

    from precision_doctor.capture.lowrun import cast_floats

    batch = UserDict({"pixel_values": torch.ones(2, 3), "input_ids": torch.ones(2, 3, dtype=torch.long)})
    cast = cast_floats(batch, torch.bfloat16)
    assert isinstance(cast, dict)
    assert cast["pixel_values"].dtype is torch.bfloat16 and cast["input_ids"].dtype is torch.long


def test_recommend_loss_scale_takes_its_choices_by_name() -> None:
    case = build_mlp()
    report = pd.analyze(case.model, case.batch, case.loss_fn)
    low = {"": True, "fc2": False}
    keyword = pd.recommend_loss_scale(report, low_units=low)
    with pytest.warns(DeprecationWarning, match="low_units"):
        positional = pd.recommend_loss_scale(report, low)
    assert positional == keyword


def test_judge_and_target_are_enums_checked_before_any_work() -> None:
    assert pd.Judge("Planned") is pd.Judge.PLANNED and pd.Target("H100") is pd.Target.H100
    case = build_mlp()
    report = pd.analyze(case.model, case.batch, case.loss_fn)
    with pytest.raises(
        pd.PrecisionDoctorError, match=r"unknown target 'v100'; choose one of: h100, h200, b200, a100, 4090, cpu"
    ):
        pd.plan_report(case.model, case.batch, case.loss_fn, report, target="v100")
    with pytest.raises(pd.PrecisionDoctorError, match=r"unknown judge 'best'; choose one of: low, planned"):
        pd.preflight(case.model, case.batch, case.loss_fn, judge="best")


def test_another_librarys_enum_member_and_torchaos_recipe_names_are_accepted() -> None:
    """torchao's `Float8LinearRecipeName.ROWWISE` (a plain Enum whose value is "rowwise") and
    its MoE recipe name `mxfp8_rceil` (the scaling `mxfp8` is) parse as our recipes; an
    unsupported variant is refused naming the choices and the alias."""
    import enum

    from precision_doctor.options import Fp8Recipe, parse_enum

    class TheirRecipe(enum.Enum):  # torchao.float8.Float8LinearRecipeName's shape
        ROWWISE = "rowwise"
        TENSORWISE = "tensorwise"

    assert parse_enum(Fp8Recipe, TheirRecipe.ROWWISE, "fp8 recipe") is Fp8Recipe.ROWWISE
    assert parse_enum(Fp8Recipe, "MXFP8_RCEIL", "fp8 recipe") is Fp8Recipe.MXFP8
    with pytest.raises(pd.PrecisionDoctorError, match=r"choose one of: .*mxfp8 \(also: mxfp8_rceil\)$"):
        parse_enum(Fp8Recipe, "mxfp8_rceil_wgrad_with_hp", "fp8 recipe")
    try:
        from torchao.float8 import Float8LinearRecipeName
    except ImportError:
        return
    for member in Float8LinearRecipeName:
        assert parse_enum(Fp8Recipe, member, "fp8 recipe").value == member.value

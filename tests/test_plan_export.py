"""apply_plan and the exports, tested by using them."""

from __future__ import annotations

import json
import math
import types
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import precision_doctor as pd
from precision_doctor.capture.emulation import emulated_precision
from precision_doctor.capture.units import UnitTracker
from precision_doctor.extras import PlanBytes, PlanCosts
from precision_doctor.options import ExportFormat
from precision_doctor.planning.export import (
    DEEPSPEED_BF16_KEYS,
    DEEPSPEED_FP16_KEYS,
    DEEPSPEED_TORCH_AUTOCAST_KEYS,
    deepspeed_config,
    export_caveats,
    hf_training_args,
    plan_section,
    render_hf,
    render_python,
    safe_module_classes,
)
from precision_doctor.planning.plan import Plan, apply_plan, plan_model
from tests.fixtures import plan_of
from tests.test_loss_scale import load

MATMULS = {"mm", "addmm", "bmm", "baddbmm"}


class DtypeCounter(TorchDispatchMode):
    """Per module: the dtypes of float outputs of matmul ops, and of all float outputs."""

    def __init__(self, tracker: UnitTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.matmul: dict[str, Counter[torch.dtype]] = defaultdict(Counter)
        self.all: dict[str, Counter[torch.dtype]] = defaultdict(Counter)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if torch._C._current_graph_task_id() == -1:
            unit = self.tracker.current
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.all[unit][t.dtype] += 1
                    if str(func.overloadpacket).split(".")[-1] in MATMULS:
                        self.matmul[unit][t.dtype] += 1
        return out


def count_dtypes(model: torch.nn.Module, batch: Any) -> DtypeCounter:
    with (
        UnitTracker(model, on_exit=lambda p: None) as tracker,
        DtypeCounter(tracker) as counter,
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        model(*batch)
    return counter


@pytest.fixture(scope="module")
def rescue() -> tuple[Any, Plan]:
    mod = load("plan_rescue")
    model, batch = mod.build_model(), mod.make_batch()
    report = pd.analyze(model, batch, mod.loss_fn, dtype="bf16")
    plan = plan_model(model, batch, mod.loss_fn, report)
    # A non-contiguous plan for the dtype test: norm and fc2 fp32, the rest low.
    units = {u: ("fp32" if u in ("norm", "fc2", "<loss>") else "bf16") for u in plan.units}
    return mod, plan.model_copy(update={"units": units})


def check_counts(counter: DtypeCounter, plan: Plan) -> None:
    for unit, dtype in plan.units.items():
        if unit == "<loss>" or not counter.all.get(unit):
            continue
        if dtype == "fp32":
            assert set(counter.all[unit]) == {torch.float32}, (unit, counter.all[unit])
        elif counter.matmul.get(unit):
            assert set(counter.matmul[unit]) == {torch.bfloat16}, (unit, counter.matmul[unit])


def test_apply_plan_runs_the_planned_dtypes_and_is_removable(rescue: tuple[Any, Plan]) -> None:
    mod, plan = rescue
    model, batch = mod.build_model(), mod.make_batch()
    plain = count_dtypes(model, batch)
    assert plain.all["norm"][torch.bfloat16] > 0  # plain autocast runs norm's input low
    with apply_plan(model, plan):
        counter = count_dtypes(model, batch)
        check_counts(counter, plan)
        assert counter.matmul["fc1"] and counter.matmul["fc2"]
        with torch.no_grad():  # outside an autocast region: the model as written
            assert model(*batch).dtype == torch.float32
    assert "forward" not in vars(model.norm)
    after = count_dtypes(model, batch)
    assert after.all == plain.all


def test_plan_handles_come_off_in_any_order(rescue: tuple[Any, Plan]) -> None:
    """Two handles on one model, removed first-in first-out, and a wrapper installed over
    the plan's (as Accelerate does): each removal leaves the others working, and the model
    ends as written."""
    mod, plan = rescue
    model, batch = mod.build_model(), mod.make_batch()
    plain = count_dtypes(model, batch)
    first, second = apply_plan(model, plan), apply_plan(model, plan)
    first.remove()
    check_counts(count_dtypes(model, batch), plan)  # the second still applies the plan
    second.remove()
    assert not any("forward" in vars(m) for m in model.modules())
    assert count_dtypes(model, batch).all == plain.all

    handle = apply_plan(model, plan)
    planned = model.norm.forward
    model.norm.forward = lambda *a, **k: planned(*a, **k)  # someone else's wrapper on top
    outer = model.norm.forward
    handle.remove()
    assert model.norm.forward is outer  # not torn out from under its owner
    assert count_dtypes(model, batch).all == plain.all  # ours below it only passes through

    # A wrapper made with functools.wraps (as Accelerate's are) copies our wrapper's
    # attributes: a later handle's removal must still not take it for ours.
    import functools

    model = mod.build_model()
    first = apply_plan(model, plan)
    inner = model.norm.forward
    model.norm.forward = functools.wraps(inner)(lambda *a, **k: inner(*a, **k))
    wrapped = model.norm.forward
    first.remove()
    second = apply_plan(model, plan)
    second.remove()
    assert model.norm.forward is wrapped


def test_python_snippet_installs_the_same_overrides(rescue: tuple[Any, Plan]) -> None:
    mod, plan = rescue
    ns: dict[str, Any] = {}
    exec(compile(render_python(plan), "<plan snippet>", "exec"), ns)  # a fresh namespace
    model, batch = mod.build_model(), mod.make_batch()
    remove = ns["install_precision_plan"](model)
    snippet_counts = count_dtypes(model, batch)
    remove()
    with apply_plan(model, plan):
        ours = count_dtypes(model, batch)
    assert snippet_counts.all == ours.all
    check_counts(snippet_counts, plan)
    assert "precision_doctor" not in render_python(plan)
    # Its removal, too, leaves a wrapper installed over it in place, and inert below it.
    plain = count_dtypes(model, batch)
    remove = ns["install_precision_plan"](model)
    planned = model.norm.forward
    model.norm.forward = lambda *a, **k: planned(*a, **k)
    outer = model.norm.forward
    remove()
    assert model.norm.forward is outer and count_dtypes(model, batch).all == plain.all


def test_python_snippet_takes_a_plan_with_backward_ops_outside_any_module(rescue: tuple[Any, Plan]) -> None:
    """A plan of a model with backward ops no module made (the `<backward>` unit: FSDP2's
    gradient reduction; as the loss's `<loss>`) installs on that model; the snippet refused it as an unknown module
    where `apply_plan` took it."""
    mod, plan = rescue
    plan = plan.model_copy(update={"units": {**plan.units, "<backward>": "fp32"}})
    ns: dict[str, Any] = {}
    exec(compile(render_python(plan), "<plan snippet>", "exec"), ns)
    model, batch = mod.build_model(), mod.make_batch()
    remove = ns["install_precision_plan"](model)
    snippet_counts = count_dtypes(model, batch)
    remove()
    with apply_plan(model, plan):
        assert count_dtypes(model, batch).all == snippet_counts.all


def test_wrong_module_names_are_refused(rescue: tuple[Any, Plan]) -> None:
    _, plan = rescue
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(pd.PrecisionDoctorError, match="does not match this model"):
        apply_plan(other, plan)


def test_a_larger_model_is_refused_too(rescue: tuple[Any, Plan]) -> None:
    """Every module the plan names exists, but the model has one more (another layer): the
    plan would leave it alone, so it is another model's plan."""
    mod, plan = rescue
    model = mod.build_model()
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(pd.PrecisionDoctorError, match=r"made for a model of \d+ modules"):
        apply_plan(model, plan)
    ns: dict[str, Any] = {}
    exec(compile(render_python(plan), "<plan snippet>", "exec"), ns)
    with pytest.raises(ValueError, match="does not match the model"):
        ns["install_precision_plan"](model)
    del model.extra
    apply_plan(model, plan).remove()  # the model it was made for


def _fp16(plan: Plan) -> Plan:
    units = {u: ("fp16" if d != "fp32" else d) for u, d in plan.units.items()}
    return plan.model_copy(update={"dtype": pd.LowDtype.FP16, "units": units})


def test_a_plan_refuses_an_autocast_region_of_another_dtype(rescue: tuple[Any, Plan]) -> None:
    """An fp16 plan inside a bf16 region would switch the region to fp16, with no scaler:
    apply_plan and the python snippet refuse it, in one line naming both dtypes and how to
    re-plan. In an fp16 region it runs; outside autocast the model is as written."""
    mod, bf16_plan = rescue
    plan = _fp16(bf16_plan)
    batch = mod.make_batch()
    ns: dict[str, Any] = {}
    exec(compile(render_python(plan), "<plan snippet>", "exec"), ns)
    for install, error in (
        (lambda m: apply_plan(m, plan).remove, pd.PrecisionDoctorError),
        (ns["install_precision_plan"], RuntimeError),
    ):
        model = mod.build_model()
        remove = install(model)
        with pytest.raises(error) as info, torch.autocast("cpu", dtype=torch.bfloat16):
            model(*batch)
        msg = str(info.value)
        assert "\n" not in msg and "made for fp16" in msg and "bf16 (torch.bfloat16) autocast region" in msg
        assert "--dtype bf16" in msg
        with torch.autocast("cpu", dtype=torch.float16):  # the plan's own dtype: runs
            out = model(*batch)
        assert torch.isfinite(out).all()
        with torch.no_grad():  # no autocast: untouched
            assert model(*batch).dtype == torch.float32
        remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # removed: the region as it is
            model(*batch)
        # Applied inside the wrong region: refused at once.
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(error, match="made for fp16"):
            install(model)
    assert not any("forward" in vars(m) for m in model.modules())
    # The bf16 plan in an fp16 region, likewise.
    model = mod.build_model()
    with (
        apply_plan(model, bf16_plan),
        torch.autocast("cpu", dtype=torch.float16),
        pytest.raises(pd.PrecisionDoctorError, match=r"made for bf16 .* --dtype fp16"),
    ):
        model(*batch)


def test_json_roundtrip_and_version(rescue: tuple[Any, Plan], tmp_path: Any) -> None:
    _, plan = rescue
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    raw = json.loads(plan.to_json())
    raw["schema_version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(pd.PrecisionDoctorError, match="schema_version"):
        Plan.load(tmp_path / "bad.json")
    model, batch = torch.nn.Linear(2, 1), torch.ones(1, 2)
    report = pd.analyze(model, batch, loss_fn=lambda o, b: o.sum())
    report.save(tmp_path / "report.json")
    with pytest.raises(pd.PrecisionDoctorError, match="is an analysis report with no plan"):
        Plan.load(tmp_path / "report.json")
    # A planned report file is read as the plan it carries, as `apply_plan(model, report)` is.
    planned = pd.plan_report(model, batch, lambda o, b: o.sum(), report)
    planned.save(tmp_path / "planned.json")
    assert Plan.load(tmp_path / "planned.json") == Plan.from_report(planned)
    with apply_plan(model, tmp_path / "planned.json"):
        pass


def test_deepspeed_keys_are_documented(rescue: tuple[Any, Plan]) -> None:
    _, plan = rescue
    assert plan.loss_scale is not None
    scaled = plan.loss_scale.model_copy(update={"scaler_needed": True, "recommended_scale_log2": 12})
    fp16_plan = plan.model_copy(update={"dtype": pd.LowDtype.FP16, "loss_scale": scaled})
    old = deepspeed_config(fp16_plan, "0.14.0")
    assert set(old) == {"fp16"} and set(old["fp16"]) <= DEEPSPEED_FP16_KEYS  # type: ignore[arg-type]
    assert old["fp16"]["initial_scale_power"] == 12  # type: ignore[index]
    # No scaler for the plan's low units (none run low): this config still runs all in fp16.
    unscaled = fp16_plan.model_copy(update={"loss_scale": scaled.model_copy(update={"scaler_needed": False})})
    assert deepspeed_config(unscaled, "0.14.0")["fp16"]["initial_scale_power"] == 16  # type: ignore[index]
    assert set(deepspeed_config(plan, "0.14.0")["bf16"]) <= DEEPSPEED_BF16_KEYS  # type: ignore[arg-type]
    new = deepspeed_config(plan, "0.17.2")["torch_autocast"]
    assert set(new) <= DEEPSPEED_TORCH_AUTOCAST_KEYS  # type: ignore[arg-type]
    assert "torch.nn.modules.linear.Linear" not in new["lower_precision_safe_modules"]  # fc2 is fp32  # type: ignore[index]
    assert "torch.nn.modules.activation.GELU" in new["lower_precision_safe_modules"]  # type: ignore[index]


def test_deepspeed_export_says_what_old_versions_cannot_carry(rescue: tuple[Any, Plan]) -> None:
    _, plan = rescue
    kept = sorted(u for u, d in plan.units.items() if u and not u.startswith("<") and d == "fp32")
    assert kept  # plan_rescue keeps units in fp32
    (line,) = export_caveats(plan, "deepspeed", "0.14.0")
    assert "no per-module dtypes" in line and all(u in line for u in kept) and "<loss>" not in line
    assert export_caveats(plan, "deepspeed", "0.17.2") == []  # torch_autocast lists the safe classes
    assert export_caveats(plan, "python", "0.14.0") == []


def test_hf_kwargs_are_training_arguments(rescue: tuple[Any, Plan]) -> None:
    import dataclasses

    transformers = pytest.importorskip("transformers")
    _, plan = rescue
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    assert set(hf_training_args(plan)) <= fields
    # The snippet runs, and its scale is fp16's recommendation or none at all for bf16.
    for dtype in (pd.LowDtype.FP16, pd.LowDtype.BF16):
        namespace: dict[str, Any] = {}
        exec(render_hf(plan.model_copy(update={"dtype": dtype})), namespace)  # our own export
        expected = plan.loss_scale.recommended_scale_log2 if dtype is pd.LowDtype.FP16 else None  # type: ignore[union-attr]
        assert namespace["INIT_SCALE_LOG2"] == expected
        assert namespace["TRAINING_ARGS_KWARGS"] == {str(dtype): True}
        code = [line for line in render_hf(plan).splitlines() if not line.lstrip().startswith("#")]
        assert not any("precision_doctor" in line for line in code)  # only in the comments
        # Its guard takes TrainingArguments of the plan's precision and refuses the others.
        check = namespace["check_training_args"]
        check(transformers.TrainingArguments(output_dir="out", use_cpu=True, **namespace["TRAINING_ARGS_KWARGS"]))
        other = "bf16" if dtype is pd.LowDtype.FP16 else "fp16"
        for wrong in ({other: True}, {}):
            args = types.SimpleNamespace(**{"fp16": False, "bf16": False, **wrong})
            with pytest.raises(ValueError, match=f"made for {dtype} but the TrainingArguments run") as info:
                check(args)
            assert "\n" not in str(info.value)
            # Re-planning is suggested only for the other dtype the arguments do run.
            assert (f"--dtype {other}" in str(info.value)) == bool(wrong), str(info.value)


def test_plan_summary_prints_times_and_sizes_in_units_that_fit(rescue: tuple[Any, Plan]) -> None:
    import re

    _, plan = rescue
    tiny = plan.model_copy(
        update={
            "estimated_step_time_s": PlanCosts(fp32=3e-4, autocast=2.5e-4, plan=3e-7),
            "activation_bytes": PlanBytes(fp32=3 * 2**20, autocast=1536, plan=512),
        }
    )
    head = tiny.summary().splitlines()[0]
    assert "estimated step 300 ns vs fp32 300 µs" in head and "autocast 250 µs" in head, head
    assert "activations 512 B vs 3 MiB fp32" in head, head
    assert not re.search(r"\b0\.0+\d* (ms|MiB)", head)


def test_plan_extras_shape(rescue: tuple[Any, Plan]) -> None:
    _, plan = rescue
    extras = plan_section(plan).model_dump(mode="json")
    assert set(extras) == {
        "target",
        "dtype",
        "units",
        "fp32_units",
        "estimated_step_time_s",
        "activation_bytes",
        "verified_loss_rel_error",
        "verification_passes",
        "exports",
        "regime",
        "master_units",
    }
    assert set(extras["exports"]) == {"json", "python", "deepspeed", "hf"}
    assert extras["regime"] == "autocast" and extras["master_units"] == []


def curve(mod: Any, low_units: dict[str, bool] | None, steps: int = 100) -> list[float]:
    model, batch = mod.build_model(), mod.make_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    losses = []
    ctx = emulated_precision(model, torch.float16, low_units) if low_units != {} else torch.enable_grad()
    with ctx:
        for _ in range(steps):
            loss = mod.loss_fn(model(*batch), batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow  # three 100-step emulated training runs: ~10-17 s on 2 cores
def test_plan_keeps_units_whose_gradients_no_scale_keeps() -> None:
    """At the plan's own loss scale no low unit loses its gradient (GRAD_UNDERFLOW judged as
    the analysis judges it); those that would are fp32, with that reason, and no more."""
    from precision_doctor.analysis.flags import gradient_flags_at_scale
    from precision_doctor.formats import FP16

    mod = load("deep_narrow_underflow")
    model, batch = mod.build_model(), mod.make_batch()
    report = pd.analyze(model, batch, mod.loss_fn)
    plan = plan_model(model, batch, mod.loss_fn, report)
    assert plan.loss_scale is not None
    k = plan.loss_scale.recommended_scale_log2
    th = pd.Thresholds()
    units = report.by_module()
    for name, dtype in plan.units.items():
        lost = [f for f in gradient_flags_at_scale(units[name], k, FP16, th) if f.flag is pd.Flag.GRAD_UNDERFLOW]
        if dtype != "fp32":
            assert not lost, name
    kept = {u.unit: u.reason for u in plan.fp32_units if "flush to 0" in u.reason}
    assert "layers.0" in kept and f"2^{k}" in kept["layers.0"]
    assert sum(d == "fp16" for d in plan.units.values()) > len(plan.units) // 2


def test_plan_tracks_fp32_where_all_low_does_not() -> None:
    mod = load("plan_rescue")
    model, batch = mod.build_model(), mod.make_batch()
    report = pd.analyze(model, batch, mod.loss_fn)
    plan = plan_model(model, batch, mod.loss_fn, report)
    assert plan.units["norm"] == "fp32" and plan.verification_passes >= 1
    assert plan.verified_loss_rel_error <= plan.tolerance
    fp32 = curve(mod, {})
    planned = curve(mod, plan.low_units)
    all_low = curve(mod, None)
    rel = [abs(p - f) / abs(f) for p, f in zip(planned, fp32, strict=True)]
    assert max(rel) <= plan.tolerance
    bad = [not math.isfinite(a) or abs(a - f) / abs(f) > plan.tolerance for a, f in zip(all_low, fp32, strict=True)]
    assert any(bad)


def test_a_promotion_no_measured_contribution_explains_says_so() -> None:
    """Where the measured contributions account for none of the verified error (each low
    unit's 0: here a report whose units kept no local error), the promoted unit is the one
    whose values the low run changes most, and its reason says the measurements do not
    explain the error (it read "worst contributor (0.00e+00)", the unit picked by name).
    (Such a case came from the plan's low units casting their fp32 inputs, which plain
    autocast leaves fp32: LayerNorms with a local error of 0 then changed the loss.)"""
    from precision_doctor.model.spec import load_model_file

    spec = load_model_file(Path(__file__).resolve().parents[1] / "sample_models" / "tiny_transformer.py")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="bf16")
    assert report.losses.rel_error > 1e-8  # the all-low run's error, which no unit accounts for
    unmeasured = [u.model_copy(update={"forward": u.forward.model_copy(update={"local": None})}) for u in report.units]
    report = report.model_copy(update={"units": unmeasured})
    plan = plan_model(spec.model, spec.batch, spec.loss_fn, report, tolerance=1e-8)
    promoted = [u for u in plan.fp32_units if "promoted after verification" in u.reason]
    assert promoted, plan.fp32_units
    # Not a LayerNorm: autocast runs it in fp32 under either label, so promoting it changes
    # nothing (the search spent its rounds on them and fell back to all fp32).
    norms = {n for n, m in spec.model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert norms and not norms & {u.unit for u in promoted}, promoted
    assert not any("worst contributor (0.00e+00)" in u.reason for u in promoted)
    unexplained = [u for u in promoted if "no low unit's measured contribution accounts for it" in u.reason]
    assert unexplained, [u.reason for u in promoted]
    units = report.by_module()
    for u in unexplained:
        propagated = units[u.unit].forward.propagated
        assert propagated is not None and f"({propagated.rel_l2_error:.2e})" in u.reason, u.reason


def test_an_all_low_run_with_no_loss_error_spends_no_error_budget() -> None:
    """unscaled_gradients: the all-low run's final loss equals fp32's. Its units' local errors
    scaled to that measured error are 0; unscaled, they kept `head` in fp32 on an "error
    budget" the run contradicts (and moved the loss scale off the run's). The plan's own
    verification pass still measures what it picks."""
    from precision_doctor.planning.plan import error_contributions

    mod = load("unscaled_gradients")
    model, batch = mod.build_model(), mod.make_batch()
    analysed = pd.analyze(model, batch, mod.loss_fn)
    # The measured error set to 0 (on this CPU it is; another's last bit may differ).
    report = analysed.model_copy(update={"losses": analysed.losses.model_copy(update={"rel_error": 0.0})})
    local = {u.name: u.forward.local.rel_l2_error for u in report.units if u.forward.local is not None}
    assert any(e > 0 for e in local.values())  # what was spent unscaled
    assert set(error_contributions(report).values()) == {0.0}
    plan = plan_model(model, batch, mod.loss_fn, report)
    assert not [f for f in plan.fp32_units if f.reason.startswith("error budget")], plan.summary()
    assert plan.verification_passes >= 1 and plan.verified_loss_rel_error <= plan.tolerance


def test_a_tie_kept_in_fp32_is_not_priced_at_zero() -> None:
    """attention_unscaled: `attn.k` costs the same low or fp32 on the roofline and stays fp32;
    its reason said "low would cost 0 s per step"."""
    mod = load("attention_unscaled")
    model, batch = mod.build_model(), mod.make_batch()
    report = pd.analyze(model, batch, mod.loss_fn)
    plan = plan_model(model, batch, mod.loss_fn, report)
    reasons = [f.reason for f in plan.fp32_units]
    assert not [r for r in reasons if " 0 s per step" in r], reasons
    assert any("on a tie it stays fp32" in r for r in reasons), reasons


class _ResidualBlock(torch.nn.Module):
    """A pre-norm residual block: under plain autocast its residual stream stays fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.ff = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.ff(self.norm(x))
        return self.head(h + 0.5 * h)


def _all_low_plan(model: torch.nn.Module, dtype: pd.LowDtype, regime: pd.Regime) -> Plan:
    units = {name or "<root>": dtype.value for name, _ in model.named_modules()}
    plan: Plan = plan_of(units, model=type(model).__name__, regime=regime.value)
    return plan


def test_a_plan_with_every_unit_low_runs_as_plain_autocast() -> None:
    """A plan's low unit takes its inputs as autocast does: with every unit low, the forward
    and backward under `apply_plan` and under the python export are plain autocast's, bit for
    bit (same kernels, same process). Low units cast their fp32 inputs to the low dtype
    before, so the residual adds ran in bf16 where autocast keeps them fp32: the verified
    plan was not the autocast run the analysis measured, nor what the hf/DeepSpeed exports
    (plain autocast when no unit is fp32) run. A pure plan still casts (model.to() holds
    every activation low)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16) * 3

    def run(install: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = _ResidualBlock()
        plan = _all_low_plan(model, pd.LowDtype.BF16, pd.Regime.AUTOCAST)
        if install == "apply_plan":
            apply_plan(model, plan)
        elif install == "export":
            ns: dict[str, Any] = {}
            exec(compile(render_python(plan), "plan.py", "exec"), ns)
            ns["install_precision_plan"](model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        assert model.ff.weight.grad is not None
        return out, model.ff.weight.grad

    plain_out, plain_grad = run("plain")
    assert plain_out.dtype == torch.bfloat16
    for install in ("apply_plan", "export"):
        out, grad = run(install)
        assert torch.equal(out, plain_out) and torch.equal(grad, plain_grad), install
    # The pure regime's plan casts a low unit's inputs: the residual add runs in bf16 there.
    torch.manual_seed(0)
    model = _ResidualBlock()
    seen: list[torch.dtype] = []
    model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    pure = _all_low_plan(model, pd.LowDtype.BF16, pd.Regime.PURE)
    apply_plan(model, pure)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen == [torch.bfloat16]


def test_a_unit_autocast_runs_in_fp32_costs_the_same_either_way() -> None:
    """Planned low, a LayerNorm still runs in fp32 (autocast's fp32 list) and hands on fp32
    values: the cost model gives it no saving and no casts around it, so its label changes no
    estimate (it offered the search a saving the plan's run never makes). A pure-regime
    report's plans cast its inputs, and there the label does change the cost."""
    from precision_doctor.planning.cost import build_cost_model, profile_for

    torch.manual_seed(0)
    model, x = _ResidualBlock(), torch.randn(8, 16)
    for regime, same in ((pd.Regime.AUTOCAST, True), (pd.Regime.PURE, False)):
        report = pd.analyze(model, x, lambda out, b: out.float().square().mean(), dtype="bf16", regime=regime)
        costs = build_cost_model(report, profile_for("h100"))
        base = {u.name: True for u in report.units}
        with_norm_low = costs.step_time_s(base), costs.activation_bytes(base)
        without = costs.step_time_s({**base, "norm": False}), costs.activation_bytes({**base, "norm": False})
        assert (with_norm_low == without) is same, regime
        assert with_norm_low[0] < costs.step_time_s(dict.fromkeys(base, False))  # the Linears still save


def test_a_plan_lists_no_unit_autocast_runs_in_fp32_anyway() -> None:
    """tiny_transformer's plan listed its five LayerNorms as kept in fp32 ("on a tie it stays
    fp32"), and the hf export's caveat named them, though plain autocast runs them in fp32
    under either label: they are labelled low, and the plan's fp32 units are ones it keeps
    for a reason."""
    from precision_doctor.model.spec import load_model_file

    spec = load_model_file(Path(__file__).resolve().parents[1] / "sample_models" / "tiny_transformer.py")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn)
    norms = [n for n, m in spec.model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) >= 3
    plan = Plan.from_report(pd.plan_report(spec.model, spec.batch, spec.loss_fn, report))
    assert all(plan.units[n] == "fp16" for n in norms), plan.units
    kept = [u.unit for u in plan.fp32_units]
    assert not set(norms) & set(kept) and all("on a tie" not in u.reason for u in plan.fp32_units), plan.fp32_units
    assert not any(n in caveat for caveat in export_caveats(plan, ExportFormat.HF) for n in norms)
    # Labelled low only because autocast runs them in fp32 anyway: DeepSpeed, which would
    # communicate a listed class's parameters low, does not get the LayerNorm class.
    assert set(norms) <= set(plan.fp32_under_autocast)
    classes = safe_module_classes(plan)
    assert classes and not [c for c in classes if c.endswith("LayerNorm")], classes


def test_an_error_budget_reason_says_its_numbers_are_estimates() -> None:
    """A unit kept fp32 on the error budget: the numbers are the search's estimates (shares of
    the all-low run's final-loss error), not the verified error the plan prints below them."""
    from tests.fixtures import build_mlp

    case = build_mlp()
    report = pd.analyze(case.model, case.batch, case.loss_fn)
    assert report.losses.rel_error > 1e-9  # the precondition: low costs some error
    plan = Plan.from_report(pd.plan_report(case.model, case.batch, case.loss_fn, report, tolerance=1e-9))
    budget = [f.reason for f in plan.fp32_units if f.reason.startswith("error budget")]
    assert budget and all("an estimated" in r and "estimated for the plan's low units" in r for r in budget), budget


class _Centered(torch.nn.Module):
    """A Linear with a bias of 1000, centred: `y - mean(y)` cancels the 1000 and keeps its
    rounding error, a relative error of order 1 in any low dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        with torch.no_grad():
            self.lin.bias.fill_(1000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y - y.mean(-1, keepdim=True)


class _QuietSideBranch(torch.nn.Module):
    """The centred branch reaches the output at 1e-4: the final loss barely sees its error."""

    def __init__(self) -> None:
        super().__init__()
        self.main = torch.nn.Linear(16, 4)
        self.side = _Centered()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + 1e-4 * self.side(x)[:, :4]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_unit_with_an_error_finding_stays_fp32_though_the_loss_is_within_budget(dtype: str) -> None:
    """The verdict said "not safe as-is" for a unit's own error (DIVERGENCE, ERROR_GROWTH) while
    the final-loss error was within tolerance; the plan, judged on that error alone, ran the
    unit low, and the pre-flight then refused the plan for the same finding. The plan keeps
    it fp32, saying why, and the pre-flight's planned configuration carries no such error."""
    torch.manual_seed(0)
    model, x = _QuietSideBranch(), torch.randn(32, 16)

    def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return out.float().square().mean()

    report = pd.analyze(model, x, loss_fn, dtype=dtype)
    errors = {f.flag.value for f in report.by_module()["side"].flags if f.severity.value == "error"}
    assert report.loss_within_tolerance and {"DIVERGENCE", "ERROR_GROWTH"} <= errors  # the precondition
    plan = Plan.from_report(pd.plan_report(model, x, loss_fn, report))
    assert plan.units["side"] == "fp32" and plan.units["main"] == dtype, plan.units
    (side,) = [f for f in plan.fp32_units if f.unit == "side"]
    assert side.reason.startswith(("DIVERGENCE (error)", "ERROR_GROWTH (error)")), side.reason
    result = pd.preflight(model, x, loss_fn, dtype=dtype, steps=2, judge="planned")
    assert not [r for r in result.reasons if r.mode == "analysis"], [r.line() for r in result.reasons]


def test_a_cost_within_the_solvers_tolerance_is_a_tie() -> None:
    """HiGHS stops within its MIP gap (1e-6 of the objective it solves, scaled by the units'
    fp32 times): a 10 ms plan kept a unit fp32 whose low label "would cost -1.15 ns per step".
    The tie is read at twice that gap, on the solver's own scale."""
    from precision_doctor.planning.plan import is_tie
    from precision_doctor.planning.search import Choice, PlanProblem

    problem = PlanProblem(
        names=("a", "b"),
        choices=((Choice("fp32", 0.25e-3, 0), Choice("bf16", 0.1e-3, 0)),) * 2,
        edges=(),
        error_budget=1.0,
    )
    assert problem.solver_scale == pytest.approx(0.5e-3)  # what the solver's tolerances apply to
    assert is_tie(-0.9e-9, problem.solver_scale) and is_tie(5e-13, 0.0)
    assert not is_tie(1.1e-9, problem.solver_scale) and not is_tie(-1e-6, problem.solver_scale)

"""The analysis engine: one instrumented fwd+bwd pass, then statistics into a Report."""

from __future__ import annotations

import contextlib
import math
import platform
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import TypeAdapter
from torch.utils._python_dispatch import _disable_current_modes

from precision_doctor.analysis.flags import (
    MAX_SCALE_LOG2,
    reads_overflow,
    scale_ceiling,
    unit_flags,
)
from precision_doctor.analysis.fp8 import fp8_section, with_fp8
from precision_doctor.analysis.gradients import (
    grad_scale_log2,
)
from precision_doctor.analysis.jobs import AnalysisJob, CapturedStep, LowGradients, SingleProcess, analysis_job
from precision_doctor.analysis.loss_scale import seed_ceiling_log2
from precision_doctor.analysis.optimizer_step import optimizer_step, with_optimizer_step
from precision_doctor.capture import cpu_kernels
from precision_doctor.capture.fp8 import Fp8Run, torchao_version
from precision_doctor.capture.graph_cache import GRAPHS, Fingerprint, fingerprint
from precision_doctor.capture.graph_driver import GraphUnavailable, StepGraph, graph_capture, trace_step
from precision_doctor.capture.lowrun import GradientSink, LowRun, emulates, low_run
from precision_doctor.capture.memory import caller_heap_frozen
from precision_doctor.capture.pipeline import ModelOpError
from precision_doctor.capture.records import OpRecord, UnitRecord, unit_outputs
from precision_doctor.capture.shadow import ShadowCapture, batch_storages, capture_pass
from precision_doctor.capture.statistics import (
    EXP_BIAS,
    SUMSQ_BINS,
    ErrorAccumulator,
    SummaryBatch,
    TensorSummary,
    relative_loss_error,
)
from precision_doctor.capture.units import LOSS_UNIT, LowUnits, owner_of
from precision_doctor.deprecation import positional_deprecated
from precision_doctor.errors import PrecisionDoctorError, PrecisionDoctorInternalError
from precision_doctor.formats import LIMITS, TORCH_DTYPES, FormatLimits, dtype_spelling
from precision_doctor.model.parallel import (
    check_fsdp_precision,
    counted_part,
    fsdp_modules,
    gathered_params,
    is_sharded,
    is_tensor_parallel,
    local_tensor,
    reduced,
    reset_fsdp_iteration,
    storage_ptr,
)
from precision_doctor.model.spec import LossFn, OptimizerFactory, device_of, resolve_loss, run_model
from precision_doctor.model.state import ModelStateGuard, ModuleAttributes
from precision_doctor.options import (
    AutocastPolicy,
    CapturePath,
    Driver,
    Fp8Recipe,
    LowDtype,
    Phase,
    Regime,
    Thresholds,
    parse_enum,
)
from precision_doctor.report import (
    Environment,
    ErrorStats,
    FormatTails,
    Histogram,
    Losses,
    LossScalePoint,
    OpCost,
    OpStats,
    Report,
    TensorStats,
    Unit,
    UnitBackward,
    UnitEdge,
    UnitForward,
)
from precision_doctor.runtime.distributed import (
    RanksFailedError,
    RanksFailedInternalError,
    fail_fast,
    same_outcome,
    unwrap,
)
from precision_doctor.version import __version__

Progress = Callable[[str], None]
PROGRESS_STEPS = (
    "torch.fx check",
    "the real low-precision run",
    "fp32 forward with shadows",
    "fp32 backward",
    "statistics and flags",
    "low-precision backward",
)
"""What `analyze` reports to `progress`, one call each, in order (the last only where the
gradient fidelity runs): the total of a progress bar."""
LOSS_SCALES = range(128)
"""The loss-scale curves' scales, 2^0..2^127: every power of two GradScaler's fp32 scale can
hold (and the recommendation searches). Gradients below 2^-24 carry per-bin sums of squares,
and every value a scale 2^k >= 1 flushes (below 2^(-24-k)) lies there: the norm fractions are
exact over the whole range."""


def fx_check(model: torch.nn.Module) -> tuple[bool, str | None]:
    """Whether torch.fx.symbolic_trace can trace the model (it cannot trace most
    transformers models); the dispatch capture is used either way."""
    if is_sharded(model):
        # Tracing would run FSDP2's and tensor parallel's hooks on Proxy objects (a child's
        # pre-forward hook lazily initializes it as a root and gathers its parameters, and
        # nothing reshards them): the model would come out broken.
        return False, "not traced: FSDP2/tensor-parallel hooks run collectives (the dispatch capture is used)"
    # Tracing runs `forward` on Proxy objects: whatever it binds on the modules (a lazy
    # cache, a reassigned buffer) must not reach the real run.
    attributes = ModuleAttributes(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.fx.symbolic_trace(model)
    except (Exception, SystemExit) as e:  # sys.exit() in forward: the real run reports it
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, f"{type(e).__name__}: {msg}"[:300]
    finally:
        attributes.restore()
    return True, None


@same_outcome
@positional_deprecated("dtype")
def analyze(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    dtype: str | LowDtype = LowDtype.FP16,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    regime: str | Regime = Regime.AUTOCAST,
    policy: str | AutocastPolicy = AutocastPolicy.CUDA,
    fp8_recipe: str | Fp8Recipe | None = None,
    build_optimizer: OptimizerFactory | None = None,
    lr: float | None = None,
    driver: str | Driver = Driver.AUTO,
) -> Report:
    """Analyze one training step of `model` on `batch` in fp32 and in `dtype`.

    `driver` says how the fp32 step's ops reach the capture (`options.Driver`): `dispatch`
    (a TorchDispatchMode on the eager step), `graph` (the step traced once into an aten graph
    that the capture walks, `capture.graph_driver`; a step the graph cannot stand for takes
    the dispatch driver, `report.environment.driver_reason` says why) or `auto` (the graph an
    earlier analysis of this step kept, `capture.graph_cache`, else the dispatch driver, as a
    trace costs more than one walk saves). Both give the same report. A traced graph is kept
    for the next analysis of the same model, structure, batch and loss function in this
    process (the bf16 check after an fp16 analysis walks it).

    `dtype="fp8"`: the low run is a copy of the model converted by torchao
    (`convert_to_float8_training` with `fp8_recipe`, default `tensorwise`; emulated on the
    CPU) under bf16 autocast; the report's `extras.fp8` holds its casts and matmuls, and its
    FP8_ERROR / FP8_UNDERFLOW findings (`analysis.fp8`).

    `regime` says what the low-precision run executes: `autocast` (what
    `torch.autocast(device_type, dtype)` runs, with `policy`'s op lists: `cuda` or `cpu`) or
    `pure` (`model.to(dtype)` with float inputs cast).

    The phases, in order: validate the model and options (`_validate`, which also picks where
    the analysis runs: `jobs.analysis_job`); the real low run (`_low_run`); the fp32 capture
    with low-precision shadows, forward and backward (`_fp32_capture`); statistics and the
    report (`_report`); the gradient fidelity (`_gradient_fidelity`); the optimizer step
    (`_optimizer_step`, where `build_optimizer` or `lr` is given: the optimizer
    `build_optimizer(model)` makes, else AdamW at `lr`, stepped once on copies with fp32 and
    with low-precision weights). All but the first run inside one `ModelStateGuard`, which
    puts the model back however they end.

    >>> import torch, precision_doctor as pd
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> report = pd.analyze(net, torch.randn(8, 4), loss_fn=lambda out, b: out.pow(2).mean())
    >>> bool(report)  # no error-severity finding, final-loss error within tolerance
    True
    """
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise PrecisionDoctorError(f"lr={lr!r} must be a finite number > 0")
    req = _validate(model, batch, loss_fn, dtype, regime, policy, thresholds, name, progress, driver)
    # The state the step starts from, before the analysis touches it: a kept graph of it is
    # walked again (`capture.graph_cache`).
    key = fingerprint(req.model, req.batch) if req.driver is not Driver.DISPATCH else None
    recipe, fp8 = _fp8_setup(req, fp8_recipe)
    with (
        caller_heap_frozen(),
        ModelStateGuard(req.model, req.batch) as guard,
        fp8.recording() if fp8 else contextlib.nullcontext(),
        cpu_kernels.analysis_scope(req.model),
    ):
        # Inside the guard: tracing runs forward(), whose side effects must be undone too.
        req.say("checking whether torch.fx can trace the model")
        fx = fx_check(req.model)
        req.say(f"{req.low} forward as {req.regime} training runs it")
        low_model = fp8.model if fp8 else req.model
        real_low = _low_run(
            low_model, req.batch, req.loss_fn, req.low, req.regime, req.policy, guard, req.job.fail_fast
        )
        reset_fsdp_iteration(req.model)  # a forward without its backward (yet)
        req.say("fp32 forward with low-precision shadows")
        captured = _fp32_capture(req, real_low, guard, key)
        # The fp32 run is done, backward included: a low run made again (the kept graph's
        # fallback) reads the batch as the caller gave it, not as the fp32 forward wrote it.
        guard.restore_batch()
        capture, grads = captured.capture, captured.grads
        req.say("statistics and flags")
        report = _report(req, captured, real_low, fx)
        stepped = build_optimizer is not None or lr is not None
        # Pure regime: the applied optimizer step steps the low run's own gradients, kept here.
        low_grads: dict[str, torch.Tensor] | None = (
            {} if stepped and req.regime is Regime.PURE and isinstance(req.job, SingleProcess) else None
        )
        if real_low.graph is not None:
            # Without an optimizer step to take, nothing reads an fp32 gradient once it is
            # compared: each goes then (one process; the model's `.grad` lets go of them, the
            # guard puts the caller's back), so they do not all wait through the low backward.
            drop = not stepped and isinstance(req.job, SingleProcess)
            if drop:
                for p in req.model.parameters():
                    p.grad = None
            report = _gradient_fidelity(req, capture, real_low, grads, report, low_model, low_grads, drop_compared=drop)
        if stepped:
            report = _optimizer_step(req, grads, report, build_optimizer, lr, low_grads or None)
        del grads, low_grads
    if captured.step is not None:
        GRAPHS.keep(req.model, req.loss_fn, captured.step, key)
    elif req.driver is Driver.GRAPH:
        GRAPHS.drop(req.model)
    if fp8 and recipe:
        rec = fp8.recorder
        section = fp8_section(recipe, torchao_version(), fp8.emulated, rec.layers, rec.casts, rec.gemms)
        report = with_fp8(report, section)
    return report


def _fp8_setup(req: _Request, fp8_recipe: str | Fp8Recipe | None) -> tuple[Fp8Recipe | None, Fp8Run | None]:
    """For `dtype="fp8"`: the recipe and the torchao-converted copy of the model with its cast
    recorder; refused where the analysis cannot run fp8 yet (one line)."""
    if req.low is not LowDtype.FP8:
        if fp8_recipe is not None:
            raise PrecisionDoctorError(f"fp8_recipe={str(fp8_recipe)!r} needs dtype='fp8' (got {req.low})")
        return None, None
    recipe = parse_enum(Fp8Recipe, fp8_recipe if fp8_recipe is not None else Fp8Recipe.TENSORWISE, "fp8 recipe")
    if req.regime is not Regime.AUTOCAST:
        raise PrecisionDoctorError(
            "fp8 runs under bf16 autocast as torchao trains: use --regime autocast with --dtype fp8"
        )
    if type(req.job) is not SingleProcess:
        raise PrecisionDoctorError("--dtype fp8 analyzes one process yet, not a torch.distributed job")
    return recipe, Fp8Run.start(req.model, recipe)


@dataclass(frozen=True)
class _Request:
    """What `analyze` was asked, validated: the model unwrapped (`unwrap`), the options parsed,
    and where the analysis runs (`job`)."""

    model: torch.nn.Module
    batch: Any
    loss_fn: LossFn | None
    low: LowDtype
    regime: Regime
    policy: AutocastPolicy
    th: Thresholds
    name: str
    say: Progress
    device: torch.device
    job: AnalysisJob
    driver: Driver = Driver.AUTO


def _validate(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    dtype: str | LowDtype,
    regime: str | Regime,
    policy: str | AutocastPolicy,
    thresholds: Thresholds | Mapping[str, float] | None,
    name: str | None,
    progress: Progress | None,
    driver: str | Driver = Driver.AUTO,
) -> _Request:
    """The options parsed and the model checked before anything runs: an fp32 model with
    every parameter initialized, a precision FSDP2 can run, a regime it allows."""
    low = parse_enum(LowDtype, dtype, "dtype")
    run_regime = parse_enum(Regime, regime, "regime")
    op_policy = parse_enum(AutocastPolicy, policy, "policy")
    run_driver = parse_enum(Driver, driver, "driver")
    if not isinstance(model, torch.nn.Module):
        raise PrecisionDoctorError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    # One rank of a torch.distributed job: this rank's part is captured, the report is the
    # job's (`analysis.distributed`); DDP's wrapper is set aside (`unwrap`).
    model, wrapper = unwrap(model)
    job = analysis_job(model, wrapper)
    lazy = [n for n, p in model.named_parameters() if isinstance(p, torch.nn.parameter.UninitializedParameter)]
    if lazy:
        raise PrecisionDoctorError(
            f"parameter {lazy[0]!r} is not initialized yet (a lazy module): run the model once before analyzing it"
        )
    # Only float32 values get shadows: a model already in bf16 would be its own "reference"
    # and show no error at all. (A float64 buffer, a constant, is no low-precision model.)
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for pname, t in named:
            if t.is_floating_point() and t.dtype != torch.float32 and (kind == "parameter" or t.element_size() < 4):
                raise PrecisionDoctorError(
                    f"{kind} {pname!r} is {str(t.dtype).removeprefix('torch.')}: the analysis needs the "
                    "fp32 model as its reference (call model.float() first)"
                )
    check_fsdp_precision(model)
    if run_regime is Regime.PURE and fsdp_modules(model):
        raise PrecisionDoctorError(
            "the pure regime swaps in low copies of the parameters, which FSDP2 replaces with its own "
            "gathered ones: analyze an FSDP2 model with --regime autocast"
        )
    return _Request(
        model=model,
        batch=batch,
        loss_fn=loss_fn,
        low=low,
        regime=run_regime,
        policy=op_policy,
        th=Thresholds.of(thresholds),
        name=name or type(model).__name__,
        say=progress or (lambda _msg: None),
        device=device_of(model),
        job=job,
        driver=run_driver,
    )


@dataclass(frozen=True)
class _Captured:
    """The fp32 step's capture: the pipeline's records and units, the fp32 loss, the analysis'
    fp32 parameter gradients, which driver ran, and why not the graph one where it was asked
    for or considered."""

    capture: ShadowCapture
    loss_fp32: float
    grads: dict[str, torch.Tensor]
    path: CapturePath
    driver_reason: str | None
    step: StepGraph | None = None  # the graph walked: kept for the next analysis of this step


# The shadows follow the real low run op by op (its dtypes); every unit but the loss function
# also gets a local shadow.
_LOW_UNITS = LowUnits({"": True, LOSS_UNIT: False})


def _graph_refused(req: _Request, key: Fingerprint | None) -> str | None:
    """Why the graph driver is not tried for this request (None: it is). `auto` takes it where
    an earlier analysis in this process kept the graph of this very step (`capture.graph_cache`):
    its walk costs less than the dispatch driver, its trace about as much (docs/architecture.md)."""
    if req.driver is Driver.DISPATCH:
        return None
    if not isinstance(req.job, SingleProcess) or is_sharded(req.model):
        return "a torch.distributed job: its collectives and DTensors run once, under the dispatch driver"
    if req.driver is Driver.AUTO and not GRAPHS.has(req.model, req.loss_fn, key):
        return "auto: no graph of this step kept from an earlier analysis, and a trace costs what it would save"
    return None


def _fp32_capture(req: _Request, real_low: LowRun, guard: ModelStateGuard, key: Fingerprint | None) -> _Captured:
    """The fp32 step with low-precision shadows, by the driver `req.driver` asks for: the graph
    walk (`_graph_capture`) where it can stand for the step, else the dispatch mode on the
    eager step (`_dispatch_capture`)."""
    reason = _graph_refused(req, key)
    if req.driver is not Driver.DISPATCH and reason is None:
        graph = _graph_capture(req, real_low, guard, key)
        if not isinstance(graph, str):
            return graph
        reason = graph
    capture, loss_fp32, grads = _dispatch_capture(req, real_low, guard)
    return _Captured(capture, loss_fp32, grads, CapturePath.DISPATCH, reason)


def _graph_capture(req: _Request, real_low: LowRun, guard: ModelStateGuard, key: Fingerprint | None) -> _Captured | str:
    """The step's aten graph walked by the capture (`capture.graph_driver`): the graph an
    earlier analysis kept for this step (`capture.graph_cache`), else one traced now. A kept
    graph whose walk is not the step's (a value it branched on changed) is dropped, and the
    step traced again (`auto`: left to the dispatch driver, which costs less than a trace).
    Returns the reason where the graph cannot stand for the step, the model's state then as
    it was."""
    kept = GRAPHS.get(req.model, req.loss_fn, key)
    if kept is not None:
        walked = _walk(req, real_low, guard, kept.rewound())
        if not isinstance(walked, str):
            return walked
        GRAPHS.drop(req.model)
        if req.driver is Driver.AUTO:
            return f"auto: the graph kept from an earlier analysis no longer stands for the step ({walked})"
    GRAPHS.drop(req.model)
    try:
        step = trace_step(req.model, req.batch, req.loss_fn, on_mutation=guard.before_mutation)
    except GraphUnavailable as e:
        return str(e)
    return _walk(req, real_low, guard, step)


def _walk(req: _Request, real_low: LowRun, guard: ModelStateGuard, step: StepGraph) -> _Captured | str:
    """One walk of `step` through a fresh capture; the reason where its forward is not the
    traced one (the state then put back). A failure of the walk of a step whose trace
    succeeded is the tool's: raised as an internal error."""
    capture = graph_capture(
        req.model,
        TORCH_DTYPES[req.low],
        _LOW_UNITS,
        on_mutation=guard.before_mutation,
        op_dtypes=real_low.op_dtypes,
        # A copy: a walk that stops leaves the dispatch driver every module's low outputs.
        module_outputs=dict(real_low.module_outputs),
        default_low=req.regime is Regime.PURE,
    )
    capture.external_storages |= batch_storages(req.batch)
    try:
        loss, grads = capture.replay(step, req.model)
    except GraphUnavailable as e:
        step.restore(req.model)
        return str(e)
    except (PrecisionDoctorError, PrecisionDoctorInternalError):
        raise
    except Exception as e:
        cause = e.original if isinstance(e, ModelOpError) else e
        where = f" at {capture.failed_at}" if capture.failed_at else ""
        raise PrecisionDoctorInternalError(
            f"the graph driver's walk failed{where}: {type(cause).__name__}: {cause}"
        ) from e
    req.say("fp32 backward with gradient statistics")
    real_low.module_outputs.clear()
    for n, p in req.model.named_parameters(remove_duplicate=False):
        p.grad = grads.get(n)
    return _Captured(capture, float(loss), guard.analysis_grads(), CapturePath.GRAPH, None, step)


def _dispatch_capture(
    req: _Request, real_low: LowRun, guard: ModelStateGuard
) -> tuple[ShadowCapture, float, dict[str, torch.Tensor]]:
    """The fp32 step under the dispatch mode: forward and loss (`_fp32_forward`), then
    backward with gradient statistics (`_fp32_backward`). Returns the capture, the fp32 loss
    and the analysis' fp32 parameter gradients. A failure that is not the model's or the
    user's is the tool's: raised as an internal error, naming the op it happened at."""
    capture: ShadowCapture | None = None
    try:
        with capture_pass(
            req.model,
            TORCH_DTYPES[req.low],
            _LOW_UNITS,
            on_mutation=guard.before_mutation,
            op_dtypes=real_low.op_dtypes,
            module_outputs=real_low.module_outputs,
            default_low=req.regime is Regime.PURE,
        ) as capture:
            output, loss, loss_fp32 = _fp32_forward(req, capture, real_low)
            req.job.before_backward()
            req.say("fp32 backward with gradient statistics")
            _fp32_backward(req.model, capture, loss)
            del loss, output
        return capture, loss_fp32, guard.analysis_grads()
    except (PrecisionDoctorError, PrecisionDoctorInternalError):
        raise
    except Exception as e:
        where = f" at {capture.failed_at}" if capture and capture.failed_at else ""
        raise PrecisionDoctorInternalError(f"analysis failed{where}: {type(e).__name__}: {e}") from e


def _fp32_forward(req: _Request, capture: ShadowCapture, real_low: LowRun) -> tuple[Any, torch.Tensor, float]:
    """The model's forward and the loss under the capture: the output (alive through the
    backward, as in a training step), the loss tensor and its value, which must be finite (a
    model broken in fp32 has no precision to diagnose)."""
    capture.external_storages |= batch_storages(req.batch)
    with fail_fast(req.job.fail_fast):
        try:
            output = run_model(req.model, req.batch)
        except PrecisionDoctorInternalError:
            raise
        except (Exception, SystemExit) as e:  # sys.exit() in forward: not a silent end
            raise PrecisionDoctorError(
                f"the model's forward raised {type(e).__name__}: {e}"
                + (f" (at {capture.failed_at})" if capture.failed_at else "")
            ) from e
    capture.tracker.outside = LOSS_UNIT
    try:
        loss = resolve_loss(output, req.batch, req.loss_fn)
    except (PrecisionDoctorError, PrecisionDoctorInternalError):
        raise
    except (Exception, SystemExit) as e:
        raise PrecisionDoctorError(f"loss_fn raised {type(e).__name__}: {e}") from e
    real_low.module_outputs.clear()  # those no module call consumed
    capture.flush()  # the forward's statistics, read back
    with _disable_current_modes():  # reading the loss is no op of the model
        loss_fp32 = float(loss.detach())
    if not math.isfinite(loss_fp32):
        first = next((r for r in capture.records if r.fp32_nonfinite_root), None)
        where = f"; first non-finite op: {first.op} in unit {first.unit!r}" if first else ""
        raise PrecisionDoctorError(
            f"the fp32 loss is {loss_fp32}: the model is broken before any precision change (NONFINITE_FP32{where})"
        )
    return output, loss, loss_fp32


def _fp32_backward(model: torch.nn.Module, capture: ShadowCapture, loss: torch.Tensor) -> None:
    """The fp32 backward from `loss`, its gradients summarized as they pass (`instrument_backward`)."""
    # The parameters FSDP2 gathered and keeps for backward are parameters, not activations
    # (their storage exists only while gathered).
    capture.external_storages |= {storage_ptr(t) for t, _ in gathered_params(model)}
    handles = capture.instrument_backward(loss)
    try:
        with _disable_current_modes():  # the seed is no forward op of the loss
            seed = torch.ones_like(loss)
        loss.backward(seed)  # type: ignore[no-untyped-call]  # unannotated in torch
    except PrecisionDoctorInternalError:
        raise
    except Exception as e:
        raise PrecisionDoctorError(
            f"backward raised {type(e).__name__}: {e}" + (f" (at {capture.failed_at})" if capture.failed_at else "")
        ) from e
    finally:
        for h in handles:
            h.remove()
    capture.settle()


def _report(req: _Request, captured: _Captured, real_low: LowRun, fx: tuple[bool, str | None]) -> Report:
    """The capture's statistics judged into the report: this process's, or the job's
    (`AnalysisJob.report`)."""
    capture, loss_fp32, grads = captured.capture, captured.loss_fp32, captured.grads
    try:
        param_stats = _param_grad_stats(capture, req.model, grads)
    except Exception as e:
        raise PrecisionDoctorInternalError(f"parameter gradient statistics failed: {type(e).__name__}: {e}") from e
    capture.forget_graph()
    low_params = _low_params(req.model, capture.low_reads)
    loss_low, loss_dtype = real_low.loss, real_low.loss_dtype
    fx_ok, fx_error = fx
    return req.job.report(
        CapturedStep(build_report, capture, param_stats, req.model, grads, fidelity_follows=real_low.graph is not None),
        low=req.low,
        th=req.th,
        losses=Losses(
            fp32=loss_fp32,
            low=loss_low,
            rel_error=relative_loss_error(loss_fp32, loss_low),
            low_dtype="fp16" if loss_dtype == torch.float16 else "bf16" if loss_dtype == torch.bfloat16 else "fp32",
            low_term_grad_max_abs=capture.low_term_grad_max_abs,
        ),
        env=Environment(
            tool_version=__version__,
            torch_version=torch.__version__,
            python_version=sys.version.split()[0],
            platform=platform.platform(),
            device=str(req.device),
            dtype=req.low,
            emulated=emulates(TORCH_DTYPES[req.low], req.device.type),
            capture_path=captured.path,
            fx_traceable=fx_ok,
            fx_error=fx_error,
            driver_reason=captured.driver_reason,
            regime=req.regime,
            policy=req.policy if req.regime is Regime.AUTOCAST else None,
        ),
        name=req.name,
        low_params=low_params,
    )


def _gradient_fidelity(
    req: _Request,
    capture: ShadowCapture,
    real_low: LowRun,
    grads: dict[str, torch.Tensor],
    report: Report,
    low_model: torch.nn.Module | None = None,
    keep: dict[str, torch.Tensor] | None = None,
    *,
    drop_compared: bool = False,
) -> Report:
    """The real low run's backward, its parameter gradients compared with fp32's
    (`AnalysisJob.gradient_fidelity`), and kept in `keep` where given (in the low dtype);
    `drop_compared`: each fp32 gradient leaves `grads` once compared (`GradComparer`).
    The loss scale comes from the fp32 run's gradients, in the report: hence the low
    backward last."""
    scale_log2 = grad_scale_log2(report)
    req.say(f"{req.low} backward at loss scale 2^{scale_log2}")

    def low_backward(sink: GradientSink) -> None:
        model = low_model if low_model is not None else req.model
        _low_backward(real_low, model, req.batch, req.loss_fn, scale_log2, sink, req.low, req.regime, req.policy)

    return req.job.gradient_fidelity(
        LowGradients(
            report,
            req.model,
            grads,
            scale_log2,
            capture.workspace,
            low_backward,
            keep,
            TORCH_DTYPES[req.low],
            drop_compared=drop_compared,
        )
    )


def _optimizer_step(
    req: _Request,
    grads: dict[str, torch.Tensor],
    report: Report,
    build_optimizer: OptimizerFactory | None,
    lr: float | None,
    low_grads: dict[str, torch.Tensor] | None = None,
) -> Report:
    """One optimizer step on copies, fp32 against the regime's dtype
    (`analysis.optimizer_step`; the applied step on `low_grads` where given), with its
    LOST_UPDATE findings. One process with plain parameters only: a sharded or distributed
    model's report has none."""
    if not isinstance(req.job, SingleProcess):
        return report
    step = optimizer_step(
        req.model,
        grads,
        req.low,
        build_optimizer=build_optimizer,
        lr=lr,
        master_weights=req.regime is Regime.AUTOCAST,
        low_grads=low_grads,
    )
    return with_optimizer_step(report, step)


def _low_run(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    low: LowDtype,
    regime: Regime,
    policy: AutocastPolicy,
    guard: ModelStateGuard,
    sharded_job: bool = False,
) -> LowRun:
    """The real low-precision forward, as `regime` training executes it. If the model or loss
    fails (not a check of precision-doctor's own, said as it is), the model is run once in
    fp32 to tell a broken model or loss function (reported as such) from a model that fails
    only in the low precision, as real training would. In a sharded job
    (`sharded_job`) a failure aborts the job at once (`fail_fast`), with no fp32 rerun: the
    other ranks are in the model's collectives, not in a rerun's."""
    try:
        with fail_fast(sharded_job):
            try:
                return low_run(
                    model,
                    batch,
                    loss_fn,
                    TORCH_DTYPES[low],
                    regime=regime,
                    policy=policy,
                    record_ops=False,
                    keep_graph=True,
                )
            except (PrecisionDoctorError, PrecisionDoctorInternalError):
                raise
            except (Exception, SystemExit) as e:
                if not sharded_job:
                    raise
                raise PrecisionDoctorError(f"the model's {low} forward raised {type(e).__name__}: {e}") from e
    except (PrecisionDoctorError, PrecisionDoctorInternalError, RanksFailedError, RanksFailedInternalError):
        raise  # our own (a check of the low run's setup, mxfp8's rows): said as it is
    except (Exception, SystemExit) as low_error:
        state = torch.random.get_rng_state()
        try:
            # Under a capture that only reports writes, so the guard restores what it changes;
            # with autograd on, or every loss would read as "does not require grad".
            with capture_pass(
                model,
                TORCH_DTYPES[low],
                LowUnits({"": False}),
                collect=False,
                local=False,
                on_mutation=guard.before_mutation,
            ):
                try:
                    output = run_model(model, batch)
                except (Exception, SystemExit) as e:
                    raise PrecisionDoctorError(f"the model's forward raised {type(e).__name__}: {e}") from e
                try:
                    resolve_loss(output, batch, loss_fn)
                except PrecisionDoctorError:
                    raise
                except (Exception, SystemExit) as e:
                    raise PrecisionDoctorError(f"loss_fn raised {type(e).__name__}: {e}") from e
        finally:
            torch.random.set_rng_state(state)
        if isinstance(low_error, PrecisionDoctorError):
            raise
        raise PrecisionDoctorError(
            f"the model fails in {low} ({regime} regime, {policy} op policy), not in fp32: "
            f"{type(low_error).__name__}: {low_error}"
        ) from low_error


def _low_backward(
    real_low: LowRun,
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    scale_log2: int,
    sink: GradientSink,
    low: LowDtype,
    regime: Regime,
    policy: AutocastPolicy,
) -> None:
    """The low run's backward at loss scale 2^k, its unscaled parameter gradients into
    `sink` (`LowGraph.backward`). A graph the model's own writes invalidated since (a
    parameter written in place in forward, restored in place after it) is run again, forward
    and backward at once (same RNG draws: the gradients that reached the sink before the
    failure reach it again, the same values). The fp32 backward of the same model succeeded:
    a failure of that run is the low precision's."""
    assert real_low.graph is not None
    try:
        real_low.graph.backward(scale_log2, sink)
        return
    except PrecisionDoctorInternalError:
        raise
    except Exception:
        pass
    try:
        low_run(
            model,
            batch,
            loss_fn,
            TORCH_DTYPES[low],
            regime=regime,
            policy=policy,
            record_ops=False,
            gradients_at=(scale_log2, sink),
        )
    except PrecisionDoctorInternalError:
        raise
    except Exception as e:
        raise PrecisionDoctorError(
            f"the model's backward fails in {low} ({regime} regime"
            + (f", {policy} op policy" if regime is Regime.AUTOCAST else "")
            + f"), not in fp32: {type(e).__name__}: {e}"
        ) from e


def _low_params(model: torch.nn.Module, low_reads: set[int]) -> set[str]:
    """The parameters an op of the real low run reads low (`low_reads`: ids of the tensors
    read). The ops read a DTensor parameter's local shard, and FSDP2's gathered copy of a
    sharded one."""
    readers: dict[int, list[int]] = {}
    for unsharded, sharded in gathered_params(model):
        readers.setdefault(id(sharded), []).append(id(unsharded))
    return {
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if any(i in low_reads for i in (id(p), id(local_tensor(p)), *readers.get(id(p), ())))
    }


def _param_grad_stats(
    capture: ShadowCapture, model: torch.nn.Module, grads: dict[str, torch.Tensor]
) -> dict[str, TensorSummary]:
    """Summaries of the parameters' gradients. A tied weight (GPT-2's embedding and lm_head)
    is one gradient under two names: one summary (38.6M values on GPT-2), attributed to both
    owners. A sparse gradient (`Embedding(sparse=True)`) is summarized over the rows it has;
    a complex one gets none (nothing here rounds complex values)."""
    by_tensor: dict[int, TensorSummary] = {}
    param_stats: dict[str, TensorSummary] = {}
    small = SummaryBatch(capture.workspace, with_sumsq=True, readback=capture.readback)
    replicated = is_tensor_parallel(model)
    for n, g in grads.items():
        if id(g) not in by_tensor:
            values = g.coalesce().values() if g.is_sparse else g
            if values.dtype != torch.float32:
                continue
            # A DTensor gradient (FSDP2, tensor parallel) counts once per element in the job:
            # this rank's shard, a replica on one rank only, a partial sum once reduced; so
            # does a plain parameter's under tensor parallel (every rank holds it).
            part = counted_part(reduced(values), replicated=replicated)
            by_tensor[id(g)] = small.add(part) if part is not None and part.numel() else TensorSummary()
        param_stats[n] = by_tensor[id(g)]
    small.compute()
    capture.flush()
    params = dict(model.named_parameters(remove_duplicate=False))
    for n, st in param_stats.items():
        if st.nonfinite_count:
            capture.param_grad_nonfinite(params[n])
    return param_stats


# --- from capture records to the report ------------------------------------------------------


def tensor_stats(s: TensorSummary) -> TensorStats:
    hist = s.hist.copy()
    hist[0] -= s.zero_count
    hist[255] = 0
    nz = hist.nonzero()[0]
    lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (EXP_BIAS, EXP_BIAS)
    tails = {}
    for name, t in s.tails.items():
        tails[name] = FormatTails(
            overflow_count=t.overflow,
            overflow_fraction=s.fraction(t.overflow),
            underflow_count=t.flushed,
            underflow_fraction=s.fraction(t.flushed),
            subnormal_count=t.subnormal,
            subnormal_fraction=s.fraction(t.subnormal),
        )
    return TensorStats(
        numel=s.numel,
        zero_count=s.zero_count,
        nan_count=s.nan_count,
        inf_count=s.inf_count,
        max_abs=s.max_abs,
        min_nonzero_abs=s.min_nonzero_abs if math.isfinite(s.min_nonzero_abs) else None,
        fp16=tails["fp16"],
        bf16=tails["bf16"],
        histogram=Histogram(
            log2_lo=lo - EXP_BIAS,
            counts=[int(c) for c in hist[lo:hi]],
            sum_squares=[float(v) for v in s.sumsq[lo : min(hi, SUMSQ_BINS)]] if s.sumsq is not None else None,
        ),
        sum_squares_total=s.sumsq_total if s.sumsq is not None else None,
        masked_count=s.masked_count,
    )


_CURVE = TypeAdapter(list[LossScalePoint])


def loss_scale_curve(s: TensorSummary) -> list[LossScalePoint]:
    """The summary's fractions at every scale of LOSS_SCALES. 128 points per unit: validated
    as one list (one pydantic-core call, ~25% less than a constructor call per point)."""
    lost, over, norm = s.loss_scale_fractions(LOSS_SCALES)
    norms = norm.tolist() if s.sumsq is not None else [None] * len(LOSS_SCALES)
    return _CURVE.validate_python(
        [
            {"scale_log2": k, "underflow_fraction": a, "overflow_fraction": b, "underflow_norm_fraction": c}
            for k, a, b, c in zip(LOSS_SCALES, lost.tolist(), over.tolist(), norms, strict=True)
        ]
    )


def _error(acc: ErrorAccumulator, nonfinite: int) -> ErrorStats:
    return ErrorStats(rel_l2_error=acc.rel_l2, sqnr_db=acc.sqnr_db, nonfinite_count=nonfinite)


def _op_stats(ops: list[OpRecord]) -> list[OpStats]:
    groups: dict[tuple[str, Phase], list[OpRecord]] = defaultdict(list)
    for r in ops:
        groups[(r.op, r.phase)].append(r)
    out = []
    for (op, phase), rs in groups.items():
        sums = [r.summary for r in rs if r.summary is not None]
        errs = [r.local_rel_error for r in rs if r.local_rel_error is not None]
        out.append(
            OpStats(
                op=op,
                phase=phase,
                calls=len(rs),
                flops=sum(r.flops for r in rs),
                max_abs=max((s.max_abs for s in sums), default=None),
                nonfinite_count=sum(s.nonfinite_count for s in sums),
                fp16_overflow_count=sum(s.tails["fp16"].overflow for s in sums),
                fp16_underflow_count=sum(s.tails["fp16"].flushed for s in sums),
                local_rel_l2_error=max(errs) if errs else None,
                low_dtypes=sorted({dtype_spelling(d) for r in rs for d in (r.low_dtypes or ())}),
            )
        )
    return out


def _op_costs(ops: list[OpRecord]) -> list[OpCost]:
    calls: dict[tuple[str, Phase, int, int], int] = defaultdict(int)
    for r in ops:
        if r.flops or r.moved_bytes:
            calls[(r.op, r.phase, r.flops, r.moved_bytes)] += 1
    return [OpCost(op=o, phase=ph, flops=f, bytes=b, calls=n) for (o, ph, f, b), n in calls.items()]


def build_report(
    capture: ShadowCapture,
    param_stats: dict[str, TensorSummary],
    *,
    low: LowDtype,
    th: Thresholds,
    losses: Losses,
    env: Environment,
    name: str,
    low_params: set[str] | None = None,
) -> Report:
    """`low_params`: the parameters the real low run reads in the low dtype (their gradients
    are low there too); None: all of them.

    The capture's unit records are completed first (parameter gradients, outputs, propagated
    errors), then judged unit by unit at the model's loss-scale ceiling."""
    records = capture.records
    limits = LIMITS[low]
    _add_param_grads(capture, param_stats, low_params)
    unit_outputs(records, capture.units)
    _add_propagated_errors(capture, losses)
    all_grads = TensorSummary()
    for urec in capture.units.values():
        if urec.name != LOSS_UNIT:  # fp32 under autocast; see flags.py
            all_grads.merge(urec.backward)
    # The highest scale GradScaler can settle at: what the gradient flags' severities read.
    over = all_grads.loss_scale_fractions(range(MAX_SCALE_LOG2 + 1), limits)[1] if all_grads.numel else None
    ceiling = scale_ceiling(lambda k: float(over[k]), th) if over is not None else MAX_SCALE_LOG2
    return Report(
        model=name,
        environment=env,
        losses=losses,
        thresholds=th,
        op_count_forward=sum(1 for r in records if r.phase == Phase.FORWARD),
        op_count_backward=sum(1 for r in records if r.phase == Phase.BACKWARD),
        units=_units(capture, param_stats, low, limits, th, ceiling, _loss_ceiling_log2(losses, low)),
        edges=_edges(records),
        loss_scale=loss_scale_curve(all_grads) if all_grads.numel else [],
    )


def _loss_ceiling_log2(losses: Losses, low: LowDtype) -> int:
    """The largest scale the low run's loss takes (`loss_scale.seed_ceiling_log2`): a loss the
    run holds in fp16 (CPU autocast's `mean`, pure fp16) gets the scale as its fp16 gradient."""
    if low is not LowDtype.FP16:
        return MAX_SCALE_LOG2
    return seed_ceiling_log2(low, losses.low_dtype == low.value, losses.low_term_grad_max_abs)


def _add_param_grads(
    capture: ShadowCapture, param_stats: dict[str, TensorSummary], low_params: set[str] | None
) -> None:
    """Each parameter named on its unit, and its gradient's statistics merged into the unit's
    backward where the real low run's gradient is low."""
    for pname, pstats in param_stats.items():
        owner = capture.unit(owner_of(pname))
        owner.param_names.append(pname)
        if low_params is not None and pname not in low_params:
            continue  # an fp32 gradient in the real run (a LayerNorm weight under autocast)
        # Parameters' gradients are summarized after backward (see instrument_backward): a
        # unit's gradients are those w.r.t. its ops' outputs plus its parameters' (those the
        # low run reads low: autocast's cast copy of a weight gets its gradient in fp16).
        owner.backward.merge(pstats)
        owner.grad_nodes.append((f"AccumulateGrad({pname})", pstats))


def _add_propagated_errors(capture: ShadowCapture, losses: Losses) -> None:
    """Each unit's propagated error: what its outputs hand on against the real low run's."""
    loss_unit = capture.units.get(LOSS_UNIT)
    if loss_unit is not None:  # what it hands on is the loss itself
        loss_unit.prop_error = ErrorAccumulator()
        loss_unit.prop_error.add(torch.tensor([losses.fp32]), torch.tensor([losses.low]), None, capture.workspace)
        loss_unit.prop_nonfinite = loss_unit.prop_error.nonfinite_mismatch
    # A module's outputs are compared with the real low run's (see ShadowCapture.module_output).
    for uname, acc in capture.module_errors.items():
        urec = capture.units.get(uname)
        if urec is not None and (acc.sum_sq_ref > 0 or acc.nonfinite_mismatch):
            urec.prop_error = acc
            urec.prop_nonfinite = acc.nonfinite_mismatch


def _edges(records: list[OpRecord]) -> list[UnitEdge]:
    """Forward dataflow between units, each produced tensor counted once per consumer unit."""
    edge_bytes: dict[tuple[str, str], int] = defaultdict(int)
    seen: set[tuple[int, str]] = set()
    for r in records:
        if r.phase != Phase.FORWARD:
            continue
        for i in r.inputs:
            if i < 0:
                continue
            src = records[i]
            if src.unit != r.unit and (i, r.unit) not in seen:
                seen.add((i, r.unit))
                edge_bytes[(src.unit, r.unit)] += src.output_bytes
    return [UnitEdge(src=s, dst=d, bytes=b) for (s, d), b in edge_bytes.items()]


def _units(
    capture: ShadowCapture,
    param_stats: dict[str, TensorSummary],
    low: LowDtype,
    limits: FormatLimits,
    th: Thresholds,
    ceiling: int,
    loss_ceiling_log2: int = MAX_SCALE_LOG2,
) -> list[Unit]:
    """Every unit judged, in the order of its first op (a unit with none last)."""
    records = capture.records
    by_unit: dict[str, list[OpRecord]] = defaultdict(list)
    for r in records:
        by_unit[r.unit].append(r)
    first_op = {u: ops[0].index for u, ops in by_unit.items()}
    units: list[Unit] = []
    params = dict(param_stats)
    for uname, urec in sorted(capture.units.items(), key=lambda kv: first_op.get(kv[0], len(records))):
        ops = by_unit.get(uname, [])
        order = first_op.get(uname, len(records))
        units.append(_unit(urec, ops, params, order, low, limits, th, ceiling, loss_ceiling_log2=loss_ceiling_log2))
    return units


def _unit(
    urec: UnitRecord,
    ops: list[OpRecord],
    param_stats: dict[str, TensorSummary],
    order: int,
    low: LowDtype,
    limits: Any,
    th: Thresholds,
    scale_ceiling_log2: int = 24,
    *,
    loss_ceiling_log2: int = MAX_SCALE_LOG2,
) -> Unit:
    fwd_ops = [r for r in ops if r.phase == Phase.FORWARD]
    bwd_ops = [r for r in ops if r.phase == Phase.BACKWARD]
    has_local = urec.local_error.sum_sq_ref > 0 or urec.local_error.nonfinite_mismatch > 0
    has_prop = urec.prop_error.sum_sq_ref > 0 or urec.prop_error.nonfinite_mismatch > 0
    return Unit(
        name=urec.name,
        kind=urec.kind,
        order=order,
        flops_forward=sum(r.flops for r in fwd_ops),
        flops_backward=sum(r.flops for r in bwd_ops),
        activation_bytes=urec.saved_bytes,
        param_bytes=sum(4 * param_stats[p].numel for p in urec.param_names if p in param_stats),
        op_count=len(ops),
        flags=unit_flags(urec, ops, low, limits, th, scale_ceiling_log2, loss_ceiling_log2=loss_ceiling_log2),
        forward=UnitForward(
            stats=tensor_stats(urec.forward) if urec.forward.numel else None,
            local=_error(urec.local_error, urec.local_error.nonfinite_mismatch) if has_local else None,
            propagated=_error(urec.prop_error, urec.prop_nonfinite) if has_prop else None,
            input_rel_l2_error=urec.input_prop_error,
        ),
        backward=UnitBackward(
            stats=tensor_stats(urec.backward) if urec.backward.numel else None,
            loss_scale=loss_scale_curve(urec.backward) if urec.backward.numel else [],
            param_grads={p: tensor_stats(param_stats[p]) for p in urec.param_names if p in param_stats},
            reads_overflow=reads_overflow(ops, limits),
        ),
        ops=_op_stats(ops),
        op_costs=_op_costs(ops),
    )

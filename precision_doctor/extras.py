"""What later stages add to a report (`Report.extras`): one typed section each, one writer each.

- `plan` (`PlanSection`): the per-unit dtype plan with its rendered exports; written by
  `planning.export.plan_section` (through `planning.pipeline.plan_report`, which the CLI and
  the pre-flight both call).
- `loss_scale` (`LossScaleSection`): the initial loss-scale recommendation for the plan's low
  units; `analysis.loss_scale.LossScaleAdvice.to_extras`.
- `preflight` (`PreflightSection`): the pre-flight's verdict and short training runs;
  `training.preflight.PreflightResult.annotated_report`.
- `scaler_monitor` (`MonitorSection`): a real run's GradScaler history;
  `training.monitor.ScalerMonitor.to_extras`.
- `fp8` (`Fp8Section`): the fp8 low run's casts and matmuls; `analysis.fp8.with_fp8`.
- `fp8_recipes` (`Fp8RecipeComparison`): the same model under each fp8 recipe;
  `analysis.fp8_recipes.compare_fp8_recipes`.

Sections are validated with the report: a report whose section does not fit does not load
(one line naming the field). Writers live in the planning and training stages and readers in
the views, so the models live here, below both.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from precision_doctor.options import (
    AutocastPolicy,
    ExportFormat,
    Judge,
    LowDtype,
    PlanUnitDtype,
    Regime,
    Severity,
    percent,
)
from precision_doctor.schema import Frozen

MONITOR_KIND: Final = "precision-doctor-scaler-monitor"
MONITOR_SCHEMA_VERSION: Final = 1
PREFLIGHT_SCHEMA_VERSION = 2
"""2: a run's units may be `fp8:<recipe>` (the fp8 pre-flight's planned run)."""


# --- plan -----------------------------------------------------------------------------------


class Fp32Unit(Frozen):
    unit: str
    reason: str


class NotFp8Unit(Frozen):
    """A Linear unit an fp8 plan keeps out of float8 (in bf16 or fp32), and why."""

    unit: str
    reason: str


class PlanCosts(Frozen):
    """Estimated step time, in seconds, of each configuration."""

    fp32: float
    autocast: float
    plan: float


class PlanBytes(Frozen):
    """Activation memory, in bytes, of each configuration."""

    fp32: int
    autocast: int
    plan: int


class PlanSection(Frozen):
    """`extras.plan`: the per-unit dtype plan, its estimated costs and its exports."""

    target: str
    dtype: LowDtype
    units: dict[str, PlanUnitDtype]
    """Unit -> the dtype it runs in (`fp8:<recipe>` for an fp8 plan's converted Linears)."""
    fp32_units: list[Fp32Unit]
    estimated_step_time_s: PlanCosts
    activation_bytes: PlanBytes
    verified_loss_rel_error: float
    verification_passes: int
    exports: dict[ExportFormat, str] = Field(default_factory=dict)
    """Each export format's text, as `analyze --export` writes it."""
    regime: Regime = Regime.AUTOCAST
    """`pure`: the low units hold their own parameters low (`Plan.regime`)."""
    master_units: list[str] = Field(default_factory=list)
    """Pure regime: the low units whose parameters keep fp32 master copies."""

    @property
    def low_units(self) -> dict[str, bool]:
        return {u: d != "fp32" for u, d in self.units.items()}

    @property
    def speedup(self) -> float | None:
        """Estimated step-time speed-up of the plan over fp32."""
        t = self.estimated_step_time_s
        return t.fp32 / t.plan if t.plan > 0 else None

    @property
    def memory_saving(self) -> float | None:
        """Fraction of fp32 activation memory the plan saves."""
        a = self.activation_bytes
        return 1.0 - a.plan / a.fp32 if a.fp32 > 0 else None


# --- loss scale -----------------------------------------------------------------------------


class LossScaleSection(Frozen):
    """`extras.loss_scale` (and `Plan.loss_scale`): the initial fp16 loss scale, as powers of two."""

    recommended_scale_log2: int
    default_scale_log2: int
    underflow_fraction_at_recommended: float
    """Fraction of the nonzero gradients that flush to zero at the recommended scale."""
    underflow_fraction_at_default: float
    skipped_steps_from_default: int
    """Steps `torch.amp.GradScaler` skips backing off from the default scale on these
    gradients: one per halving until the scaled gradients are finite (not down to the
    recommended scale, which keeps a headroom below that)."""
    scaler_needed: bool

    def describe(self, dtype: LowDtype) -> str:
        """One line for a person (the CLI prints it)."""
        if dtype is LowDtype.BF16:
            need = "needed" if self.scaler_needed else "not needed"
            return f"bf16: a loss scaler is {need} (gradients fit bf16's fp32-sized range)"
        if not self.scaler_needed and self.recommended_scale_log2 == 0 and self.skipped_steps_from_default == 0:
            # Only an advice over no nonzero gradient reads so: a nonzero gradient that fits at
            # 2^16 gets k >= 14 (headroom 2^2), one that does not makes skipped steps.
            return "fp16: no loss scaler needed (no nonzero gradient runs in fp16)"
        headroom = (
            ", 4x headroom below fp16's max for gradients growing in the first steps"
            if self.recommended_scale_log2 < self.default_scale_log2 and self.skipped_steps_from_default == 0
            else ""
        )
        return (
            f"initial loss scale 2^{self.recommended_scale_log2} "
            f"(underflow {percent(self.underflow_fraction_at_recommended)}{headroom}; at the default "
            f"2^{self.default_scale_log2}: {percent(self.underflow_fraction_at_default)}, "
            f"{self.skipped_steps_from_default} skipped step(s) to back off)"
        )


# --- pre-flight -----------------------------------------------------------------------------


class StepRecord(Frozen):
    step: int
    loss: float
    grads_finite: bool
    scale: float | None = None
    """The loss scale this step used (None: no scaler)."""
    skipped: bool = False
    """GradScaler skipped the optimizer step."""
    unchanged_fraction: float | None = None
    """Fraction of the trained weights' elements this step left exactly as they were (the
    pure regime's runs; None elsewhere): weights in bf16 keep their value where the update is
    below half their spacing."""
    rank_losses: list[float] = Field(default_factory=list)
    """Each rank's loss in a torch.distributed job (`loss` is their mean); empty for one
    process."""


class ModeRun(Frozen):
    mode: str
    """"fp32", "low", "planned"; "bf16" (fp8); "master" and "untrained" (pure regime)."""
    description: str
    units: dict[str, PlanUnitDtype] = Field(default_factory=dict)
    """Per unit, where the run differs from its default ("" key); an fp8 plan's planned run
    names its fp8 layers `fp8:<recipe>`."""
    init_scale_log2: int | None = None
    """The GradScaler's initial scale (None: no scaler)."""
    steps: list[StepRecord]
    skipped_steps: list[int]
    nonfinite_steps: list[int]
    max_divergence: float | None = None
    """Largest |loss - fp32 loss| / |fp32 loss| over the steps (None for the fp32 run), the
    fp32 loss after the same optimizer steps applied: from an fp32 run that skipped the steps
    this run's GradScaler skipped."""
    divergence_step: int | None = None
    noise_floor: float | None = None
    """Where `max_divergence` is over the tolerance: the largest divergence, from the same fp32
    reference, of an fp32 run whose initial weights were rounded once to the low dtype (same
    batches, same steps skipped): how far the loss moves from one rounding alone. A loss
    this sensitive (a chaotic run) makes the divergence no evidence of precision damage."""
    seconds: float

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps]


class Reason(Frozen):
    risk: str
    mode: str
    """"analysis" for a flag of the one-step analysis, else the run that showed it."""
    unit: str | None = None
    message: str
    severity: Severity = Severity.ERROR
    """The analysis flag's severity; for a run's risk: `warning` for SKIPPED_STEPS unless
    GradScaler was still skipping at the last step, `error` otherwise."""

    def line(self) -> str:
        where = f" [{self.unit}]" if self.unit else ""
        return f"{self.risk} ({self.mode}){where}: {self.message}"


class Fp8ScalingStep(Frozen):
    """One training step of one fp8 tensor under Transformer Engine's delayed scaling, modelled
    (`training.fp8_scaling`), beside current (per-step tensorwise) scaling."""

    step: int
    amax: float
    """This step's amax of the tensor (what TE appends to its amax history)."""
    delayed_scale: float
    """The scale delayed scaling casts this step with: fp8 max / (the largest amax of the
    previous steps in the history window) * 2^-margin; TE's initial 1 at step 0, and the
    previous scale where that amax is 0 or not finite."""
    current_scale: float
    """fp8 max / this step's amax (current scaling: torchao's tensorwise, TE's
    Float8CurrentScaling)."""
    nonzero: int
    flushed_delayed: int
    saturated_delayed: int
    flushed_current: int
    saturated_current: int

    @property
    def flushed_delayed_fraction(self) -> float:
        return self.flushed_delayed / self.nonzero if self.nonzero else 0.0

    @property
    def flushed_current_fraction(self) -> float:
        return self.flushed_current / self.nonzero if self.nonzero else 0.0


class Fp8ScalingTrack(Frozen):
    """One fp8 tensor of one layer (its input, weight or output gradient) over the steps."""

    layer: str
    role: str
    fp8_dtype: str
    """`e4m3` for input and weight, `e5m2` for the output gradient (TE's HYBRID format)."""
    steps: list[Fp8ScalingStep]


class Fp8ScalingModel(Frozen):
    """`PreflightSection.fp8_scaling`: the pre-flight's fp8 run replayed under Transformer
    Engine's default `DelayedScaling` recipe: modelled on the run's own tensors, not TE's
    kernels."""

    run: str = "low"
    """The pre-flight run whose fp8 layers and tensors it replays: "low" (every Linear under the
    recipe) or "planned" (the plan's fp8 layers), the one the verdict judges."""
    recipe: str
    amax_history_len: int
    margin: int
    tracks: list[Fp8ScalingTrack]


class PreflightSection(Frozen):
    """`extras.preflight`: the pre-flight's verdict and its short training runs (the plan
    and loss scale it ran with are the report's `plan` and `loss_scale` sections)."""

    schema_version: int = PREFLIGHT_SCHEMA_VERSION
    model: str
    dtype: LowDtype
    regime: Regime = Regime.AUTOCAST
    """How the plain low-precision run held the model (the planned run is always autocast)."""
    policy: AutocastPolicy | None = AutocastPolicy.CUDA
    """Whose autocast op lists the runs under autocast followed (None: no run was)."""
    steps: int
    optimizer: str
    judge: Judge
    """"low" or "planned": the configuration the verdict judges."""
    fail_on: list[str]
    loss_tolerance: float
    max_skipped_steps: int
    go: bool
    reasons: list[Reason]
    """The risks that make it no-go: found in the judged run and named in `fail_on`."""
    notes: list[Reason] = Field(default_factory=list)
    """Risks found but not failing: not in `fail_on`, or in the configuration not judged."""
    planned_go: bool | None = None
    """The same judgment for the planned configuration (None: no plan was available)."""
    analysis_verdict: str
    flagged_units: dict[str, list[str]]
    runs: dict[str, ModeRun]
    timings_s: dict[str, float] = Field(default_factory=dict)
    messages: list[str] = Field(default_factory=list)
    fp8_scaling: Fp8ScalingModel | None = None
    """Only in an fp8 pre-flight (left out of the JSON where None, as `ReportExtras.fp8`)."""

    @model_serializer(mode="wrap")
    def _without_absent_fp8(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if self.fp8_scaling is None and isinstance(data, dict):
            data.pop("fp8_scaling", None)
        return data


class PreflightPrediction(Frozen):
    """What a pre-flight predicts for the run its verdict judged
    (`PreflightResult.prediction()`), kept beside a real run's monitor to compare."""

    go: bool
    dtype: LowDtype
    judge: Judge
    steps: int
    init_scale_log2: int | None
    skipped_steps: list[int]
    nonfinite_steps: list[int]
    max_divergence: float | None
    reasons: list[str]
    recommended_scale_log2: int | None


# --- a real run's GradScaler ----------------------------------------------------------------


class MonitorSection(Frozen):
    """`extras.scaler_monitor` and the file `ScalerMonitor.save` writes: what a real run's
    GradScaler did, with the pre-flight's prediction when it was given one."""

    kind: Literal["precision-doctor-scaler-monitor"] = MONITOR_KIND
    schema_version: Literal[1] = MONITOR_SCHEMA_VERSION
    enabled: bool
    init_scale: float
    growth_factor: float
    backoff_factor: float
    growth_interval: int
    """Clean steps between growths."""
    steps: int
    current_scale: float
    scale_history: list[tuple[int, float]]
    """Change points (step, scale): from this step on, the scale was this."""
    skipped_steps: list[int]
    skipped_count: int
    prediction: PreflightPrediction | None = None


# --- fp8 -----------------------------------------------------------------------------------


class Fp8Cast(Frozen):
    """One of torchao's casts to fp8 in the fp8 low run: what went in, the scale it used, what
    came out (made by `capture.fp8.cast_record`)."""

    layer: str
    gemm: str
    """`fprop`, `dgrad` or `wgrad`: the matmul this cast feeds."""
    role: str
    """`input`, `weight` or `grad_output`."""
    fp8_dtype: str
    """`e4m3` or `e5m2`."""
    hp_dtype: str
    """The dtype of the value torchao cast (`fp32` or `bf16`)."""
    granularity: str
    """`tensorwise` or `axiswise` (rowwise: one scale per row along the scaled axis)."""
    numel: int
    nonzero: int
    amax: float
    scale_min: float
    scale_max: float
    flushed: int
    """Nonzero values that are 0 in fp8 after scaling (Transformer Engine's `underflows%`)."""
    saturated: int
    """Values whose scaled magnitude exceeds the fp8 format's max (clamped to it by torchao)."""
    zero_groups: int
    """Scaling groups (rows under rowwise scaling; the tensor under tensorwise) whose amax is 0."""
    groups: int
    sqnr_db: float
    """20 log10(||x|| / ||deq(fp8) - x||) against the value torchao cast (inf: exact)."""
    sqnr_vs_bf16_db: float
    """The same against that value rounded to bf16: how far the fp8 value is from bf16's."""
    rel_error: float
    mse: float
    """mean((deq(fp8) - x)^2): Transformer Engine's `mse`."""
    outlier_ratio: float
    """amax over the 99.9th percentile of |x| (inf when that percentile is 0 and amax is not)."""

    @property
    def flushed_fraction(self) -> float:
        """Transformer Engine's `underflows%`, as a fraction of the nonzero values."""
        return self.flushed / self.nonzero if self.nonzero else 0.0


class Fp8Gemm(Frozen):
    """One matmul of one Float8Linear, fed the low run's high-precision operands, under each
    recipe (torchao's own casts): its SQNR against the same matmul unquantized, in fp32 (made
    by `capture.fp8`)."""

    layer: str
    gemm: str
    sqnr_db: dict[str, float]
    """Recipe -> SQNR (dB; inf when exact). A recipe that keeps this matmul in high precision
    (`rowwise_with_gw_hp`'s wgrad) has inf."""
    row_sqnr_db: dict[str, float]
    """Recipe -> the median over the output's rows (tokens for fprop and dgrad, weight rows for
    wgrad) of each row's SQNR: what most rows get, which one outlier row's norm hides in
    `sqnr_db` (an outlier token under tensorwise scaling)."""
    rel_error: dict[str, float]


class Fp8Exclusion(Frozen):
    """One layer that convention keeps out of fp8, judged on this model (`analysis.fp8.exclusions`)."""

    layer: str
    convention: str
    """Why convention excludes it: `first` or `last` Linear (Megatron; `first and last` where the
    model has one), or the ModelOpt default
    pattern its name matches (`*lm_head*`, `*router*`, `*mlp.gate*`, `*output_layer*`)."""
    flagged: bool
    """It has an FP8_ERROR or FP8_UNDERFLOW finding under this run's recipe."""
    fix: str
    """The first recipe under which all its matmuls pass (`analysis.fp8.fix_for`), or `bf16`."""

    @property
    def needed(self) -> bool:
        """This model needs the exclusion: no fp8 recipe passes the layer."""
        return self.fix == "bf16"


class Fp8Section(Frozen):
    """`extras.fp8`: the fp8 low run (torchao's `convert_to_float8_training`), its casts and
    its matmuls per recipe; written by `analysis.fp8.with_fp8`."""

    recipe: str
    torchao_version: str
    emulated: bool
    layers: list[str]
    """The Linear layers torchao converted (their paths in the model)."""
    casts: list[Fp8Cast] = Field(default_factory=list)
    gemms: list[Fp8Gemm] = Field(default_factory=list)
    exclusions: list[Fp8Exclusion] = Field(default_factory=list)
    """The conventional exclusions (first and last Linear, lm_head, router, gate, output
    layer), each judged on this model: whether it takes fp8, needs another recipe or bf16."""


class Fp8RecipeRun(Frozen):
    """One recipe's analysis in a recipe comparison: its final loss and its fp8 findings."""

    recipe: str
    loss_low: float
    loss_rel_error: float
    """|loss_low - loss_fp32| / |loss_fp32|: the report's `losses.rel_error` under this recipe."""
    findings: dict[str, list[str]]
    """Layer -> its FP8_ERROR / FP8_UNDERFLOW findings under this recipe (`FLAG gemm`, e.g.
    `FP8_ERROR fprop`); a layer without any is left out."""
    fixes: dict[str, str]
    """Layer -> the recipe `analysis.fp8.fix_for` names for it in this run (or `bf16`)."""


class Fp8RecipeComparison(Frozen):
    """`extras.fp8_recipes`: the same model analyzed under each fp8 recipe, side by side;
    written by `analysis.fp8_recipes.compare_fp8_recipes` (each run its own `analyze`)."""

    loss_fp32: float
    layers: list[str]
    """The Linear layers any recipe converted, in the model's order."""
    runs: list[Fp8RecipeRun]


# --- the report's extras --------------------------------------------------------------------


class Bf16CheckSection(Frozen):
    """`extras.bf16_check`: the same model analyzed in bf16 after its fp16 analysis was found
    not safe (the CLI's `--bf16-check`, on by default): that analysis' verdict, in short."""

    safe: bool
    verdict: str
    final_loss_rel_error: float
    flagged_units: list[str] = Field(default_factory=list)
    severity_counts: dict[Severity, int] = Field(default_factory=dict)


class ReportExtras(Frozen):
    """`Report.extras`: each later stage's section, None where that stage did not run."""

    plan: PlanSection | None = None
    loss_scale: LossScaleSection | None = None
    preflight: PreflightSection | None = None
    scaler_monitor: MonitorSection | None = None
    fp8: Fp8Section | None = None
    """Only in an fp8 analysis's report; left out of the JSON where None, so that every other
    report is written as before (a reader without the field loads it)."""
    fp8_recipes: Fp8RecipeComparison | None = None
    """Only in a recipe comparison's report (`--fp8-recipe all`); left out where None, as `fp8`."""
    bf16_check: Bf16CheckSection | None = None
    """Only in an fp16 report the CLI found not safe and checked in bf16 too; left out where
    None, as `fp8`."""

    @model_serializer(mode="wrap")
    def _without_absent_fp8(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in ("fp8", "fp8_recipes", "bf16_check"):
                if getattr(self, name) is None:
                    data.pop(name, None)
        return data

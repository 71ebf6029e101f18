"""String options as enums, validated before any work starts, and the flag thresholds."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal, TypeVar, cast

from precision_doctor.errors import PrecisionDoctorError


class StrEnum(str, enum.Enum):
    """`enum.StrEnum` exists only from 3.11; this keeps 3.10 working. A value is matched
    case-insensitively, and by the aliases `aliases()` names (`LowDtype("float16")`)."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def aliases(cls) -> dict[str, str]:
        """Other spellings of the values, lower case -> value (none but for `LowDtype`)."""
        return {}

    @classmethod
    def _missing_(cls, value: object) -> StrEnum | None:
        if isinstance(value, enum.Enum) and isinstance(value.value, str):
            value = value.value  # another library's member of the same name (torchao's recipes)
        if not isinstance(value, str):
            return None
        key = value.strip().lower()
        key = cls.aliases().get(key, key)
        found = cls._value2member_map_.get(key)
        return found if isinstance(found, cls) else None


class LowDtype(StrEnum):
    """A low-precision dtype. torch's names are aliases: `float16`, `half`, `bfloat16`, with
    or without `torch.` (and a `torch.dtype` itself, `LowDtype(torch.float16)`)."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    """float8 matmuls as torchao's `convert_to_float8_training` runs them (`Fp8Recipe`), every
    other op under bf16 autocast: `formats.TORCH_DTYPES` maps it to bf16, the dtype of the
    values it holds outside the fp8 casts."""

    @classmethod
    def aliases(cls) -> dict[str, str]:
        return _DTYPE_ALIASES

    @classmethod
    def _missing_(cls, value: object) -> StrEnum | None:
        if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
            value = str(value)  # torch.float16 -> "torch.float16"
        return super()._missing_(value)


_DTYPE_ALIASES = {
    **{name: "fp16" for name in ("float16", "half", "torch.float16", "torch.half")},
    **{name: "bf16" for name in ("bfloat16", "torch.bfloat16")},
    **{name: "fp8" for name in ("float8",)},
}
"""torch's names of the low dtypes (`str(torch.float16)` is `torch.float16`)."""


UnitDtype = Literal["fp32", "fp16", "bf16"]
"""The dtype one unit runs in: fp32, or a `LowDtype` by its value. The one spelling of a
dtype in every saved document; `formats.TORCH_DTYPES` maps the low ones to torch."""

Fp8UnitDtype = Literal["fp8:tensorwise", "fp8:rowwise", "fp8:rowwise_with_gw_hp", "fp8:mxfp8"]
"""A Linear unit of an fp8 plan converted by torchao under one recipe (`Fp8Recipe`):
`fp8:<recipe>`. The plan's other units run in a `UnitDtype` (bf16 or fp32)."""

PlanUnitDtype = UnitDtype | Fp8UnitDtype
"""What one unit of a plan runs in (`Plan.units`)."""

FP8_UNIT_PREFIX = "fp8:"


class Severity(StrEnum):
    """How bad one finding is (`FlagRecord.severity`; the rules are in `analysis/flags.py`).

    `error`: training breaks or silently loses accuracy (non-finite values GradScaler cannot
    fix, divergence over the tolerance, gradients lost at every scale); a report with one is
    "Not safe as-is". `warning`: a cost that GradScaler or the user absorbs (GradScaler backs
    off a few steps). `info`: worth knowing, costs nothing."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


SEVERITY_RANK = {severity: rank for rank, severity in enumerate(Severity)}
"""Worst first: the first key of `Report.flags()`'s order."""

DEFAULT_FAIL_ON: str = Severity.ERROR.value
"""The pre-flight's default gate (`--fail-on`, `preflight(fail_on=None)`): error-severity
risks fail, a diverging loss among them; a warning (one GradScaler back-off, which GradScaler
absorbs by design) is a note, not a reason to stop a launch."""


class Flag(StrEnum):
    """The fixed flag vocabulary. Order here is the order of flags of one severity, worst
    first."""

    NONFINITE_FP32 = "NONFINITE_FP32"
    OVERFLOW = "OVERFLOW"
    GRAD_OVERFLOW = "GRAD_OVERFLOW"
    DIVERGENCE = "DIVERGENCE"
    GRAD_DIVERGENCE = "GRAD_DIVERGENCE"
    ERROR_GROWTH = "ERROR_GROWTH"
    GRAD_UNDERFLOW = "GRAD_UNDERFLOW"
    UNDERFLOW = "UNDERFLOW"
    FP8_ERROR = "FP8_ERROR"
    FP8_UNDERFLOW = "FP8_UNDERFLOW"
    LOST_UPDATE = "LOST_UPDATE"


class Fp8Recipe(StrEnum):
    """torchao's float8 training recipes (`Float8LinearConfig.from_recipe_name`): `tensorwise`
    (one dynamic scale per tensor, e4m3 forward, e5m2 gradients), `rowwise` (a power-of-two
    scale per row, e4m3 everywhere), `rowwise_with_gw_hp` (rowwise, the weight gradient's
    matmul in high precision); and `mxfp8`, MX block scaling (torchao's `MXFP8Linear`: an e8m0
    power-of-two scale per 32 consecutive values along each matmul's inner dimension, e4m3
    everywhere, scales rounded up (RCEIL); Blackwell GPUs run it natively).

    The order is the order `analysis.fp8.fix_for` tries them in: the per-tensor and per-row
    recipes every fp8 GPU runs first, mxfp8 (Blackwell only) last."""

    TENSORWISE = "tensorwise"
    ROWWISE = "rowwise"
    ROWWISE_WITH_GW_HP = "rowwise_with_gw_hp"
    MXFP8 = "mxfp8"

    @classmethod
    def aliases(cls) -> dict[str, str]:
        return {"mxfp8_rceil": "mxfp8"}  # torchao's MoE recipe name for the same scaling

    @property
    def unit_dtype(self) -> Fp8UnitDtype:
        """How a plan spells a Linear converted under this recipe."""
        return cast(Fp8UnitDtype, FP8_UNIT_PREFIX + self.value)


def fp8_recipe_of(unit_dtype: str) -> Fp8Recipe | None:
    """The recipe of a plan's `fp8:<recipe>` unit dtype; None for any other dtype."""
    if not unit_dtype.startswith(FP8_UNIT_PREFIX):
        return None
    return Fp8Recipe(unit_dtype.removeprefix(FP8_UNIT_PREFIX))


FLAG_RANK = {flag: rank for rank, flag in enumerate(Flag)}
"""The order of flags within one severity (a flag's severity itself is per finding)."""


class Target(StrEnum):
    """The device a plan's roofline costs are for (`planning.cost.PROFILES`); `cpu` is the
    machine the analysis runs on, its peaks measured."""

    H100 = "h100"
    H200 = "h200"
    B200 = "b200"
    A100 = "a100"
    RTX4090 = "4090"
    CPU = "cpu"


class Judge(StrEnum):
    """The configuration a pre-flight's verdict judges: `low` (every unit low, GradScaler at
    its default) or `planned` (the plan's dtypes and recommended loss scale)."""

    LOW = "low"
    PLANNED = "planned"


def percent(fraction: float, spec: str = ".2%") -> str:
    """A fraction as a percentage that never reads as 0 or 100 when it is not: a nonzero
    fraction below the last printed digit is `<0.01%`, one just short of 1 is `>99.99%`.

    >>> percent(3e-7), percent(0.0), percent(0.25), percent(0.999999), percent(float("inf"))
    ('<0.01%', '0%', '25.00%', '>99.99%', 'inf')
    """
    if math.isnan(fraction):
        return "nan"
    if math.isinf(fraction):
        return "inf" if fraction > 0 else "-inf"
    if fraction == 0:
        return "0%"
    text = format(fraction, spec)
    digits = int(spec[1:-1]) if spec[1:-1].isdigit() else 6
    step = 10.0**-digits  # the last printed digit, in percent
    if float(text[:-1]) == 0:
        return f"<{step:.{digits}f}%"
    if fraction < 1 and float(text[:-1]) >= 100:
        return f">{100 - step:.{digits}f}%"
    return text


class CostSource(StrEnum):
    """Where the plan's unit times come from."""

    ROOFLINE = "roofline"  # per-op rooflines on a device profile (--target)
    MEASURED = "measured"  # each unit timed in each dtype on the model's device


class ExportFormat(StrEnum):
    """What `analyze --export` writes (see `planning.export`)."""

    JSON = "json"
    PYTHON = "python"
    DEEPSPEED = "deepspeed"
    HF = "hf"
    TORCHAO = "torchao"
    """fp8 plans: a `module_filter_fn` per recipe for torchao's `convert_to_float8_training`."""
    TE = "te"
    """fp8 plans: the Linear modules to swap for Transformer Engine's `te.Linear` (run under
    `fp8_autocast`), the rest kept out of it."""


class Regime(StrEnum):
    """How the real low-precision run holds the model (`capture.lowrun`)."""

    AUTOCAST = "autocast"
    """What `torch.autocast(device_type, low)` executes: fp32 parameters, each op cast by the
    chosen device type's op lists (`AutocastPolicy`)."""
    PURE = "pure"
    """`model.to(low)`: parameters and floating buffers low, floating inputs cast to low."""


class AutocastPolicy(StrEnum):
    """Whose autocast op lists decide which ops run low and which in fp32. They differ: CUDA
    runs softmax, layer_norm, exp and sums in fp32, CPU runs them in the low dtype."""

    CUDA = "cuda"
    CPU = "cpu"


class CapturePath(StrEnum):
    """Which driver captured the fp32 step's ops (`Driver`): `dispatch` ran the real module
    under a TorchDispatchMode, `graph` walked the step's aten graph, traced once
    (`capture.graph_driver`). `fx` is read in reports older than schema 9 only, where it meant
    that torch.fx.symbolic_trace traced the model (their ops came from the dispatch capture)."""

    DISPATCH = "dispatch"
    GRAPH = "graph"
    FX = "fx"


class Driver(StrEnum):
    """Which driver captures the fp32 step's ops (`analyze(driver=...)`, `--driver`).
    `dispatch`: a TorchDispatchMode sees every op as the eager step runs, for every model.
    `graph`: the step is traced once into an aten graph that the op pipeline walks
    (`capture.graph_driver`); a step the graph cannot stand for (collectives, tensor
    subclasses, a step its ops do not reproduce) takes the dispatch driver, and the report says
    why (`environment.driver_reason`). `auto`: the graph where an earlier analysis in this
    process kept the graph of this very step (`capture.graph_cache`), else the dispatch driver:
    a trace costs more than the walk saves in one analysis."""

    AUTO = "auto"
    DISPATCH = "dispatch"
    GRAPH = "graph"


class Phase(StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"


class Wrapper(StrEnum):
    """How torch.distributed runs the model across the job's ranks (`environment.distributed`)."""

    NONE = "none"
    """A plain module on every rank: each rank's gradients are its own."""
    DDP = "ddp"
    """`DistributedDataParallel`: every rank a full replica, gradients averaged across ranks."""
    FSDP2 = "fsdp2"
    """`fully_shard`: parameters sharded across ranks (DTensors)."""
    TP = "tp"
    """Tensor parallel (`parallelize_module`): DTensor parameters without FSDP2."""


E = TypeVar("E", bound=StrEnum)


def parse_enum(cls: type[E], value: str | E, what: str) -> E:
    """Validate a string option up front, naming the choices (and the aliases) in the error:
    one line, `unknown --dtype 'fp8'; choose one of: fp16, bf16 (also: float16, ...)`."""
    try:
        return cls(value)
    except ValueError:
        raise PrecisionDoctorError(f"unknown {what} {value!r}; choose one of: {choices_text(cls)}") from None


def choices_text(cls: type[StrEnum]) -> str:
    """`fp16, bf16 (also: float16, half, ...)`: the values, then the aliases, if any."""
    text = ", ".join(m.value for m in cls)
    aliases = [a for a in cls.aliases() if not a.startswith("torch.")]
    if aliases and issubclass(cls, LowDtype):
        text += f" (also torch's names: {', '.join(aliases)}, with or without 'torch.')"
    elif aliases:
        text += f" (also: {', '.join(aliases)})"
    return text


@dataclass(frozen=True)
class Thresholds:
    """When a statistic becomes a flag. Every field is a CLI option (`--threshold NAME=VALUE`).

    Fractions are of the unit's nonzero values (or of its gradient's L2 norm where the name
    says so); errors are relative L2 errors against the fp32 run.
    """

    overflow_fraction: float = 0.0
    """OVERFLOW when more than this fraction of a unit's forward values exceed the dtype's max."""
    underflow_fraction: float = 0.10
    """UNDERFLOW when more than this fraction of a unit's nonzero forward values flush to zero."""
    divergence_rel_error: float = 0.05
    """DIVERGENCE when the unit's local error (fed fp32 inputs) exceeds this."""
    error_growth_factor: float = 8.0
    """ERROR_GROWTH when the propagated error at a unit is this many times its inputs' error..."""
    error_growth_min_rel_error: float = 0.02
    """...and at least this large, so noise-level errors never count as growth."""
    grad_overflow_fraction: float = 0.0
    """GRAD_OVERFLOW when more than this fraction of gradients overflow at the default scale."""
    grad_underflow_norm_fraction: float = 0.05
    """GRAD_UNDERFLOW when more than this fraction of a unit's gradient L2 norm is lost."""
    grad_scale_log2: int = 16
    """The loss scale 2^k the fp16 gradient flags are judged at: GradScaler's default 2^16. A
    whole number in 0..24, while the report's loss-scale curves cover 2^0..2^127
    (`analysis.engine.LOSS_SCALES`)."""
    loss_rel_error: float = 0.01
    """The final-loss relative error a "Safe to train" verdict allows (the plan's default
    tolerance)."""
    grad_rel_error: float = 0.25
    """GRAD_DIVERGENCE (a warning) when a unit's parameter gradients in the low run differ
    from fp32's by more than this relative L2 error (healthy models measure ~1e-3 in fp16
    and up to ~0.08 in bf16; a minibatch's own noise is far larger)..."""
    grad_cosine_min: float = 0.9
    """...and an error when their cosine with fp32's falls below this: the update no longer
    points the way fp32's does."""
    grad_error_share_min: float = 1e-6
    """GRAD_DIVERGENCE weighs a unit by its share of the model's gradient: only where the
    unit's gradient error ||g_low - g_fp32|| is at least this fraction of the model's fp32
    gradient norm, or the low format's range flushes its gradients (more than
    `grad_underflow_norm_fraction` of the norm of those it holds low), or they are Inf/NaN.
    Below it the difference is rounding of a gradient that carries nothing: attention's
    query/key projections, whose gradient softmax's shift invariance makes ~0, are
    cancellation residue in fp32 itself, their error 2e-9..1.2e-8 of the model's norm (a
    tiny CLIP, fp16 and bf16). 1e-6 is ~16 of fp32's own rounding steps (2^-24) of the
    model's norm, and 13x below the smallest share a sample model flags for rounding or
    loss rather than a flush (`unscaled_gradients`' `embed`, 1.3e-5)."""

    fp8_underflow_fraction: float = 0.05
    """FP8_UNDERFLOW when more than this fraction of the nonzero values of one fp8 cast flush
    to zero after scaling (Transformer Engine's `underflows%`; its auto-switch falls back to
    high precision above 5 %)."""
    fp8_output_sqnr_db: float = 18.0
    """FP8_ERROR when a Float8Linear's forward (fprop) or input-gradient (dgrad) matmul, fed
    the high-precision values, is below this SQNR against the same matmul unquantized
    (torchao's tests hold Float8Linear outputs to >= 18 dB)..."""
    fp8_wgrad_sqnr_db: float = 17.0
    """...and its weight-gradient (wgrad) matmul below this (torchao's tests: >= 17 dB)."""
    lost_update_fraction: float = 0.5
    """LOST_UPDATE, an error in the pure regime, when the optimizer step with the unit's
    weights (and state) in the low dtype leaves more than this fraction of the elements the
    fp32 step changes unchanged: most of the unit's training is rounded away..."""
    lost_update_partial_fraction: float = 0.1
    """...and a warning when more than this fraction of them is lost or partly lost (moved by
    less than half the intended update): a unit that visibly trains slower. The sample
    `tiny_transformer` in pure bf16 has none from AdamW at lr 4e-3 up; at lr 1e-3 each
    LayerNorm's gains (1.0, whose bf16 spacing is 2^-8 below 1) keep none of their updates, half
    the unit's elements: a warning. Under autocast (fp32 master weights) the finding is
    information."""

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, str | float]) -> Thresholds:
        """The defaults with `overrides` (name -> a number, or its text) applied; an unknown
        name or a value that is no number: one line."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, float | int] = {}
        for name, raw in overrides.items():
            if name not in known:
                raise PrecisionDoctorError(f"unknown threshold {name!r}; known: {', '.join(sorted(known))}")
            try:
                value = float(raw)
                values[name] = int(value) if name == "grad_scale_log2" and value.is_integer() else value
            except (TypeError, ValueError):
                raise PrecisionDoctorError(f"threshold {name}={raw!r} is not a number") from None
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def of(cls, value: Thresholds | Mapping[str, str | float] | None) -> Thresholds:
        """What an API's `thresholds=` takes: None (the defaults), a `Thresholds`, or a
        mapping of the names to override (`{"loss_rel_error": 0.05}`)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_overrides(value)
        raise PrecisionDoctorError(
            f"thresholds must be a Thresholds or a mapping of threshold names to numbers, not {type(value).__name__}"
        )

    def __post_init__(self) -> None:
        # A NaN threshold compares false with everything: it would switch its flag off silently.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "grad_scale_log2":
                # Whole powers of two (a saved report holds 16.0), k in 0..24; the curves it is
                # read from span 2^0..2^127 (engine.LOSS_SCALES).
                if isinstance(value, bool) or not float(value).is_integer() or not 0 <= value <= 24:
                    raise PrecisionDoctorError(f"threshold grad_scale_log2={value} is not a whole number in 0..24")
                object.__setattr__(self, f.name, int(value))  # 16.0 -> 16: the report stores an int
            elif not math.isfinite(value) or value < 0:
                raise PrecisionDoctorError(f"threshold {f.name}={value} must be a finite number >= 0")
            elif (f.name.endswith("_fraction") or f.name == "grad_cosine_min") and value > 1:
                what = "a cosine" if f.name == "grad_cosine_min" else "a fraction"
                raise PrecisionDoctorError(f"threshold {f.name}={value} is {what}: at most 1")

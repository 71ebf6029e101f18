"""The pre-flight's fp8 run (`preflight(dtype="fp8")`): a torchao-converted copy trained for
real (emulated on the CPU), and Transformer Engine's delayed scaling modelled over its steps.

`Fp8Training` converts the run's model copy in place (`capture.fp8.convert_fp8`: the same
parameter objects, so the copied optimizer still holds them) and, while the run trains, keeps a
`DelayedScalingModel`: per Linear layer, its three fp8 tensors (the input and the weight in
e4m3, the output gradient in e5m2: TE's default HYBRID format), each step's values taken from
the run itself (the input as the converted layer receives it, the weight, the gradient of its
output) and counted twice:

- under *delayed* scaling as TE's default recipe computes it (`DelayedScaling(margin=0,
  fp8_format=Format.HYBRID, amax_history_len=1024, amax_compute_algo="max")`; TE's
  `delayed_scaling.cu`): each tensor's scale for a step is `fp8_max * 2^-margin / amax`, with
  `amax` the largest of the amaxes the *previous* steps recorded (the history's window), the
  scale kept where that amax is 0 or not finite, and TE's initial scale 1 before any history;
- under *current* scaling, `fp8_max / amax` of the step's own tensor (torchao's tensorwise, TE's
  `Float8CurrentScaling`).

Each count is a cast of the scaled value to `torch.float8_e4m3fn` / `float8_e5m2` with TE's
saturation (values past the format's max clamp to it): `flushed` (nonzero values that become
0), `saturated` (values past the max). This models the scale TE would pick; it does not run
TE's kernels (nor its amax reduction across a distributed job, nor its first-step handling
beyond the initial scale of 1). The run itself trains with the torchao recipe asked for.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from precision_doctor.capture.fp8 import convert_fp8, fp8_layers, mx_gemm_as_gpu
from precision_doctor.extras import Fp8ScalingModel, Fp8ScalingStep, Fp8ScalingTrack, ModeRun, Reason
from precision_doctor.options import Fp8Recipe, Severity, Thresholds, percent

__all__ = [
    "AMAX_HISTORY_LEN",
    "DELAYED_RECIPE",
    "MARGIN",
    "DelayedScalingModel",
    "Fp8Training",
    "bf16_divergence_reasons",
    "clipping",
    "delayed_scaling_reasons",
    "scaled_counts",
]

AMAX_HISTORY_LEN = 1024
MARGIN = 0
DELAYED_RECIPE = f'DelayedScaling(margin={MARGIN}, fp8_format=Format.HYBRID, amax_history_len={AMAX_HISTORY_LEN}, amax_compute_algo="max")'
"""Transformer Engine's default fp8 recipe (before Blackwell), as modelled."""

FP8_DTYPES = {"input": torch.float8_e4m3fn, "weight": torch.float8_e4m3fn, "grad_output": torch.float8_e5m2}
"""TE's HYBRID format: e4m3 for the forward's tensors, e5m2 for the gradients."""

DELAYED_RISK = "FP8_DELAYED_SCALING"
"""The pre-flight's note where delayed scaling would flush or saturate what current scaling
keeps (`delayed_scaling_reasons`)."""


def scaled_counts(x: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[int, int, int]:
    """(nonzero, flushed, saturated) of `x * scale` cast to `dtype` with saturation."""
    fmax = float(torch.finfo(dtype).max)
    x = x.detach().float()
    y = x * scale
    cast = y.clamp(-fmax, fmax).to(dtype).float()
    nonzero = x != 0
    return int(nonzero.sum()), int((nonzero & (cast == 0)).sum()), int((y.abs() > fmax).sum())


@dataclass
class _Track:
    layer: str
    role: str
    dtype: torch.dtype
    history: list[float] = field(default_factory=list)
    scale: float = 1.0  # TE's initial scale
    steps: list[Fp8ScalingStep] = field(default_factory=list)
    pending: list[torch.Tensor] = field(default_factory=list)

    def close(self, step: int) -> None:
        """The step's tensors counted under the delayed scale (from the previous steps) and
        their current one; then this step's amax enters the history and the next scale is
        computed from it, as TE's update after the step."""
        if not self.pending:
            return
        fmax = float(torch.finfo(self.dtype).max)
        amax = max(float(t.abs().max()) if t.numel() else 0.0 for t in self.pending)
        current = fmax / amax if amax > 0 and math.isfinite(amax) else 1.0
        counts = [0] * 5
        for t in self.pending:
            nz, fd, sd = scaled_counts(t, self.scale, self.dtype)
            _, fc, sc = scaled_counts(t, current, self.dtype)
            for i, v in enumerate((nz, fd, sd, fc, sc)):
                counts[i] += v
        self.steps.append(
            Fp8ScalingStep(
                step=step,
                amax=amax,
                delayed_scale=self.scale,
                current_scale=current,
                nonzero=counts[0],
                flushed_delayed=counts[1],
                saturated_delayed=counts[2],
                flushed_current=counts[3],
                saturated_current=counts[4],
            )
        )
        self.pending = []
        self.history = [*self.history, amax][-AMAX_HISTORY_LEN:]
        window = max(self.history)
        if window > 0 and math.isfinite(window):
            self.scale = fmax * 2.0**-MARGIN / window


class DelayedScalingModel:
    """Records the fp8 tensors of a converted model's layers step by step (`watching`, and
    `step` around each optimizer step) and replays TE's delayed scaling over them (`result`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = fp8_layers(model)
        self.tracks = {
            (name, role): _Track(name, role, dtype) for name in self.layers for role, dtype in FP8_DTYPES.items()
        }

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        handles = []
        for name, m in self.layers.items():
            handles.append(m.register_forward_pre_hook(self._pre(name)))
            handles.append(m.register_forward_hook(self._post(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def step(self, i: int) -> Iterator[None]:
        try:
            yield
        finally:
            for track in self.tracks.values():
                track.close(i)

    def _keep(self, name: str, role: str, t: torch.Tensor) -> None:
        self.tracks[(name, role)].pending.append(t.detach().float().clone())

    def _pre(self, name: str) -> Any:
        def pre(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                with torch.no_grad():
                    self._keep(name, "input", args[0])

        return pre

    def _post(self, name: str) -> Any:
        def post(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                with torch.no_grad():
                    self._keep(name, "weight", weight)
            if isinstance(output, torch.Tensor) and output.requires_grad:

                def on_grad(grad: torch.Tensor) -> None:
                    with torch.no_grad():
                        self._keep(name, "grad_output", grad)

                output.register_hook(on_grad)  # type: ignore[no-untyped-call]  # unannotated in torch

        return post

    def result(self, run: str = "low") -> Fp8ScalingModel:
        """The model over the tensors of the pre-flight run `run` ("low" or "planned")."""
        return Fp8ScalingModel(
            run=run,
            recipe=DELAYED_RECIPE,
            amax_history_len=AMAX_HISTORY_LEN,
            margin=MARGIN,
            tracks=[
                Fp8ScalingTrack(
                    layer=t.layer,
                    role=t.role,
                    fp8_dtype="e4m3" if t.dtype == torch.float8_e4m3fn else "e5m2",
                    steps=t.steps,
                )
                for t in self.tracks.values()
                if t.steps
            ],
        )


class Fp8Training:
    """How the pre-flight's fp8 run differs from a bf16 autocast run: its model copy converted
    by torchao under `recipe` (`convert`), the MX matmul computed as on the GPU while it trains
    (`running`), and the delayed-scaling model kept step by step (`step`)."""

    def __init__(self, recipe: Fp8Recipe, units: Mapping[str, str] | None = None) -> None:
        self.recipe = recipe
        self.units = units
        """A plan's units: convert its fp8 layers, each under its own recipe, instead of every
        Linear under `recipe`."""
        self.scaling: DelayedScalingModel | None = None
        self.planned: Fp8Training | None = None
        """The pre-flight's planned run beside this one (set where there is a plan)."""

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.units is not None:
            from precision_doctor.planning.fp8 import convert_planned

            converted = convert_planned(model, self.units, copy_model=False)
        else:
            converted = convert_fp8(model, self.recipe, inplace=True)
        self.scaling = DelayedScalingModel(converted)
        return converted

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        assert self.scaling is not None, "convert() first"
        with contextlib.ExitStack() as stack:
            if any(type(m).__name__ == "MXFP8Linear" for m in self.scaling.layers.values()):
                stack.enter_context(mx_gemm_as_gpu())
            stack.enter_context(self.scaling.watching())
            yield

    def step(self, i: int) -> contextlib.AbstractContextManager[None]:
        assert self.scaling is not None, "convert() first"
        return self.scaling.step(i)


_MANTISSA_BITS = {"e4m3": 3, "e5m2": 2}


def overshoot(step: Fp8ScalingStep, fp8_dtype: str) -> float:
    """How far past the format's max the step's amax lands under the delayed scale, as a
    ratio (<= 1: nothing saturates)."""
    fmax = float(torch.finfo(torch.float8_e4m3fn if fp8_dtype == "e4m3" else torch.float8_e5m2).max)
    return step.amax * step.delayed_scale / fmax


def clipping(step: Fp8ScalingStep, fp8_dtype: str) -> bool:
    """Whether the delayed scale clamps the step's amax by more than half the format's spacing
    at its top (2^-4 for e4m3, 2^-3 for e5m2): a clamp the format's own rounding would not
    hide (an amax that grew a little since the history's max clamps within rounding)."""
    return overshoot(step, fp8_dtype) > 1 + 2.0 ** -(_MANTISSA_BITS[fp8_dtype] + 1)


def delayed_scaling_reasons(model: Fp8ScalingModel, th: Thresholds) -> list[Reason]:
    """One warning per tensor whose delayed scale, at some step after the first, flushes more
    than `fp8_underflow_fraction` of its nonzero values where the step's current scale does
    not, or clamps its amax beyond the format's rounding (`clipping`); step 0 casts with TE's
    initial scale 1 and is left out (its counts are in the model)."""
    out: list[Reason] = []
    for track in model.tracks:
        later = [s for s in track.steps if s.step > 0]
        bad = [
            s
            for s in later
            if (s.flushed_delayed_fraction > th.fp8_underflow_fraction >= s.flushed_current_fraction)
            or clipping(s, track.fp8_dtype)
        ]
        if not bad:
            continue
        worst = max(bad, key=lambda s: (overshoot(s, track.fp8_dtype), s.flushed_delayed_fraction))
        out.append(
            Reason(
                risk=DELAYED_RISK,
                mode=model.run,
                unit=track.layer,
                severity=Severity.WARNING,
                message=(
                    f"modelled TE delayed scaling ({model.recipe}): the {track.role} ({track.fp8_dtype}) of "
                    f"{track.layer!r} at step {worst.step} casts with scale {worst.delayed_scale:.4g} from earlier "
                    f"steps' amax, against {worst.current_scale:.4g} for its own amax {worst.amax:.4g}: "
                    f"{percent(worst.flushed_delayed_fraction)} flushed, {worst.saturated_delayed} saturated (amax "
                    f"clamped to 1/{overshoot(worst, track.fp8_dtype):.3g} of itself; current scaling: "
                    f"{percent(worst.flushed_current_fraction)} flushed, {worst.saturated_current} saturated); "
                    f"{len(bad)} of {len(later)} later steps so"
                ),
            )
        )
    return out


def bf16_divergence_reasons(
    fp8: ModeRun, bf16: ModeRun, tolerance: float, flagged_layers: Sequence[str]
) -> list[Reason]:
    """DIVERGENT_LOSS where the fp8 run's loss leaves the bf16 run's by more than `tolerance`
    (relative to bf16's) at some step: fp8 costs accuracy bf16 does not; the analysis' fp8
    findings name the layers."""
    worst, at = 0.0, None
    for s, r in zip(fp8.steps, bf16.steps, strict=True):
        if not math.isfinite(r.loss):
            continue
        d = math.inf if not math.isfinite(s.loss) else abs(s.loss - r.loss) / max(abs(r.loss), 1e-30)
        if at is None or d > worst:
            worst, at = d, s.step
    if at is None or worst <= tolerance:
        return []
    layers = f"; the layers the analysis flags: {', '.join(flagged_layers)}" if flagged_layers else ""
    return [
        Reason(
            risk="DIVERGENT_LOSS",
            mode=fp8.mode,
            message=(
                f"the fp8 loss differs from the bf16 run's by {percent(worst)} at step {at} "
                f"(tolerance {percent(tolerance)}){layers}"
            ),
        )
    ]

"""The optimizer step in low precision: updates and optimizer state lost to the weights' dtype.

Mixed precision keeps fp32 master weights because a small update added to a low-precision
weight is rounded away: an update below half the weight's spacing (bf16: 2^-8 of |w|, fp16:
2^-11) leaves it as it was. `model.to(torch.bfloat16)` with a stock optimizer (Lightning's
`bf16-true`) steps the low weights themselves, and its state (Adam's moments) in their dtype.

`optimizer_step` runs the user's optimizer for real, one step per parameter tensor twice: on an
fp32 copy with the analysis' fp32 gradient (the intended step) and on a copy in the low dtype
(the applied step: the optimizer makes its state in that dtype, as it does for a low model)
with, under --regime pure, the low run's own gradient (the engine keeps it from the gradient
fidelity's backward, in the low dtype), else the fp32 gradient rounded to the low dtype. The copies are made and dropped one parameter at a time, so the
extra memory is a few copies of the largest parameter, and the user's model and optimizer are
never touched. Element by element, the applied update is compared with the intended one
(`report.StepFidelity`): lost (the fp32 step changes the element, the low one does not),
partly lost (moved less than half the intended way), and the ratio of the update norms (the
effective learning rate); the same for each state tensor the optimizer keeps. Per unit (the
module owning the parameter), the learning rate at which the updates survive is read off the
weights' magnitudes: an element survives where lr times its update per unit of lr reaches
half its spacing in the low dtype.

The step is each optimizer's first (its state starts fresh). Adam's first update is lr times
about sign(g), its largest: where the gradients vary from step to step its later updates are
smaller (its first moment averages them away), so more of them are lost in training than in
this step, and the learning rate at which updates survive is a lower bound; the pre-flight's
pure-regime runs measure the later steps (`steps[].unchanged_fraction`). Its state's own
increments are lost later in training too (`exp_avg_sq * 0.999` is `exp_avg_sq` again in
bf16 once it is a third of g^2), which one step from a fresh state cannot show.

An optimizer that rounds stochastically (torchao's `_AdamW(bf16_stochastic_round=True)`:
`rounds_stochastically`, the same step on a probe weight from two seeds) moves a weight by a
whole spacing with the probability of its update's share of it: most elements keep their
value in any one step, yet the updates arrive on average. Its steps are judged by that mean
(`StepFidelity.mean_update_ratio`, less three standard errors of the one draw the steps take
under a fixed seed), not by the elements one draw left unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from precision_doctor.analysis.flags import lost_update_flags
from precision_doctor.capture.units import owner_of
from precision_doctor.formats import TORCH_DTYPES
from precision_doctor.model.spec import OptimizerFactory, call_build_optimizer, rebuild_optimizer
from precision_doctor.options import LowDtype
from precision_doctor.report import OptimizerStep, ParamStep, Report, StepFidelity, UnitStep

DEFAULT_LR = 1e-3
"""AdamW's learning rate when neither `build_optimizer` nor `lr` says one (torch's default)."""
SURVIVE_QUANTILE = 0.9
"""`UnitStep.survive_lr`: the learning rate at which this fraction of a unit's updates survive."""
_BINS_PER_OCTAVE = 8
_LOG2_LO, _LOG2_HI = -80, 40  # learning rates 2^-80..2^40: far beyond any in use
_NBINS = (_LOG2_HI - _LOG2_LO) * _BINS_PER_OCTAVE
CHUNK = 1 << 22
"""Elements per piece: an elementwise optimizer (`ELEMENTWISE`) steps a large parameter in
flat pieces of this many elements, so the copies the comparison makes stay ~16 MiB each
(GPT-2's 38.6M-element embedding would need ~2 GiB at once)."""
SAMPLE_BUDGET = 1 << 21
"""Elements an elementwise optimizer's step is measured on, at most, over the model: above
it, every k-th element of each parameter of more than `WHOLE_MAX` elements (k =
ceil(parameters / budget)), an even sample of independent elements (GPT-2 small: every 60th).
The fractions are then estimates (to ~1e-3 on a sample of 2e6). Measured on GPT-2 small
(fp16, AdamW): the step and its comparison cost ~1.2 plain fp32 training steps (11 before
the sample), the peak memory +4%."""
WHOLE_MAX = 1 << 16
"""Parameters this small are always stepped whole (a LayerNorm's 768 gains)."""
ELEMENTWISE = frozenset(
    {"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "ASGD", "Adadelta", "Rprop"}
)
"""torch.optim's optimizers whose step treats each element on its own (no norm or
factorization over a tensor): a piece of a parameter steps as the whole does. Others (LAMB,
Adafactor, Muon, an unknown class) step each parameter whole."""


@dataclass
class _Counts:
    """Sums over one or more tensor pairs (intended, applied) of updates."""

    numel: int = 0
    changed: int = 0
    applied_changed: int = 0
    lost: int = 0
    partly_lost: int = 0
    nonfinite: int = 0
    sum_sq_intended: float = 0.0
    sum_sq_applied: float = 0.0
    sum_abs_intended: float = 0.0
    sum_applied_along: float = 0.0
    """Of the applied updates, their sum along the intended ones' signs: over the sum of the
    intended |updates|, the mean share of the update that arrives (`mean_update_ratio`)."""
    sum_move_var: float = 0.0
    """The variance of that sum had each update been rounded stochastically: an update of
    (k + f) spacings s moves k or k + 1 of them, the last with probability f: var f(1-f)s^2
    (s the spacing above the weight, which at a power of two is twice the one below: the
    variance errs high, towards findings)."""

    def add(self, intended: torch.Tensor, applied: torch.Tensor, spacing: torch.Tensor | None = None) -> None:
        """`intended`, `applied`: the updates (fp32), element by element; `spacing`: the low
        weights' spacing there (for `sum_move_var`)."""
        broken = ~torch.isfinite(applied) & torch.isfinite(intended)
        if bool(broken.any()):
            self.nonfinite += int(broken.sum())
            applied = torch.where(broken, 0.0, applied)
        changed = intended != 0
        moved = (applied != 0) | broken
        self.numel += intended.numel()
        self.changed += int(changed.sum())
        self.applied_changed += int(moved.sum())
        self.lost += int((changed & ~moved).sum())
        # Moved less than half the intended way (or the other way): rounded down to a smaller
        # multiple of the spacing. Rounding up (more than intended) is no loss.
        short = applied * intended.sign() < 0.5 * intended.abs()
        self.partly_lost += int((changed & moved & short).sum())
        wide, applied_wide = intended.double(), applied.double()
        self.sum_sq_intended += float(wide.square().sum())
        self.sum_sq_applied += float(applied_wide.square().sum())
        self.sum_abs_intended += float(wide.abs().sum())
        self.sum_applied_along += float((applied_wide * intended.sign()).sum())
        if spacing is not None:
            s = spacing.double()
            q = wide.abs() / s.clamp(min=1e-300)
            f = q - q.floor()
            self.sum_move_var += float((f * (1 - f) * s.square()).sum())

    def merge(self, other: _Counts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def fidelity(self, stochastic: bool = False) -> StepFidelity:
        return StepFidelity(**self._fields(stochastic))

    def _fields(self, stochastic: bool = False) -> dict[str, Any]:
        """The record's fields; `stochastic`: the step rounds stochastically, and the standard
        error of its mean ratio means something (None otherwise)."""
        ratio = math.sqrt(self.sum_sq_applied / self.sum_sq_intended) if self.sum_sq_intended > 0 else None
        if self.nonfinite:
            ratio = math.inf
        along = self.sum_applied_along / self.sum_abs_intended if self.sum_abs_intended > 0 else None
        stderr = math.sqrt(self.sum_move_var) / self.sum_abs_intended if self.sum_abs_intended > 0 else None
        return {
            "mean_update_ratio": along if not self.nonfinite else None,
            "mean_update_ratio_stderr": stderr if stochastic and not self.nonfinite else None,
            "numel": self.numel,
            "changed": self.changed,
            "applied_changed": self.applied_changed,
            "lost": self.lost,
            "partly_lost": self.partly_lost,
            "nonfinite": self.nonfinite,
            "update_norm_ratio": ratio,
        }


@dataclass
class _UnitSums:
    weights: _Counts = field(default_factory=_Counts)
    state: dict[str, _Counts] = field(default_factory=dict)
    needed_lr: torch.Tensor = field(default_factory=lambda: torch.zeros(_NBINS, dtype=torch.float64))
    """Histogram of log2 of the lr each changed element needs for its update to survive."""
    lrs: set[float] = field(default_factory=set)
    """The learning rates of the parameter groups holding the unit's parameters."""

    def lr_at(self, quantile: float) -> float | None:
        total = float(self.needed_lr.sum())
        if total <= 0:
            return None
        cum = torch.cumsum(self.needed_lr, 0)
        i = int(torch.searchsorted(cum, torch.tensor(quantile * total, dtype=torch.float64)))
        i = min(i, _NBINS - 1)
        return float(2.0 ** (_LOG2_LO + (i + 1) / _BINS_PER_OCTAVE))


def half_spacing(w: torch.Tensor, low: torch.dtype) -> torch.Tensor:
    """Half the spacing between `low` values around each |w| (fp32): the smallest update that
    changes the weight held in `low` (up to the tie and a power-of-two boundary).

    >>> half_spacing(torch.tensor([1.0, 0.02, 0.0]), torch.bfloat16).tolist()
    [0.00390625, 6.103515625e-05, 4.591774807899561e-41]
    """
    fi = torch.finfo(low)
    _, exponent = torch.frexp(w.float())
    spacing = torch.ldexp(torch.full_like(w, fi.eps, dtype=torch.float32), exponent - 1)
    spacing = torch.where(w == 0, 0.0, spacing)  # frexp(0) has exponent 0: no spacing of its own
    return torch.clamp(spacing, min=fi.tiny * fi.eps) / 2


def make_optimizer(
    model: torch.nn.Module, build_optimizer: OptimizerFactory | None, lr: float | None
) -> torch.optim.Optimizer:
    """`build_optimizer(model)`, else AdamW over `model`'s parameters at `lr` (`DEFAULT_LR`)."""
    if build_optimizer is None:
        return torch.optim.AdamW(model.parameters(), lr=DEFAULT_LR if lr is None else lr)
    return call_build_optimizer(build_optimizer, model)


def _single(template: torch.optim.Optimizer, group: Mapping[str, Any], p: torch.Tensor) -> torch.optim.Optimizer:
    """The template's optimizer class over one parameter, with the hyperparameters of the
    group that holds it and the settings it keeps on itself (`spec.rebuild_optimizer`)."""
    return rebuild_optimizer(template, [{"params": [p], **{k: v for k, v in group.items() if k != "params"}}])


PROBE_SHAPE = (32, 32)
"""`rounds_stochastically`'s weight: 2-D, for optimizers that step matrices only (Muon)."""


def rounds_stochastically(template: torch.optim.Optimizer, low: torch.dtype) -> bool:
    """Whether the optimizer's step on low weights depends on the RNG (stochastic rounding,
    torchao's `_AdamW(bf16_stochastic_round=True)`): the same step from two seeds, on a probe
    whose update is about a quarter of its weights' spacing in `low` (the update of a weight
    of 1 with gradient 1, measured in fp32 first), which rounding to nearest moves alike from
    any seed and stochastic rounding moves about one time in four. (A model's own first
    weights may get updates far below their spacing, which no rounding moves in one draw.)
    Each parameter group in turn, on its parameters' device, until one moves the probe at all
    (a frozen group's lr of 0 does not); a group whose settings cannot step a probe (a device
    it does not take) is passed over."""
    for group in template.param_groups:
        params = [p for p in group["params"] if isinstance(p, torch.Tensor)]
        device = params[0].device if params else torch.device("cpu")
        try:
            moved = _probe(template, group, low, device)
        except Exception:  # an optimizer that cannot step this probe: the next group's may
            continue
        if moved is not None:
            return moved
    return False


def _probe(
    template: torch.optim.Optimizer, group: Mapping[str, Any], low: torch.dtype, device: torch.device
) -> bool | None:
    """`rounds_stochastically` on one group: None where the group does not move the probe."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        p32 = torch.nn.Parameter(torch.ones(PROBE_SHAPE, device=device))
        p32.grad = torch.ones(PROBE_SHAPE, device=device)
        _single(template, group, p32).step()
        update = float((p32.detach() - 1.0).abs().max())
        if not (update > 0 and math.isfinite(update)):
            return None
        weight = 2.0 ** round(math.log2(4 * update / torch.finfo(low).eps))
        results = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            pl = torch.nn.Parameter(torch.full(PROBE_SHAPE, weight, dtype=low, device=device))
            pl.grad = torch.ones(PROBE_SHAPE, dtype=low, device=device)
            _single(template, group, pl).step()
            results.append(pl.detach())
    return not torch.equal(results[0], results[1])


def _one_param(
    template: torch.optim.Optimizer,
    group: Mapping[str, Any],
    p: torch.Tensor,
    g: torch.Tensor,
    low: torch.dtype,
    g_low: torch.Tensor | None = None,
    stochastic: bool = False,
) -> tuple[_Counts, dict[str, _Counts], torch.Tensor]:
    """One step on an fp32 copy of `p` with gradient `g` and one on a low copy with gradient
    `g_low` (the low run's own; by default `g` rounded to `low`); `stochastic`: the step rounds
    stochastically, and its draw's variance is counted. Returns the weights' counts,
    each same-shaped state tensor's, and the lr each changed element needs for its update to
    survive (log2)."""
    w32 = p.detach().float().clone()
    p32 = torch.nn.Parameter(w32.clone())
    p32.grad = g.detach().float().clone()
    opt = _single(template, group, p32)
    opt.step()
    intended = p32.detach() - w32
    state32 = {k: v for k, v in opt.state[p32].items() if isinstance(v, torch.Tensor) and v.shape == p.shape}
    del opt, p32

    wl = w32.to(low)
    pl = torch.nn.Parameter(wl.clone())
    pl.grad = (g_low if g_low is not None else g).detach().to(low)
    opt = _single(template, group, pl)
    opt.step()
    applied = pl.detach().float() - wl.float()
    weights = _Counts()
    weights.add(intended, applied, 2 * half_spacing(wl.float(), low) if stochastic else None)
    del applied
    states: dict[str, _Counts] = {}
    for key, s32 in state32.items():
        sl = opt.state[pl].get(key)
        if isinstance(sl, torch.Tensor) and sl.shape == s32.shape:
            states[key] = _Counts()
            # The state starts at zero (a fresh optimizer's): its "update" is its value.
            states[key].add(s32.float(), sl.float())
    del opt, pl, state32

    lr = float(group.get("lr", 0.0)) or 1.0
    changed = intended != 0
    per_lr = intended[changed].abs() / lr
    needed = half_spacing(wl.float()[changed], low) / per_lr
    return weights, states, torch.log2(needed)


def optimizer_step(
    model: torch.nn.Module,
    grads: Mapping[str, torch.Tensor],
    low: LowDtype,
    *,
    build_optimizer: OptimizerFactory | None = None,
    lr: float | None = None,
    master_weights: bool = False,
    low_grads: Mapping[str, torch.Tensor] | None = None,
) -> OptimizerStep:
    """One optimizer step, intended (fp32) against applied (`low` weights and state), per
    parameter and per unit (see the module's docstring). `grads`: the fp32 gradients by
    parameter name (a tied parameter's under any of its names). `build_optimizer(model)`
    gives the optimizer (only its class and parameter groups are used: it never steps);
    otherwise AdamW at `lr`. `master_weights`: the regime keeps fp32 master weights
    (autocast), recorded for the findings. `low_grads`: the low run's own gradients by
    parameter name (pure regime), which the applied step steps instead of the fp32 ones
    rounded to `low` (a parameter without one falls back to those)."""
    start = time.perf_counter()
    template = make_optimizer(model, build_optimizer, lr)
    group_of = {id(p): g for g in template.param_groups for p in g["params"]}
    low_dtype = TORCH_DTYPES[low]
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    params: list[ParamStep] = []
    units: dict[str, _UnitSums] = {}
    total = _Counts()
    pieces = type(template).__name__ in ELEMENTWISE and type(template).__module__.startswith("torch.optim")
    stepped = [p for p in model.parameters() if id(p) in group_of and p.is_floating_point()]
    every = max(1, math.ceil(sum(p.numel() for p in stepped) / SAMPLE_BUDGET)) if pieces else 1
    stochastic = rounds_stochastically(template, low_dtype)
    # One seed for the steps: an optimizer that rounds stochastically gives the same report twice.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for n, p in model.named_parameters():
            group = group_of.get(id(p))
            g = next((grads[m] for m in names[id(p)] if m in grads), None)
            g_low = next((low_grads[m] for m in names[id(p)] if m in low_grads), None) if low_grads else None
            if g_low is not None and (g_low.shape != p.shape or g_low.is_sparse):
                g_low = None
            if group is None or g is None or g.is_sparse or p.is_complex() or not p.is_floating_point():
                continue
            unit = owner_of(n)
            sums = units.setdefault(unit, _UnitSums())
            sums.lrs.add(float(group.get("lr", 0.0)))
            weights, states = _Counts(), dict[str, _Counts]()
            parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = [(p, g, g_low)]
            sampled = every > 1 and p.numel() > WHOLE_MAX
            if pieces and (p.numel() > CHUNK or sampled):
                flat_p, flat_g = p.detach().reshape(-1), g.detach().reshape(-1)
                flat_l = g_low.detach().reshape(-1) if g_low is not None else None
                if sampled:
                    flat_p, flat_g = flat_p[::every], flat_g[::every]
                    flat_l = flat_l[::every] if flat_l is not None else None
                parts = [
                    (
                        flat_p[k : k + CHUNK],
                        flat_g[k : k + CHUNK],
                        flat_l[k : k + CHUNK] if flat_l is not None else None,
                    )
                    for k in range(0, flat_p.numel(), CHUNK)
                ]
            for part, grad, grad_low in parts:
                with torch.no_grad():
                    w, s, needed_log2 = _one_param(template, group, part, grad, low_dtype, grad_low, stochastic)
                weights.merge(w)
                for key, c in s.items():
                    states.setdefault(key, _Counts()).merge(c)
                finite = needed_log2[torch.isfinite(needed_log2)].double()
                sums.needed_lr += torch.histc(
                    finite.clamp(_LOG2_LO, _LOG2_HI - 1e-9), bins=_NBINS, min=_LOG2_LO, max=_LOG2_HI
                )
                del w, s, needed_log2, finite
            sums.weights.merge(weights)
            for key, c in states.items():
                sums.state.setdefault(key, _Counts()).merge(c)
            total.merge(weights)
            params.append(
                ParamStep(
                    name=n, unit=unit, state={k: c.fidelity() for k, c in states.items()}, **weights._fields(stochastic)
                )
            )
    unit_steps = [
        UnitStep(
            unit=u,
            state={k: c.fidelity() for k, c in s.state.items()},
            survive_lr=s.lr_at(SURVIVE_QUANTILE),
            survive_lr_half=s.lr_at(0.5),
            lr=next(iter(s.lrs)) if len(s.lrs) == 1 else None,
            **s.weights._fields(stochastic),
        )
        for u, s in units.items()
    ]
    return OptimizerStep(
        optimizer=type(template).__name__,
        lr=float(template.param_groups[0].get("lr", 0.0)) if template.param_groups else 0.0,
        dtype=low,
        master_weights=master_weights,
        sampled_every=every,
        stochastic_rounding=stochastic,
        units=unit_steps,
        params=params,
        total=total.fidelity(stochastic),
        seconds=time.perf_counter() - start,
    )


def with_optimizer_step(report: Report, step: OptimizerStep) -> Report:
    """`report` with `step` (`Report.optimizer_step`) and its LOST_UPDATE findings on the units."""
    flagged = report.with_unit_flags(lost_update_flags(step, report.thresholds))
    return flagged.model_copy(update={"optimizer_step": step})

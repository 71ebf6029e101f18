"""The choices of a pure-regime plan: per unit fp32, low, or low with fp32 master weights.

A report of `model.to(dtype)` training (`--regime pure`) is planned with the weights where that
training holds them: a low unit's own parameters are held in the low dtype, and the optimizer
steps them there, its state in that dtype too. Its updates can then be rounded away
(`analysis.optimizer_step`, LOST_UPDATE). So each unit with parameters has three choices:

- `fp32`: fp32 parameters and optimizer state: 4 + 4k bytes per parameter (k state tensors per
  parameter: AdamW's two moments);
- `bf16` (the low dtype): parameters and state held low, 2 + 2k bytes per parameter, no weight
  cast in the step (the weights already are low); not offered where the unit's updates are lost
  (LOST_UPDATE at warning or error severity: more than `lost_update_partial_fraction` lost or
  partly lost, or made Inf/NaN), nor where a training check saw its weights stall;
- `bf16+fp32-master`: the same forward and backward over low parameters, with an fp32 master
  copy the optimizer steps and fp32 state: 2 + 4 + 4k bytes per parameter, and the step time of
  autocast's low unit (the copies cast down once per step, the gradients up, as autocast casts
  its fp32 weights); it loses no update.

Units without parameters keep the two choices of an autocast plan. All choices of a unit spend
the same share of the error budget (their forward and backward are the same computation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from precision_doctor.formats import TORCH_DTYPES
from precision_doctor.model.spec import LossFn, OptimizerFactory
from precision_doctor.options import AutocastPolicy, Flag, LowDtype, Severity, percent
from precision_doctor.planning.cost import CostModel, weight_cast_s
from precision_doctor.planning.search import Choice
from precision_doctor.planning.training_check import TrainingCheck, check_training
from precision_doctor.report import Report
from precision_doctor.runtime import distributed

MASTER_SUFFIX = "+fp32-master"
DEFAULT_STATE_TENSORS = 2
"""Optimizer state tensors per parameter where the report ran no optimizer step: AdamW's two
moments (the optimizer the analysis and the training check default to)."""


def master_label(dtype: LowDtype) -> str:
    """`bf16+fp32-master`: the label of a low unit with fp32 master weights."""
    return f"{dtype.value}{MASTER_SUFFIX}"


def state_tensors(report: Report) -> int:
    """Optimizer state tensors per parameter, as the report's optimizer step kept them (those
    shaped like the parameter: Adam's `exp_avg` and `exp_avg_sq`, SGD's momentum)."""
    step = report.optimizer_step
    if step is None:
        return DEFAULT_STATE_TENSORS
    return max((len(p.state) for p in step.params), default=DEFAULT_STATE_TENSORS)


def unit_params(report: Report) -> dict[str, int]:
    """Parameter elements each unit owns (`Unit.param_bytes` counts them in fp32)."""
    return {u.name: u.param_bytes // 4 for u in report.units}


def lost_update_units(report: Report) -> dict[str, str]:
    """Units whose updates are lost with their weights held low (LOST_UPDATE at warning or
    error severity), with why: they are offered low only with fp32 master weights."""
    out: dict[str, str] = {}
    for u in report.units:
        for f in u.flags:
            if f.flag is Flag.LOST_UPDATE and f.severity in (Severity.ERROR, Severity.WARNING):
                v = f.evidence.values
                nonfinite = v.get("nonfinite_weights", 0.0)
                out[u.name] = (
                    f"LOST_UPDATE: one step makes {int(nonfinite)} of its weights Inf/NaN held in {report.environment.dtype}"
                    if nonfinite
                    else f"LOST_UPDATE: {percent(v.get('lost_fraction', 0.0))} of its weight updates are rounded away "
                    f"held in {report.environment.dtype} ({percent(v.get('partly_lost_fraction', 0.0))} more partly)"
                )
                break
    return out


def state_bytes(params: int, tensors: int, dtype: LowDtype, label: str) -> int:
    """Parameters, master copies and optimizer state of `params` elements under a choice."""
    low = TORCH_DTYPES[dtype].itemsize
    if label == "fp32":
        return params * 4 * (1 + tensors)
    if label == master_label(dtype):
        return params * (low + 4 + 4 * tensors)
    return params * low * (1 + tensors)


def pure_choices(
    report: Report,
    costs: CostModel,
    contributions: Mapping[str, float],
    forced: set[str],
    needs_master: Mapping[str, str],
) -> tuple[tuple[Choice, ...], ...]:
    """Per unit of `costs`, in order: its choices (see the module docstring). `forced`: kept
    fp32; `needs_master`: offered low only with master weights."""
    dtype = costs.dtype
    low = dtype.value
    tensors = state_tensors(report)
    params = unit_params(report)
    units = report.by_module()
    bandwidth = costs.profile.bandwidth_bytes_per_s
    out: list[tuple[Choice, ...]] = []
    for cost in costs.units:
        n = params.get(cost.name, 0)
        fp32 = Choice("fp32", cost.fp32_time_s, cost.fp32_activation_bytes, state_bytes(n, tensors, dtype, "fp32"))
        if cost.name in forced:
            out.append((fp32,))
            continue
        error = contributions.get(cost.name, 0.0)
        unit = units.get(cost.name)
        cast = weight_cast_s(unit, bandwidth) if unit is not None else 0.0
        choices = [fp32]
        if n == 0 or cost.name not in needs_master:
            held_low = Choice(
                low,
                max(cost.low_time_s - cast, 0.0),
                cost.low_activation_bytes,
                state_bytes(n, tensors, dtype, low),
                error=error,
                boundary=low,
            )
            choices.append(held_low)
        if n > 0:
            label = master_label(dtype)
            choices.append(
                Choice(
                    label,
                    cost.low_time_s,
                    cost.low_activation_bytes,
                    state_bytes(n, tensors, dtype, label),
                    error=error,
                    boundary=low,
                )
            )
        out.append(tuple(choices))
    return tuple(out)


@dataclass
class PureRounds:
    """What the search of a pure-regime plan adds to its rounds: the units offered low only
    with master weights (LOST_UPDATE's, then each the training check saw stall), and the
    training check (`training_check.check_training`) of each candidate whose forward the
    verification passed."""

    needs_master: dict[str, str]
    build_optimizer: OptimizerFactory | None
    lr: float | None
    steps: int
    policy: AutocastPolicy
    check: TrainingCheck | None = None

    def choices(
        self, report: Report, costs: CostModel, contributions: Mapping[str, float], forced: set[str]
    ) -> tuple[tuple[Choice, ...], ...]:
        return pure_choices(report, costs, contributions, forced, self.needs_master)

    def trains(
        self,
        model: torch.nn.Module,
        batch: Any,
        loss_fn: LossFn | None,
        dtype: LowDtype,
        labels: Mapping[str, str],
        passes: int,
    ) -> bool | None:
        """Train the candidate `labels` beside fp32. True: it tracks fp32. False: it does not,
        and the unit held low without master weights whose weights moved least now needs them
        (the next round re-solves). None: it does not, and no unit is left to give master
        weights (the caller falls back to fp32)."""
        low = {n: label != "fp32" for n, label in labels.items()}
        masters = {n for n, label in labels.items() if label == master_label(dtype)}
        # In a torch.distributed job every rank trains on its own shard: all decide on the
        # worst rank's check, so they take the same next round and end with the same plan.
        self.check = distributed.worst(
            check_training(
                model,
                batch,
                loss_fn,
                TORCH_DTYPES[dtype],
                low,
                masters,
                build_optimizer=self.build_optimizer,
                lr=self.lr,
                steps=self.steps,
                policy=self.policy,
            ),
            lambda c: 0.0 if c.tracks else 1.0,
        )
        if self.check.tracks:
            return True
        stuck = self.check.unchanged_fraction
        if not stuck:
            return None
        worst = max(stuck, key=lambda n: (stuck[n], n))
        if not all(math.isfinite(x) for x in self.check.plan_losses):
            # Unchanged weights are not what failed: the run went non-finite.
            why = f"went non-finite with this unit's weights held in {dtype} without master weights"
        else:
            why = (
                f"left {percent(stuck[worst])} of its weights unchanged per step held in {dtype} without master weights"
            )
        self.needs_master[worst] = f"the training check of verification pass {passes} ({self.check.summary()}) {why}"
        return False

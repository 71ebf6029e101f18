"""A pure-regime plan's optimizer steps, run for real: does training under the plan track fp32?

A plan for `model.to(dtype)` training (`Plan.regime` pure) stores its low units' parameters in
the low dtype, some of them with fp32 master weights (`master.MasterWeights`). One forward
says nothing about the optimizer step, where a low weight's small updates are rounded away
(`analysis.optimizer_step`): so the plan is also trained, `steps` real optimizer steps on the
batch, beside the same steps in fp32, on copies of the model (the user's model and RNG are
left as they were). The planned copy runs as `apply_plan` installs a pure plan: the low units'
parameters cast down (master copies taken first), the plan's per-unit overrides inside
`torch.autocast` of the plan's dtype (emulated on the CPU as the analysis' runs), the backward
outside it, the optimizer stepping the master copies and the plan's other parameters.

The plan tracks fp32 when its loss, finite at every step, falls over the steps by at least
`TRACK_FRACTION` of what the fp32 run's falls (a stalled run, its updates rounded away, stays
flat where fp32 descends).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from precision_doctor.analysis.optimizer_step import make_optimizer
from precision_doctor.capture.emulation import emulated_precision
from precision_doctor.capture.lowrun import low_precision_backward
from precision_doctor.capture.units import owner_of
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.model.spec import LossFn, OptimizerFactory, resolve_loss, run_model
from precision_doctor.options import AutocastPolicy
from precision_doctor.planning.master import MasterWeights, hold_plan_weights

TRAIN_STEPS = 8
"""Optimizer steps the check trains. On `sample_models/bf16_finetune_stall.py` (AdamW, lr 1e-5)
eight steps take fp32's loss down ~2% and leave pure bf16's where it was."""
TRACK_FRACTION = 0.5
"""The plan's loss must fall by at least this fraction of the fp32 run's fall."""


@dataclass(frozen=True)
class TrainingCheck:
    """The losses of `steps` optimizer steps in fp32 and under the plan (`steps + 1` each: the
    loss before each step and after the last)."""

    fp32_losses: tuple[float, ...]
    plan_losses: tuple[float, ...]
    unchanged_fraction: dict[str, float]
    """Per unit with low parameters stepped in place (no master copy): the fraction of their
    elements the steps left as they were, averaged over the steps."""
    optimizer: str = ""
    """The optimizer's class."""
    lr: float = math.nan
    """Its (first parameter group's) learning rate."""

    @property
    def fp32_descent(self) -> float:
        return self.fp32_losses[0] - self.fp32_losses[-1]

    @property
    def plan_descent(self) -> float:
        return self.plan_losses[0] - self.plan_losses[-1]

    @property
    def tracks(self) -> bool:
        if not all(math.isfinite(v) for v in self.plan_losses):
            return False
        if not self.fp32_descent > 0:  # fp32 does not descend on this batch: nothing to lose
            return True
        return self.plan_descent >= TRACK_FRACTION * self.fp32_descent

    def summary(self) -> str:
        return (
            f"{len(self.fp32_losses) - 1} optimizer steps: fp32 loss {self.fp32_losses[0]:.6g} -> "
            f"{self.fp32_losses[-1]:.6g}, plan {self.plan_losses[0]:.6g} -> {self.plan_losses[-1]:.6g}"
        )


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:
        raise PrecisionDoctorError(
            f"the plan's training check works on copies and cannot deep-copy the model: {type(e).__name__}: {e}"
        ) from e


def check_training(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    dtype: torch.dtype,
    low: Mapping[str, bool],
    masters: Collection[str],
    *,
    build_optimizer: OptimizerFactory | None = None,
    lr: float | None = None,
    steps: int = TRAIN_STEPS,
    policy: AutocastPolicy = AutocastPolicy.CUDA,
) -> TrainingCheck:
    """`steps` optimizer steps on `batch` in fp32 and under the plan (`low`: unit -> runs low,
    its parameters stored low; `masters`: the low units whose parameters keep fp32 master
    weights), each on its own copy of `model`, from the same RNG state. The optimizer is
    `build_optimizer(copy)`'s, else AdamW at `lr`."""
    if steps < 1:
        raise PrecisionDoctorError(f"the training check needs at least one step, got {steps}")
    with torch.random.fork_rng(devices=[]):
        rng = torch.get_rng_state()
        ref = _copy(model)
        ref.train()
        opt = make_optimizer(ref, build_optimizer, lr)
        name = type(opt).__name__
        first_lr = float(opt.param_groups[0].get("lr", math.nan)) if opt.param_groups else math.nan
        fp32 = _train(ref, opt, batch, loss_fn, steps, None, low, policy, MasterWeights([]))
        del ref, opt
        torch.set_rng_state(rng)
        m = _copy(model)
        m.train()
        opt = make_optimizer(m, build_optimizer, lr)  # over the fp32 parameters: pointed at the masters below
        held = hold_plan_weights(m, low, masters, dtype)
        held.use_in(opt)
        tracked: dict[str, list[torch.nn.Parameter]] = {}
        for n, p in m.named_parameters():
            if p.dtype == dtype and held.master(p) is p:
                tracked.setdefault(owner_of(n), []).append(p)
        plan = _train(m, opt, batch, loss_fn, steps, dtype, low, policy, held, tracked)
    return TrainingCheck(tuple(fp32[0]), tuple(plan[0]), plan[1], name, first_lr)


def _train(
    m: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: Any,
    loss_fn: LossFn | None,
    steps: int,
    dtype: torch.dtype | None,
    low: Mapping[str, bool],
    policy: AutocastPolicy,
    held: MasterWeights,
    tracked: Mapping[str, list[torch.nn.Parameter]] | None = None,
) -> tuple[list[float], dict[str, float]]:
    losses: list[float] = []
    same = dict.fromkeys(tracked or {}, 0)
    total = {u: sum(p.numel() for p in ps) * steps for u, ps in (tracked or {}).items()}
    for i in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        try:
            loss = _loss(m, batch, loss_fn, dtype, low, policy)
            losses.append(float(loss.detach()))
            if i == steps:
                break
            if dtype is None:
                loss.backward()  # type: ignore[no-untyped-call]
            else:
                with low_precision_backward(m, dtype):
                    loss.backward()  # type: ignore[no-untyped-call]
        except PrecisionDoctorError:
            raise
        except Exception as e:
            raise PrecisionDoctorError(f"the plan's training check raised {type(e).__name__} at step {i}: {e}") from e
        before = {u: [p.detach().clone() for p in ps] for u, ps in (tracked or {}).items()}
        held.step(opt)
        for u, ps in (tracked or {}).items():
            same[u] += sum(int((b == p.detach()).sum()) for b, p in zip(before[u], ps, strict=True))
    return losses, {u: same[u] / total[u] for u in same if total[u]}


def _loss(
    m: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    dtype: torch.dtype | None,
    low: Mapping[str, bool],
    policy: AutocastPolicy,
) -> torch.Tensor:
    if dtype is None:
        return resolve_loss(run_model(m, batch), batch, loss_fn)
    with emulated_precision(m, dtype, low, policy=policy, cast_low_inputs=True):  # a pure plan's units
        return resolve_loss(run_model(m, batch), batch, loss_fn)

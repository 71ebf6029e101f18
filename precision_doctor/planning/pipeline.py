"""The planning stage on an analysis report, end to end: the unit costs (per-op rooflines on a
device profile, or each unit timed on the model's own device), the verified per-unit dtype
plan, and the report with its `plan` and `loss_scale` sections filled. The CLI's `analyze`
and the pre-flight both plan through here, so both write the same sections."""

from __future__ import annotations

from typing import Any

import torch

from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.model.spec import LossFn, OptimizerFactory
from precision_doctor.options import CostSource, LowDtype, Target, parse_enum
from precision_doctor.planning.export import plan_section
from precision_doctor.planning.plan import DEFAULT_TOLERANCE, plan_model
from precision_doctor.report import Report
from precision_doctor.runtime.distributed import exchange, same_outcome, unwrap


@same_outcome
def plan_report(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    report: Report,
    *,
    target: Target | str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    cost_source: CostSource | str = CostSource.ROOFLINE,
    build_optimizer: OptimizerFactory | None = None,
    lr: float | None = None,
) -> Report:
    """`report` with `extras.plan` (the plan and its exports) and `extras.loss_scale` (the
    initial loss scale for the plan's low units) set.

    `cost_source="roofline"` costs each op on the `target` profile (default h100);
    `"measured"` times each unit on the model's own device (no `target` then). The plan is
    verified by real low-precision runs of `model` under the plan (restored afterwards).

    In a torch.distributed job every rank calls it (with its own shard of the data) and gets
    the same plan: each verification pass decides on the worst rank's error, and measured
    costs are rank 0's. A `DistributedDataParallel` model is planned as its `module`.

    A pure-regime report gets a pure plan, with fp32 master weights per unit where the updates
    would be lost, trained for real beside fp32 with `build_optimizer(model)`'s optimizer (else
    AdamW at `lr`, else at the lr of the report's optimizer step): see `plan.plan_model`. An
    fp8 report gets an fp8 plan (`planning.fp8_plan`)."""
    model = unwrap(model)[0]
    source = parse_enum(CostSource, cost_source, "cost source")
    if source is CostSource.MEASURED and report.environment.dtype is LowDtype.FP8:
        raise PrecisionDoctorError(
            "measured costs time each unit in fp32 and bf16 only: plan fp8 on a device's roofline "
            "(--target h100, h200 or b200)"
        )
    if target is not None:
        target = parse_enum(Target, target, "target")
    if source is CostSource.MEASURED and target is not None:
        raise PrecisionDoctorError("measured costs time the model's own device; they take no target")
    costs = None
    target_name = str(target) if target is not None else Target.H100.value
    if source is CostSource.MEASURED:
        from precision_doctor.planning.timing import measure_cost_model

        costs = exchange(measure_cost_model(model, batch, report))[0]
        target_name = costs.profile.name
    plan = plan_model(
        model,
        batch,
        loss_fn,
        report,
        target=target_name,
        tolerance=tolerance,
        costs=costs,
        build_optimizer=build_optimizer,
        lr=lr,
    )
    return report.with_extras(plan=plan_section(plan), loss_scale=plan.loss_scale)

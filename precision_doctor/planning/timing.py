"""Measured unit costs (`--cost measured`): each unit's forward and backward timed in fp32
and in the low dtype on the model's own device, in place of datasheet rooflines.

Every module's inputs are recorded on one real forward. Each module is then replayed on
them, in fp32 and under `torch.autocast(device, low dtype)`: forward, then backward to its
parameters and floating-point inputs with `torch.autograd.grad` (no `.grad` is touched);
the least of `repeats` timings after a warm-up (other work on the machine only ever adds
time: `timeit`'s reasoning), bracketed by synchronizations on CUDA. A
unit's own time is its module's time minus that of the child modules it called (their ops
are their own units), never below zero. Units without a module (`<loss>`, `<backward>`)
and modules that never ran keep their per-op rooflines, on a profile measured on the same
device, which also prices the casts at dtype boundaries (its copy bandwidth).

Meant for CUDA, where it sees real kernels and launch overheads. On a CPU it measures the
CPU's own kernels (fp16 ones are slow there), so plans made with it fit CPU training only.

>>> import torch, precision_doctor as pd
>>> from precision_doctor.planning.timing import measure_cost_model
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
>>> x, loss = torch.randn(4, 8), (lambda out, b: out.pow(2).mean())
>>> costs = measure_cost_model(net, x, pd.analyze(net, x, loss_fn=loss, dtype="bf16"), repeats=1)
>>> [u.name for u in costs.units]  # the modules timed; `<loss>` (no module) keeps its roofline
['0', '1', '2', '<loss>']
>>> all(u.fp32_time_s > 0 and u.low_time_s > 0 for u in costs.units)
True
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from precision_doctor.capture.units import ROOT_UNIT
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.formats import TORCH_DTYPES
from precision_doctor.model.spec import device_of, run_model
from precision_doctor.model.state import ModelStateGuard
from precision_doctor.options import LowDtype
from precision_doctor.planning.cost import (
    CostModel,
    UnitCost,
    cast_edges,
    measure_device_profile,
    synchronize,
    unit_roofline_s,
    weight_cast_s,
    with_fp32_under_autocast,
)
from precision_doctor.report import Report

DEFAULT_REPEATS = 5


@dataclass
class _Call:
    """A module's first call (its inputs, cloned) and how often the forward called it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    calls: int = 1


def _snapshot(value: Any) -> Any:
    """A deep copy of a module's inputs: tensors cloned, and stateful objects too (a
    transformers `Cache` the forward goes on appending to), so replays see the first call."""
    detached = pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)
    try:
        return copy.deepcopy(detached)
    except Exception:  # an object that cannot be copied: share it, clone the tensors
        return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, detached)


def record_module_calls(model: torch.nn.Module, batch: Any) -> dict[str, _Call]:
    """Module path (`<root>` for the model) -> its first call's inputs, from one forward."""
    paths = {id(m): (n or ROOT_UNIT) for n, m in model.named_modules()}
    calls: dict[str, _Call] = {}

    def pre(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        path = paths.get(id(mod))
        if path is None:
            return
        if path in calls:
            calls[path].calls += 1
        else:
            calls[path] = _Call(_snapshot(args), _snapshot(kwargs))

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return calls


def time_module_s(
    module: torch.nn.Module,
    call: _Call,
    device: torch.device,
    low: torch.dtype | None,
    repeats: int = DEFAULT_REPEATS,
) -> float:
    """The least seconds of `repeats` forward + backward passes of `module` on `call`'s inputs,
    in fp32 (`low=None`) or under autocast to `low` (other work on the machine only adds time:
    the least is the steadier figure)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def fresh_inputs() -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = _snapshot((call.args, call.kwargs))
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.requires_grad_(True)
        return args, kwargs

    def once(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
            out = module(*args, **kwargs)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        wrt = params + inputs
        if outs and wrt:
            torch.autograd.grad(outs, wrt, grad_outputs=[torch.ones_like(t) for t in outs], allow_unused=True)

    once(*fresh_inputs())  # warm-up: lazy initialization, autotuning, allocator growth
    times = []
    for _ in range(max(1, repeats)):
        args, kwargs = fresh_inputs()  # not timed
        synchronize(device)
        t0 = time.perf_counter()
        once(args, kwargs)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def _children(path: str, called: Mapping[str, _Call]) -> list[str]:
    """The called modules directly below `path` (the nearest called ones on each branch)."""
    prefix = "" if path == ROOT_UNIT else path + "."
    below = [p for p in called if p != ROOT_UNIT and p != path and p.startswith(prefix)]
    return [p for p in below if not any(q != p and p.startswith(q + ".") for q in below)]


def measure_cost_model(
    model: torch.nn.Module,
    batch: Any,
    report: Report,
    *old_spelling: Report,
    repeats: int = DEFAULT_REPEATS,
    progress: Callable[[str], None] | None = None,
) -> CostModel:
    """A cost model whose unit times are measured on the model's device (the loss unit keeps
    its roofline: a loss is not timed alone)."""
    if old_spelling:
        # (model, batch, loss_fn, report): a loss_fn that was never used.
        warnings.warn(
            "measure_cost_model(model, batch, loss_fn, report) is deprecated: it takes no loss_fn; "
            "call measure_cost_model(model, batch, report)",
            DeprecationWarning,
            stacklevel=2,
        )
        report = old_spelling[0]
    low = report.environment.dtype
    low_dtype = TORCH_DTYPES[LowDtype(low)]
    device = device_of(model)
    modules = {(n or ROOT_UNIT): m for n, m in model.named_modules()}
    profile = measure_device_profile(device)
    step = progress or (lambda _msg: None)

    with ModelStateGuard(model):
        try:
            called = record_module_calls(model, batch)
        except Exception as e:
            raise PrecisionDoctorError(
                f"the model's forward raised {type(e).__name__}: {e} (recording unit inputs)"
            ) from e
        totals: dict[str, tuple[float, float]] = {}
        for i, (path, call) in enumerate(called.items()):
            step(f"timing {path} ({i + 1}/{len(called)})")
            try:
                t32 = time_module_s(modules[path], call, device, None, repeats)
                tlow = time_module_s(modules[path], call, device, low_dtype, repeats)
            except Exception as e:
                raise PrecisionDoctorError(f"timing unit {path!r} in {low} raised {type(e).__name__}: {e}") from e
            totals[path] = (t32 * call.calls, tlow * call.calls)

    units = []
    for u in report.units:
        if u.name in totals:
            kids = _children(u.name, called)
            own32 = max(0.0, totals[u.name][0] - sum(totals[k][0] for k in kids))
            ownlow = max(0.0, totals[u.name][1] - sum(totals[k][1] for k in kids))
        else:
            bw = profile.bandwidth_bytes_per_s
            own32 = unit_roofline_s(u, profile.peak_flops_per_s("fp32"), bw)
            ownlow = unit_roofline_s(u, profile.peak_flops_per_s(low.value), bw, bytes_scale=0.5) + weight_cast_s(u, bw)
        units.append(UnitCost(u.name, own32, ownlow, u.activation_bytes, u.activation_bytes // 2))
    costs = CostModel(profile, LowDtype(low), tuple(units), cast_edges(report, profile.bandwidth_bytes_per_s))
    return with_fp32_under_autocast(costs, report)

"""Per-unit dtype overrides, and low precision for real training loops.

`unit_overrides(model, low_units, dtype)` installs what a plan installs (`apply_plan` is built
on it): inside a `torch.autocast` region, a unit that runs low runs its forward under
`torch.autocast(device, dtype)` on its inputs as they come (autocast casts what its op lists
cast: a plan whose every unit is low runs as plain autocast does, the residual stream fp32),
a unit that runs in fp32 runs with autocast disabled and its floating inputs cast to fp32,
and a low unit called by an fp32 one hands its floating results back in fp32; modules the
mapping does not name run as their caller does. A pure-regime plan (`cast_low_inputs`) also
casts a low unit's floating inputs to `dtype`, as `model.to(dtype)` training holds every
activation low. Outside an autocast region the model is untouched. Inside a region of
another dtype than the overrides' (a bf16 region, an fp16 plan) entering an overridden module
raises `PrecisionDoctorError`: running it would switch the region to the plan's dtype, with no
loss scaler where the region's own dtype needs none.
The plan's verification (`planning.plan.verify_plan`) runs these same overrides inside the real
low-precision run (`lowrun.low_run`), so a verified plan is what `apply_plan` executes.

`emulated_precision(model, dtype, low_units)` is the context for training loops: the autocast
regime of `lowrun.low_precision` (real autocast with CUDA's op lists, fp16 kernels emulated on
the CPU, bf16 ones on a CPU without fast bf16 kernels) plus `low_units`' overrides. There is
one emulation, `lowrun.EmulateLowMode`; this module only adds which units run low.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar, overload

import torch

from precision_doctor.capture.lowrun import low_precision
from precision_doctor.capture.units import LOSS_UNIT, ROOT_UNIT, UNATTRIBUTED_UNIT
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.formats import dtype_spelling
from precision_doctor.model.spec import device_type
from precision_doctor.options import AutocastPolicy, Regime

__all__ = [
    "UnitOverrides",
    "cast_floats",
    "check_region_dtype",
    "emulated_precision",
    "region_mismatch",
    "results_to",
    "unit_overrides",
]


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """`obj`'s floating tensors cast to `dtype`, through tuples (not named ones), lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [cast_floats(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def results_to(out: Any, dtype: torch.dtype) -> Any:
    """A module's results with their floating tensors cast to `dtype`, containers kept as
    their own type (a named tuple, a `ModelOutput`)."""
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() and out.dtype != dtype else out
    if isinstance(out, tuple):
        items = [results_to(o, dtype) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(out, list):
        return type(out)(results_to(o, dtype) for o in out)
    if isinstance(out, dict):
        cast = {k: results_to(v, dtype) for k, v in out.items()}
        if type(out) is dict:
            return cast
        copied = copy.copy(out)  # an OrderedDict subclass (ModelOutput): items set in place
        for k, v in cast.items():
            if v is not out[k]:
                copied[k] = v
        return copied
    return out


def region_mismatch(device: str, low_dtype: torch.dtype) -> str | None:
    """Why per-unit overrides in `low_dtype` must not run in the current autocast region of
    `device` (one line), or None: outside a region, or in one of `low_dtype`."""
    if not torch.is_autocast_enabled(device):
        return None
    region = torch.get_autocast_dtype(device)
    if region == low_dtype:
        return None
    plan, there = (dtype_spelling(str(d).removeprefix("torch.")) for d in (low_dtype, region))
    replan = (
        f"re-plan with `precision-doctor analyze model.py --dtype {there} --export ...`, or "
        if there in ("fp16", "bf16")
        else ""
    )
    return (
        f"this plan was made for {plan} but runs inside a {there} ({region}) autocast region: "
        f"{replan}run it under torch.autocast({device!r}, dtype={low_dtype})"
    )


def check_region_dtype(device: str, low_dtype: torch.dtype) -> None:
    """Refuse (`PrecisionDoctorError`, one line) to run `low_dtype` overrides inside an
    autocast region of another dtype (see `region_mismatch`)."""
    why = region_mismatch(device, low_dtype)
    if why is not None:
        raise PrecisionDoctorError(why)


def _autocast_cast_hooks(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`args` through the module's forward pre-hooks that cast its input to the autocast region's
    dtype (`capture.fp8.autocast_input`, the CPU emulation of torchao's own cast), again inside
    the region the override entered: they ran before it, under an fp32 caller's disabled
    autocast, and left an fp8 layer's input fp32 where torchao on a GPU casts it."""
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "casts_to_autocast_dtype", False):
            args = hook(module, args) or args
    return args


# Each installed override -> (its handle, whether the module had its own `forward`, the
# forward it wrapped). Looked up by identity: `functools.wraps` copies a wrapper's attributes
# onto whatever wraps it (Accelerate's hooks), so a marker attribute would be inherited.
_WRAPPERS: weakref.WeakKeyDictionary[Any, tuple[UnitOverrides, bool, Any]] = weakref.WeakKeyDictionary()


class UnitOverrides:
    """Installed per-unit overrides; `remove()` (or leaving the `with` block) takes them off."""

    def __init__(self) -> None:
        self._installed: list[tuple[torch.nn.Module, bool, Any, Any]] = []
        self._depth = 0  # >0 while inside an overridden module entered in an autocast region

    def _wrap(self, module: torch.nn.Module, low: bool, low_dtype: torch.dtype, cast_low_inputs: bool) -> None:
        had = "forward" in module.__dict__
        orig = module.forward

        @functools.wraps(orig)
        def forward(*args: Any, **kwargs: Any) -> Any:
            dev = device_type(module, *args, *kwargs.values())
            if not self._installed or (self._depth == 0 and not torch.is_autocast_enabled(dev)):
                # Removed (but still called by a wrapper installed on top of it), or not in
                # an autocast region: the model as written.
                return orig(*args, **kwargs)
            if self._depth == 0:
                # Entered from the caller's own autocast region: it must be the plan's dtype
                # (an fp16 plan in a bf16 region would switch that region to fp16, unscaled).
                check_region_dtype(dev, low_dtype)
            # Called by a unit that runs in fp32 (autocast disabled): that unit computes in
            # fp32, so a low unit hands its results back in fp32 (its matmul could not take
            # an fp16 operand beside an fp32 one outside autocast).
            in_fp32 = not torch.is_autocast_enabled(dev)
            self._depth += 1
            try:
                if not low or cast_low_inputs:
                    dtype = low_dtype if low else torch.float32
                    args, kwargs = cast_floats(args, dtype), cast_floats(kwargs, dtype)
                ctx = torch.autocast(dev, dtype=low_dtype) if low else torch.autocast(dev, enabled=False)
                with ctx:
                    if low and in_fp32:
                        args = _autocast_cast_hooks(module, args)
                    out = orig(*args, **kwargs)
                return results_to(out, torch.float32) if low and in_fp32 else out
            finally:
                self._depth -= 1

        _WRAPPERS[forward] = (self, had, orig)
        module.forward = forward
        self._installed.append((module, had, orig, forward))

    @property
    def active(self) -> bool:
        return bool(self._installed)

    def remove(self) -> None:
        """Take the overrides off. Where something wrapped a module's forward on top of ours
        (another handle, Accelerate), its wrapper stays and ours only passes calls through;
        restoring a forward also drops removed handles' wrappers below it."""
        installed, self._installed = self._installed, []
        for module, had, orig, ours in reversed(installed):
            if module.__dict__.get("forward") is not ours:
                continue
            while (unwrap := _WRAPPERS.get(orig)) is not None and not unwrap[0].active:
                _, had, orig = unwrap
            if had:
                module.forward = orig
            else:
                module.__dict__.pop("forward", None)

    def __enter__(self) -> UnitOverrides:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


H = TypeVar("H", bound=UnitOverrides)

_NO_MODULE = (LOSS_UNIT, UNATTRIBUTED_UNIT)
"""Units of a report that name no module: the loss function, and backward ops outside any
module's autograd node (FSDP2's last gradient reduction)."""


@overload
def unit_overrides(
    model: torch.nn.Module, low_units: Mapping[str, bool], low_dtype: torch.dtype, *, cast_low_inputs: bool = False
) -> UnitOverrides: ...
@overload
def unit_overrides(
    model: torch.nn.Module,
    low_units: Mapping[str, bool],
    low_dtype: torch.dtype,
    handle: H,
    *,
    cast_low_inputs: bool = False,
) -> H: ...
def unit_overrides(
    model: torch.nn.Module,
    low_units: Mapping[str, bool],
    low_dtype: torch.dtype,
    handle: UnitOverrides | None = None,
    *,
    cast_low_inputs: bool = False,
) -> UnitOverrides:
    """Install per-unit overrides on `model` (see the module docstring), on `handle` (a new
    one by default). `low_units` maps units (module paths, `<root>` for the model itself) to
    whether they run in `low_dtype`; `<loss>` and `<backward>` name no module and are skipped
    (they run as the autocast region runs them). A unit the model does not have is an error.
    `cast_low_inputs`: low units cast their floating inputs to `low_dtype` (a pure-regime plan).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> with unit_overrides(net, {"1": False}, torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
    ...     net[0](torch.ones(1, 2)).dtype, net(torch.ones(1, 2)).dtype
    (torch.bfloat16, torch.float32)
    """
    modules = {name or ROOT_UNIT: m for name, m in model.named_modules()}
    unknown = [u for u in low_units if u not in modules and u not in _NO_MODULE]
    if unknown:
        raise PrecisionDoctorError(
            f"{type(model).__name__} has no module {unknown[0]!r} ({len(unknown)} unit(s) it does not have)"
        )
    handle = handle if handle is not None else UnitOverrides()
    for unit, low in low_units.items():
        if unit not in _NO_MODULE:
            handle._wrap(modules[unit], bool(low), low_dtype, cast_low_inputs)
    return handle


@contextlib.contextmanager
def emulated_precision(
    model: torch.nn.Module,
    dtype: torch.dtype,
    low_units: Mapping[str, bool] | None = None,
    *,
    policy: AutocastPolicy | str = AutocastPolicy.CUDA,
    cast_low_inputs: bool = False,
) -> Iterator[None]:
    """Run `model`'s forward as mixed-precision training runs it: `torch.autocast` in `dtype`
    with `policy`'s op lists and, with `low_units`, those units overridden as a plan
    overrides them (`unit_overrides`; the `""` key, if any, is the default of the modules not
    named). fp16 kernels are emulated on the CPU, bf16 ones on a CPU without fast bf16
    kernels (`lowrun.low_precision`, `lowrun.emulates`). Compute the loss inside, as under
    `torch.autocast`, and run the backward outside, in `lowrun.low_precision_backward`
    (inside, autocast would cast the backward's matmuls too, an fp32 unit's included). For
    the pure regime (`model.to(dtype)`) use `low_precision`; a pure-regime plan's units run with
    `cast_low_inputs` (see `unit_overrides`).

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> with emulated_precision(net, torch.float16):
    ...     y = net(torch.tensor([[70000.0, 0.0]]))
    >>> bool(torch.isinf(y).all())
    True
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"emulated_precision runs float16 or bfloat16, not {dtype}")
    units = dict(low_units or {})
    if "" in units:
        default = bool(units.pop(""))
        for name, _ in model.named_modules():
            units.setdefault(name or ROOT_UNIT, default)
    with (
        low_precision(model, dtype, regime=Regime.AUTOCAST, policy=policy),
        unit_overrides(model, units, dtype, cast_low_inputs=cast_low_inputs),
    ):
        yield

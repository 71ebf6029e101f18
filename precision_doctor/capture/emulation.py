"""Emulated low precision for real training loops on the CPU.

`emulated_precision(model, torch.float16)` runs the model's REAL forward and backward ops in
fp32 kernels, but every op of a unit that runs low takes inputs rounded to the low dtype and
produces outputs rounded to it (`x.to(low).float()`): what a tensor-core kernel with fp32
accumulate computes, at CPU fp32 speed (CPU fp16 kernels are ~30x slower). Overflow becomes
inf and underflow becomes 0 exactly as in fp16, so `torch.amp.GradScaler` sees the same
non-finite gradients it would see on a GPU and skips the same steps.

What stays fp32, as under torch.autocast:
- ops outside the model's forward with grad disabled (the optimizer, GradScaler's unscale
  and inf checks, zero_grad): master weights and their updates are fp32 in AMP;
- the loss (ops outside the model's forward with grad enabled, unit `<loss>`) unless
  `low_units` names `<loss>` explicitly: autocast runs nearly every loss in fp32, and
  `scaler.scale(loss)` must not overflow the loss it scales;
- gradient accumulation into `.grad` (AccumulateGrad): AMP accumulates in fp32.

Units are attributed, forward and backward, by the capture's `UnitAttribution`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from precision_doctor.capture.ops import op_info
from precision_doctor.capture.units import LOSS_UNIT, UNATTRIBUTED_UNIT, Policy, UnitAttribution

__all__ = ["EmulatedPrecisionMode", "emulated_precision"]


class EmulatedPrecisionMode(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
    """Rounds inputs and outputs of every value-changing op of the low units."""

    def __init__(
        self,
        attribution: UnitAttribution,
        low_dtype: torch.dtype,
        policy: Policy,
        loss_low: bool,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
        self.attribution = attribution
        self.tracker = attribution.tracker
        self.low = low_dtype
        self.policy = policy
        self.loss_low = loss_low
        self.rounded_ops = 0
        self.fp32_ops = 0

    def _is_low(self, unit: str) -> bool:
        if unit == UNATTRIBUTED_UNIT:
            return False
        if unit == LOSS_UNIT:
            return self.loss_low
        return self.policy.is_low(unit)

    def _round(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.low).float() if t.dtype == torch.float32 else t

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        info = op_info(func)
        backward = torch._C._current_graph_task_id() != -1
        accumulate = False
        if backward:
            unit, accumulate = self.attribution.backward_unit()
        elif self.tracker.stack:
            unit = self.tracker.current
        else:
            # Outside the model's forward: the loss (grad on) or the optimizer (grad off).
            unit = LOSS_UNIT if torch.is_grad_enabled() else UNATTRIBUTED_UNIT
        if not backward:
            self.attribution.record_forward(unit)

        if info.preserves_values or accumulate or not self._is_low(unit):
            self.fp32_ops += 1
            return func(*args, **kwargs)

        # In place ops write their first argument: round it in place after the fp32 kernel.
        # Other mutated arguments (batch norm's running stats) are fp32 state in AMP too.
        inplace = 0 in info.mutates and info.name.split(".")[0].endswith("_")
        mutated = set(info.mutates)

        def round_arg(i: int, a: Any) -> Any:
            if i in mutated:
                return a
            if isinstance(a, torch.Tensor):
                return self._round(a)
            if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
                return type(a)(self._round(t) if isinstance(t, torch.Tensor) else t for t in a)
            return a

        rargs = tuple(round_arg(i, a) for i, a in enumerate(args))
        rkwargs = {k: round_arg(-1, v) for k, v in kwargs.items()}
        out = func(*rargs, **rkwargs)
        self.rounded_ops += 1
        if inplace:
            target = args[0]
            if isinstance(target, torch.Tensor) and target.dtype == torch.float32:
                target.copy_(target.to(self.low))
            return out
        if info.mutates:
            return out  # out= style results alias their arguments: leave them be
        if isinstance(out, torch.Tensor):
            return self._round(out)
        if isinstance(out, (list, tuple)):
            return type(out)(self._round(t) if isinstance(t, torch.Tensor) else t for t in out)
        return out


@contextlib.contextmanager
def emulated_precision(
    model: torch.nn.Module,
    dtype: torch.dtype,
    low_units: Mapping[str, bool] | None = None,
) -> Iterator[EmulatedPrecisionMode]:
    """Run `model` (forward, backward, a whole training loop) in emulated `dtype`.

    `low_units` is a `Policy` dict: unit name -> runs low, with a `""` default key (default:
    every unit low). Units are module paths plus `<root>` and `<loss>`; `<loss>` runs low
    only when named explicitly.

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> with emulated_precision(net, torch.float16):
    ...     y = net(torch.tensor([[70000.0, 0.0]]))
    >>> bool(torch.isinf(y).all())
    True
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"emulated_precision emulates float16 or bfloat16, not {dtype}")
    policy_dict = dict(low_units) if low_units is not None else {"": True}
    loss_low = bool(policy_dict.get(LOSS_UNIT, False))
    policy = Policy(policy_dict)
    attribution = UnitAttribution(model)
    mode = EmulatedPrecisionMode(attribution, dtype, policy, loss_low)
    with attribution.tracker, mode:
        yield mode

"""Units: which module an op belongs to, forward and backward.

A forward op belongs to the innermost module running (`UnitTracker`, global module hooks).
A backward op belongs to the module whose forward created the autograd node being executed:
each forward op records the sequence number of the node it created, and the backward op
reads the current node's (`UnitAttribution`). An `AccumulateGrad` node belongs to the module
that owns its parameter. Every mode (the analysis capture, the emulation) uses this one
component.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn.modules import module as nn_module

# The unit names are the report's vocabulary, defined there (the base) and used here.
from precision_doctor.report import LOSS_UNIT as LOSS_UNIT
from precision_doctor.report import ROOT_UNIT as ROOT_UNIT
from precision_doctor.report import UNATTRIBUTED_UNIT as UNATTRIBUTED_UNIT


# torch's private autograd internals, typed in this one place (the rest of the package calls
# these). Both are stable since torch 2.0 and carry stubs in torch._C, but `torch.autograd`
# re-exports `_get_sequence_nr` without listing it (mypy strict: attr-defined), and the stub
# of `_current_autograd_node` omits the None it returns outside a backward pass. Autograd
# nodes are handled as `Any` (their `_sequence_nr()`, hooks and saved tensors read by name).
def sequence_nr() -> int:
    """The sequence number the next autograd node made on this thread will get."""
    return torch._C._autograd._get_sequence_nr()


def current_autograd_node() -> Any | None:
    """The autograd node being executed on this thread, None outside a backward pass."""
    node: Any | None = torch._C._current_autograd_node()
    return node


class UnitTracker:
    """Which unit is running: a stack of module paths kept by global module hooks."""

    def __init__(
        self,
        model: torch.nn.Module,
        on_exit: Callable[[str], None],
        on_output: Callable[[str, int, Any], None] | None = None,
    ) -> None:
        self.paths: dict[int, str] = {}
        self.kinds: dict[str, str] = {}
        for name, mod in model.named_modules(remove_duplicate=True):
            path = name or ROOT_UNIT
            self.paths[id(mod)] = path
            self.kinds[path] = type(mod).__name__
        self.stack: list[str] = []
        # Which call of its module each entry of `stack` is (0 for the first): names ops
        # alike in two runs of one model (see `OpKeyer`).
        self.call_stack: list[int] = []
        self.calls: dict[str, int] = {}
        self.outside = ROOT_UNIT
        self._on_exit = on_exit
        self._on_output = on_output  # (path, call, output) of each module call that returns
        self._handles: list[Any] = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else self.outside

    def _pre(self, mod: torch.nn.Module, args: Any) -> None:
        path = self.paths.get(id(mod))
        if path is not None:
            call = self.calls.get(path, 0)
            self.calls[path] = call + 1
            self.stack.append(path)
            self.call_stack.append(call)

    def _post(self, mod: torch.nn.Module, args: Any, out: Any) -> None:
        path = self.paths.get(id(mod))
        if path is not None and self.stack and self.stack[-1] == path:
            self.stack.pop()
            call = self.call_stack.pop()
            self._on_exit(path)
            if self._on_output is not None:
                self._on_output(path, call, out)

    def __enter__(self) -> UnitTracker:
        self._handles = [
            nn_module.register_module_forward_pre_hook(self._pre),
            nn_module.register_module_forward_hook(self._post, always_call=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.stack.clear()
        self.call_stack.clear()


class LowUnits:
    """Which units run low. A dict with a `""` default key, as Polygraphy's per-unit options:
    `{"": True, "lm_head": False}` runs everything low except `lm_head`."""

    def __init__(self, low: Mapping[str, bool]) -> None:
        self._low = dict(low)
        self._default = self._low.get("", True)

    def is_low(self, unit: str) -> bool:
        return self._low.get(unit, self._default)


def owner_of(param_name: str) -> str:
    """The unit owning a parameter by its qualified name (`blocks.0.attn.weight`)."""
    return param_name.rpartition(".")[0] or ROOT_UNIT


def param_owners(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> the unit (module path) that owns it; a tied parameter belongs to its
    first owner."""
    owners: dict[int, str] = {}
    for name, p in model.named_parameters():
        owners.setdefault(id(p), owner_of(name))
    return owners


class UnitAttribution:
    """Forward tracking, backward lookup by autograd sequence number, parameter ownership."""

    def __init__(
        self,
        model: torch.nn.Module,
        on_exit: Callable[[str], None] = lambda path: None,
        on_output: Callable[[str, int, Any], None] | None = None,
    ) -> None:
        self.tracker = UnitTracker(model, on_exit, on_output)
        self.param_units = param_owners(model)
        self.seq_start = sequence_nr()
        self.seq_units: dict[int, str] = {}

    def record_forward(self, unit: str) -> int | None:
        """Called by a forward op: the autograd node it created (if any) belongs to `unit`.
        Autograd makes the node before the op reaches a dispatch mode. Returns that node's
        sequence number, None if the op made no node."""
        seq = sequence_nr() - 1
        if seq >= self.seq_start and seq not in self.seq_units:
            self.seq_units[seq] = unit
            return seq
        return None

    def backward_unit(self) -> tuple[str, bool]:
        """(unit of the autograd node being executed, whether it is an AccumulateGrad)."""
        node = current_autograd_node()
        if node is None:
            return UNATTRIBUTED_UNIT, False
        unit = self.seq_units.get(node._sequence_nr())
        if unit is not None:
            return unit, False
        variable = getattr(node, "variable", None)  # AccumulateGrad holds its parameter
        if variable is not None:
            return self.param_units.get(id(variable), UNATTRIBUTED_UNIT), True
        # A node no captured op made: autograd rebuilds the history of a view written in place
        # (the GRU cell's `chunk(...)[2].mul_(gate)` on the CPU) with nodes of its own. It
        # belongs with what it reads: the unit of the first of its inputs' nodes that has one.
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            unit = self.seq_units.get(nxt._sequence_nr())
            if unit is None and getattr(nxt, "variable", None) is not None:
                unit = self.param_units.get(id(nxt.variable))
            if unit is not None:
                return unit, False
        return UNATTRIBUTED_UNIT, False


OpKey = tuple[str, int, str, int]
"""(unit, which call of the unit's module, aten op, which such op in that call)."""
OpDtypes = tuple[tuple[torch.dtype | None, ...], tuple[torch.dtype | None, ...]]
"""An op's tensor input dtypes (in `ops.tensor_leaves` order) and output dtypes in one run."""


class OpKeyer:
    """Names the value-making forward ops of one run so that the same op of another run of
    the same model gets the same name: the fp32 run and the low-precision run differ in casts
    (autocast's, the model's own `.float()`), which are no value-making ops, and in ops that
    dtype-dependent code adds (T5's fp16 clamp), which get names the other run lacks."""

    def __init__(self, tracker: UnitTracker) -> None:
        self.tracker = tracker
        self._counts: dict[tuple[str, int, str], int] = {}

    def key(self, unit: str, op: str) -> OpKey:
        call = self.tracker.call_stack[-1] if self.tracker.stack else 0
        head = (unit, call, op)
        n = self._counts.get(head, 0)
        self._counts[head] = n + 1
        return (unit, call, op, n)

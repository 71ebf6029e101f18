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

ROOT_UNIT = "<root>"
LOSS_UNIT = "<loss>"
UNATTRIBUTED_UNIT = "<backward>"


class UnitTracker:
    """Which unit is running: a stack of module paths kept by global module hooks."""

    def __init__(self, model: torch.nn.Module, on_exit: Callable[[str], None]) -> None:
        self.paths: dict[int, str] = {}
        self.kinds: dict[str, str] = {}
        for name, mod in model.named_modules(remove_duplicate=True):
            path = name or ROOT_UNIT
            self.paths[id(mod)] = path
            self.kinds[path] = type(mod).__name__
        self.stack: list[str] = []
        self.outside = ROOT_UNIT
        self._on_exit = on_exit
        self._handles: list[Any] = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else self.outside

    def _pre(self, mod: torch.nn.Module, args: Any) -> None:
        path = self.paths.get(id(mod))
        if path is not None:
            self.stack.append(path)

    def _post(self, mod: torch.nn.Module, args: Any, out: Any) -> None:
        path = self.paths.get(id(mod))
        if path is not None and self.stack and self.stack[-1] == path:
            self.stack.pop()
            self._on_exit(path)

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


class Policy:
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

    def __init__(self, model: torch.nn.Module, on_exit: Callable[[str], None] = lambda path: None) -> None:
        self.tracker = UnitTracker(model, on_exit)
        self.param_units = param_owners(model)
        self.seq_start = torch.autograd._get_sequence_nr()
        self.seq_units: dict[int, str] = {}

    def record_forward(self, unit: str) -> None:
        """Called by a forward op: the autograd node it created (if any) belongs to `unit`.
        Autograd makes the node before the op reaches a dispatch mode."""
        seq = torch.autograd._get_sequence_nr() - 1
        if seq >= self.seq_start and seq not in self.seq_units:
            self.seq_units[seq] = unit

    def node_unit(self, node: Any) -> str | None:
        return self.seq_units.get(node._sequence_nr())

    def backward_unit(self) -> tuple[str, bool]:
        """(unit of the autograd node being executed, whether it is an AccumulateGrad)."""
        node = torch._C._current_autograd_node()
        if node is None:
            return UNATTRIBUTED_UNIT, False
        unit = self.seq_units.get(node._sequence_nr())
        if unit is not None:
            return unit, False
        variable = getattr(node, "variable", None)  # AccumulateGrad holds its parameter
        if variable is not None:
            return self.param_units.get(id(variable), UNATTRIBUTED_UNIT), True
        return UNATTRIBUTED_UNIT, False

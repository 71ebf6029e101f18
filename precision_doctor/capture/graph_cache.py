"""Traced step graphs kept across analyses of the same model in one process, so that a second
analysis of the same step (the CLI's bf16 check after an fp16 analysis, a notebook analyzing
again) walks the graph without tracing the step again (`graph_driver`).

What a kept graph may stand for. A `StepGraph` reads the model's parameters and buffers and
the batch's tensors as constants, by object, and replays the ops and the branches the traced
run took. It is reused only where the next analysis would trace the same graph:

- the same model object (the cache is keyed by it, weakly: a model the user drops takes its
  graph with it, and nothing here keeps the model alive) and the same loss function object
  (weakly referenced too: a closure over the model must not keep it alive);
- the same `Fingerprint`: every module's path, class and train/eval mode; every parameter
  and buffer by object, shape, dtype, device, memory and `requires_grad`; the batch's
  structure, its tensors by object, shape, dtype, device and memory, its other leaves by
  value. A changed shape, weight dtype (`model.double().float()` moves the memory), a module
  swapped or put in eval mode, a new batch tensor or loss function: all miss and trace again.

Values are not in the key: the walk reads the live tensors, so new values (an optimizer step,
a batch written in place) are what it computes with. What a value can change beyond the
values (a branch the forward takes on them, a tensor a closure reads, Python state) is caught
where the walk's forward loss is not the traced one's, bit for bit: the engine drops the
graph then and traces again (`driver="graph"`) or takes the dispatch driver (`auto`). Not
version counters either: every analysis hands the buffers back by copying (a new version),
and so do the plan's verification and timing runs between an analysis and the bf16 check.

The low-precision side is not in the key: the graph is the fp32 step's, and the low dtype,
regime and autocast policy reach the walk through the capture (`graph_capture`), not the
graph. That is the reuse the product has: the bf16 check walks the fp16 analysis' graph.

What a kept graph holds beyond the model: its nodes and the tensors no op made (the batch,
the backward's seed; on the demo 505 nodes and 2 KiB), no activations.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from precision_doctor.capture.graph_driver import StepGraph
from precision_doctor.model.parallel import storage_ptr

# One entry of a fingerprint: a hashable description of one module, tensor or batch leaf.
Fingerprint = tuple[Any, ...]


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (id(t), tuple(t.shape), t.dtype, t.device, storage_ptr(t), t.requires_grad)


def fingerprint(model: torch.nn.Module, batch: Any) -> Fingerprint | None:
    """What a kept graph of `model`'s step on `batch` depends on beside values (see the module
    docstring); None where the batch has a leaf that cannot be compared (the step is then
    traced every time)."""
    modules = tuple((n, type(m), m.training) for n, m in model.named_modules(remove_duplicate=False))
    params = tuple((n, _tensor_key(p)) for n, p in model.named_parameters(remove_duplicate=False))
    buffers = tuple((n, _tensor_key(b)) for n, b in model.named_buffers(remove_duplicate=False))
    leaves, spec = pytree.tree_flatten(batch)
    batch_keys: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            batch_keys.append(_tensor_key(leaf))
        elif leaf is None or isinstance(leaf, (bool, int, float, str, bytes)):
            batch_keys.append((type(leaf), leaf))
        else:
            return None  # an object the step may read anything of
    return (modules, params, buffers, str(spec), tuple(batch_keys))


@dataclass(frozen=True)
class _Entry:
    step: StepGraph
    fingerprint: Fingerprint
    loss_fn: weakref.ref[Any] | None  # None: the output's own loss


class GraphCache:
    """At most one kept graph per live model: the last one traced (`keep`). `hits`, `misses`
    count `get`'s answers (what tests and benchmarks/overhead.py read)."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[torch.nn.Module, _Entry] = weakref.WeakKeyDictionary()
        self.hits = 0
        self.misses = 0

    def get(self, model: torch.nn.Module, loss_fn: Any, key: Fingerprint | None) -> StepGraph | None:
        """The graph kept for this model, loss function and fingerprint; None if none is."""
        step = self._match(model, loss_fn, key)
        if step is None:
            self.misses += 1
        else:
            self.hits += 1
        return step

    def has(self, model: torch.nn.Module, loss_fn: Any, key: Fingerprint | None) -> bool:
        """Whether `get` would find a graph (counts nothing)."""
        return self._match(model, loss_fn, key) is not None

    def _match(self, model: torch.nn.Module, loss_fn: Any, key: Fingerprint | None) -> StepGraph | None:
        entry = self._entries.get(model)
        if entry is None or key is None or entry.fingerprint != key:
            return None
        # A loss function that died is no match, not even for `loss_fn=None`.
        same = loss_fn is None if entry.loss_fn is None else loss_fn is not None and entry.loss_fn() is loss_fn
        return entry.step if same else None

    def keep(self, model: torch.nn.Module, loss_fn: Any, step: StepGraph, key: Fingerprint | None) -> None:
        """Keep `step` for the next analysis of `model` whose fingerprint is `key`. A loss function that cannot be weakly referenced (a builtin) is
        not kept, nor its graph: holding it could keep the model alive."""
        if key is None:
            self._entries.pop(model, None)
            return
        try:
            ref = weakref.ref(loss_fn) if loss_fn is not None else None
        except TypeError:
            self._entries.pop(model, None)
            return
        self._entries[model] = _Entry(step, key, ref)

    def drop(self, model: torch.nn.Module) -> None:
        self._entries.pop(model, None)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


GRAPHS = GraphCache()
"""The process' kept graphs (`analysis.engine` reads and fills it)."""

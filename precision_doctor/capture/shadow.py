"""Capture, driven by the real model's run: a TorchDispatchMode (`ShadowMode`) that sees
every aten op of forward and backward and hands it to the op pipeline (`pipeline.OpPipeline`),
saying which unit runs it (the innermost module, forward; through autograd's sequence numbers,
backward: a forward op records the number of the autograd node it created, and the backward
op reads the node being executed), and autograd hooks that summarize the gradients.

`ShadowCapture` is one pass's capture: the pipeline's records and units, plus the gradient
statistics, which autograd gives this driver node by node (`instrument_backward`). The
propagated error is the real low run's own (`lowrun.low_run`), compared module output by
module output (`OpPipeline.module_output`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from precision_doctor.capture.dispatch import dynamo_safe, faking
from precision_doctor.capture.local_shadow import POOL_SLOT
from precision_doctor.capture.memory import TRIM_AFTER_BYTES, layout_key, return_free_heap
from precision_doctor.capture.ops import WRAPPED_SCALAR_DTYPES, rearranges
from precision_doctor.capture.pipeline import ModelOpError, Op, OpPipeline, all_finite_job
from precision_doctor.capture.readback import Held, Job, Parallel
from precision_doctor.capture.statistics import SummaryBatch, TensorSummary, summarize
from precision_doctor.capture.units import LowUnits, OpDtypes, OpKey, UnitAttribution
from precision_doctor.errors import PrecisionDoctorInternalError
from precision_doctor.model.parallel import gathered_params, local_parts, memory_of, storage_ptr

# Names tests and callers reach through this module (`summarize`: patched to count summaries).
__all__ = ["LowUnits", "ShadowCapture", "ShadowMode", "SummaryBatch", "capture_pass", "configure_capture", "summarize"]

# Small gradients waiting in a batch before it is computed (values): bounds the batch's
# buffers and the gradients it keeps alive (256 KiB of fp32 each; at 1 << 18 the demo
# model's analysis peaked 4 MiB higher for 1 ms less).
_BATCH_PENDING_ELEMENTS = 1 << 16
# Per autograd node class, the attributes holding what it saved for backward.
_SAVED_ATTRS: dict[type, tuple[str, ...]] = {}


class ShadowMode(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
    """The driver: routes each op to `capture`'s pipeline with the unit running it. Use
    through `capture_pass`, which also tracks units."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps every mode's handler in `torch._dynamo.disable` unless this says no:
        # the wrapper's first call imports torch._dynamo (0.7 s of a 0.75 s first demo
        # analysis; a CLI run pays it every time) and each op pays the wrapper. Without
        # torch._dynamo imported nothing can be compiled, so nothing needs disabling; when it
        # is, `capture_pass` uses `dynamo_safe(ShadowMode)`, wrapped as torch would.
        return False

    def __init__(self, capture: ShadowCapture) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
        self.capture = capture

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        capture = self.capture
        if types and not capture.wrappers.isdisjoint(types):
            # A DTensor (or a functional collective's unwaited result): its own dispatch runs
            # the ops on this rank's local tensors, and the collectives, under this mode.
            return NotImplemented
        if capture.wrappers and faking():
            return func(*args, **(kwargs or {}))
        try:
            return self._route(func, args, kwargs or {})
        except ModelOpError as e:
            raise e.original from None  # the model's own op failed: the caller reports it
        except PrecisionDoctorInternalError:
            raise
        except Exception as e:
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            raise PrecisionDoctorInternalError(
                f"capture failed at op {func} ({phase}, unit {capture.tracker.current!r}, "
                f"low dtype {capture.low}): {type(e).__name__}: {e}"
            ) from e

    def _route(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        capture, attribution = self.capture, self.capture.attribution
        info = capture.classify(func)
        backward = torch._C._current_graph_task_id() != -1
        if info.communicates:
            running = attribution.backward_unit()[0] if backward else capture.tracker.current
            return capture.communicate(Op(func, info, args, kwargs, backward, running))
        if info.bookkeeping:
            return func(*args, **kwargs)
        if backward:
            return capture.run(Op(func, info, args, kwargs, True, attribution.backward_unit()[0]))
        unit = capture.tracker.current
        return capture.run(Op(func, info, args, kwargs, False, unit, attribution.record_forward(unit)))


class ShadowCapture(OpPipeline):
    """One pass's capture under `ShadowMode`: the pipeline's records and units, and the
    gradients' statistics, summarized as autograd hands each node its output gradients."""

    def __init__(
        self,
        attribution: UnitAttribution,
        low_dtype: torch.dtype,
        low_units: LowUnits,
        *,
        collect: bool,
        local: bool,
        on_mutation: Callable[[torch.Tensor], None],
        op_dtypes: Mapping[OpKey, OpDtypes] | None = None,
        default_low: bool = False,
    ) -> None:
        super().__init__(
            attribution,
            low_dtype,
            low_units,
            collect=collect,
            local=local,
            on_mutation=on_mutation,
            op_dtypes=op_dtypes,
            default_low=default_low,
        )
        # The largest |d loss / d term| of a 0-dim value the real run holds low (a loss term
        # reduced in fp16 inside forward): the loss scale times it reaches that term in the
        # low dtype, so it bounds the scale as an fp16 loss does (`Losses.low_term_grad_max_abs`).
        self.low_term_grad_max_abs = 0.0
        self._saved_storages: set[int] = set()
        # Backward graph, by node id: who consumes a node's output, and whether the gradient
        # that reached a hooked node was finite (for blaming the node that made an Inf/NaN).
        self._consumers: dict[int, list[Any]] = {}
        self._grad_finite: dict[int, bool] = {}
        self._accumulate_nodes: dict[int, Any] = {}
        # Gradient summaries by tensor (see _grad_summary): (data_ptr, dtype, shape, stride) ->
        # (weak reference to the tensor, its version, summary).
        self._grad_summaries: dict[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], int, TensorSummary]] = {}
        # Small gradients wait in a batch (see SummaryBatch); the autograd nodes that need
        # their summaries are finished, in the order they ran, by `settle()`.
        self._grad_batch = SummaryBatch(self.workspace, with_sumsq=True, readback=self.readback)
        # (node, unit, its gradients' summaries, [whether its 0-dim or fp32 gradients are finite])
        self._unfinished_grads: list[tuple[Any, str, list[TensorSummary], list[bool]]] = []

    def before_write(self, t: torch.Tensor) -> None:
        if self._grad_batch.reads(t):
            self._settle()  # the batch takes the gradient before this write (held, protected below)
        super().before_write(t)

    # --- activations saved for backward --------------------------------------------------
    def _count_saved(self, node: Any) -> None:
        """Charge the tensors `node` saved for backward to the unit that produced them (its
        dtype decides their size): the unit of the tensor's (or its base's) grad_fn, else,
        for tensors without one (masks, indices), the unit of the op that saved it. Each
        storage once; parameters, buffers and the batch are not activations. Read off the
        graph, so the run itself is untouched."""
        saver = self.seq_units.get(node._sequence_nr())
        attrs = _SAVED_ATTRS.get(type(node))
        if attrs is None:
            attrs = _SAVED_ATTRS[type(node)] = tuple(
                a for a in dir(node) if a.startswith("_saved_") and not a.startswith("_saved_raw")
            )
        saved: list[Any] = []
        for attr in attrs:
            try:
                saved.append(getattr(node, attr))
            except RuntimeError:  # already freed
                continue
        if isinstance(node, torch.autograd.function.BackwardCFunction):  # custom autograd.Function
            with contextlib.suppress(RuntimeError):
                saved.append(node.saved_tensors)
        for value in saved:
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if not isinstance(t, torch.Tensor) or (t.dim() == 0 and t.dtype in WRAPPED_SCALAR_DTYPES):
                    continue  # `x * 2.5` saves the Python number as a 0-dim double: not memory
                held = memory_of(t) if self.wrappers else t  # a DTensor's local shard
                ptr = held.untyped_storage().data_ptr()
                if not ptr or ptr in self._saved_storages or ptr in self.external_storages:
                    continue
                self._saved_storages.add(ptr)
                base = t._base if t._is_view() and t._base is not None else t
                maker = base.grad_fn
                unit = self.seq_units.get(maker._sequence_nr()) if maker is not None else saver
                if unit is not None:
                    self.unit(unit).saved_bytes += held.untyped_storage().nbytes()

    # --- gradients ---------------------------------------------------------------------
    def instrument_backward(self, loss: torch.Tensor) -> list[Any]:
        """Hook the autograd nodes that lead to `loss`: the gradient w.r.t. each forward
        op's output (what fp16 training would store; summed over its consumers) is
        summarized once, when it reaches the op's node, and attributed to the op's unit.
        Returns the hook handles.

        Rearranging nodes (view, transpose, cat, ...) are not hooked: their gradient holds
        the values their input's producer receives. Parameters' gradients are summarized
        once after backward. On GPT-2 this is one summary per gradient tensor instead of
        one per node input, and no pass over the 38.6M-element tied embedding gradient."""
        self.flush()  # the forward's statistics
        # Shadows are forward-only; those of activations saved for backward would otherwise
        # live as long as the activations (~half their memory again, in fp16).
        for store in self.shadows.stores.values():
            store.clear()
        self.workspace.release(POOL_SLOT)
        if sum(r.output_bytes for r in self.records) >= TRIM_AFTER_BYTES:
            return_free_heap()
        handles: list[Any] = []
        root = loss.grad_fn
        if root is None:
            return handles
        seen: set[int] = set()
        stack = [root]
        with _disable_current_modes():  # unpacking a saved tensor is no op of the model
            while stack:
                node = stack.pop()
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if self.collect:
                    self._count_saved(node)
                nexts = [n for n, _ in node.next_functions if n is not None]
                for n in nexts:
                    self._consumers.setdefault(id(n), []).append(node)
                variable = getattr(node, "variable", None)
                if variable is not None:
                    self._accumulate_nodes[id(variable)] = node
                elif node is root:
                    self._grad_finite[id(node)] = True  # the seed, d loss / d loss = 1: no gradient to judge
                elif not rearranges(node):
                    handles.append(node.register_prehook(self._gradient_hook(node)))
                stack.extend(nexts)
        return handles

    def _gradient_hook(self, node: Any) -> Callable[[Any], None]:
        def hook(grad_outputs: Any) -> None:
            seq = node._sequence_nr()
            unit = self.seq_units.get(seq)
            if unit is None:
                return  # made outside the captured forward
            floats = [g for g in grad_outputs if isinstance(g, torch.Tensor) and g.dtype == torch.float32 and g.numel()]
            counted = floats
            # DTensor gradients: this rank's shard, a replica on one rank only. A rank that
            # counts none of a gradient still records the node, empty, as the others do: the
            # job's statistics are combined node by node.
            aligned = False
            with _disable_current_modes():  # holding a gradient for the readback is no op of the model
                if self.wrappers:
                    aligned = any(g.dim() > 0 for g in floats)
                    floats, counted = local_parts(floats)
                if self.op_dtypes is not None and seq not in self._low_grad_seqs:
                    # The real run holds this gradient in fp32: nothing to judge against the low
                    # dtype, but its finiteness still decides which node made an Inf/NaN.
                    finite = [True]
                    if floats:
                        held = [self.readback.hold(g) for g in floats]
                        self.readback.submit(self._finite_job(held, finite, False))
                    self._unfinished_grads.append((node, unit, [], finite))
                    return
                # A 0-dim gradient is not summarized: it is the loss's own tail (d loss / d term = 1,
                # times the scale) - a model returning `recon + kl` from forward reduces in fp32
                # under autocast and GradScaler scales that fp32 loss; judged at 2^16 its 1.0 would
                # flag every such model. Its finiteness still counts for blaming an Inf/NaN.
                grads = [g for g in counted if g.dim() > 0]
                if not floats and not aligned:
                    return
                scalars = [self.readback.hold(g) for g in floats if g.dim() == 0]
                scalars_finite = [True]
                if scalars:
                    self.readback.submit(self._finite_job(scalars, scalars_finite, True))
                summaries = [self._grad_summary(g) for g in grads] or ([TensorSummary()] if aligned else [])
                self._unfinished_grads.append((node, unit, summaries, scalars_finite))
                self._settle_if_full()

        return hook

    def _finite_job(self, grads: list[Held], finite: list[bool], scalars: bool) -> Job[None]:
        """Whether `grads` are all finite (into `finite[0]`); for finite 0-dim gradients (the
        loss's own terms, `scalars`), the largest |value| too."""
        if scalars:
            values = yield tuple(g.t for g in grads)
            finite[0] = all(math.isfinite(v) for v in values)
            if finite[0]:
                for v in values:
                    self.low_term_grad_max_abs = max(self.low_term_grad_max_abs, abs(v))
        else:
            finite[0] = all((yield Parallel([all_finite_job(g.t) for g in grads])))

    def _finish_gradient(self, node: Any, unit: str, summaries: list[TensorSummary], scalars_finite: bool) -> None:
        """A node's gradient statistics, once read back: onto its unit; a non-finite one blamed."""
        finite = scalars_finite
        if summaries:
            summary = TensorSummary()
            for s in summaries:
                summary.merge(s)
            urec = self.unit(unit)
            urec.backward.merge(summary)
            urec.grad_nodes.append((node.name(), summary))
            finite = finite and not summary.nonfinite_count
        self._grad_finite[id(node)] = finite
        if not finite:
            self._blame_nonfinite(node)

    def _grad_summary(self, g: torch.Tensor) -> TensorSummary:
        """The summary of one gradient tensor, computed once. Autograd hands the same tensor
        on without a copy where a backward formula is the identity (an add passes its
        gradient to both inputs): on GPT-2, 33M of the 175M gradient values that reach the
        hooks are tensors already summarized. A cached summary is reused only while the tensor
        it was computed from is alive (so the memory cannot hold another tensor) and
        unchanged since (its version counter)."""
        key = layout_key(g)
        hit = self._grad_summaries.get(key)
        if hit is not None:
            ref, version, cached = hit
            if ref() is not None and version == g._version:
                return cached
        summary = self._grad_batch.add(g)
        self._grad_summaries[key] = (weakref.ref(g), g._version, summary)
        return summary

    def _blame_nonfinite(self, node: Any) -> None:
        """A non-finite gradient reached `node`: the consumer node (through rearranging ones)
        whose own incoming gradient was finite made it in fp32."""
        stack, seen = list(self._consumers.get(id(node), [])), set()
        while stack:
            c = stack.pop()
            if id(c) in seen:
                continue
            seen.add(id(c))
            if id(c) not in self._grad_finite:  # not hooked (rearranging): look past it
                stack.extend(self._consumers.get(id(c), []))
            elif self._grad_finite[id(c)]:
                unit = self.seq_units.get(c._sequence_nr())
                if unit is not None and self.unit(unit).grad_nonfinite_root is None:
                    self.unit(unit).grad_nonfinite_root = c.name()
                return

    def param_grad_nonfinite(self, param: torch.Tensor) -> None:
        """Called for a parameter whose fp32 gradient is not finite, after backward."""
        node = self._accumulate_nodes.get(id(param))
        if node is not None:
            self._blame_nonfinite(node)

    def forget_graph(self) -> None:
        self._grad_summaries.clear()
        self._consumers.clear()
        self._grad_finite.clear()
        self._accumulate_nodes.clear()

    def _settle_if_full(self) -> None:
        if self._grad_batch.pending_elements >= _BATCH_PENDING_ELEMENTS:
            self._settle()
            if self.readback.over_budget:
                self.flush()

    def _settle(self) -> None:
        """Queue the pending batch, then the gradient nodes waiting on it, to be finished in
        the order they ran (blaming a non-finite gradient reads what its consumers got)."""
        with _disable_current_modes():
            self._grad_batch.compute()
        grads, self._unfinished_grads = self._unfinished_grads, []

        def finish() -> None:
            for node, unit, summaries, finite in grads:
                self._finish_gradient(node, unit, summaries, finite[0])

        self.readback.then(finish)

    def settle(self) -> None:
        """Summarize the gradients still waiting and read back everything pending: the end of
        backward."""
        self._settle()
        self.flush()


@contextlib.contextmanager
def capture_pass(
    model: torch.nn.Module,
    low_dtype: torch.dtype,
    low_units: LowUnits,
    *,
    collect: bool = True,
    local: bool = True,
    on_mutation: Callable[[torch.Tensor], None] = lambda t: None,
    op_dtypes: Mapping[OpKey, OpDtypes] | None = None,
    module_outputs: dict[tuple[str, int], list[torch.Tensor]] | None = None,
    default_low: bool = False,
) -> Iterator[ShadowCapture]:
    """Unit tracking plus the shadow mode; both removed on exit, whatever happened.

    With the real low-precision run's `op_dtypes` and `module_outputs` (see
    `lowrun.low_run`), the shadows hold values low exactly where that run does, and each
    module's outputs in the global shadow are that run's own (dtype-dependent code included)."""
    capture: ShadowCapture | None = None
    attribution = UnitAttribution(
        model,
        on_exit=lambda path: capture.unit_exited(path) if capture else None,
        on_output=(lambda path, call, out: capture.module_output(path, call, out) if capture else None)
        if module_outputs is not None
        else None,
    )
    capture = ShadowCapture(
        attribution,
        low_dtype,
        low_units,
        collect=collect,
        local=local,
        on_mutation=on_mutation,
        op_dtypes=op_dtypes,
        default_low=default_low,
    )
    capture.module_outputs = module_outputs or {}
    configure_capture(capture, model, attribution)
    try:
        with attribution.tracker, dynamo_safe(ShadowMode)(capture):
            yield capture
            capture.flush()  # whatever is still pending, before the records are read
    finally:
        # The tracker's hooks reach the capture through this cell, and the capture holds the
        # tracker: a cycle that kept every record, summary and held tensor of the pass alive
        # until the collector's next full pass (after the analysis: the heap is frozen in it).
        capture = None


def batch_storages(batch: Any) -> set[int]:
    """The memory the batch's tensors hold: no op of the step makes it (`external_storages`)."""
    return {storage_ptr(t) for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)}


def configure_capture(capture: ShadowCapture, model: torch.nn.Module, attribution: UnitAttribution) -> None:
    """What a capture knows of the model before its step runs, whichever driver runs it: the
    model's constants, the memory no op makes, and who owns each parameter's memory."""
    # Constants of the model: its buffers and plain tensor attributes (a mask kept as one).
    capture.masks.constant_ids = {id(b) for b in model.buffers()} | {
        id(v)
        for m in model.modules()
        for v in vars(m).values()
        if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)
    }
    capture.external_storages = {storage_ptr(t) for t in (*model.parameters(), *model.buffers())}
    for p, owner in ((p, attribution.param_units.get(id(p))) for p in model.parameters()):
        if owner is not None:
            capture.param_storage_units.setdefault(storage_ptr(p), owner)
    # FSDP2's gathered parameters (made by an earlier forward) get their gradients as the
    # registered ones would: owned by the same unit.
    for unsharded, sharded in gathered_params(model):
        if (owner := attribution.param_units.get(id(sharded))) is not None:
            attribution.param_units.setdefault(id(unsharded), owner)

"""Capture: run the real model under a TorchDispatchMode that sees every aten op of forward
and backward, attributes it to a unit (the innermost module that ran it), records the
dataflow graph, and computes low-precision *shadows* beside the fp32 values.

A *local* shadow rides along each forward op of the fp32 run: it restarts at each unit from
the fp32 run's inputs, rounded where the real low-precision run holds them low, and gives the
unit's own error, so downstream units are not blamed for inherited damage. The propagated
error is the real low run's own (`lowrun.low_run`), compared module output by module output
(`module_output`). Shadows held low are stored in the low dtype itself (their values are
representable), which halves what they cost in memory.

Backward ops are attributed through autograd's sequence numbers: a forward op records the
number of the autograd node it created, and the backward op reads the node being executed.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from precision_doctor.capture.dispatch import dynamo_safe, faking
from precision_doctor.capture.masks import MaskTracker
from precision_doctor.capture.memory import (
    TRIM_AFTER_FORWARD_BYTES,
    WeakIdMap,
    dense,
    layout_key,
    return_free_heap,
)
from precision_doctor.capture.ops import (
    COMM_HANDLE_OPS,
    NO_SHADOW_OPS,
    SELECT_OPS,
    UNINITIALIZED_OPS,
    WRAPPED_SCALAR_DTYPES,
    OpInfo,
    aten,
    dtype_name,
    fills_nonfinite,
    map_args,
    moved_bytes,
    nbytes,
    op_flops,
    op_info,
    out_overload,
    outputs_of,
    rearranges,
    tensor_leaves,
)
from precision_doctor.capture.records import OpRecord, UnitRecord, value_sources
from precision_doctor.capture.statistics import (
    ErrorAccumulator,
    SummaryBatch,
    TensorSummary,
    Workspace,
    summarize,
    summarize_unmasked,
)
from precision_doctor.capture.units import (
    UNATTRIBUTED_UNIT,
    OpDtypes,
    OpKey,
    OpKeyer,
    Policy,
    UnitAttribution,
)
from precision_doctor.errors import PrecisionDoctorInternalError
from precision_doctor.formats import BF16, FP16
from precision_doctor.model.parallel import (
    gathered_params,
    local_parts,
    local_tensor,
    memory_of,
    storage_ptr,
    waited,
    wrapper_types,
)
from precision_doctor.options import Phase

# Transient fp32 tensors at least this large (16 MiB) - upcast shadow inputs, shadow results
# that are only rounded - go to reused buffers (see _pooled_like).
POOLED_ELEMENTS = 1 << 22
# Workspace slots of those buffers, released together before backward.
POOL_SLOT = "pooled"
# Small gradients waiting in a batch before it is computed (values): bounds the batch's
# buffers and the gradients it keeps alive (256 KiB of fp32 each; at 1 << 18 the demo
# model's analysis peaked 4 MiB higher for 1 ms less).
_BATCH_PENDING_ELEMENTS = 1 << 16
# Per autograd node class, the attributes holding what it saved for backward.
_SAVED_ATTRS: dict[type, tuple[str, ...]] = {}


def _all_finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no Inf/NaN, from one fp32-accumulated sum (Inf and NaN carry into
    it): a reduction, where `isfinite(t).all()` writes a mask as large as `t` first. A sum of
    finite values beyond fp32's range (~3e38) would read as non-finite: no gradient or
    activation here comes near it."""
    return bool(torch.isfinite(torch.sum(t, dtype=torch.float32)))


def _has_nonfinite(t: torch.Tensor) -> bool:
    """Exact, in one fp32 sum where `t` is finite; where that sum is not (an Inf, a NaN, or
    -1e38 sentinels adding up past fp32's max), in an fp64 one, which no fp32 values overflow."""
    return not _all_finite(t) and not math.isfinite(float(torch.sum(t, dtype=torch.float64)))


def _out_of_range(s: TensorSummary) -> bool:
    """Whether a summary holds values a low format cannot (what mask values can explain)."""
    return bool(s.nonfinite_count) or any(t.overflow or t.flushed for t in s.tails.values())


def _any(low: bool | Sequence[bool]) -> bool:
    return low if isinstance(low, bool) else any(low)


class _ModelOpError(Exception):
    """Carries an exception raised by the model's own op out of our handler untouched."""

    def __init__(self, original: Exception) -> None:
        super().__init__(str(original))
        self.original = original


class ShadowCapture(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
    """The analysis mode. Use through `capture_pass`, which also tracks units."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps every mode's handler in `torch._dynamo.disable` unless this says no:
        # the wrapper's first call imports torch._dynamo (0.7 s of a 0.75 s first demo
        # analysis; a CLI run pays it every time) and each op pays the wrapper. Without
        # torch._dynamo imported nothing can be compiled, so nothing needs disabling; when it
        # is, `capture_pass` uses `dynamo_safe(ShadowCapture)`, wrapped as torch would.
        return False

    def __init__(
        self,
        attribution: UnitAttribution,
        low_dtype: torch.dtype,
        policy: Policy,
        *,
        collect: bool,
        local: bool,
        on_mutation: Callable[[torch.Tensor], None],
        op_dtypes: Mapping[OpKey, OpDtypes] | None = None,
        default_low: bool = False,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
        self.attribution = attribution
        self.tracker = attribution.tracker
        self.low = low_dtype
        self.low_format = FP16 if low_dtype == torch.float16 else BF16
        self.policy = policy
        self.collect = collect
        self.local = local
        self.on_mutation = on_mutation
        self.records: list[OpRecord] = []
        self.units: dict[str, UnitRecord] = {}
        self.op_count = 0
        self.seq_units = attribution.seq_units
        # The real low-precision run's dtypes, op by op (see lowrun.low_run): each shadow
        # rounds an input or output to the low dtype only where that run holds it there. None:
        # every op of a low unit rounds (the policy's units, as plan verification ran them).
        self.op_dtypes = op_dtypes
        self.keyer = OpKeyer(attribution.tracker)
        # Whether a tensor no op made (a parameter, the batch) is low in the real run: in the
        # pure regime it is; under autocast it is fp32 and each op casts it.
        self.default_low = default_low
        # Autograd nodes (by sequence number) whose output gradient the real run holds in the
        # low dtype: the node's forward op made a low output, or a consumer cast it low.
        self._low_grad_seqs: set[int] = set()
        self._op_seq: dict[int, int] = {}  # op record index -> sequence number of its node
        self._read_low: dict[bool, list[bool]] = {True: [], False: []}
        self.low_reads: set[int] = set()  # ids of tensors no op made that an op reads low
        # The largest |d loss / d term| of a 0-dim value the real run holds low (a loss term
        # reduced in fp16 inside forward): the loss scale times it reaches that term in the
        # low dtype, so it bounds the scale as an fp16 loss does (`Losses.low_term_grad_max_abs`).
        self.low_term_grad_max_abs = 0.0
        # View or copy record index -> ids of the tensors no op made whose values it passes on
        # (a Linear's `t(weight)`): an op reading it low reads the parameter low.
        self._passed_leaves: dict[int, tuple[int, ...]] = {}
        self.module_outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.module_errors: dict[str, ErrorAccumulator] = {}  # unit -> its module outputs' error
        self._value_errors: WeakIdMap = WeakIdMap()  # fp32 module output -> (its version, its error)
        self._producer: WeakIdMap = WeakIdMap()
        self._locals: dict[str, WeakIdMap] = {}
        # Rounded copies of tensors without a shadow (parameters, the batch), shared by the
        # global and local shadow of one op only: a cache across ops would keep an fp16 copy
        # of every parameter alive (250 MiB on GPT-2 small) for a conversion that is cheap.
        self._op_rounded: dict[int, torch.Tensor] = {}
        self._op_upcast: dict[tuple[Any, ...], torch.Tensor] = {}
        self.failed_at: str | None = None
        self._wrappers = wrapper_types()
        # Which unit a collective's buffers belong to (see _communicate), and the owners of
        # the parameters' memory (a DTensor's local shard: what FSDP2 gathers from).
        self._comm_units: WeakIdMap = WeakIdMap()
        self._communicated = False
        self.param_storage_units: dict[int, str] = {}
        self.workspace = Workspace()
        self.masks = MaskTracker()  # values meant to be masked, from the dataflow
        self.external_storages: set[int] = set()  # parameters', buffers' and the batch's memory
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
        self._grad_batch = SummaryBatch(self.workspace, with_sumsq=True)
        self._unfinished_grads: list[tuple[Any, str, list[TensorSummary], bool]] = []

    # --- units -------------------------------------------------------------------------
    def unit(self, name: str) -> UnitRecord:
        rec = self.units.get(name)
        if rec is None:
            rec = UnitRecord(name=name, kind=self.tracker.kinds.get(name, name))
            self.units[name] = rec
        return rec

    def module_output(self, path: str, call: int, out: Any) -> None:
        """A module call returned: its outputs' propagated error is that of the real
        low-precision run's outputs of the same call (which dtype-dependent code - T5's fp16
        clamp - shaped), kept per module and per output value (what `unit_outputs` reads for
        the values other units read; a parent handing on its child's output reuses it). An
        output another unit made is also something the module reads: the root returning the
        head's logits hands on the head's error (`UnitRecord.handed_on_error`), it did not
        make it."""
        low = self.module_outputs.pop((path, call), None)
        if low is None:
            return
        refs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if len(refs) != len(low):
            return
        with _disable_current_modes():
            if self._wrappers:  # DTensor outputs (tensor parallel): this rank's local values
                refs = [local_tensor(waited(t)) for t in refs]
                low = [local_tensor(waited(t)) for t in low]
            acc = self.module_errors.setdefault(path, ErrorAccumulator())
            for ref, sh in zip(refs, low, strict=True):
                if ref.dtype != torch.float32 or sh.shape != ref.shape or not ref.numel():
                    continue
                if sh.dtype not in (torch.float32, self.low):
                    continue
                made = self._producer.get(ref)
                sources = value_sources(self.records, made[0], made[1]) if made is not None else ()
                cached = self._value_errors.get(ref)
                # A parent handing on its child's output reuses its error; a module that wrote
                # the tensor in place since (`x.sub_(c)`, ReLU(inplace=True)) gets its own.
                one = cached[1] if cached is not None and cached[0] == ref._version else None
                if one is None:
                    # Mask values (-1e38 turns into -inf in fp16, which masks as well) are no error.
                    masked = self.masks.positions(ref, self.records[made[0]] if made is not None else None)
                    one = ErrorAccumulator()
                    one.add(ref.detach(), sh, None, self.workspace, masked=masked)
                    self._value_errors[ref] = (ref._version, one)
                    for v, k in sources:
                        local_k = self.records[v].output_errors.get(k, (None, None))[0]
                        self.records[v].output_errors[k] = (local_k, one)
                acc.merge(one)
                # (A container with no op of its own is no unit: nothing to record.)
                urec = self.units.get(path)
                if urec is not None and not any(self.records[v].unit == path for v, _ in sources):
                    urec.handed_on_error = max(urec.handed_on_error, one.rel_l2)

    def unit_exited(self, path: str) -> None:
        local = self._locals.get(path)
        if local is not None:
            local.clear()

    # --- shadows -----------------------------------------------------------------------
    def _round(self, t: torch.Tensor) -> torch.Tensor:
        r = self._op_rounded.get(id(t))
        if r is None:
            r = t.detach().to(self.low)
            self._op_rounded[id(t)] = r
        return r

    def _upcast(self, s: torch.Tensor, *, shareable: bool) -> torch.Tensor:
        """`s.float()`, shared by the global and local shadow of one op when both read the
        same low-precision values (a parameter, a view of one): on GPT-2 the tied 38.6M
        embedding is upcast once instead of twice for the logits matmul. Not for ops that
        write their inputs, which would change the other shadow's input."""
        if not shareable:
            return s.float()
        key = layout_key(s)
        up = self._op_upcast.get(key)
        if up is None:
            pooled = self._pooled_like(s, f"{POOL_SLOT}.upcast{len(self._op_upcast)}")
            up = pooled.copy_(s) if pooled is not None else s.float()
            self._op_upcast[key] = up
        return up

    def _pooled_like(self, t: torch.Tensor, slot: str) -> torch.Tensor | None:
        """An fp32 tensor with `t`'s shape and strides in a buffer reused from op to op, for
        a large dense `t`; None otherwise. Large fresh CPU tensors are fresh mmaps whose
        pages fault in on first touch, ~5x the cost of a conversion into them; the buffers
        are released before backward, where they would only add to the peak."""
        if t.numel() < POOLED_ELEMENTS or not dense(t):
            return None
        buf = self.workspace.get(slot, t.numel(), torch.float32, t.device)
        return torch.as_strided(buf, t.shape, t.stride())

    def _shadow_input(self, t: torch.Tensor, store: WeakIdMap | None, low: bool, cast: bool) -> torch.Tensor:
        """The shadow value standing for fp32 tensor `t` (possibly stored in the low dtype).
        `low`: what a tensor without a shadow is; `cast`: the op reads it in the low dtype
        even where the run holds it in fp32 (autocast's cast of a low-precision op's input)."""
        if t.dtype != torch.float32:
            return t
        s: torch.Tensor | None = store.get(t) if store is not None else None
        if s is None:
            return self._round(t) if low else t.detach()
        if cast and s.dtype == torch.float32:
            return self._round(s)
        return s

    def _run_shadow(
        self,
        func: Any,
        info: OpInfo,
        args: Any,
        kwargs: Mapping[str, Any],
        store: WeakIdMap | None,
        low: bool,
        wanted: Sequence[bool | None] | None = None,
        held: Sequence[bool | None] | None = None,
    ) -> tuple[Any, Any]:
        """The shadow (args, kwargs) for one op, taken before the fp32 op can mutate anything.
        `wanted[i]`: whether this op reads tensor input i (in `tensor_leaves` order) low in the
        real run (None: as stored); `held[i]`: whether the run holds it low where this store
        has no shadow of it (None: `low`)."""
        position = iter(range(1 << 30))
        # Type promotion over what the op reads: dimensioned inputs decide, 0-dim ones only
        # when there are none (a wrapped Python number never makes fp16 fp32).
        self._read_low = {True: [], False: []}

        def pick(t: torch.Tensor) -> torch.Tensor:
            i = next(position)
            want = wanted[i] if wanted is not None and i < len(wanted) else None
            if want is None:
                kept = held[i] if held is not None and i < len(held) else None
                s = self._shadow_input(t, store, low if kept is None else kept, False)
            else:
                s = self._shadow_input(t, store, want, want)
            if t.is_floating_point():
                self._read_low[t.dim() > 0].append(s.dtype == self.low)
            if not info.preserves_values and s.dtype != t.dtype and t.dtype == torch.float32:
                s = self._upcast(s, shareable=not (info.mutates or info.writes_kwargs))
            return s

        sargs, skwargs = map_args(args, kwargs, pick)
        for name in info.writes_kwargs:  # never write the fp32 tensor from a shadow (`out=`)
            t, st = kwargs.get(name), skwargs.get(name)
            if isinstance(t, torch.Tensor) and isinstance(st, torch.Tensor) and (
                st.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            ):
                skwargs[name] = st.clone()
        if info.mutates:
            sargs = list(sargs)
            for i in info.mutates:
                if i < len(sargs) and isinstance(sargs[i], torch.Tensor) and (
                    sargs[i].untyped_storage().data_ptr() == args[i].untyped_storage().data_ptr()
                ):
                    sargs[i] = sargs[i].clone()  # never mutate the fp32 tensor twice
            sargs = tuple(sargs)
        return sargs, skwargs

    def _note_low_reads(
        self, tensors: list[torch.Tensor], producers: list[Any], wanted: Sequence[bool | None] | None, low: bool
    ) -> None:
        """Tensors this op reads in the low dtype (autocast's cast of an fp32 input): their
        gradient from this op is low in the real run too - the node that made them gets its
        gradient judged, a parameter or input is recorded in `low_reads`."""
        for i, t in enumerate(tensors):
            if not t.is_floating_point():
                continue
            want = wanted[i] if wanted is not None and i < len(wanted) else None
            p = producers[i]
            if want is None and p is not None:
                want = self.records[p[0]].stored_low
            if not (low if want is None else want):
                continue
            # The node that made it gets its gradient low: autograd has wrapped the input by
            # now (a custom Function's node, made after its forward ran, included).
            for node in (t.grad_fn, t._base.grad_fn if t._is_view() and t._base is not None else None):
                if node is not None:
                    self._low_grad_seqs.add(node._sequence_nr())
            if p is None:
                self.low_reads.add(id(t))
            else:  # through views and copies, to the ops that made the values
                for op, _ in value_sources(self.records, p[0], p[1]):
                    if (seq := self._op_seq.get(op)) is not None:
                        self._low_grad_seqs.add(seq)
                # ... and to the parameter a view of it passes on: autocast casts the weight
                # of `mm(x, t(weight))`, so the weight's gradient is first held low.
                self.low_reads.update(self._passed_leaves.get(p[0], ()))

    @staticmethod
    def _exact_inputs(
        tensors: list[torch.Tensor],
        store: WeakIdMap,
        wanted: Sequence[bool | None] | None,
        held: Sequence[bool | None] | None,
    ) -> bool:
        """Whether every float input of an op reads, in `store`'s shadow, exactly the fp32
        run's values: no shadow of it there, not held low, not cast low by this op."""
        for i, t in enumerate(tensors):
            if t.dtype != torch.float32:
                continue
            if t in store or (wanted is not None and i < len(wanted) and wanted[i]):
                return False
            if held is not None and i < len(held) and held[i]:
                return False
        return True

    def _promotes_low(self, picked: bool, low: bool) -> bool:
        """Whether an op without a counterpart in the real run (it runs in its inputs' dtype)
        makes a low output: all the inputs that decide promotion are low."""
        if not picked:
            return low
        reads = self._read_low[True] or self._read_low[False]
        return bool(reads) and all(reads)

    def _store_shadow(
        self, info: OpInfo, args: Any, out: Any, sout: Any, store: WeakIdMap, low: bool | Sequence[bool]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Map each fp32 output to its shadow, rounded where `low` (per output) says the real
        run holds it in the low dtype; returns the (ref, shadow) pairs for error."""
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        refs = outputs_of(out)
        shadows = outputs_of(sout)
        for k, (ref, sh) in enumerate(zip(refs, shadows, strict=False)):
            if ref.dtype != torch.float32 or sh.dtype not in (torch.float32, self.low):
                continue
            low_k = low if isinstance(low, bool) else (k < len(low) and low[k])
            if low_k and sh.dtype == torch.float32 and not info.preserves_values:
                sh = sh.to(self.low)
            elif sh.dtype == torch.float32 and not info.preserves_values and self.workspace.owns(sh):
                sh = sh.clone()  # an op that handed back its pooled input
            existing = store.get(ref)
            if existing is not None and existing is not sh and info.mutates:
                existing.copy_(sh)  # write through views of a mutated shadow
                sh = existing
            store[ref] = sh
            pairs.append((ref, sh))
        return pairs

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
                held = memory_of(t) if self._wrappers else t  # a DTensor's local shard
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
        # Shadows are forward-only; those of activations saved for backward would otherwise
        # live as long as the activations (~half their memory again, in fp16).
        for store in self._locals.values():
            store.clear()
        self.workspace.release(POOL_SLOT)
        if sum(r.output_bytes for r in self.records) >= TRIM_AFTER_FORWARD_BYTES:
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
            if self._wrappers:
                aligned = any(g.dim() > 0 for g in floats)
                with _disable_current_modes():
                    floats, counted = local_parts(floats)
            if self.op_dtypes is not None and seq not in self._low_grad_seqs:
                # The real run holds this gradient in fp32: nothing to judge against the low
                # dtype, but its finiteness still decides which node made an Inf/NaN.
                with _disable_current_modes():
                    finite = all(_all_finite(g) for g in floats)
                self._unfinished_grads.append((node, unit, [], finite))
                return
            # A 0-dim gradient is not summarized: it is the loss's own tail (d loss / d term = 1,
            # times the scale) - a model returning `recon + kl` from forward reduces in fp32
            # under autocast and GradScaler scales that fp32 loss; judged at 2^16 its 1.0 would
            # flag every such model. Its finiteness still counts for blaming an Inf/NaN.
            grads = [g for g in counted if g.dim() > 0]
            if not floats and not aligned:
                return
            with _disable_current_modes():
                scalars_finite = all(bool(torch.isfinite(g)) for g in floats if g.dim() == 0)
                if scalars_finite:
                    for g in floats:
                        if g.dim() == 0:
                            self.low_term_grad_max_abs = max(self.low_term_grad_max_abs, abs(float(g)))
                summaries = [self._grad_summary(g) for g in grads] or ([TensorSummary()] if aligned else [])
                self._unfinished_grads.append((node, unit, summaries, scalars_finite))
                self._settle_if_full()

        return hook

    def _finish_gradient(self, node: Any, unit: str, summaries: list[TensorSummary], scalars_finite: bool) -> None:
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

    # --- the op handler ----------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if types and not self._wrappers.isdisjoint(types):
            # A DTensor (or a functional collective's unwaited result): its own dispatch runs
            # the ops on this rank's local tensors, and the collectives, under this mode.
            return NotImplemented
        if self._wrappers and faking():
            return func(*args, **(kwargs or {}))
        try:
            return self._dispatch(func, args, kwargs or {})
        except _ModelOpError as e:
            raise e.original from None  # the model's own op failed: the caller reports it
        except PrecisionDoctorInternalError:
            raise
        except Exception as e:
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            raise PrecisionDoctorInternalError(
                f"capture failed at op {func} ({phase}, unit {self.tracker.current!r}, "
                f"low dtype {self.low}): {type(e).__name__}: {e}"
            ) from e

    def _dispatch(self, func: Any, args: Any, kwargs: Any) -> Any:
        info = op_info(func)
        self.op_count += 1
        backward = torch._C._current_graph_task_id() != -1
        if info.communicates:
            return self._communicate(func, info, args, kwargs, backward)
        if info.bookkeeping:
            return func(*args, **kwargs)
        comm_buffer: str | None = None
        new_seq: int | None = None
        if backward:
            unit = self.attribution.backward_unit()[0]
            if unit == UNATTRIBUTED_UNIT and self._communicated:
                # Outside any autograd node (FSDP2's last reduce-scatter, in autograd's final
                # callback): the buffer ops of a collective belong to its unit.
                comm_buffer = self._comm_unit(tensor_leaves(args, kwargs))
                if comm_buffer is not None:
                    unit = comm_buffer
        else:
            unit = self.tracker.current
            new_seq = self.attribution.record_forward(unit)
        unit_low = self.policy.is_low(unit)
        # What the real low-precision run holds low around this op: per tensor input and per
        # output (None: the op has no counterpart there, so it runs in its inputs' dtype).
        wanted_in: Sequence[bool | None] | None = None
        wanted_out: Sequence[bool] | None = None
        low_dtypes: tuple[str, ...] | None = None
        low: bool = unit_low
        if self.op_dtypes is not None:
            low = self.default_low
            if not backward and not info.preserves_values:
                found = self.op_dtypes.get(self.keyer.key(unit, info.name))
                if found is not None:
                    wanted_in = [d == self.low if d is not None else None for d in found[0]]
                    wanted_out = [d == self.low for d in found[1]]
                    low_dtypes = tuple(dtype_name(d) for d in found[1] if d is not None)

        written: list[Any] = []  # most ops write nothing: no list work for them
        if info.mutates or info.writes_kwargs:
            written = [args[i] for i in info.mutates if i < len(args)] + [kwargs.get(n) for n in info.writes_kwargs]
        for t in written:
            if isinstance(t, torch.Tensor):
                self.on_mutation(t)  # `out=` too: `torch.mul(w, 0.5, out=w)` writes a parameter
                if self._grad_batch.reads(t):
                    self.settle()  # the batch must read the gradient before this write

        tensors_in = tensor_leaves(args, kwargs)
        # Whether the real run holds each input low, as far as the op that made it knows: a
        # shadow that restarts here (a unit's local one) starts from the values it holds.
        held_in: list[bool | None] | None = None
        if self.op_dtypes is not None and self.collect and not backward:
            held_in = []
            for t in tensors_in:
                made = self._producer.get(t)
                held_in.append(self.records[made[0]].stored_low if made is not None else None)
        shadows = not backward and func not in NO_SHADOW_OPS and func not in UNINITIALIZED_OPS and not info.restrides
        if shadows:
            shadows = not info.random and any(t.dtype == torch.float32 for t in tensors_in)
        local_store: WeakIdMap | None = None
        # A lookup into a table no op produced (an embedding of its weight): the shadows are
        # the fp32 rows rounded, without rounding and upcasting the whole table.
        rounded_rows = False
        if shadows:
            if self.local and unit_low:
                local_store = self._locals.get(unit)
                if local_store is None:
                    local_store = self._locals[unit] = WeakIdMap()
                if wanted_out is not None and not any(wanted_out) and self._exact_inputs(
                    tensors_in, local_store, wanted_in, held_in
                ):
                    # An fp32 op of the real run on values it holds exactly (autocast's layer
                    # norm of the fp32 residual stream): its local shadow would be its own
                    # fp32 result, with error 0; consumers read the fp32 values instead.
                    local_store = None
            if (low or self.op_dtypes is not None) and func in SELECT_OPS:
                rounded_rows = local_store is not None and all(
                    t not in local_store for t in tensors_in if t.dtype == torch.float32
                )
            # A view or copy of tensors without a shadow in a store (a parameter's `t()`)
            # needs no entry there either: a consumer rounds the fp32 view itself, the same
            # values. Skipping it (every Linear's weight) took the demo's forward from 15.6
            # to 14.9 ms.
            if (
                info.preserves_values and not info.mutates and local_store is not None
                and not any(t in local_store for t in tensors_in if t.dtype == torch.float32)
            ):
                local_store = None
            if not rounded_rows and local_store is not None:
                local_low = low if self.op_dtypes is not None else True
                largs = self._run_shadow(func, info, args, kwargs, local_store, local_low, wanted_in, held_in)
            self._op_rounded.clear()
            self._op_upcast.clear()

        try:
            out = func(*args, **kwargs)
        except Exception as e:
            self.failed_at = f"{info.name} in unit {unit!r} ({'backward' if backward else 'forward'})"
            raise _ModelOpError(e) from e

        outs = outputs_of(out)
        if comm_buffer is not None:
            self._note_comm_buffers(outs, comm_buffer)
        if info.restrides and not backward:
            for store in self._locals.values():
                shadow = store.get(args[0])
                if shadow is not None:
                    func(shadow, *args[1:], **kwargs)
        if info.random:
            # Consumers of random values round the fp32 ones: a second draw would compare
            # two different samples.
            for t in [*outs, *(args[i] for i in info.mutates)]:
                for store in self._locals.values():
                    store.pop(t, None)

        lpairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Which outputs the real run holds low: as recorded there; else the policy's unit
        # (no low run), else the dtype its inputs promote to (low only if all were low).
        out_low: bool | Sequence[bool]
        local_out_low: bool | Sequence[bool]
        if wanted_out is not None:
            out_low = local_out_low = wanted_out
        elif self.op_dtypes is None:
            out_low, local_out_low = low, True
        else:
            picked = not rounded_rows and local_store is not None
            out_low = local_out_low = shadows and self._promotes_low(picked, low)
        if shadows and local_store is not None:
            sout = out.detach() if rounded_rows else self._call_shadow(
                func, info, largs, out, stored_low=_any(local_out_low)
            )
            lpairs = self._store_shadow(info, args, out, sout, local_store, local_out_low)

        if not self.collect:
            return out

        producers = [self._producer.get(t) for t in tensors_in]
        rec = self._new_record(
            info, unit, backward, producers, outs,
            flops=op_flops(info, args, kwargs, out), moved=moved_bytes(func, info, tensors_in, outs),
        )
        if not backward:
            rec.stored_low = _any(out_low) if shadows else low
            rec.low_dtypes = low_dtypes
            if new_seq is not None:
                self._op_seq[rec.index] = new_seq
                if rec.stored_low:
                    self._low_grad_seqs.add(new_seq)
            if self.op_dtypes is not None and not info.preserves_values:  # a view or copy reads nothing low itself
                self._note_low_reads(tensors_in, producers, wanted_in, low)
        if info.preserves_values:
            rec.value_sources = self._passed_on(func, info, args, tensors_in, producers)
            leaves = self._leaves_passed_on(info, args, tensors_in, producers)
            if leaves:
                self._passed_leaves[rec.index] = leaves
        # Writing into a view (`out[:8] = y`) changes its base, which consumers read: the base
        # now holds this op's values beside those it held before.
        bases = [
            b for i in info.mutates if i < len(args) and isinstance(args[i], torch.Tensor) and (b := args[i]._base) is not None
        ]
        if bases:
            own = rec.value_sources if rec.value_sources is not None else tuple((rec.index, k) for k in range(len(outs)))
            before = [src for b in bases if (p := self._producer.get(b)) is not None for src in value_sources(self.records, *p)]
            rec.value_sources = tuple(dict.fromkeys((*own, *before)))
        self.records.append(rec)
        urec = self.unit(unit)
        urec.op_indices.append(rec.index)
        for k, t in enumerate(outs):
            self._producer[t] = (rec.index, k)
        for b in bases:
            self._producer[b] = (rec.index, 0)
        if not backward:
            self.masks.op(
                func, info, args, kwargs, tensors_in, [self.records[p[0]] if p is not None else None for p in producers],
                outs, rec,
            )

        # Only inputs other ops produced count as "already out of range": a parameter or
        # batch value beyond the format's max is this op's problem to report, not inherited.
        in_max = 0.0
        masked_in = False
        for k, (t, i) in enumerate(zip(tensors_in, rec.inputs, strict=True)):
            if i >= 0 and t.dtype == torch.float32:
                src = self.records[i]
                masked_in = masked_in or src.mask_nonfinite
                if self.op_dtypes is None or src.stored_low:
                    in_max = max(in_max, src.out_max_abs)
                elif src.overflow_inherited:
                    in_max = math.inf  # an overflow upstream, carried on in fp32
                elif (
                    not backward and wanted_in is not None and k < len(wanted_in) and wanted_in[k]
                    and src.summary is not None and self.low_format.max_value < src.out_max_abs < math.inf
                ):
                    # This op reads an fp32 value low (autocast's cast of its input): the cast
                    # overflows here, in this op, not where the value was made.
                    rec.cast_overflow += src.summary.tails[self.low_format.name].overflow
        rec.input_max_abs = rec.out_max_abs = in_max
        rec.overflow_inherited = in_max > self.low_format.max_value
        rec.mask_nonfinite = masked_in  # a view or copy passes the mask on
        # Backward ops get no per-op statistics: gradients are summarized once per autograd
        # node (see instrument_backward), which skips the backward formulas' intermediates.
        if backward or info.preserves_values:
            return out
        ref_outs = [t for t in outs if t.dtype == torch.float32 and t.numel()]
        if not ref_outs:
            return out
        summary = TensorSummary()
        masked: dict[int, torch.Tensor] = {}  # output position -> where it holds mask values
        raw_nonfinite = False
        for t in ref_outs:
            # Mask values count as the zeros they stand for: looked up where a mask reached
            # the op, and in a constant only if its values hold something a mask would explain.
            where = self.masks.positions(t, rec) if rec.masked else None
            if where is None:
                part = summarize(t, workspace=self.workspace)
                raw_nonfinite = raw_nonfinite or bool(part.nonfinite_count)
                if rec.constant and _out_of_range(part):
                    where = self.masks.positions(t, rec)
            if where is not None:
                masked[id(t)] = where
                part = summarize_unmasked(t, where, workspace=self.workspace)
                # Whether the mask itself held Inf (what its consumers' mask_nonfinite reads).
                raw_nonfinite = raw_nonfinite or bool(part.nonfinite_count) or _has_nonfinite(t)
            summary.merge(part)
        rec.summary = summary
        # Inf/NaN are out of range, but a mask's -inf is no overflowed value for a consumer to
        # inherit, nor a finding; nor is what ops make of it (a fully -inf row's softmax).
        rec.mask_nonfinite = raw_nonfinite and (
            masked_in or fills_nonfinite(args, kwargs) or not summary.nonfinite_count
        )
        nonfinite = bool(summary.nonfinite_count) and not rec.mask_nonfinite
        rec.out_max_abs = math.inf if nonfinite else summary.max_abs
        if nonfinite and math.isfinite(in_max):
            rec.fp32_nonfinite_root = True
        urec.forward.merge(summary)
        if rec.stored_low:
            urec.forward_low.merge(summary)
        if nonfinite and any(
            isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.external_storages for t in written
        ):
            urec.wrote_nonfinite_state = True

        position = {id(t): k for k, t in enumerate(outs)}
        local_by_output: dict[int, ErrorAccumulator] = {}
        if lpairs:
            acc = ErrorAccumulator()
            for ref, sh in lpairs:
                one = local_by_output[position[id(ref)]] = ErrorAccumulator()
                one.add(ref, sh, None, self.workspace, masked=masked.get(id(ref)))
                acc.merge(one)
            if acc.nonfinite_mismatch:
                # Only a root cause if this op's own low-precision inputs were finite.
                # Rounded rows that overflow came out of the table itself: its rounding made them.
                inputs_ok = not rounded_rows and all(
                    self._finite_but_masks(t, s)
                    for t, s in zip(tensors_in, tensor_leaves(*largs), strict=False)
                    if s.dtype in (torch.float32, self.low)
                )
                if inputs_ok:
                    rec.local_nonfinite_root = acc.nonfinite_mismatch
                else:
                    for a in (acc, *local_by_output.values()):
                        a.nonfinite_mismatch = 0
                        a.sum_sq_err = a.sum_sq_ref = 0.0
            rec.local_error = acc
        for k, local in local_by_output.items():
            rec.output_errors[k] = (local, None)
        return out

    def _communicate(self, func: Any, info: OpInfo, args: Any, kwargs: Any, backward: bool) -> Any:
        """A collective or a collective's buffer op: run once, as the model runs it (no shadow:
        every rank would have to join a second one), and recorded for its cost only. Its
        buffers get no statistics and no producer: the parameters FSDP2 gathers read as
        parameters, a tensor-parallel all-reduce's result as a value no op of this rank made.
        It is charged to the unit whose values it moves: the owner of the parameter it reads
        (FSDP2's all-gather, also when prefetched while another unit runs), that of the
        collective whose buffer it reads, that of the op that made its input (a tensor-
        parallel all-reduce), else the unit running."""
        self._communicated = True
        tensors_in = tensor_leaves(args, kwargs)
        unit = None
        for t in tensors_in:
            if (unit := self.param_storage_units.get(storage_ptr(t))) is not None:
                break
        if unit is None:
            unit = self._comm_unit(tensors_in)
        if unit is None:
            for t in tensors_in:
                if (made := self._producer.get(t)) is not None and self.records[made[0]].unit != UNATTRIBUTED_UNIT:
                    unit = self.records[made[0]].unit
                    break
        if unit is None:
            unit = self.attribution.backward_unit()[0] if backward else self.tracker.current
        # c10d's ops write their first argument (their schemas do not say so).
        written = [args[0]] if func.namespace == "c10d" and args else []
        written += [args[i] for i in info.mutates if i < len(args)] + [kwargs.get(n) for n in info.writes_kwargs]
        written_tensors = [
            t for w in written for t in pytree.tree_leaves(w) if isinstance(t, torch.Tensor)
        ]
        for t in written_tensors:
            self.on_mutation(t)
            if self._grad_batch.reads(t):
                self.settle()
            # What it wrote (an in-place all-reduce of a partial sum) is no longer what the
            # op that made the tensor computed, nor what that op's shadow holds.
            self._producer.pop(t, None)
            for store in self._locals.values():
                store.pop(t, None)
        try:
            out = func(*args, **kwargs)
        except Exception as e:
            self.failed_at = f"{info.name} in unit {unit!r} ({'backward' if backward else 'forward'})"
            raise _ModelOpError(e) from e
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self._note_comm_buffers([*outs, *written_tensors], unit)
        if self.collect:
            moved = 0 if info.packet.__name__ in COMM_HANDLE_OPS else sum(nbytes(t) for t in (*tensors_in, *outs))
            rec = self._new_record(
                info, unit, backward, [self._producer.get(t) for t in tensors_in], outs, flops=0, moved=moved,
            )
            rec.stored_low = False
            self.records.append(rec)
            self.unit(unit).op_indices.append(rec.index)
        return out

    def _new_record(
        self, info: OpInfo, unit: str, backward: bool, producers: list[tuple[int, int] | None],
        outs: Sequence[torch.Tensor], *, flops: int, moved: int,
    ) -> OpRecord:
        """The next op's record, its inputs read off their producers (None: no op made it)."""
        return OpRecord(
            index=len(self.records),
            op=info.name,
            unit=unit,
            phase=Phase.BACKWARD if backward else Phase.FORWARD,
            inputs=tuple(p[0] if p is not None else -1 for p in producers),
            output_shapes=tuple(tuple(t.shape) for t in outs),
            output_dtypes=tuple(dtype_name(t.dtype) for t in outs),
            output_bytes=sum(nbytes(t) for t in outs),
            flops=flops,
            moved_bytes=moved,
            input_slots=tuple(p[1] if p is not None else -1 for p in producers),
        )

    def _note_comm_buffers(self, tensors: list[torch.Tensor], unit: str) -> None:
        # A view's base too: FSDP2 writes a buffer through a view and hands on the buffer.
        for t in tensors:
            self._comm_units[t] = unit
            if t._base is not None:
                self._comm_units[t._base] = unit

    def _comm_unit(self, tensors: list[torch.Tensor]) -> str | None:
        for t in tensors:
            unit: str | None = self._comm_units.get(t)
            if unit is None and t._base is not None:
                unit = self._comm_units.get(t._base)
            if unit is not None:
                return unit
        return None

    def _finite_but_masks(self, t: torch.Tensor, s: torch.Tensor) -> bool:
        """Whether shadow input `s` (standing for fp32 `t`) is finite, or non-finite only
        where `t` holds mask values (-1e38 as -inf in fp16): not what made an Inf/NaN here."""
        finite = torch.isfinite(s)
        if bool(finite.all()):
            return True
        made = self._producer.get(t)
        where = self.masks.positions(t, self.records[made[0]] if made is not None else None)
        return where is not None and bool((finite | (where & ~torch.isnan(s))).all())

    def _passed_on(
        self, func: Any, info: OpInfo, args: Any, tensors_in: list[torch.Tensor], producers: list[Any]
    ) -> tuple[tuple[int, int], ...]:
        """The (op, output) pairs whose values a view or copy passes on: those of every float
        input it reads (all parts of a `cat`), not of the tensor a `copy_` writes into."""
        if func in UNINITIALIZED_OPS:
            return ()
        written = set() if info.restrides else {id(args[i]) for i in info.mutates if i < len(args)}
        found: dict[tuple[int, int], None] = {}
        for t, p in zip(tensors_in, producers, strict=True):
            if p is not None and t.is_floating_point() and id(t) not in written:
                for src in value_sources(self.records, p[0], p[1]):
                    found[src] = None
        return tuple(found)


    def _leaves_passed_on(
        self, info: OpInfo, args: Any, tensors_in: list[torch.Tensor], producers: list[Any]
    ) -> tuple[int, ...]:
        """Ids of the float tensors no op made (parameters, the batch) whose values a view or
        copy passes on, directly or through earlier views and copies."""
        written = set() if info.restrides else {id(args[i]) for i in info.mutates if i < len(args)}
        found: dict[int, None] = {}
        for t, p in zip(tensors_in, producers, strict=True):
            if not t.is_floating_point() or id(t) in written:
                continue
            if p is None:
                found[id(t)] = None
            else:
                found.update(dict.fromkeys(self._passed_leaves.get(p[0], ())))
        return tuple(found)

    def _settle_if_full(self) -> None:
        if self._grad_batch.pending_elements >= _BATCH_PENDING_ELEMENTS:
            self.settle()

    def settle(self) -> None:
        """Compute the pending batch, then finish the gradient nodes waiting on it, in the
        order they ran (blaming a non-finite gradient reads what its consumers got)."""
        with _disable_current_modes():
            self._grad_batch.compute()
        grads, self._unfinished_grads = self._unfinished_grads, []
        for node, unit, summaries, scalars_finite in grads:
            self._finish_gradient(node, unit, summaries, scalars_finite)

    def _call_shadow(self, func: Any, info: OpInfo, sargs: tuple[Any, dict[str, Any]], out: Any, *, stored_low: bool) -> Any:
        """Run one shadow of an op. A large fp32 result that is only rounded to the low dtype
        and dropped (a shadow of GPT-2's 12.9M logits) is written into a reused buffer
        through the op's `out=` overload: a fresh 51 MiB tensor costs more in page faults
        than the rounding itself."""
        if func is aten.native_dropout.default:
            return self._dropout_shadow(sargs[0], out)
        if stored_low and not info.preserves_values and isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            result = self._pooled_like(out, f"{POOL_SLOT}.result")
            out_op = out_overload(func) if result is not None else None
            if out_op is not None:
                return out_op(*sargs[0], **sargs[1], out=result)
        if not info.preserves_values:
            return func(*sargs[0], **sargs[1])
        try:
            return func(*sargs[0], **sargs[1])
        except RuntimeError:
            # A view the low dtype has no kernel for (`view_as_complex` of bf16): the real run
            # cast its input up first (`x.float()`, a no-op this fp32 run never sees).
            up = map_args(sargs[0], sargs[1], lambda t: t.float() if t.dtype == self.low else t)
            return func(*up[0], **up[1])

    @staticmethod
    def _dropout_shadow(sargs: Any, out: Any) -> Any:
        # Reuse the fp32 run's mask: a second draw would compare two different dropouts.
        shadow_in, p = sargs[0], float(sargs[1])
        train = sargs[2] if len(sargs) > 2 else True
        mask = out[1]
        if not train or p == 0.0:
            return (shadow_in.float(), mask)
        return (shadow_in.float() * mask * (1.0 / (1.0 - p)), mask)


@contextlib.contextmanager
def capture_pass(
    model: torch.nn.Module,
    low_dtype: torch.dtype,
    policy: Policy,
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
    mode: ShadowCapture | None = None
    attribution = UnitAttribution(
        model,
        on_exit=lambda path: mode.unit_exited(path) if mode else None,
        on_output=(lambda path, call, out: mode.module_output(path, call, out) if mode else None)
        if module_outputs is not None else None,
    )
    mode = dynamo_safe(ShadowCapture)(
        attribution, low_dtype, policy, collect=collect, local=local, on_mutation=on_mutation,
        op_dtypes=op_dtypes, default_low=default_low,
    )
    mode.module_outputs = module_outputs or {}
    # Constants of the model: its buffers and plain tensor attributes (a mask kept as one).
    mode.masks.constant_ids = {id(b) for b in model.buffers()} | {
        id(v) for m in model.modules() for v in vars(m).values()
        if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)
    }
    mode.external_storages = {storage_ptr(t) for t in (*model.parameters(), *model.buffers())}
    for p, owner in ((p, attribution.param_units.get(id(p))) for p in model.parameters()):
        if owner is not None:
            mode.param_storage_units.setdefault(storage_ptr(p), owner)
    # FSDP2's gathered parameters (made by an earlier forward) get their gradients as the
    # registered ones would: owned by the same unit.
    for unsharded, sharded in gathered_params(model):
        if (owner := attribution.param_units.get(id(sharded))) is not None:
            attribution.param_units.setdefault(id(unsharded), owner)
    with attribution.tracker, mode:
        yield mode


"""The op pipeline: what the capture does with each aten op of forward and backward, as named
steps that a *driver* calls in order. The dispatch mode (`shadow.ShadowMode`) is one driver;
a walk over an FX graph of aten ops (forward and backward) is meant to be another, and gets
the same records by calling the same steps (tests/test_pipeline.py walks a make_fx graph).

A driver routes on `classify(func)` (an `OpInfo`): a collective (`info.communicates`) goes to
`communicate(op)`, which runs it once and records its cost; a bookkeeping op
(`info.bookkeeping`) is run as it is, outside the pipeline; any other op goes to `run(op)`,
which calls the steps below in order. Each step reads the fields of the `Op` that the driver
or an earlier step filled in, and fills in its own:

| step             | reads                                   | fills in / does                               |
|------------------|-----------------------------------------|-----------------------------------------------|
| `attribute`      | unit, backward, args, kwargs            | unit (a collective's buffer op: its unit)     |
| `plan`           | unit, backward, info                    | low, unit_low, wanted_in/out, low_dtypes      |
| `track_writes`   | info, args, kwargs                      | written; `before_write` before the op writes  |
| `prepare_shadow` | the above                               | tensors_in, held_in, store, shadow_args       |
| `execute`        | func, args, kwargs                      | out, outs (the real outputs)                  |
| `shadow`         | store, shadow_args, out                 | out_low, pairs; the local store's new entries |
| `record`         | tensors_in, outs, out_low, seq          | producers, rec (appended to `records`)        |
| `track_masks`    | rec, producers, outs                    | rec.constant, rec.masked                      |
| `summarize`      | rec, outs, pairs, written               | queues rec's statistics and local error       |

(`record`, `track_masks` and `summarize` run only when `collect` is set.)

No step reads a device value back to the host. `summarize` (and `record`'s inherited ranges,
`module_output`'s errors) queue readback jobs (`capture/readback.py`) on `readback`, holding
the tensors they read; `flush()` runs them all, a few batched reads in all, and then fills in
the records and units in op order. A driver calls `flush()` at the end of each pass, before
anything reads `records` or `units` (the pipeline also flushes early when the held tensors
pass `readback.HOLD_BUDGET_BYTES`).

What a driver gives, per op (`Op`'s first fields):
- `func`, `args`, `kwargs`: the aten overload and its real arguments, the fp32 run's tensors
  themselves (the pipeline keys what it knows of a tensor by identity: a driver passes an
  op the very tensor objects earlier ops returned); `kwargs` a dict, possibly empty;
  `info = classify(func)`.
- `backward`: whether the op belongs to the backward pass (no shadow, no statistics: the
  gradients are summarized per autograd node, `ShadowCapture.instrument_backward`).
- `unit`: the unit running it. Forward: the innermost module whose forward runs it (the
  tracker's `current`). Backward: the unit of the forward op whose autograd node it is part
  of (`UnitAttribution.backward_unit`), `UNATTRIBUTED_UNIT` outside any. For a collective,
  the unit running it, which `communicate` uses only where the tensors it moves name none.
- `seq`: forward only, the sequence number of the autograd node the op created, once
  registered to `unit` (`UnitAttribution.record_forward`); None if it made none. It ties
  the op's record to its gradient; a driver without autograd passes None.
The real outputs are the pipeline's own to make: `execute` runs `func(*args, **kwargs)`
between `prepare_shadow` and `shadow`, since an op that writes its inputs must not have
written them when the shadow takes its copies.

And, around the ops:
- `module_output(path, call, outputs)` when a module call returns (given the real low run's
  outputs of that call in `module_outputs`), and `unit_exited(path)` when it is left: the
  unit tracker's hooks do this (`UnitAttribution(on_exit=..., on_output=...)`).
- The tracker's module call stack as the eager run has it while an op runs: `plan` names
  ops by (unit, module call, op, n) to find them in the real low run (`units.OpKeyer`).
- `external_storages`, `masks.constant_ids`, `param_storage_units`: see `capture_pass`.
- The pipeline's own tensor work (shadows, summaries) must reach no capture mode: inside a
  dispatch mode's handler the mode is off; a driver outside one runs where none is active.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from precision_doctor.capture.local_shadow import LocalShadows, any_low
from precision_doctor.capture.masks import MaskTracker
from precision_doctor.capture.memory import WeakIdMap
from precision_doctor.capture.ops import (
    COMM_HANDLE_OPS,
    NO_SHADOW_OPS,
    SELECT_OPS,
    UNINITIALIZED_OPS,
    OpInfo,
    dtype_name,
    fills_nonfinite,
    moved_bytes,
    nbytes,
    op_flops,
    op_info,
    outputs_of,
    tensor_leaves,
)
from precision_doctor.capture.readback import Held, Job, Parallel, Readback
from precision_doctor.capture.records import OpRecord, UnitRecord, value_sources
from precision_doctor.capture.statistics import (
    ErrorAccumulator,
    TensorSummary,
    Workspace,
    summarize_job,
    summarize_unmasked_job,
)
from precision_doctor.capture.units import (
    UNATTRIBUTED_UNIT,
    LowUnits,
    OpDtypes,
    OpKey,
    OpKeyer,
    UnitAttribution,
)
from precision_doctor.formats import BF16, FP16
from precision_doctor.model.parallel import local_tensor, storage_ptr, waited, wrapper_types
from precision_doctor.options import Phase


def all_finite_job(t: torch.Tensor) -> Job[bool]:
    """Whether `t` holds no Inf/NaN, as a job (capture/readback.py), from one fp32-accumulated
    sum (Inf and NaN carry into it): a reduction, where `isfinite(t).all()` writes a mask as
    large as `t` first. A sum of
    finite values beyond fp32's range (~3e38) would read as non-finite: no gradient or
    activation here comes near it."""
    return bool((yield torch.isfinite(torch.sum(t, dtype=torch.float32))))


def _has_nonfinite_job(t: torch.Tensor) -> Job[bool]:
    """Exact, in one fp32 sum where `t` is finite; where that sum is not (an Inf, a NaN, or
    -1e38 sentinels adding up past fp32's max), in an fp64 one, which no fp32 values overflow."""
    if (yield from all_finite_job(t)):
        return False
    return not math.isfinite((yield torch.sum(t, dtype=torch.float64)))


def _out_of_range(s: TensorSummary) -> bool:
    """Whether a summary holds values a low format cannot (what mask values can explain)."""
    return bool(s.nonfinite_count) or any(t.overflow or t.flushed for t in s.tails.values())


# What an op's local error reads once its statistics are read back: (output position, fp32
# output, shadow) pairs, and per float shadow input the input itself (or, for one in a reused
# buffer, whether it was finite), where its fp32 value holds mask values as far as the dataflow
# tells, and that value if it is a constant (whose positions are read off its values).
_LocalInput = tuple[Held | torch.Tensor, torch.Tensor | None, Held | None]
_LocalInputs = tuple[list[tuple[int, Held, Held]], list[_LocalInput] | None]


def grad_seqs(t: torch.Tensor) -> tuple[int, ...]:
    """The sequence numbers of the autograd nodes that made `t` and its base."""
    nodes = (t.grad_fn, t._base.grad_fn if t._is_view() and t._base is not None else None)
    return tuple(n._sequence_nr() for n in nodes if n is not None)


class ModelOpError(Exception):
    """Carries an exception raised by the model's own op out of the pipeline untouched."""

    def __init__(self, original: Exception) -> None:
        super().__init__(str(original))
        self.original = original


@dataclass(eq=False, slots=True)
class Op:
    """One op going through the pipeline: what the driver gives (up to `seq`), then what
    each step found, in step order."""

    func: Any
    info: OpInfo
    args: Any
    kwargs: dict[str, Any]
    backward: bool
    unit: str  # the unit running it; `attribute` settles the one it is charged to
    seq: int | None = None
    # A driver without autograd (the graph walk): per tensor input (`tensors_in` order), the
    # sequence numbers of the autograd nodes that made it and its base, as the traced run had
    # them. None: read off the inputs' `grad_fn`.
    input_seqs: Sequence[tuple[int, ...]] | None = None
    # attribute: the collective whose buffer this op works on, if that decided the unit
    comm_buffer: str | None = None
    # plan: what the real low run holds low. Per tensor input and per output (None: the op
    # has no counterpart there, so it runs in its inputs' dtype); `low`: a tensor no op made.
    unit_low: bool = False
    low: bool = False
    wanted_in: Sequence[bool | None] | None = None
    wanted_out: Sequence[bool] | None = None
    low_dtypes: tuple[str, ...] | None = None
    # track_writes
    written: list[Any] = field(default_factory=list)
    # prepare_shadow: `store` is None where the op gets no local shadow
    tensors_in: list[torch.Tensor] = field(default_factory=list)
    held_in: list[bool | None] | None = None
    shadows: bool = False
    store: WeakIdMap | None = None
    rounded_rows: bool = False
    shadow_args: tuple[Any, Any] | None = None
    # execute
    out: Any = None
    outs: list[torch.Tensor] = field(default_factory=list)
    # shadow: which outputs the real run holds low, and the (fp32, shadow) output pairs
    out_low: bool | Sequence[bool] = False
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # record
    producers: list[tuple[int, int] | None] = field(default_factory=list)
    rec: OpRecord | None = None


class OpPipeline:
    """The pipeline's steps and the state they share across ops: the records, the units,
    which op made each live tensor, the local shadows, the masks. Long as a whole because
    every step reads and extends that one state; each step is a method of its own, and the
    shadows' own work is `LocalShadows`'."""

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
        self.attribution = attribution
        self.tracker = attribution.tracker
        self.low = low_dtype
        self.low_format = FP16 if low_dtype == torch.float16 else BF16
        self.low_units = low_units
        self.collect = collect
        self.local = local
        self.on_mutation = on_mutation
        self.records: list[OpRecord] = []
        self.units: dict[str, UnitRecord] = {}
        self.op_count = 0
        self.seq_units = attribution.seq_units
        # The real low-precision run's dtypes, op by op (see lowrun.low_run): each shadow
        # rounds an input or output to the low dtype only where that run holds it there. None:
        # every op of a low unit rounds (the low units, as plan verification ran them).
        self.op_dtypes = op_dtypes
        self.keyer = OpKeyer(attribution.tracker)
        # Whether a tensor no op made (a parameter, the batch) is low in the real run: in the
        # pure regime it is; under autocast it is fp32 and each op casts it.
        self.default_low = default_low
        # Autograd nodes (by sequence number) whose output gradient the real run holds in the
        # low dtype: the node's forward op made a low output, or a consumer cast it low.
        self._low_grad_seqs: set[int] = set()
        self._op_seq: dict[int, int] = {}  # op record index -> sequence number of its node
        self.low_reads: set[int] = set()  # ids of tensors no op made that an op reads low
        # View or copy record index -> ids of the tensors no op made whose values it passes on
        # (a Linear's `t(weight)`): an op reading it low reads the parameter low.
        self._passed_leaves: dict[int, tuple[int, ...]] = {}
        self.module_outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.module_errors: dict[str, ErrorAccumulator] = {}  # unit -> its module outputs' error
        self._value_errors: WeakIdMap = WeakIdMap()  # fp32 module output -> (its version, its error)
        self._producer: WeakIdMap = WeakIdMap()
        self.failed_at: str | None = None
        self.wrappers = wrapper_types()
        # Which unit a collective's buffers belong to (see communicate), and the owners of
        # the parameters' memory (a DTensor's local shard: what FSDP2 gathers from).
        self._comm_units: WeakIdMap = WeakIdMap()
        self._communicated = False
        self.param_storage_units: dict[int, str] = {}
        self.workspace = Workspace()
        # What the statistics read back to the host waits here and is read once per round
        # for all pending ops (`flush`), not op by op.
        self.readback = Readback()
        self.shadows = LocalShadows(low_dtype, self.workspace)
        self.masks = MaskTracker()  # values meant to be masked, from the dataflow
        self.external_storages: set[int] = set()  # parameters', buffers' and the batch's memory

    # --- units ---------------------------------------------------------------------------
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
            if self.wrappers:  # DTensor outputs (tensor parallel): this rank's local values
                refs = [local_tensor(waited(t)) for t in refs]
                low = [local_tensor(waited(t)) for t in low]
            acc = self.module_errors.setdefault(path, ErrorAccumulator())
            urec = self.units.get(path)
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
                fresh = one is None
                if one is None:
                    # Mask values (-1e38 turns into -inf in fp16, which masks as well) are no error.
                    masked = self.masks.positions(ref, self.records[made[0]] if made is not None else None)
                    one = ErrorAccumulator()
                    held = self.readback.hold(ref)
                    self.readback.submit(one.add_job(held, sh, None, self.workspace, masked=masked))
                    self._value_errors[ref] = (ref._version, one)
                self.readback.then(functools.partial(self._module_output_error, path, acc, urec, one, sources, fresh))

    def _module_output_error(
        self,
        path: str,
        acc: ErrorAccumulator,
        urec: UnitRecord | None,
        one: ErrorAccumulator,
        sources: tuple[tuple[int, int], ...],
        fresh: bool,
    ) -> None:
        """One module output's error, once read: on the records that made its values, in the
        module's total, and as what the module hands on if another unit made it."""
        if fresh:
            for v, k in sources:
                local_k = self.records[v].output_errors.get(k, (None, None))[0]
                self.records[v].output_errors[k] = (local_k, one)
        acc.merge(one)
        # (A container with no op of its own is no unit: nothing to record.)
        if urec is not None and not any(self.records[v].unit == path for v, _ in sources):
            urec.handed_on_error = max(urec.handed_on_error, one.rel_l2)

    def unit_exited(self, path: str) -> None:
        local = self.shadows.stores.get(path)
        if local is not None:
            local.clear()

    def before_write(self, t: torch.Tensor) -> None:
        """An op is about to write `t` (in place, `out=`, a collective's buffer)."""
        self.on_mutation(t)  # `out=` too: `torch.mul(w, 0.5, out=w)` writes a parameter
        self.readback.protect(t)  # pending statistics read what it holds now

    def flush(self) -> None:
        """Read back the pending statistics and finish the records that wait on them (see
        `readback.Readback`): at the end of each phase, before the records are read, and
        whenever what the pending statistics hold grows past `readback.HOLD_BUDGET_BYTES`.
        Their tensor work reaches no capture mode."""
        if len(self.readback):
            with _disable_current_modes():
                self.readback.flush()

    # --- the steps -------------------------------------------------------------------------
    def classify(self, func: Any) -> OpInfo:
        """What kind of op `func` is: the driver routes on it, every step reads it."""
        self.op_count += 1
        return op_info(func)

    def run(self, op: Op) -> Any:
        """The steps, in order, for an op that is neither a collective nor bookkeeping;
        returns its real outputs."""
        self.attribute(op)
        self.plan(op)
        self.track_writes(op)
        self.prepare_shadow(op)
        self.execute(op)
        self.shadow(op)
        if self.collect:
            self.record(op)
            self.track_masks(op)
            self.summarize(op)
            if self.readback.over_budget:
                self.flush()
        return op.out

    def attribute(self, op: Op) -> None:
        """The unit the op is charged to: the one running it, but for a collective's buffer
        op that no autograd node runs."""
        if op.backward and op.unit == UNATTRIBUTED_UNIT and self._communicated:
            # Outside any autograd node (FSDP2's last reduce-scatter, in autograd's final
            # callback): the buffer ops of a collective belong to its unit.
            op.comm_buffer = self._comm_unit(tensor_leaves(op.args, op.kwargs))
            if op.comm_buffer is not None:
                op.unit = op.comm_buffer

    def plan(self, op: Op) -> None:
        """Which of the op's inputs and outputs the real low-precision run holds low (or, with
        no low run, whether its unit runs low)."""
        op.unit_low = op.low = self.low_units.is_low(op.unit)
        if self.op_dtypes is not None:
            op.low = self.default_low
            if not op.backward and not op.info.preserves_values:
                found = self.op_dtypes.get(self.keyer.key(op.unit, op.info.name))
                if found is not None:
                    op.wanted_in = [d == self.low if d is not None else None for d in found[0]]
                    op.wanted_out = [d == self.low for d in found[1]]
                    op.low_dtypes = tuple(dtype_name(d) for d in found[1] if d is not None)

    def track_writes(self, op: Op) -> None:
        """Announce the tensors the op writes, before it writes them: the model state guard copies
        a parameter first, the gradient batch reads a gradient first."""
        info, args, kwargs = op.info, op.args, op.kwargs
        if info.mutates or info.writes_kwargs:  # most ops write nothing: no list work for them
            op.written = _written(info, args, kwargs)
        for t in op.written:
            if isinstance(t, torch.Tensor):
                self.before_write(t)

    def prepare_shadow(self, op: Op) -> None:
        """Whether the op gets a local shadow, and its inputs. Long for one reason: each way an
        op can do without a shadow of its own is decided here, before it runs."""
        func, info, backward = op.func, op.info, op.backward
        op.tensors_in = tensors_in = tensor_leaves(op.args, op.kwargs)
        # Whether the real run holds each input low, as far as the op that made it knows: a
        # shadow that restarts here (a unit's local one) starts from the values it holds.
        if self.op_dtypes is not None and self.collect and not backward:
            op.held_in = []
            for t in tensors_in:
                made = self._producer.get(t)
                op.held_in.append(self.records[made[0]].stored_low if made is not None else None)
        shadows = not backward and func not in NO_SHADOW_OPS and func not in UNINITIALIZED_OPS and not info.restrides
        if shadows:
            shadows = not info.random and any(t.dtype == torch.float32 for t in tensors_in)
        op.shadows = shadows
        if not shadows:
            return
        store: WeakIdMap | None = None
        if self.local and op.unit_low:
            store = self.shadows.store(op.unit)
            if (
                op.wanted_out is not None
                and not any(op.wanted_out)
                and self.shadows.exact_inputs(tensors_in, store, op.wanted_in, op.held_in)
            ):
                # An fp32 op of the real run on values it holds exactly (autocast's layer
                # norm of the fp32 residual stream): its local shadow would be its own
                # fp32 result, with error 0; consumers read the fp32 values instead.
                store = None
        # A lookup into a table no op produced (an embedding of its weight): the shadows are
        # the fp32 rows rounded, without rounding and upcasting the whole table.
        if (op.low or self.op_dtypes is not None) and func in SELECT_OPS:
            op.rounded_rows = store is not None and all(t not in store for t in tensors_in if t.dtype == torch.float32)
        # A view or copy of tensors without a shadow in a store (a parameter's `t()`)
        # needs no entry there either: a consumer rounds the fp32 view itself, the same
        # values. Skipping it (every Linear's weight) took the demo's forward from 15.6
        # to 14.9 ms.
        if (
            info.preserves_values
            and not info.mutates
            and store is not None
            and not any(t in store for t in tensors_in if t.dtype == torch.float32)
        ):
            store = None
        op.store = store
        if not op.rounded_rows and store is not None:
            local_low = op.low if self.op_dtypes is not None else True
            op.shadow_args = self.shadows.args(info, op.args, op.kwargs, store, local_low, op.wanted_in, op.held_in)
        self.shadows.end_op()

    def _run_model_op(
        self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], info: OpInfo, unit: str, backward: bool
    ) -> Any:
        """The op on the real values. A failure is the model's own: `ModelOpError` carries it
        past the driver's handler for internal errors, and `failed_at` names where."""
        try:
            return func(*args, **kwargs)
        except Exception as e:
            self.failed_at = f"{info.name} in unit {unit!r} ({'backward' if backward else 'forward'})"
            raise ModelOpError(e) from e

    def execute(self, op: Op) -> None:
        """The op on the fp32 values. A failure is the model's own: `ModelOpError` carries it
        past the driver's handler for internal errors."""
        op.out = self._run_model_op(op.func, op.args, op.kwargs, op.info, op.unit, op.backward)
        op.outs = outputs_of(op.out)
        if op.comm_buffer is not None:
            self._note_comm_buffers(op.outs, op.comm_buffer)

    def shadow(self, op: Op) -> None:
        """The local shadow's run and its outputs stored beside the fp32 ones; what the real
        run holds low among the outputs."""
        info, args = op.info, op.args
        if info.restrides and not op.backward:
            self.shadows.restride(op.func, args, op.kwargs)
        if info.random:
            # Consumers of random values round the fp32 ones: a second draw would compare
            # two different samples.
            for t in [*op.outs, *(args[i] for i in info.mutates)]:
                self.shadows.forget(t)
        # Which outputs the real run holds low: as recorded there; else whether its unit runs low
        # (no low run), else the dtype its inputs promote to (low only if all were low).
        local_out_low: bool | Sequence[bool]
        if op.wanted_out is not None:
            op.out_low = local_out_low = op.wanted_out
        elif self.op_dtypes is None:
            op.out_low, local_out_low = op.low, True
        else:
            picked = not op.rounded_rows and op.store is not None
            op.out_low = local_out_low = op.shadows and self.shadows.promotes_low(picked, op.low)
        if op.shadows and op.store is not None:
            if op.rounded_rows:
                sout = op.out.detach()
            else:
                assert op.shadow_args is not None  # prepare_shadow built them for this store
                if info.mutates or info.writes_kwargs:  # the shadow writes shadows pending statistics read
                    for t in _written(info, *op.shadow_args):
                        if isinstance(t, torch.Tensor):
                            self.readback.protect(t)
                    for ref in op.outs:
                        if (existing := op.store.get(ref)) is not None:
                            self.readback.protect(existing)  # `keep` writes through it
                sout = self.shadows.call(op.func, info, op.shadow_args, op.out, stored_low=any_low(local_out_low))
            op.pairs = self.shadows.keep(info, op.outs, sout, op.store, local_out_low)

    def record(self, op: Op) -> None:
        """The op's record, in the graph: its inputs' producers, the values it passes on, which
        of its outputs the real run holds low, and what out-of-range values it inherits."""
        info, args, backward, tensors_in, outs = op.info, op.args, op.backward, op.tensors_in, op.outs
        op.producers = producers = [self._producer.get(t) for t in tensors_in]
        op.rec = rec = self._new_record(
            info,
            op.unit,
            backward,
            producers,
            outs,
            flops=op_flops(info, args, op.kwargs, op.out),
            moved=moved_bytes(op.func, info, tensors_in, outs),
        )
        if not backward:
            rec.stored_low = any_low(op.out_low) if op.shadows else op.low
            rec.low_dtypes = op.low_dtypes
            if op.seq is not None:
                self._op_seq[rec.index] = op.seq
                if rec.stored_low:
                    self._low_grad_seqs.add(op.seq)
            if self.op_dtypes is not None and not info.preserves_values:  # a view or copy reads nothing low itself
                self._note_low_reads(tensors_in, producers, op.wanted_in, op.low, op.input_seqs)
        if info.preserves_values:
            rec.value_sources, leaves = self._passed_on(op.func, info, args, tensors_in, producers)
            if leaves:
                self._passed_leaves[rec.index] = leaves
        # Writing into a view (`out[:8] = y`) changes its base, which consumers read: the base
        # now holds this op's values beside those it held before.
        bases = [
            b
            for i in info.mutates
            if i < len(args) and isinstance(args[i], torch.Tensor) and (b := args[i]._base) is not None
        ]
        if bases:
            own = (
                rec.value_sources if rec.value_sources is not None else tuple((rec.index, k) for k in range(len(outs)))
            )
            before = [
                src
                for b in bases
                if (p := self._producer.get(b)) is not None
                for src in value_sources(self.records, *p)
            ]
            rec.value_sources = tuple(dict.fromkeys((*own, *before)))
        self.records.append(rec)
        self.unit(op.unit).op_indices.append(rec.index)
        for k, t in enumerate(outs):
            self._producer[t] = (rec.index, k)
        for b in bases:
            self._producer[b] = (rec.index, 0)
        # Read off the producers' statistics, which are read back later (`flush`): in op order.
        fp32_in, wanted_in = [t.dtype == torch.float32 for t in tensors_in], op.wanted_in
        self.readback.then(lambda: self._inherit(rec, fp32_in, backward, wanted_in))

    def _inherit(
        self, rec: OpRecord, fp32_in: list[bool], backward: bool, wanted_in: Sequence[bool | None] | None
    ) -> None:
        """What out-of-range values the op reads (`fp32_in`: which of its tensor inputs are
        fp32). Only inputs other ops produced count as "already out of range": a parameter or
        batch value beyond the format's max is this op's problem to report, not inherited."""
        in_max = 0.0
        masked_in = False
        for k, (fp32, i) in enumerate(zip(fp32_in, rec.inputs, strict=True)):
            if i >= 0 and fp32:
                src = self.records[i]
                masked_in = masked_in or src.mask_nonfinite
                if self.op_dtypes is None or src.stored_low:
                    in_max = max(in_max, src.out_max_abs)
                elif src.overflow_inherited:
                    in_max = math.inf  # an overflow upstream, carried on in fp32
                elif (
                    not backward
                    and wanted_in is not None
                    and k < len(wanted_in)
                    and wanted_in[k]
                    and src.summary is not None
                    and self.low_format.max_value < src.out_max_abs < math.inf
                ):
                    # This op reads an fp32 value low (autocast's cast of its input): the cast
                    # overflows here, in this op, not where the value was made.
                    rec.cast_overflow += src.summary.tails[self.low_format.name].overflow
        rec.input_max_abs = rec.out_max_abs = in_max
        rec.overflow_inherited = in_max > self.low_format.max_value
        rec.mask_nonfinite = masked_in  # a view or copy passes the mask on

    def track_masks(self, op: Op) -> None:
        """Where mask values reach the forward op's outputs (what `summarize` counts as zeros)."""
        if op.backward or op.rec is None:
            return
        self.masks.op(
            op.func,
            op.info,
            op.args,
            op.kwargs,
            op.tensors_in,
            [self.records[p[0]] if p is not None else None for p in op.producers],
            op.outs,
            op.rec,
        )

    def summarize(self, op: Op) -> None:
        """The forward op's output statistics and local error, for its record and unit, read
        back at the next `flush` (its tensors held till then). Backward ops get none: gradients
        are summarized once per autograd node (see `ShadowCapture.instrument_backward`), which
        skips the backward formulas' intermediates; views and copies neither: their values
        are their inputs'."""
        rec = op.rec
        if op.backward or op.info.preserves_values or rec is None:
            return
        ref_outs = [(k, t) for k, t in enumerate(op.outs) if t.dtype == torch.float32 and t.numel()]
        if not ref_outs:
            return
        urec = self.unit(op.unit)
        hold = self.readback.hold
        # Mask values count as the zeros they stand for: looked up where a mask reached the
        # op, and in a constant only if its values hold something a mask would explain.
        outs = [(k, hold(t), self.masks.positions(t, rec) if rec.masked else None) for k, t in ref_outs]
        local = self._local_inputs(op)
        writes_state = any(isinstance(t, torch.Tensor) and storage_ptr(t) in self.external_storages for t in op.written)
        fills = fills_nonfinite(op.args, op.kwargs)
        found: dict[str, Any] = {}
        self.readback.submit(self._summary_job(outs, rec, local, found))
        self.readback.then(lambda: self._summarized(rec, urec, found, fills, writes_state))

    def _summary_job(
        self,
        outs: list[tuple[int, Held, torch.Tensor | None]],
        rec: OpRecord,
        local: _LocalInputs | None,
        found: dict[str, Any],
    ) -> Job[None]:
        """The op's outputs summarized (into `found`), then its local error (onto `rec`)."""
        parts = yield Parallel([self._output_job(h, where, rec) for _, h, where in outs])
        summary = TensorSummary()
        masked: dict[int, torch.Tensor] = {}  # output position -> where it holds mask values
        raw_nonfinite = False
        for (k, _, _), (part, where, raw) in zip(outs, parts, strict=True):
            if where is not None:
                masked[k] = where
            raw_nonfinite = raw_nonfinite or raw
            summary.merge(part)
        found["summary"], found["raw_nonfinite"] = summary, raw_nonfinite
        if local is not None:
            yield from self._local_error_job(rec, local, masked)

    def _output_job(
        self, h: Held, where: torch.Tensor | None, rec: OpRecord
    ) -> Job[tuple[TensorSummary, torch.Tensor | None, bool]]:
        """One output's summary, where it holds mask values, and whether it holds Inf/NaN."""
        raw_nonfinite = False
        if where is not None and not (yield from self.masks.any_set_job(where)):
            where = None
        if where is None:
            part = yield from summarize_job(h.t, workspace=self.workspace)
            raw_nonfinite = bool(part.nonfinite_count)
            if rec.constant and _out_of_range(part):
                where = yield from self.masks.constant_positions_job(h.t)
        if where is not None:
            part = yield from summarize_unmasked_job(h.t, where, workspace=self.workspace)
            # Whether the mask itself held Inf (what its consumers' mask_nonfinite reads).
            raw_nonfinite = raw_nonfinite or bool(part.nonfinite_count) or (yield from _has_nonfinite_job(h.t))
        return part, where, raw_nonfinite

    def _summarized(
        self, rec: OpRecord, urec: UnitRecord, found: dict[str, Any], fills: bool, writes_state: bool
    ) -> None:
        """The op's statistics, once read, judged onto its record and unit."""
        summary: TensorSummary = found["summary"]
        rec.summary = summary
        # Inf/NaN are out of range, but a mask's -inf is no overflowed value for a consumer to
        # inherit, nor a finding; nor is what ops make of it (a fully -inf row's softmax).
        # (`rec.mask_nonfinite` so far: whether an input held a mask's, see `_inherit`.)
        rec.mask_nonfinite = found["raw_nonfinite"] and (rec.mask_nonfinite or fills or not summary.nonfinite_count)
        nonfinite = bool(summary.nonfinite_count) and not rec.mask_nonfinite
        rec.out_max_abs = math.inf if nonfinite else summary.max_abs
        if nonfinite and math.isfinite(rec.input_max_abs):
            rec.fp32_nonfinite_root = True
        urec.forward.merge(summary)
        if rec.stored_low:
            urec.forward_low.merge(summary)
        if nonfinite and writes_state:
            urec.wrote_nonfinite_state = True

    def _local_inputs(self, op: Op) -> _LocalInputs | None:
        """What the op's local error needs once read back: its (fp32, shadow) output pairs,
        and its shadow inputs with where they hold mask values, to tell whether an Inf/NaN
        the shadow made came from finite inputs. A pooled upcast input is read from the low
        tensor it was made from; any other shadow input in a reused buffer is checked now:
        the next op overwrites it."""
        if not op.pairs:
            return None
        position = {id(t): k for k, t in enumerate(op.outs)}
        hold = self.readback.hold
        pairs = [(position[id(ref)], hold(ref), hold(sh)) for ref, sh in op.pairs]
        inputs: list[_LocalInput] | None = None
        if not op.rounded_rows and op.shadow_args is not None:
            inputs = []
            for t, s in zip(op.tensors_in, tensor_leaves(*op.shadow_args), strict=False):
                if s.dtype not in (torch.float32, self.low):
                    continue
                src = self.records[made[0]] if (made := self._producer.get(t)) is not None else None
                where, constant = self.masks.known(t, src)
                pooled = self.workspace.owns(s)
                if pooled and (low_source := self.shadows.upcast_sources.get(id(s))) is not None:
                    s = low_source  # a pooled upcast: its low source has its finiteness and NaNs
                    pooled = self.workspace.owns(s)
                if pooled:
                    where = self.masks.positions(t, src) if constant else where
                    inputs.append((self._finite_flag(s, where), where, None))
                else:
                    inputs.append((hold(s), where, hold(t) if constant else None))
        return pairs, inputs

    @staticmethod
    def _finite_flag(s: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        """Whether shadow input `s` is finite, or non-finite only where its fp32 value holds
        mask values (-1e38 as -inf in fp16): a device bool."""
        finite = torch.isfinite(s)
        if where is None:
            return finite.all()
        return (finite | (where & ~torch.isnan(s))).all()

    def _local_error_job(self, rec: OpRecord, local: _LocalInputs, masked: dict[int, torch.Tensor]) -> Job[None]:
        """The op's local shadow against its fp32 outputs, per output and over all of them."""
        pairs, inputs = local
        ones = [ErrorAccumulator() for _ in pairs]
        yield Parallel(
            [
                one.add_job(ref, sh, None, self.workspace, masked=masked.get(k))
                for one, (k, ref, sh) in zip(ones, pairs, strict=True)
            ]
        )
        acc = ErrorAccumulator()
        local_by_output: dict[int, ErrorAccumulator] = {}
        for one, (k, _, _) in zip(ones, pairs, strict=True):
            local_by_output[k] = one
            acc.merge(one)
        if acc.nonfinite_mismatch:
            # Only a root cause if this op's own low-precision inputs were finite.
            # Rounded rows that overflow came out of the table itself: its rounding made them.
            inputs_ok = inputs is not None and all(
                (yield Parallel([self._finite_but_masks_job(*entry) for entry in inputs]))
            )
            if inputs_ok:
                rec.local_nonfinite_root = acc.nonfinite_mismatch
            else:
                for a in (acc, *local_by_output.values()):
                    a.nonfinite_mismatch = 0
                    a.sum_sq_err = a.sum_sq_ref = 0.0
        rec.local_error = acc
        for k, one in local_by_output.items():
            rec.output_errors[k] = (one, None)

    def _finite_but_masks_job(
        self, s: Held | torch.Tensor, where: torch.Tensor | None, constant: Held | None
    ) -> Job[bool]:
        """Whether shadow input `s` is finite, or non-finite only where its fp32 value holds
        mask values (`where`; for a `constant`, read off its values): not what made an Inf/NaN
        here. A tensor `s` is that answer, taken before its buffer was reused."""
        if isinstance(s, torch.Tensor):
            return bool((yield s))
        finite = torch.isfinite(s.t)
        if (yield finite.all()):
            return True
        if where is None and constant is not None:
            where = yield from self.masks.constant_positions_job(constant.t)
        return where is not None and bool((yield (finite | (where & ~torch.isnan(s.t))).all()))

    # --- collectives -----------------------------------------------------------------------
    def communicate(self, op: Op) -> Any:
        """A collective or a collective's buffer op: run once, as the model runs it (no shadow:
        every rank would have to join a second one), and recorded for its cost only. Its
        buffers get no statistics and no producer: the parameters FSDP2 gathers read as
        parameters, a tensor-parallel all-reduce's result as a value no op of this rank made.
        It is charged to the unit whose values it moves: the owner of the parameter it reads
        (FSDP2's all-gather, also when prefetched while another unit runs), that of the
        collective whose buffer it reads, that of the op that made its input (a tensor-
        parallel all-reduce), else `op.unit`, the unit running."""
        func, info, args, kwargs = op.func, op.info, op.args, op.kwargs
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
            unit = op.unit
        op.unit = unit
        # c10d's ops write their first argument (their schemas do not say so).
        written = [args[0]] if func.namespace == "c10d" and args else []
        written += _written(info, args, kwargs)
        written_tensors = [t for w in written for t in pytree.tree_leaves(w) if isinstance(t, torch.Tensor)]
        for t in written_tensors:
            self.before_write(t)
            # What it wrote (an in-place all-reduce of a partial sum) is no longer what the
            # op that made the tensor computed, nor what that op's shadow holds.
            self._producer.pop(t, None)
            self.shadows.forget(t)
        out = self._run_model_op(func, args, kwargs, info, unit, op.backward)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self._note_comm_buffers([*outs, *written_tensors], unit)
        if self.collect:
            moved = 0 if info.packet.__name__ in COMM_HANDLE_OPS else sum(nbytes(t) for t in (*tensors_in, *outs))
            rec = self._new_record(
                info,
                unit,
                op.backward,
                [self._producer.get(t) for t in tensors_in],
                outs,
                flops=0,
                moved=moved,
            )
            rec.stored_low = False
            self.records.append(rec)
            self.unit(unit).op_indices.append(rec.index)
        return out

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

    # --- what the record steps read off the graph -------------------------------------------
    def _new_record(
        self,
        info: OpInfo,
        unit: str,
        backward: bool,
        producers: list[tuple[int, int] | None],
        outs: Sequence[torch.Tensor],
        *,
        flops: int,
        moved: int,
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

    def _note_low_reads(
        self,
        tensors: list[torch.Tensor],
        producers: list[Any],
        wanted: Sequence[bool | None] | None,
        low: bool,
        input_seqs: Sequence[tuple[int, ...]] | None = None,
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
            self._low_grad_seqs.update(input_seqs[i] if input_seqs is not None else grad_seqs(t))
            if p is None:
                self.low_reads.add(id(t))
            else:  # through views and copies, to the ops that made the values
                for op, _ in value_sources(self.records, p[0], p[1]):
                    if (seq := self._op_seq.get(op)) is not None:
                        self._low_grad_seqs.add(seq)
                # ... and to the parameter a view of it passes on: autocast casts the weight
                # of `mm(x, t(weight))`, so the weight's gradient is first held low.
                self.low_reads.update(self._passed_leaves.get(p[0], ()))

    def _passed_on(
        self, func: Any, info: OpInfo, args: Any, tensors_in: list[torch.Tensor], producers: list[Any]
    ) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """What a view or copy passes on, from every float input it reads (all parts of a
        `cat`), not from the tensor a `copy_` writes into: the (op, output) pairs whose values
        it passes on, and the ids of the float tensors no op made (parameters, the batch) whose
        values it passes on, directly or through earlier views and copies."""
        written = set() if info.restrides else {id(args[i]) for i in info.mutates if i < len(args)}
        sources: dict[tuple[int, int], None] = {}
        leaves: dict[int, None] = {}
        uninitialized = func in UNINITIALIZED_OPS  # an empty_like passes on no values, only leaves
        for t, p in zip(tensors_in, producers, strict=True):
            if not t.is_floating_point() or id(t) in written:
                continue
            if p is None:
                leaves[id(t)] = None
                continue
            if not uninitialized:
                sources.update(dict.fromkeys(value_sources(self.records, p[0], p[1])))
            leaves.update(dict.fromkeys(self._passed_leaves.get(p[0], ())))
        return tuple(sources), tuple(leaves)


def _written(info: OpInfo, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    """The arguments an op writes, as its schema says (in-place and out= arguments)."""
    return [args[i] for i in info.mutates if i < len(args)] + [kwargs.get(n) for n in info.writes_kwargs]

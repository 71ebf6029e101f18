"""What the capture records: one `OpRecord` per aten op (a node of the dataflow graph) and
one `UnitRecord` per unit, and the pass over them after the run that finds what each unit
hands on (`unit_outputs`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from precision_doctor.capture.statistics import ErrorAccumulator, TensorSummary
from precision_doctor.options import Phase


@dataclass
class OpRecord:
    """One aten op of the captured pass: a node of the dataflow graph."""

    index: int
    op: str
    unit: str
    phase: Phase
    inputs: tuple[int, ...]  # producing op index per tensor input; -1: a parameter or model input
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[str, ...]
    output_bytes: int
    flops: int
    moved_bytes: int  # what the op reads and writes: 0 for a view
    summary: TensorSummary | None = None
    input_slots: tuple[int, ...] = ()  # which output of its producer each tensor input is
    # Where this op's output values were made, as (op, output) pairs: None when the op made
    # them itself; for a view or copy (cat too) those of the inputs it passes on.
    value_sources: tuple[tuple[int, int], ...] | None = None
    local_error: ErrorAccumulator | None = None  # over all its outputs
    # Per output position: (local, propagated) errors of that output alone.
    output_errors: dict[int, tuple[ErrorAccumulator | None, ErrorAccumulator | None]] = field(default_factory=dict)
    input_max_abs: float = 0.0  # largest |x| over its float inputs (inf if any is non-finite)
    out_max_abs: float = 0.0  # the same over its outputs
    local_nonfinite_root: int = 0  # low-precision Inf/NaN this op made from finite inputs
    fp32_nonfinite_root: bool = False  # fp32 Inf/NaN this op made from finite inputs
    # Whether the real low-precision run holds this op's outputs in the low dtype (their
    # dtypes there: `low_dtypes`, None where the op has no counterpart in that run).
    stored_low: bool = True
    # Values above the low dtype's max it reads in fp32 and casts low itself (autocast's cast
    # of an fp32 input): an overflow of this op's. `overflow_inherited`: it reads values that
    # overflowed upstream (held low there, or carried on in fp32 since).
    cast_overflow: int = 0
    overflow_inherited: bool = False
    low_dtypes: tuple[str, ...] | None = None
    # Its fp32 Inf/NaN are a mask's: an op put them there on purpose (`full(-inf)`) and ops
    # since passed them on (`where`, an add to the scores), all with non-finite outputs.
    mask_nonfinite: bool = False
    # Its outputs are constants of the program (fills, literals, buffers and ops on them
    # alone); `masked`: data outputs holding mask values somewhere (see capture/masks.py).
    constant: bool = False
    masked: bool = False

    @property
    def local_rel_error(self) -> float | None:
        return self.local_error.rel_l2 if self.local_error is not None else None


@dataclass
class UnitRecord:
    """What one unit did across the pass: summaries and error accumulators."""

    name: str
    kind: str
    op_indices: list[int] = field(default_factory=list)
    forward: TensorSummary = field(default_factory=TensorSummary)
    # The forward values the real low-precision run holds in the low dtype: what range flags judge.
    forward_low: TensorSummary = field(default_factory=TensorSummary)
    backward: TensorSummary = field(default_factory=TensorSummary)
    # Errors of the unit's outputs (see `unit_outputs`), set once the pass is over.
    local_error: ErrorAccumulator = field(default_factory=ErrorAccumulator)
    prop_error: ErrorAccumulator = field(default_factory=ErrorAccumulator)
    prop_nonfinite: int = 0
    # Whether what it hands on holds fp32 Inf/NaN (True where no other unit reads it), or it
    # wrote Inf/NaN into the model's state (a buffer updated in place).
    outputs_nonfinite: bool = True
    wrote_nonfinite_state: bool = False
    input_prop_error: float = 0.0  # of the values it reads from other units
    # The largest propagated error of the outputs it returns that another unit made (a
    # parent returning its child's output): read, not made, by this unit.
    handed_on_error: float = 0.0
    grad_nodes: list[tuple[str, TensorSummary]] = field(default_factory=list)
    grad_nonfinite_root: str | None = None
    param_names: list[str] = field(default_factory=list)
    param_bytes: int = 0
    saved_bytes: int = 0  # what autograd saved for backward from this unit's forward ops


def value_sources(records: list[OpRecord], op: int, slot: int) -> tuple[tuple[int, int], ...]:
    """The (op, output) pairs that made the values of output `slot` of record `op`."""
    sources = records[op].value_sources
    return ((op, slot),) if sources is None else sources


def unit_outputs(records: list[OpRecord], units: Mapping[str, UnitRecord]) -> None:
    """Set what each unit hands on: the values its ops made that an op of another unit reads
    (through views, copies and concatenations; of a multi-output op, only the outputs read -
    not a LayerNorm's saved statistics). Its local and propagated errors are those of these
    outputs: a unit's internals can be far larger than what it hands on - `(x + 3000) - 3000`
    - and pooling them would drown the output's error. `outputs_nonfinite` says whether they
    hold fp32 Inf/NaN: T5 takes `log(0)` on the way to its position buckets and drops the
    -inf, which is no finding. A unit whose values no other unit reads (the loss) pools all
    its ops. `input_prop_error` is the largest propagated error of the values it reads from
    other units, and of those it returns that another unit made (what ERROR_GROWTH compares
    with)."""
    outputs: dict[str, set[tuple[int, int]]] = {}
    input_error: dict[str, float] = {}
    # The propagated error each op reads: measured where the value is a module's output, else
    # the largest its own inputs carry. A parent's functional op between two children (SE's
    # `x.mean(2)`, a `torch.relu`) hands on its input's error: read as 0, the next child's
    # ordinary propagated error would look like growth from nothing.
    reads_error: dict[int, float] = {}
    # Units whose own op turns finite values non-finite (its local shadow, fed fp32 values,
    # makes Inf/NaN: an attention's `q @ k^T` over fp16's range): what they hand on is theirs,
    # even where a child (the output projection) returns it.
    made_nonfinite: set[str] = set()
    for r in records:
        if r.phase != Phase.FORWARD:
            continue
        carried = 0.0
        for i, slot in zip(r.inputs, r.input_slots, strict=True):
            if i < 0:
                continue
            for v, k in value_sources(records, i, slot):
                prop = records[v].output_errors.get(k, (None, None))[1]
                err = prop.rel_l2 if prop is not None else reads_error.get(v, 0.0)
                carried = max(carried, err)
                if records[v].unit != r.unit:
                    outputs.setdefault(records[v].unit, set()).add((v, k))
                    # The error of the values read (an input already non-finite makes growth
                    # meaningless: that is inherited damage).
                    input_error[r.unit] = max(input_error.get(r.unit, 0.0), err)
        if r.local_error is not None and r.local_error.nonfinite_mismatch and math.isfinite(carried):
            # Not measured where the value is no module's output: what reads it reads Inf/NaN.
            carried = math.inf
            made_nonfinite.add(r.unit)
        reads_error[r.index] = carried
    by_unit: dict[str, list[OpRecord]] = {}
    for r in records:
        if r.phase == Phase.FORWARD and r.output_errors:
            by_unit.setdefault(r.unit, []).append(r)
    for name, urec in units.items():
        handed_on = urec.handed_on_error if name not in made_nonfinite else 0.0
        urec.input_prop_error = max(input_error.get(name, 0.0), handed_on)
        read = sorted(outputs.get(name, ()))
        if read:
            urec.outputs_nonfinite = any(
                (summary := records[v].summary) is not None and summary.nonfinite_count > 0 for v, _ in read
            )
        pairs = [errs for v, k in read if (errs := records[v].output_errors.get(k)) is not None] or [
            (r.local_error, None) for r in by_unit.get(name, [])
        ]
        urec.local_error, urec.prop_error = ErrorAccumulator(), ErrorAccumulator()
        for local, prop in pairs:
            if local is not None:
                urec.local_error.merge(local)
            if prop is not None:
                urec.prop_error.merge(prop)
        urec.prop_nonfinite = urec.prop_error.nonfinite_mismatch

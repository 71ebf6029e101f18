"""Values meant to be masked, recognised from the dataflow.

Attention masks and sentinels are values the program puts there, not values it computes: a
`-100` or `finfo.min` in an additive mask, a `masked_fill(-1e4)`, a state started at -1e38.
They are judged by where they come from, not by their size: -1e38 or `finfo.min` turning into
-inf in fp16 still masks, and a softmax's probabilities at masked positions (~4e-44 after a
-100 mask) are meant to be zero, so neither counts as overflow or underflow, and neither is
charged as error. What is left out is positions, not tensors: a computed value that overflows
in the same tensor is still an overflow.

Where masks come from:

- a **constant**: a tensor every input of which is a constant - fills (`full`, `zeros`,
  `torch.tensor(-1e4)`, `fill_`), Python numbers, the model's buffers and tensor attributes
  (timm's Swin keeps its -100 mask as a buffer), and ops on constants alone
  (`zeros_like(k) - 1e38`, `full(-inf).triu(1)`, Swin's `masked_fill(m != 0, -100)` of a
  constant). A constant is masked where it holds at most `MASK_LOGIT` (or -inf): its
  positions are computed from its values, only when they are needed, on the device.
- **writes of such a value into data**: `masked_fill`, `where`, `index_put` (`x[m] = -inf`).

Ops that hand the positions on (`PASSING`): views and copies (casts, `cat`, `expand`), an add
of the mask to the scores, a subtraction from them, a positive scaling, `maximum`/`minimum`,
and `softmax`/`exp`/`log_softmax`/dropout, whose outputs there are the zeros (or -inf) the
mask means. Any other op ends the mask: `p @ v` is computed from the probabilities.
Data positions are kept per tensor (a bool tensor, weakly keyed), so an op that reads no
masked input pays one loop over its inputs and nothing else. Nothing here reads the device:
positions are kept even where none may be set, and whether any is, is read back with the
op's statistics (`MaskTracker.any_set_job`), which then treat an empty mask as none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from precision_doctor.capture.memory import WeakIdMap
from precision_doctor.capture.ops import OpInfo, aten
from precision_doctor.capture.readback import Job
from precision_doctor.capture.records import OpRecord
from precision_doctor.capture.statistics import compact

MASK_LOGIT = -16.0
"""A constant at most this (or -inf) masks: e^-16 is below fp32's epsilon, so a logit pushed
down that far is meant to vanish next to any other. Only constants are read this way; a
computed value is never a mask by its size."""

# Ops that read their tensor input for its shape, dtype and device only.
SHAPE_ONLY_OPS = frozenset(
    {
        aten.zeros_like.default,
        aten.ones_like.default,
        aten.full_like.default,
        aten.empty_like.default,
        aten.new_zeros.default,
        aten.new_ones.default,
        aten.new_full.default,
        aten.new_empty.default,
        aten.new_empty_strided.default,
    }
)
# A literal the model wrote (`torch.tensor(-1e4)`): made outside the mode, lifted into it.
LITERAL_OPS = frozenset({aten.lift_fresh.default, aten.lift_fresh_copy.default})
# Copies whose output holds its first input's values in the same places.
_SAME_PLACES = frozenset(
    {
        aten.clone.default,
        aten.alias.default,
        aten.detach.default,
        aten._to_copy.default,
        aten.lift_fresh.default,
        aten.lift_fresh_copy.default,
    }
)
# Views whose positions are not their input's logical positions.
_NOT_LOGICAL = frozenset({aten.as_strided.default, aten.view.dtype})
_ADDS = frozenset({aten.add, aten.add_})
_SUBS = frozenset({aten.sub, aten.sub_})
_SCALES = frozenset({aten.mul, aten.mul_, aten.div, aten.div_})
_KEEPS = frozenset(
    {
        aten._softmax,
        aten.softmax,
        aten._log_softmax,
        aten.log_softmax,
        aten.exp,
        aten.exp_,
        aten.native_dropout,
    }
)
_FILLS = frozenset({aten.masked_fill, aten.masked_fill_})
_WHERE = frozenset({aten.where})
_INDEX_PUTS = frozenset({aten.index_put, aten.index_put_})
_MAXIMA = frozenset({aten.maximum, aten.fmax})
_MINIMA = frozenset({aten.minimum, aten.fmin})
_WRITES = _FILLS | _WHERE | _INDEX_PUTS
PASSING = _ADDS | _SUBS | _SCALES | _KEEPS | _FILLS | _WHERE | _INDEX_PUTS | _MAXIMA | _MINIMA
_MASKED_SOFTMAX = aten._masked_softmax.default  # its bool mask argument says where

Positions = torch.Tensor  # bool, broadcasting to the tensor it describes


def is_mask_value(v: float) -> bool:
    return v <= MASK_LOGIT  # -inf included, NaN not


class MaskTracker:
    """The masked positions of the capture's fp32 tensors (see the module docstring).
    `constant_ids`: the tensors no op of the step makes that are constants of the model (its
    buffers and tensor attributes); any other tensor no op made (a parameter, the batch, a
    collective's result) is a value."""

    def __init__(self) -> None:
        self.constant_ids: set[int] = set()
        self._positions = WeakIdMap()  # tensor -> Positions

    # --- per op ---------------------------------------------------------------------------
    def op(
        self,
        func: Any,
        info: OpInfo,
        args: Any,
        kwargs: Any,
        tensors_in: Sequence[torch.Tensor],
        sources: Sequence[OpRecord | None],
        outs: Sequence[torch.Tensor],
        rec: OpRecord,
    ) -> None:
        """Sets `rec.constant`, and the positions of its outputs where a mask reaches them
        (`rec.masked`). `sources[k]`: the record that made input k, None for a tensor no op
        made."""
        constant = not info.random
        maybe = False  # a masked input, or a float constant that may hold mask values
        for t, src in zip(tensors_in, sources, strict=True):
            if src is None:
                const_in = id(t) in self.constant_ids
            else:
                const_in = src.constant
                maybe = maybe or src.masked
            maybe = maybe or (const_in and t.is_floating_point())
            constant = constant and const_in
        if func in SHAPE_ONLY_OPS or func in LITERAL_OPS:
            constant = True
        rec.constant = constant
        found: list[Positions | None] = []
        maybe = maybe or func.overloadpacket in _WRITES  # a number written: `masked_fill(m, -100.0)`
        if (
            maybe
            and not constant
            and outs
            and (info.preserves_values or func.overloadpacket in PASSING or func is _MASKED_SOFTMAX)
        ):
            made = {id(t): src for t, src in zip(tensors_in, sources, strict=True)}
            found = self._pass_on(func, info, args, kwargs, outs, lambda t: self._of(t, made))
        if self._positions and (info.mutates or info.writes_kwargs):
            # Written in place: what was known of the tensor (and of the base of a written
            # view) is stale; its new positions, if any, are set below.
            written = [args[i] for i in info.mutates if i < len(args)] + [kwargs.get(n) for n in info.writes_kwargs]
            for t in written:
                if isinstance(t, torch.Tensor):
                    self._positions.pop(t)
                    if t._base is not None:
                        self._positions.pop(t._base)
        for o, p in zip(outs, found, strict=False):
            if p is None or not o.is_floating_point():
                continue
            # Kept as small as it broadcasts: a (T, T) causal mask for (B, H, T, T) scores.
            # Possibly none is set: whether any is, is read with the statistics (`any_set_job`).
            if _broadcasts(p.shape, o.shape):
                self._positions[o] = p
                rec.masked = True

    def positions(self, t: torch.Tensor, src: OpRecord | None) -> Positions | None:
        """Where `t` (made by `src`; None: no op made it) may hold mask values: None where it
        holds none, as far as is known without reading the device; the positions given may
        still all be False (`any_set_job`)."""
        p = self._positions.get(t)
        if p is not None:
            return p  # type: ignore[no-any-return]
        constant = src.constant if src is not None else id(t) in self.constant_ids
        if not constant or not t.is_floating_point():
            return None
        values, _ = compact(t.detach())  # an expanded constant: compared once, expanded again
        p = (values <= MASK_LOGIT).expand(t.shape)  # possibly none (see `any_set_job`)
        self._positions[t] = p
        return p

    def known(self, t: torch.Tensor, src: OpRecord | None) -> tuple[Positions | None, bool]:
        """What `positions` gives without reading `t`'s values: the positions known from the
        dataflow, and whether `t` is a float constant whose positions would be read off its
        values (`constant_positions_job`)."""
        p = self._positions.get(t)
        if p is not None:
            return p, False
        constant = src.constant if src is not None else id(t) in self.constant_ids
        return None, constant and t.is_floating_point()

    @staticmethod
    def any_set_job(p: Positions) -> Job[bool]:
        """Whether positions `p` hold any masked position, as a job (capture/readback.py):
        `positions` sets them without reading the device, and a mask may turn out empty (a
        padding mask with no padding, a constant with no mask value)."""
        return bool((yield compact(p)[0].any()))

    @staticmethod
    def constant_positions_job(t: torch.Tensor) -> Job[Positions | None]:
        """A constant's positions read off its values, as a job (capture/readback.py)."""
        values, _ = compact(t.detach())  # an expanded constant: compared once, expanded again
        below = values <= MASK_LOGIT
        if not (yield below.any()):
            return None
        return below.expand(t.shape)

    # --- the rules -----------------------------------------------------------------------
    def _pass_on(
        self,
        func: Any,
        info: OpInfo,
        args: Any,
        kwargs: Any,
        outs: Sequence[torch.Tensor],
        of: Callable[[Any], Positions | None],
    ) -> list[Positions | None]:
        packet = func.overloadpacket
        if not args:
            return []
        a = args[0]
        if func in _SAME_PLACES or packet in _KEEPS:
            return [of(a)] + [None] * (len(outs) - 1)
        if func is aten.copy_.default:
            return [of(args[1])]
        if func in (aten.cat.default, aten.stack.default):
            parts = [of(t) for t in args[0]]
            if all(p is None for p in parts):
                return [None]
            full = [
                p.expand(t.shape) if p is not None else torch.zeros(t.shape, dtype=torch.bool)
                for p, t in zip(parts, args[0], strict=True)
            ]
            return _attempt(lambda: [func(full, *args[1:], **kwargs)])
        if info.preserves_values:
            logical = info.is_view or func is aten._unsafe_view.default
            if not logical or func in _NOT_LOGICAL or not isinstance(a, torch.Tensor):
                return []
            p = of(a)
            if p is None:
                return []
            p = p.expand(a.shape)
            return _attempt(
                lambda: _as_list(func(p, *args[1:], **kwargs)),
                lambda: _as_list(func(p.contiguous(), *args[1:], **kwargs)),  # `view` of an expanded mask
            )
        if packet in _ADDS:
            b = args[1]
            alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
            pb = of(b) if isinstance(b, torch.Tensor) and _positive(alpha) else None
            return [_either(of(a), pb)]
        if packet in _SUBS:
            return [of(a)]  # a mask subtracted is no mask
        if packet in _SCALES:  # the masked tensor first: `scores * 0.125`, `scores / 8`
            return [of(a) if _positive(args[1]) else None]
        if packet in _MAXIMA or packet in _MINIMA:
            pa, pb = of(a), of(args[1])
            if packet in _MINIMA:
                return [_either(pa, pb)]
            return [pa & pb if pa is not None and pb is not None else None]
        if packet in _FILLS:
            cond, value = args[1], args[2]
            fills = _mask_value(value, of)
            return [_where(cond, fills, of(a))]
        if packet in _WHERE:
            if len(args) < 3:
                return []
            cond, x, y = args[0], args[1], args[2]
            return [_where(cond, _mask_value(x, of), _mask_value(y, of))]
        if packet in _INDEX_PUTS:
            indices, values = args[1], args[2]
            accumulate = bool(args[3]) if len(args) > 3 else bool(kwargs.get("accumulate", False))
            base = of(a)
            if accumulate:
                return [base]
            written = _mask_value(values, of)
            if (written is None or written is False) and base is None:
                return [None]
            start = base.expand(a.shape).clone() if base is not None else torch.zeros(a.shape, dtype=torch.bool)
            put = written if isinstance(written, torch.Tensor) else torch.tensor(bool(written))
            return _attempt(lambda: [aten.index_put.default(start, indices, put)])
        if func is _MASKED_SOFTMAX:
            return [_either(of(a), args[1].to(torch.bool) if isinstance(args[1], torch.Tensor) else None)]
        return []

    def _of(self, t: Any, made: dict[int, OpRecord | None]) -> Positions | None:
        """Positions of an input of the op (`made`: its inputs' records by id)."""
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return None
        return self.positions(t, made.get(id(t)))


def _broadcasts(shape: Sequence[int], to: Sequence[int]) -> bool:
    return len(shape) <= len(to) and all(n in (1, m) for n, m in zip(reversed(shape), reversed(to), strict=False))


def _as_list(out: Any) -> list[Positions | None]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _attempt(*tries: Callable[[], list[Positions | None]]) -> list[Positions | None]:
    """The first way of computing positions that works; none where none does (a view the
    positions' layout does not allow: the mask is lost, never made up)."""
    for attempt in tries:
        with contextlib.suppress(RuntimeError, TypeError, IndexError):
            return attempt()
    return []


def _positive(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v > 0
    return False


def _either(a: Positions | None, b: Positions | None) -> Positions | None:
    if a is None:
        return b
    if b is None:
        return a
    return a | b


def _mask_value(v: Any, of: Callable[[Any], Positions | None]) -> Positions | bool | None:
    """Where a written value (a number, or a tensor) is a mask: True/False for a number."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return is_mask_value(float(v))
    if isinstance(v, torch.Tensor):
        return of(v)
    return None


def _where(cond: Any, yes: Positions | bool | None, no: Positions | bool | None) -> Positions | None:
    """Positions of `where(cond, yes, no)`."""
    if not isinstance(cond, torch.Tensor):
        return None
    if (yes is None or yes is False) and (no is None or no is False):
        return None
    c = cond.to(torch.bool)
    y = yes if isinstance(yes, torch.Tensor) else torch.tensor(bool(yes))
    n = no if isinstance(no, torch.Tensor) else torch.tensor(bool(no))
    return torch.where(c, y, n)

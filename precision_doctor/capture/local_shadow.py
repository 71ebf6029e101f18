"""Local shadows: the low-precision values that ride along each forward op of the fp32 run.

A unit's local shadow restarts at the unit from the fp32 run's inputs, rounded where the real
low-precision run holds them low, and gives the unit's own error, so downstream units are not
blamed for inherited damage. `LocalShadows` keeps one store per unit (fp32 tensor -> its
shadow) and does the three things a shadow needs per op: build its arguments (before the fp32
op can mutate anything), run it, and store its outputs. Shadows held low are stored in the low
dtype itself (their values are representable), which halves what they cost in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from precision_doctor.capture.memory import WeakIdMap, dense, layout_key
from precision_doctor.capture.ops import OpInfo, aten, map_args, out_overload, outputs_of
from precision_doctor.capture.statistics import Workspace

# Transient fp32 tensors at least this large (16 MiB) - upcast shadow inputs, shadow results
# that are only rounded - go to reused buffers (see `LocalShadows.pooled_like`).
POOLED_ELEMENTS = 1 << 22
# Workspace slots of those buffers, released together before backward.
POOL_SLOT = "pooled"


def any_low(low: bool | Sequence[bool]) -> bool:
    """Whether any output is held low (`low`: for all outputs, or per output)."""
    return low if isinstance(low, bool) else any(low)


class LocalShadows:
    """The units' local shadow stores, and one op's shadow built, run and stored."""

    def __init__(self, low_dtype: torch.dtype, workspace: Workspace) -> None:
        self.low = low_dtype
        self.workspace = workspace
        self.stores: dict[str, WeakIdMap] = {}
        # Type promotion over what the op reads (see `args`): dimensioned inputs decide, 0-dim
        # ones only when there are none (a wrapped Python number never makes fp16 fp32).
        self._read_low: dict[bool, list[bool]] = {True: [], False: []}
        # Rounded copies of tensors without a shadow (parameters, the batch), shared within one
        # op only: a cache across ops would keep an fp16 copy of every parameter alive (250 MiB
        # on GPT-2 small) for a conversion that is cheap.
        self._op_rounded: dict[int, torch.Tensor] = {}
        self._op_upcast: dict[tuple[Any, ...], torch.Tensor] = {}
        # The current op's pooled upcasts (by id) and the low tensors they were made from: the
        # same finiteness and NaNs, and no buffer the next op reuses, so the statistics read
        # those (`OpPipeline._local_inputs`). Set by `args`, kept until its next call.
        self.upcast_sources: dict[int, torch.Tensor] = {}
        # Whether the current op's shadow reads low inputs as they are (`args`): its kernel is
        # the real low-precision one, as in the real run, and its result is low already.
        self.low_kernel = False
        self._emulated: dict[str, bool] = {}

    def store(self, unit: str) -> WeakIdMap:
        store = self.stores.get(unit)
        if store is None:
            store = self.stores[unit] = WeakIdMap()
        return store

    def forget(self, t: torch.Tensor) -> None:
        """`t` no longer holds what its shadows stand for (written by a collective, random)."""
        for store in self.stores.values():
            store.pop(t, None)

    def restride(self, func: Any, args: Any, kwargs: Mapping[str, Any]) -> None:
        """An op that changes its first argument's strides in place does so to its shadows."""
        for store in self.stores.values():
            shadow = store.get(args[0])
            if shadow is not None:
                func(shadow, *args[1:], **kwargs)

    def end_op(self) -> None:
        self._op_rounded.clear()
        self._op_upcast.clear()

    # --- inputs --------------------------------------------------------------------------
    def _round(self, t: torch.Tensor) -> torch.Tensor:
        r = self._op_rounded.get(id(t))
        if r is None:
            r = t.detach().to(self.low)
            self._op_rounded[id(t)] = r
        return r

    def _upcast(self, s: torch.Tensor, *, shareable: bool) -> torch.Tensor:
        """`s.float()`, shared by the shadows of one op reading the same low-precision values
        (a parameter, a view of one): on GPT-2 the tied 38.6M embedding was upcast once
        instead of twice for the logits matmul. Not for ops that write their inputs, which
        would change the other shadow's input."""
        if not shareable:
            return s.float()
        key = layout_key(s)
        up = self._op_upcast.get(key)
        if up is None:
            pooled = self.pooled_like(s, f"{POOL_SLOT}.upcast{len(self._op_upcast)}")
            up = pooled.copy_(s) if pooled is not None else s.float()
            self._op_upcast[key] = up
            if pooled is not None:
                self.upcast_sources[id(up)] = s
        return up

    def pooled_like(self, t: torch.Tensor, slot: str) -> torch.Tensor | None:
        """An fp32 tensor with `t`'s shape and strides in a buffer reused from op to op, for
        a large dense `t`; None otherwise. Large fresh CPU tensors are fresh mmaps whose
        pages fault in on first touch, ~5x the cost of a conversion into them; the buffers
        are released before backward, where they would only add to the peak."""
        if t.numel() < POOLED_ELEMENTS or not dense(t):
            return None
        buf = self.workspace.get(slot, t.numel(), torch.float32, t.device)
        return torch.as_strided(buf, t.shape, t.stride())

    def _input(self, t: torch.Tensor, store: WeakIdMap | None, low: bool, cast: bool) -> torch.Tensor:
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

    def args(
        self,
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
        self.upcast_sources.clear()
        self.low_kernel = False
        position = iter(range(1 << 30))
        self._read_low = {True: [], False: []}

        def pick(t: torch.Tensor) -> torch.Tensor:
            i = next(position)
            want = wanted[i] if wanted is not None and i < len(wanted) else None
            if want is None:
                kept = held[i] if held is not None and i < len(held) else None
                s = self._input(t, store, low if kept is None else kept, False)
            else:
                s = self._input(t, store, want, want)
            if t.is_floating_point():
                self._read_low[t.dim() > 0].append(s.dtype == self.low)
            if not info.preserves_values and s.dtype != t.dtype and t.dtype == torch.float32:
                if want and s.dtype == self.low and not self.emulated(t.device.type):
                    # The real run reads it low, with the device's real low kernels: so does
                    # the shadow (a bf16 matmul on AMX, fp16 tensor cores), with no upcast.
                    self.low_kernel = True
                else:
                    s = self._upcast(s, shareable=not (info.mutates or info.writes_kwargs))
            return s

        sargs, skwargs = map_args(args, kwargs, pick)
        for name in info.writes_kwargs:  # never write the fp32 tensor from a shadow (`out=`)
            t, st = kwargs.get(name), skwargs.get(name)
            if (
                isinstance(t, torch.Tensor)
                and isinstance(st, torch.Tensor)
                and (st.untyped_storage().data_ptr() == t.untyped_storage().data_ptr())
            ):
                skwargs[name] = st.clone()
        if info.mutates:
            sargs = list(sargs)
            for i in info.mutates:
                if (
                    i < len(sargs)
                    and isinstance(sargs[i], torch.Tensor)
                    and (sargs[i].untyped_storage().data_ptr() == args[i].untyped_storage().data_ptr())
                ):
                    sargs[i] = sargs[i].clone()  # never mutate the fp32 tensor twice
            sargs = tuple(sargs)
        return sargs, skwargs

    def emulated(self, device: str) -> bool:
        """Whether the real low run on `device` emulates this dtype's arithmetic (fp32 kernels
        on upcast inputs, `lowrun.emulates`): the shadows then emulate it too."""
        found = self._emulated.get(device)
        if found is None:
            from precision_doctor.capture.lowrun import emulates

            found = self._emulated[device] = emulates(self.low, device)
        return found

    @staticmethod
    def exact_inputs(
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

    def promotes_low(self, picked: bool, low: bool) -> bool:
        """Whether an op without a counterpart in the real run (it runs in its inputs' dtype)
        makes a low output: all the inputs that decide promotion are low. `picked`: whether
        `args` built this op's shadow inputs."""
        if not picked:
            return low
        reads = self._read_low[True] or self._read_low[False]
        return bool(reads) and all(reads)

    # --- running and storing -------------------------------------------------------------
    def call(self, func: Any, info: OpInfo, sargs: tuple[Any, dict[str, Any]], out: Any, *, stored_low: bool) -> Any:
        """Run one shadow of an op. A large fp32 result that is only rounded to the low dtype
        and dropped (a shadow of GPT-2's 12.9M logits) is written into a reused buffer
        through the op's `out=` overload: a fresh 51 MiB tensor costs more in page faults
        than the rounding itself."""
        if func is aten.native_dropout.default:
            return self._dropout(sargs[0], out)
        if self.low_kernel and not info.preserves_values:
            try:
                return func(*sargs[0], **sargs[1])
            except (RuntimeError, NotImplementedError):
                # No low kernel for this op here (one the real run does not have): emulated.
                up = map_args(sargs[0], sargs[1], lambda t: t.float() if t.dtype == self.low else t)
                return func(*up[0], **up[1])
        if stored_low and not info.preserves_values and isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            result = self.pooled_like(out, f"{POOL_SLOT}.result")
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
    def _dropout(sargs: Any, out: Any) -> Any:
        # Reuse the fp32 run's mask: a second draw would compare two different dropouts.
        shadow_in, p = sargs[0], float(sargs[1])
        train = sargs[2] if len(sargs) > 2 else True
        mask = out[1]
        if not train or p == 0.0:
            return (shadow_in.float(), mask)
        return (shadow_in.float() * mask * (1.0 / (1.0 - p)), mask)

    def keep(
        self, info: OpInfo, refs: Sequence[torch.Tensor], sout: Any, store: WeakIdMap, low: bool | Sequence[bool]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Map each fp32 output (`refs`: the op's outputs, `outputs_of`) to its shadow, rounded
        where `low` (per output) says the real run holds it in the low dtype; returns the (ref,
        shadow) pairs for error."""
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
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

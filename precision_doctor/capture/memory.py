"""Memory tricks of the capture: an identity map that does not keep tensors alive, layout
keys, handing freed heap back to the kernel, and the caller's heap kept out of the cyclic
garbage collector's full passes."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch


def dense(t: torch.Tensor) -> bool:
    """Whether `t` covers its memory exactly once in some order (a permuted contiguous
    tensor), so a buffer of `numel` elements can take its strides."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def layout_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Tensors with equal keys read the same memory the same way."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _load_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return cast(Callable[[int], int], ctypes.CDLL(None).malloc_trim)  # glibc
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return None


_MALLOC_TRIM = _load_malloc_trim()
# Below this much freed (a forward's outputs, fp32 gradients once compared) the trim (~1.6 ms
# on the demo model) costs more than it saves.
TRIM_AFTER_BYTES = 256 << 20


def return_free_heap() -> None:
    """Hand the memory the forward freed (shadows, upcasts) back to the kernel before the
    backward allocates gradients. Under free page reporting (virtio-balloon, as in
    Firecracker VMs) the kernel reuses recently freed pages first, while pages idle for a
    few seconds have gone back to the host and fault in at ~5 us per 4 KiB page (a fresh
    51 MiB tensor: 70 ms instead of 8). On GPT-2 small the backward went from 1.4-1.8 s to
    1.3-1.4 s (A/B, 4 runs each); the call itself takes ~24 ms."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextlib.contextmanager
def caller_heap_frozen() -> Iterator[None]:
    """The objects alive at entry (the caller's heap: torch, transformers, the model) left out
    of the cyclic GC until exit, so that an analysis' own allocations do not set off full
    collections that walk them. A process that imported transformers holds ~500K such
    objects; a full pass over them takes ~0.26 s, and the records of a T5 analysis (1.1 s)
    set one off every other analysis. Reference counting still frees them; only cycles wait
    for a later collection. Left as it is where the caller froze objects itself (an unfreeze
    would release theirs too) or turned the collector off."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class WeakIdMap:
    """Tensor -> value by identity, an entry dropped when its tensor dies: what torch's
    `WeakIdKeyDictionary` does, with a lookup that builds no key object (0.08 us against
    0.76 us; the capture looks up several per op)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}

    def get(self, t: torch.Tensor, default: Any = None) -> Any:
        entry = self._data.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else default

    def __contains__(self, t: torch.Tensor) -> bool:
        entry = self._data.get(id(t))
        return entry is not None and entry[0]() is t

    def __setitem__(self, t: torch.Tensor, value: Any) -> None:
        key, data = id(t), self._data

        def drop(ref: weakref.ref[torch.Tensor]) -> None:
            entry = data.get(key)
            if entry is not None and entry[0] is ref:  # not a newer tensor with the same id
                del data[key]

        data[key] = (weakref.ref(t, drop), value)

    def pop(self, t: torch.Tensor, default: Any = None) -> Any:
        entry = self._data.get(id(t))
        if entry is None or entry[0]() is not t:
            return default
        del self._data[id(t)]
        return entry[1]

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

"""Hand the user's model (and batch) back exactly as they came in, also when the analysis
fails halfway."""

from __future__ import annotations

import random
from types import TracebackType
from typing import Any

import numpy as np
import torch

from precision_doctor.model.parallel import reset_fsdp_iteration, storage_ptr
from precision_doctor.model.spec import batch_tensors


class ModuleAttributes:
    """The attribute bindings of every module (plain attributes, parameters, buffers,
    children): `restore()` puts back the objects bound at snapshot time. Running `forward`
    can rebind them - a lazy cache (`self.mask = ...`), a reassigned buffer, a counter - and
    torch.fx's tracing leaves its Proxy objects there. Values changed in place are not
    covered (the guard copies what in-place ops write)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._saved = [
            (d, dict(d)) for mod in model.modules() for d in (vars(mod), mod._parameters, mod._buffers, mod._modules)
        ]

    def restore(self) -> None:
        for d, saved in self._saved:
            if d.keys() != saved.keys() or any(d[k] is not v for k, v in saved.items()):
                d.clear()
                d.update(saved)


class ModelStateGuard:
    """Snapshot on enter, restore on exit: `.grad`, buffers, train/eval mode,
    `requires_grad`, RNG states. Parameters are copied only if an op is about to write to
    one (`before_mutation`), so the common case costs no parameter copy.

    With `batch`, its tensors too: a forward that writes its input in place (`x.mul_(2)`)
    would otherwise hand each later run of the analysis other values than the first had
    (the fp32 run a doubled batch after the low run), and the caller a changed batch; a
    batch tensor that requires grad gets its `.grad` back (the analysis' backwards, one of
    them loss-scaled, would add into it)."""

    def __init__(self, model: torch.nn.Module, batch: Any = None) -> None:
        self.model = model
        self._params = dict(model.named_parameters(remove_duplicate=False))
        # (A parameter passed in the batch is guarded as a parameter.)
        params = {id(p) for p in self._params.values()}
        self._batch = [t for t in batch_tensors(batch) if id(t) not in params]
        self._batch_storages: dict[int, list[torch.Tensor]] = {}
        for t in self._batch:
            ptr = storage_ptr(t)
            if ptr:
                self._batch_storages.setdefault(ptr, []).append(t)
        # Aliases taken here, outside any dispatch mode: one taken inside a mode's handler has
        # a version counter of its own, and a restore through it would not tell autograd that
        # a tensor a kept graph saved has changed.
        self._batch_aliases = {id(t): t.detach() for t in self._batch}
        self._batch_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Writes through `.data` or a view reach a parameter via another tensor object:
        # recognise those by the storage they write to.
        self._param_storages: dict[int, list[torch.Tensor]] = {}
        # A DTensor parameter (FSDP2, tensor parallel) is recognised by its local shard's memory.
        for p in {id(p): p for p in self._params.values()}.values():
            ptr = storage_ptr(p)
            if ptr:
                self._param_storages.setdefault(ptr, []).append(p)
        self._param_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Aliases of each parameter's memory (no copy): `p.data = other` rebinds a parameter
        # without an op the capture sees, and `__exit__` binds this memory back.
        self._original = {id(p): p.detach() for p in self._params.values()}

    def __enter__(self) -> ModelStateGuard:
        m = self.model
        self._attributes = ModuleAttributes(m)
        self._grads = {n: p.grad for n, p in self._params.items()}
        self._requires_grad = {n: p.requires_grad for n, p in self._params.items()}
        self._training = {n: mod.training for n, mod in m.named_modules(remove_duplicate=False)}
        self._buffers = {n: (b, b.detach().clone()) for n, b in m.named_buffers(remove_duplicate=False)}
        # Their memory, as the parameters': `b.data = b.data.to(low)` rebinds a buffer in place.
        self._buffer_memory = {id(b): b.detach() for b, _ in self._buffers.values()}
        self._buffer_ids = {id(b) for b, _ in self._buffers.values()}
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._py_rng = random.getstate()
        self._np_rng = np.random.get_state()
        for p in self._params.values():
            p.grad = None  # the analysis' backward must not add into the user's gradients
        self._batch_grads = [(t, t.grad) for t in self._batch if t.is_leaf and t.requires_grad]
        for t, _ in self._batch_grads:
            t.grad = None
        return self

    def before_mutation(self, t: torch.Tensor) -> None:
        """Called by the capture before an in-place op writes to `t`. What is copied is the
        parameter's original memory: a write into memory that `p.data = ...` bound under it
        needs no copy, as `__exit__` binds the original back."""
        ptr = storage_ptr(t)
        targets = self._param_storages.get(ptr, []) if ptr else []
        for p in targets:
            if id(p) not in self._param_copies:
                original = self._original[id(p)]
                self._param_copies[id(p)] = (original, original.clone())
        for t in self._batch_storages.get(ptr, []) if ptr else []:
            if id(t) not in self._batch_copies:
                alias = self._batch_aliases[id(t)]
                self._batch_copies[id(t)] = (alias, alias.clone())

    def restore_batch(self) -> None:
        """Put back the batch tensors written since the guard began (or since the last
        restore), for the next run to read the batch as the caller gave it."""
        with torch.no_grad():
            for alias, saved in self._batch_copies.values():
                alias.copy_(saved)
        self._batch_copies.clear()

    def analysis_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad for n, p in self._params.items() if p.grad is not None}

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            reset_fsdp_iteration(self.model)  # FSDP2's recovery from a pass that raised midway
        self._attributes.restore()
        for p in {id(p): p for p in self._params.values()}.values():
            original = self._original[id(p)]
            if storage_ptr(p) != storage_ptr(original) or p.shape != original.shape:
                p.data = original
        self.restore_batch()
        with torch.no_grad():
            for original, saved in self._param_copies.values():
                original.copy_(saved)
            for b, saved in self._buffers.values():
                memory = self._buffer_memory[id(b)]
                if storage_ptr(b) != storage_ptr(memory) or b.dtype != memory.dtype:
                    b.data = memory
                if b.shape == saved.shape:
                    b.copy_(saved)
        for n, p in self._params.items():
            p.grad = self._grads[n]
            p.requires_grad_(self._requires_grad[n])
        for t, g in self._batch_grads:
            t.grad = g
        for n, mod in self.model.named_modules(remove_duplicate=False):
            if n in self._training:
                mod.training = self._training[n]
        torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)
        random.setstate(self._py_rng)
        np.random.set_state(self._np_rng)

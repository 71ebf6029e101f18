"""Dispatch-mode plumbing shared by the capture's modes (the shadow capture, the emulated
low-precision run): how their handlers stay out of torch._dynamo's way."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch.utils._python_dispatch import TorchDispatchMode

M = TypeVar("M", bound=TorchDispatchMode)

_DYNAMO_SAFE: dict[type[Any], type[Any]] = {}


def dynamo_safe(cls: type[M]) -> type[M]:
    """`cls` while torch._dynamo is not imported; else a subclass whose handler dynamo never
    traces, wrapped as torch would wrap it (a model with torch.compile'd parts runs compiled
    frames around it). The modes opt out of torch's own wrapping (`_should_skip_dynamo`):
    its first call imports torch._dynamo (~0.7 s a process) and every op pays the wrapper,
    while nothing can be compiled before torch._dynamo is imported."""
    if "torch._dynamo" not in sys.modules:
        return cls
    safe = _DYNAMO_SAFE.get(cls)
    if safe is None:
        disable = cast(Callable[..., Any], torch.compiler.disable)  # unannotated in torch
        handler = disable(cls.__torch_dispatch__, recursive=True)
        safe = _DYNAMO_SAFE[cls] = type(cls.__name__, (cls,), {"__torch_dispatch__": handler})
    return cast(type[M], safe)


_FAKE = torch._C._TorchDispatchModeKey.FAKE


def faking() -> bool:
    """Whether a FakeTensorMode is running: DTensor's sharding propagation runs ops on fake
    tensors (on a cache miss, so in one run and not the next), and they reach a user mode
    first. They are no ops of the model: a mode runs them as they are."""
    return torch._C._get_dispatch_mode(_FAKE) is not None

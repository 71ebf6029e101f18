"""Training-loop integrations, imported lazily: the core package never needs transformers
or Lightning.

- `PreflightCallback` (`precision_doctor.integrations.transformers`): a transformers
  `TrainerCallback` that runs the pre-flight on the first training batch in `on_train_begin`.
- `LightningPreflightCallback` (`precision_doctor.integrations.lightning`): the same for a
  PyTorch Lightning `Trainer`, on the first `on_train_batch_start`.

On no-go both log the reasons and, with `mode="stop"` (default), stop the run after its
first step (the earliest point either trainer checks its stop flag); `mode="warn"` only
logs; `mode="raise"` raises `PreflightFailed` before any optimizer step.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from precision_doctor.errors import PrecisionDoctorError

if TYPE_CHECKING:
    from precision_doctor.training.preflight import PreflightResult

logger = logging.getLogger("precision_doctor")

__all__ = ["LightningPreflightCallback", "PreflightCallback", "PreflightFailed"]

MODES = ("stop", "warn", "raise")


class PreflightFailed(PrecisionDoctorError):
    """Raised by the callbacks in mode="raise" on a no-go verdict; `.result` holds it."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise PrecisionDoctorError(f"unknown callback mode {mode!r}; choose one of: {', '.join(MODES)}")
    return mode


def optimizer_factory(
    optimizer: Any, source: str = "trainer's"
) -> Callable[[torch.nn.Module], torch.optim.Optimizer] | None:
    """A fresh optimizer of the same class and defaults as `optimizer` (unwrapping
    accelerate's AcceleratedOptimizer), or None (then the pre-flight's default is used)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        return None
    cls = type(inner)
    try:  # defaults may hold keys the constructor does not take (AdamW's decoupled_weight_decay)
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {k: v for k, v in inner.defaults.items() if k in accepted}
    except (TypeError, ValueError):
        defaults = dict(inner.defaults)

    def build(model: torch.nn.Module) -> torch.optim.Optimizer:
        return cls([p for p in model.parameters() if p.requires_grad], **defaults)

    build.__name__ = f"{cls.__name__}({source} hyperparameters)"
    return build


def trained_as(
    model: torch.nn.Module, batch: Any, dtype: str | None, kw: dict[str, Any]
) -> tuple[torch.nn.Module, Any, str | None]:
    """The model, batch and dtype to pre-flight, for a model the trainer already holds in a
    low dtype (Lightning's "bf16-true", a model `.to(torch.bfloat16)` handed to a Trainer):
    that trains in the pure regime, whose analysis needs the fp32 model as its reference.
    Such a model is pre-flown as an fp32 copy, its batch's floats in fp32, in the pure regime
    (`kw` gets `regime="pure"` unless the caller chose one) and its own dtype; any other
    model as it is."""
    found = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    if len(found) != 1 or next(iter(found)) not in low:
        return model, batch, dtype
    from precision_doctor.capture.lowrun import cast_floats

    kw.setdefault("regime", "pure")
    return copy.deepcopy(model).float(), cast_floats(batch, torch.float32), dtype or low[next(iter(found))]


def gate(run: Callable[[], PreflightResult], mode: str) -> tuple[PreflightResult | None, bool]:
    """Run the pre-flight and act on it as `mode` says: (its result, None where it could not
    run; whether to stop the training). Logs either way; raises in mode "raise" (the
    pre-flight's own error, or `PreflightFailed` on no-go)."""
    try:
        result = run()
    except PrecisionDoctorError as e:
        if mode == "raise":
            raise
        could_not_run(e, mode)
        return None, mode == "stop"
    log_result(result, mode)
    if result.go:
        return result, False
    if mode == "raise":
        raise PreflightFailed(result.verdict, result)
    return result, mode == "stop"


def could_not_run(error: PrecisionDoctorError, mode: str, log: logging.Logger = logger) -> None:
    """Log a pre-flight that could not run: a warning in mode "warn" (training goes on), an
    error in mode "stop" (training stops: nothing was judged)."""
    if mode == "warn":
        log.warning("precision-doctor pre-flight could not run (training goes on): %s", error)
    else:
        log.error("precision-doctor pre-flight could not run: %s; stopping the run (mode='stop')", error)


def log_result(result: PreflightResult, mode: str, log: logging.Logger = logger) -> None:
    """Log the verdict: info on go, a warning with every reason on no-go."""
    if result.go:
        log.info("precision-doctor pre-flight: %s", result.verdict)
        return
    lines = [f"precision-doctor pre-flight: {result.verdict}"] + [f"  - {r.line()}" for r in result.reasons]
    if mode == "stop":
        lines.append("  stopping the run (mode='stop'; use mode='warn' to only log)")
    log.warning("\n".join(lines))


def __getattr__(name: str) -> Any:
    if name == "PreflightCallback":
        from precision_doctor.integrations.transformers import PreflightCallback

        return PreflightCallback
    if name == "LightningPreflightCallback":
        from precision_doctor.integrations.lightning import LightningPreflightCallback

        return LightningPreflightCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

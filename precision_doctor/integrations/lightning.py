"""A PyTorch Lightning `Callback` that runs the pre-flight on the first training batch.

    from precision_doctor.integrations.lightning import LightningPreflightCallback
    trainer = L.Trainer(max_steps=10_000, callbacks=[LightningPreflightCallback(dtype="fp16")])

The pre-flight model is a deep copy of the LightningModule whose forward is its own
`training_step(batch, 0)` (so the loss is what the module trains on: a tensor or a dict with
"loss"); the optimizer is built from `configure_optimizers()` of that copy when it returns an
optimizer (or a list / dict holding one), else the pre-flight's default. On no-go:
`mode="stop"` sets `trainer.should_stop` (Lightning stops after the current step),
`"warn"` only logs, `"raise"` raises `PreflightFailed` before the first step.

Built on `lightning.pytorch` when installed, else `pytorch_lightning`.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.integrations import check_mode, gate, optimizer_factory, trained_as
from precision_doctor.training.preflight import DEFAULT_STEPS, PreflightResult, preflight

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the older package name
    from pytorch_lightning import Callback  # type: ignore[assignment]

__all__ = ["LightningPreflightCallback", "training_step_model"]


def _step_forward(self: Any, batch: Any) -> Any:
    # training_step calls self(x) itself: drop the override while it runs, so that inner
    # call reaches the class's own forward.
    del self.forward
    try:
        out = self.training_step(batch, 0)
    finally:
        self.forward = types.MethodType(_step_forward, self)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise PrecisionDoctorError("training_step must return the loss (a tensor or a dict with 'loss')")
    return out


def training_step_model(pl_module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `pl_module` (detached from its trainer) whose forward(batch) is
    `training_step(batch, 0)`."""
    m = copy.deepcopy(pl_module)
    m.forward = types.MethodType(_step_forward, m)  # instance attribute: copies keep it bound
    return m


def _optimizer_from(module: Any) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conf = copy.deepcopy(module).configure_optimizers()
    except Exception:
        return None
    if isinstance(conf, Mapping):
        conf = conf.get("optimizer")
    if isinstance(conf, (list, tuple)) and conf:
        conf = conf[0]
        if isinstance(conf, (list, tuple)) and conf:
            conf = conf[0]
    return optimizer_factory(conf, "configure_optimizers'")


class LightningPreflightCallback(Callback):
    """The pre-flight gate for a Lightning `Trainer`; `self.result` holds the verdict."""

    def __init__(
        self,
        mode: str = "stop",
        dtype: str | None = None,
        steps: int = DEFAULT_STEPS,
        **preflight_kwargs: Any,
    ) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        self.dtype = dtype
        self.steps = steps
        self.preflight_kwargs = preflight_kwargs
        self.result: PreflightResult | None = None
        self.tried = False
        self.stopped = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.tried:
            return
        self.tried = True  # once, on the first batch, whether it can run or not
        precision = str(getattr(trainer, "precision", ""))
        kw = dict(self.preflight_kwargs)
        model = training_step_model(pl_module)
        if "build_optimizer" not in kw and "optimizer" not in kw:
            kw["build_optimizer"] = _optimizer_from(model)
        kw.setdefault("name", type(pl_module).__name__)
        model, args, dtype = trained_as(model, (batch,), self.dtype, kw)  # "bf16-true": pure bf16
        dtype = dtype or ("bf16" if "bf16" in precision else "fp16")

        def run() -> PreflightResult:
            with warnings.catch_warnings():
                # self.log() outside the trainer's loop only warns; the copies have no trainer.
                warnings.filterwarnings("ignore", message=".*self.log.*")
                return preflight(model, args, None, dtype=dtype, steps=self.steps, **kw)

        self.result, stop = gate(run, self.mode)
        if stop:
            trainer.should_stop = True
            self.stopped = True

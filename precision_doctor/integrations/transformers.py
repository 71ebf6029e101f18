"""A transformers `TrainerCallback` that runs the pre-flight before training starts.

    from precision_doctor.integrations.transformers import PreflightCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[PreflightCallback(mode="stop", dtype="fp16")])
    trainer.train()   # on no-go: the reasons are logged and training stops after step 1

`on_train_begin` receives the trainer's `model`, `optimizer` and `train_dataloader` (the
transformers callback API passes them as keyword arguments). The pre-flight runs on the
dataloader's first batch, with deep copies of the model and a fresh optimizer of the
trainer's optimizer class and hyperparameters, so the real run is not touched (the global
RNG state is restored after drawing the batch). The loss is the model output's `.loss`
(the batch carries `labels`) unless `loss_fn(output, batch)` is given.

`dtype=None` follows the TrainingArguments: bf16 when `args.bf16`, else fp16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from transformers import TrainerCallback

from precision_doctor.integrations import (
    check_mode,
    gate,
    logger,
    optimizer_factory,
    trained_as,
)
from precision_doctor.model.spec import LossFn
from precision_doctor.training.preflight import DEFAULT_STEPS, PreflightResult, preflight

__all__ = ["PreflightCallback"]


@contextlib.contextmanager
def accelerate_autocast_removed(model: torch.nn.Module) -> Iterator[None]:
    """While within: `model` without the autocast wrapper Accelerate's mixed precision binds
    as its forward (keeping the one it wrapped as `_original_forward`). The pre-flight copies
    the model: with the wrapper on, its fp32 reference and analysis ran under bf16 autocast
    too, compared bf16 with bf16, and found nothing."""
    d = vars(model)
    if "_original_forward" not in d or "forward" not in d:
        yield
        return
    wrapper, original = d["forward"], d["_original_forward"]
    own = getattr(original, "__self__", None) is model and getattr(original, "__func__", None) is getattr(
        type(model), "forward", None
    )
    if own:
        del d["forward"]  # the class's forward, bound afresh in each copy
    else:
        d["forward"] = original
    try:
        yield
    finally:
        d["forward"] = wrapper


def first_batch(dataloader: Iterable[Any]) -> Any:
    """The first batch of a dataloader, leaving the global RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        return next(iter(dataloader))


class PreflightCallback(TrainerCallback):
    """Runs `precision_doctor.preflight` on the first training batch; on no-go logs the
    reasons and stops (`mode="stop"`), only logs (`"warn"`) or raises (`"raise"`).
    `self.result` holds the `PreflightResult` afterwards. Other keyword arguments go to
    `preflight` (`fail_on`, `judge`, `loss_tolerance`, `plan`, ...)."""

    def __init__(
        self,
        mode: str = "stop",
        dtype: str | None = None,
        steps: int = DEFAULT_STEPS,
        loss_fn: LossFn | None = None,
        **preflight_kwargs: Any,
    ) -> None:
        self.mode = check_mode(mode)
        self.dtype = dtype
        self.steps = steps
        self.loss_fn = loss_fn
        self.preflight_kwargs = preflight_kwargs
        self.result: PreflightResult | None = None
        self.stopped = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.result is not None:  # train() called again (resume): judged already
            return control
        model = kwargs.get("model")
        dataloader = kwargs.get("train_dataloader")
        if model is None or dataloader is None:
            logger.warning("precision-doctor pre-flight skipped: the trainer passed no model or train_dataloader")
            return control
        kw = dict(self.preflight_kwargs)
        if "build_optimizer" not in kw and "optimizer" not in kw:
            kw["build_optimizer"] = optimizer_factory(kwargs.get("optimizer"))
        target, batch, dtype = trained_as(model, first_batch(dataloader), self.dtype, kw)
        dtype = dtype or ("bf16" if getattr(args, "bf16", False) else "fp16")

        def run() -> PreflightResult:
            with accelerate_autocast_removed(target):
                return preflight(target, batch, self.loss_fn, dtype=dtype, steps=self.steps, **kw)

        self.result, stop = gate(run, self.mode)
        if stop:
            control.should_training_stop = True
            self.stopped = True
        return control

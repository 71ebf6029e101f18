"""fp32 master weights for parameters held in a low dtype: the optimizer step of mixed precision.

A weight held in bf16 keeps only 8 significant bits: an update below half its spacing (2^-9 of
|w|) is rounded away, so fine-tuning at a small learning rate stalls (`analysis.optimizer_step`).
Mixed-precision optimizers (apex's `FP16_Optimizer`, DeepSpeed's `BF16_Optimizer`, Megatron's
`Float16OptimizerWithFloat16Params`) keep an fp32 copy of each low parameter: the forward and
backward run on the low parameters, the gradients are cast up onto the fp32 copies, the
optimizer steps the copies (its state fp32 too), and the stepped copies are rounded back down
into the low parameters. The small updates then accumulate in fp32 until they move the low
weight.

`MasterWeights` is that pattern for any torch optimizer, on the parameters a plan names
(`Plan.master_weights`). It needs only torch: the plan's Python export copies its source.
`hold_plan_weights` holds a pure-regime plan's low units' parameters in the low dtype, with
master copies for its master-weight units (what `apply_plan` does for such a plan).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch

from precision_doctor.capture.units import owner_of
from precision_doctor.errors import PrecisionDoctorError


class MasterWeights:
    """fp32 master copies of some parameters of a model, for an optimizer to step.

    `MasterWeights(params, low_dtype)` copies each parameter's current values to fp32 and then
    casts the parameter itself to `low_dtype` in place (the forward and backward run on it);
    without `low_dtype` the parameters are left as they are (already low: the copies are their
    exact values). Give the optimizer `masters.swap(...)` of its parameters (or parameter
    groups) instead of the low ones, and step it with `masters.step(optimizer)`: the low
    gradients are cast up onto the copies, the optimizer steps, and the copies are rounded down
    into the low parameters.

    Four SGD steps of 1e-3 on a weight of 1.0 (bf16 spacing below 1: 2^-8) move it where a
    bf16 weight stepped in place stays at 1.0:

    >>> lin = torch.nn.Linear(4, 4, bias=False)
    >>> _ = torch.nn.init.ones_(lin.weight)
    >>> masters = MasterWeights([lin.weight], torch.bfloat16)
    >>> opt = torch.optim.SGD(masters.swap(lin.parameters()), lr=1.0)
    >>> for _ in range(4):
    ...     lin.weight.grad = torch.full((4, 4), 1e-3, dtype=torch.bfloat16)
    ...     masters.step(opt)
    >>> lin.weight.dtype, lin.weight[0, 0].item(), round(masters.master(lin.weight)[0, 0].item(), 4)
    (torch.bfloat16, 0.99609375, 0.996)
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], low_dtype: torch.dtype | None = None) -> None:
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self._masters: dict[int, torch.nn.Parameter] = {}
        for p in params:
            if id(p) in self._masters:  # a tied parameter named twice: one copy
                continue
            if not p.is_floating_point():
                raise TypeError(f"a master copy is for floating parameters, not {p.dtype}")
            master = torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
            if low_dtype is not None:
                with torch.no_grad():
                    p.data = p.data.to(low_dtype)
            self._pairs.append((p, master))
            self._masters[id(p)] = master

    def __len__(self) -> int:
        return len(self._pairs)

    def master(self, param: torch.nn.Parameter) -> torch.nn.Parameter:
        """The fp32 copy of `param` (`param` itself where it has none)."""
        return self._masters.get(id(param), param)

    def swap(self, params: Iterable[Any]) -> list[Any]:
        """`params` (parameters, or parameter-group dicts with a "params" list) with each low
        parameter replaced by its fp32 copy: what to hand the optimizer."""
        out: list[Any] = []
        for item in params:
            if isinstance(item, dict):
                out.append({**item, "params": [self.master(p) for p in item["params"]]})
            else:
                out.append(self.master(item))
        return out

    def use_in(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Point an optimizer made over the model's parameters (`build_optimizer(model)`) at the
        fp32 copies instead, before its first step (its state is made on the first step, so
        it is then fp32 too). Returns it."""
        if optimizer.state:
            raise ValueError("use_in() is for an optimizer that has not stepped yet: its state is the low weights'")
        for group in optimizer.param_groups:
            group["params"] = [self.master(p) for p in group["params"]]
        return optimizer

    def grads_to_master(self) -> None:
        """Cast each low parameter's gradient up onto its copy (and drop the low one). Call it
        before `optimizer.step()` (before `GradScaler.step`, which then unscales the copies')."""
        for low, master in self._pairs:
            master.grad = None if low.grad is None else low.grad.detach().float()
            low.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round each stepped copy down into its low parameter (nearest-even)."""
        for low, master in self._pairs:
            low.copy_(master)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """`grads_to_master()`, `optimizer.step()`, `copy_to_model()`."""
        self.grads_to_master()
        optimizer.step()
        self.copy_to_model()


def hold_plan_weights(
    model: torch.nn.Module, low_units: Mapping[str, bool], master_units: Collection[str], dtype: torch.dtype
) -> MasterWeights:
    """Cast the parameters of `model` owned by low units (`owner_of`; a tied parameter's first
    owner) to `dtype` in place, with fp32 master copies, taken before the cast, of those the
    `master_units` own. The model must hold them in fp32 (the copies would not be exact). The
    low units' floating buffers are cast too, as `model.to(dtype)` casts them: a BatchNorm with
    low weights and fp32 running statistics is refused by the CPU's kernel."""
    kept: list[torch.nn.Parameter] = []
    cast: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        unit = owner_of(name)
        if not low_units.get(unit, False) or not p.is_floating_point():
            continue
        if p.dtype != torch.float32:
            raise PrecisionDoctorError(
                f"parameter {name} is {p.dtype}: apply a pure-regime plan to the fp32 model (before model.to(...)), "
                "its low weights and master copies are made from the fp32 values"
            )
        (kept if unit in master_units else cast).append(p)
    with torch.no_grad():
        for p in cast:
            p.data = p.data.to(dtype)
        for name, b in model.named_buffers():
            if low_units.get(owner_of(name), False) and b.is_floating_point():
                b.data = b.data.to(dtype)
    return MasterWeights(kept, dtype)

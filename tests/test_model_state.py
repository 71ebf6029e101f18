"""`analyze` hands the model back exactly as it came in: parameters, buffers, `.grad`,
train/eval mode, `requires_grad`, RNG states, hooks and the dispatch-mode stack, also when
the analysis fails halfway."""

from __future__ import annotations

import gc
import random
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module

import precision_doctor as pd

from .fixtures import build, doubled_input_runs

_GLOBAL_HOOK_DICTS = [
    name for name in dir(nn_module) if name.startswith("_global_") and isinstance(getattr(nn_module, name), dict)
]


@dataclass
class Snapshot:
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    grad_values: dict[str, torch.Tensor | None]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    torch_rng: torch.Tensor
    py_rng: Any
    np_rng: Any
    global_hooks: dict[str, list[int]]


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        params={n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
        buffers={n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
        grads={n: p.grad for n, p in model.named_parameters(remove_duplicate=False)},
        grad_values={
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters(remove_duplicate=False)
        },
        requires_grad={n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        training={n: m.training for n, m in model.named_modules(remove_duplicate=False)},
        torch_rng=torch.get_rng_state(),
        py_rng=random.getstate(),
        np_rng=np.random.get_state(),
        global_hooks={name: list(getattr(nn_module, name)) for name in _GLOBAL_HOOK_DICTS},
    )


def assert_restored(model: nn.Module, before: Snapshot) -> None:
    for n, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(p.detach(), before.params[n]), f"parameter {n} changed"
        assert p.requires_grad == before.requires_grad[n], f"requires_grad of {n} changed"
        assert p.grad is before.grads[n], f".grad of {n} is another object"
        if before.grad_values[n] is not None:
            assert torch.equal(p.grad, before.grad_values[n]), f".grad of {n} changed values"
    for n, b in model.named_buffers(remove_duplicate=False):
        assert torch.equal(b, before.buffers[n]), f"buffer {n} changed"
    assert set(dict(model.named_buffers(remove_duplicate=False))) == set(before.buffers)
    for n, m in model.named_modules(remove_duplicate=False):
        assert m.training == before.training[n], f"train/eval mode of {n!r} changed"
        assert not m._forward_hooks, f"forward hook left on {n!r}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {n!r}"
        assert not m._backward_hooks, f"backward hook left on {n!r}"
        assert not m._backward_pre_hooks, f"backward pre-hook left on {n!r}"
    assert torch.equal(torch.get_rng_state(), before.torch_rng)
    assert random.getstate() == before.py_rng
    after_np = np.random.get_state()
    assert after_np[0] == before.np_rng[0]
    np.testing.assert_array_equal(after_np[1], before.np_rng[1])
    assert after_np[2:] == before.np_rng[2:]
    for name in _GLOBAL_HOOK_DICTS:
        assert list(getattr(nn_module, name)) == before.global_hooks[name], f"{name} changed"
    assert torch._C._len_torch_dispatch_stack() == 0


def prepare(model: nn.Module) -> None:
    """Set some .grad, freeze one parameter, put one module in eval mode."""
    params = list(model.named_parameters())
    g = torch.Generator().manual_seed(7)
    for _, p in params[::2]:
        p.grad = torch.randn(p.shape, generator=g)
    params[-1][1].requires_grad_(False)


def run_and_check(
    model: nn.Module,
    batch: Any,
    loss_fn: Any,
    *,
    raises: type[BaseException] | tuple[type[BaseException], ...] | None,
    match: str = "",
) -> None:
    torch.manual_seed(99)
    random.seed(5)
    np.random.seed(6)
    before = snapshot(model)
    if raises is None:
        report = pd.analyze(model, batch, loss_fn)
        assert report.units
    else:
        with pytest.raises(raises, match=match or None):
            pd.analyze(model, batch, loss_fn)
    assert_restored(model, before)


# --- models ------------------------------------------------------------------------------


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in the third module")


class UsesAllRngs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + 0.0 * random.random() + 0.0 * float(np.random.rand()))


def stateful_seq(third: nn.Module) -> nn.Sequential:
    """BatchNorm (train mode: updates running stats) and Dropout (draws RNG) before `third`."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), third, nn.Dropout(0.3), nn.Linear(6, 2))


class MutatesParam(nn.Module):
    """Writes to its own parameters during forward, several ways."""

    def __init__(self, how: str, then_raise: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.how = how
        self.then_raise = then_raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.how == "inplace":
                self.scale.mul_(2.0)
                self.lin.weight.add_(0.5)
            elif self.how == "data":
                self.scale.data.mul_(2.0)
                self.lin.weight.data.add_(0.5)
            elif self.how == "view":
                self.scale[0].fill_(7.0)
                self.lin.weight[:, 0].zero_()
            elif self.how == "copy":
                self.lin.weight.copy_(torch.zeros(4, 4))
            elif self.how == "out":  # an out= keyword writes, not a positional argument
                torch.mul(self.scale, 2.0, out=self.scale)
                torch.clamp(self.lin.weight, -0.1, 0.1, out=self.lin.weight)
            elif self.how == "rebind":  # new memory bound under the parameter: no op sees it
                self.scale.data = torch.full((4,), 3.0)
            elif self.how == "rebind-write":  # then written in place: the copy must be the original's
                self.lin.weight.data = self.lin.weight.data.clamp(-0.1, 0.1)
                self.lin.weight.mul_(0.5)
        out = self.lin(x) * self.scale
        if self.then_raise:
            raise ValueError("after mutation")
        return out


def sq_loss(out: Any, batch: Any) -> torch.Tensor:
    return out.pow(2).mean()


BATCH6 = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
BATCH4 = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "functional", "gpt2"])
def test_state_restored_after_success(name: str) -> None:
    case = build(name)
    case.model.train()
    prepare(case.model)
    mods = list(case.model.modules())
    mods[1].eval()  # a mix of modes
    run_and_check(case.model, case.batch, case.loss_fn, raises=None)


def test_batchnorm_running_stats_restored_in_train_mode() -> None:
    model = stateful_seq(nn.ReLU()).train()
    prepare(model)
    bn = model[1]
    before_mean = bn.running_mean.clone()
    run_and_check(model, BATCH6, sq_loss, raises=None)
    assert torch.equal(bn.running_mean, before_mean)
    assert int(bn.num_batches_tracked) == 0
    # ... and a plain forward does change them (so the check above can fail).
    model(BATCH6)
    assert not torch.equal(bn.running_mean, before_mean)


def test_state_restored_when_forward_raises_in_third_module() -> None:
    model = stateful_seq(Boom()).train()
    prepare(model)
    run_and_check(model, BATCH6, sq_loss, raises=pd.PrecisionDoctorError, match="boom in the third module")


def test_state_restored_when_loss_fn_raises() -> None:
    model = stateful_seq(nn.ReLU()).train()
    prepare(model)

    def bad_loss(out: Any, batch: Any) -> torch.Tensor:
        raise KeyError("no such key")

    run_and_check(model, BATCH6, bad_loss, raises=pd.PrecisionDoctorError, match="loss_fn raised KeyError")


def test_state_restored_when_fp32_loss_is_not_finite() -> None:
    model = stateful_seq(nn.ReLU()).train()
    prepare(model)

    def inf_loss(out: Any, batch: Any) -> torch.Tensor:
        return (out * float("inf")).pow(2).mean()

    run_and_check(model, BATCH6, inf_loss, raises=pd.PrecisionDoctorError, match="fp32 loss is")


class RaisesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backward boom")


class BackwardBoom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RaisesInBackward.apply(x)


def test_state_restored_when_backward_raises() -> None:
    model = stateful_seq(BackwardBoom()).train()
    prepare(model)
    run_and_check(model, BATCH6, sq_loss, raises=pd.PrecisionDoctorError, match="backward raised")


@pytest.mark.parametrize("how", ["inplace", "copy", "out", "rebind", "rebind-write"])
@pytest.mark.parametrize("then_raise", [False, True], ids=["ok", "raises"])
def test_param_mutated_in_forward_is_restored(how: str, then_raise: bool) -> None:
    torch.manual_seed(0)
    model = MutatesParam(how, then_raise)
    prepare(model)
    run_and_check(model, BATCH4, sq_loss, raises=pd.PrecisionDoctorError if then_raise else None)


@pytest.mark.parametrize("how", ["data", "view"])
@pytest.mark.parametrize("then_raise", [False, True], ids=["ok", "raises"])
def test_param_mutated_through_alias_is_restored(how: str, then_raise: bool) -> None:
    """Writes through `.data` or a view reach the parameter's storage through another tensor
    object."""
    torch.manual_seed(0)
    model = MutatesParam(how, then_raise)
    prepare(model)
    run_and_check(model, BATCH4, sq_loss, raises=pd.PrecisionDoctorError if then_raise else None)


class RebindsInForward(nn.Module):
    """Binds things on itself in forward: a lazy cache, a reassigned buffer, a counter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("ema", torch.zeros(4))
        self.cache: torch.Tensor | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.cache = torch.ones(4) * 2.0
        self.ema = 0.9 * self.ema + 0.1 * x.detach().mean(0)
        self.calls += 1
        return self.lin(x) * self.cache


def test_attributes_bound_in_forward_are_restored() -> None:
    """torch.fx's trace and the real run both bind on the modules; what they bound must not
    reach the real run (the trace left Proxy objects: the cache was a Proxy, the loss 'not a
    scalar') nor the user's model afterwards."""
    torch.manual_seed(0)
    model = RebindsInForward()
    ema = model.ema
    run_and_check(model, BATCH4, sq_loss, raises=None)
    assert model.cache is None and model.calls == 0 and model.ema is ema
    assert isinstance(model(BATCH4), torch.Tensor)


class ExitsInForward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise SystemExit(3)


def test_sys_exit_in_forward_is_a_user_error() -> None:
    run_and_check(
        nn.Sequential(nn.Linear(4, 4), ExitsInForward()),
        BATCH4,
        sq_loss,
        raises=pd.PrecisionDoctorError,
        match="forward raised SystemExit: 3",
    )


def test_python_and_numpy_rng_restored_when_forward_draws_from_them() -> None:
    """Python's and numpy's RNGs restored even when the model's forward uses them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), UsesAllRngs(), nn.Linear(6, 2))
    run_and_check(model, BATCH6, sq_loss, raises=None)


def test_mutation_test_can_fail() -> None:
    """Sanity: the mutating model does change its parameters when run plainly."""
    torch.manual_seed(0)
    model = MutatesParam("view")
    before = snapshot(model)
    model(BATCH4)
    assert not torch.equal(model.scale.detach(), before.params["scale"])


def test_no_mode_or_hook_left_after_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure inside the capture machinery itself still unwinds everything."""
    import precision_doctor.capture.pipeline as capture

    def broken(*args: Any, **kwargs: Any) -> int:
        raise ZeroDivisionError("flop formula exploded")

    monkeypatch.setattr(capture, "op_flops", broken)
    model = stateful_seq(nn.ReLU()).train()
    prepare(model)
    run_and_check(
        model, BATCH6, sq_loss, raises=(pd.PrecisionDoctorError, pd.PrecisionDoctorInternalError), match="flop formula"
    )


def test_capture_bug_during_forward_is_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import precision_doctor.capture.pipeline as capture

    def broken(*args: Any, **kwargs: Any) -> int:
        raise ZeroDivisionError("flop formula exploded")

    monkeypatch.setattr(capture, "op_flops", broken)
    with pytest.raises(pd.PrecisionDoctorInternalError):
        pd.analyze(nn.Linear(3, 1), torch.randn(2, 3), sq_loss)


# --- the caller's garbage collector --------------------------------------------------------


def _loss_seeing_freeze(seen: list[int]) -> Any:
    def loss(out: Any, batch: Any) -> torch.Tensor:
        seen.append(gc.get_freeze_count())
        return out.pow(2).mean()

    return loss


@pytest.mark.parametrize("raises", [False, True], ids=["ok", "raises"])
def test_caller_heap_frozen_during_the_analysis_only(raises: bool) -> None:
    """The objects alive before the analysis sit out its collections (a full one walks all of
    them), and are handed back to the collector after it, however it ends."""
    gc.collect()
    assert gc.get_freeze_count() == 0
    seen: list[int] = []
    loss = _loss_seeing_freeze(seen)
    model = stateful_seq(Boom() if raises else nn.ReLU()).train()
    if raises:
        with pytest.raises(pd.PrecisionDoctorError):
            pd.analyze(model, BATCH6, loss)
    else:
        pd.analyze(model, BATCH6, loss)
        assert seen and min(seen) > 1000  # torch alone holds far more objects than this
    assert gc.get_freeze_count() == 0
    assert gc.isenabled()


def test_cycle_dropped_during_the_analysis_is_collected_after() -> None:
    """A frozen object that becomes cyclic garbage meanwhile is not leaked: the next
    collection after the analysis frees it."""

    class Node:
        other: Any = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)

    def loss(out: Any, batch: Any) -> torch.Tensor:
        nonlocal a, b
        a = b = None  # the cycle is garbage now, frozen: no collection sees it
        gc.collect()
        assert gone() is not None
        return out.pow(2).mean()

    pd.analyze(stateful_seq(nn.ReLU()).train(), BATCH6, loss)
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("driver", ["dispatch", "graph"])
def test_the_analysis_leaves_no_cyclic_garbage_of_its_own(driver: str) -> None:
    """The capture's records, summaries and held tensors go when the analysis returns, by
    reference counting: none waits for a collection (with the heap frozen during the next
    analysis, they would wait through it; a GPT-2 capture's garbage held ~1,000 objects)."""
    from precision_doctor.capture.records import OpRecord
    from precision_doctor.capture.shadow import ShadowCapture

    model = stateful_seq(nn.ReLU()).train()
    gc.collect()
    gc.disable()
    try:
        pd.analyze(model, BATCH6, lambda out, b: out.pow(2).mean(), driver=driver)
        left = [type(o).__name__ for o in gc.get_objects() if isinstance(o, (OpRecord, ShadowCapture))]
    finally:
        gc.enable()
    assert left == []


@pytest.mark.parametrize("state", ["frozen", "disabled"])
def test_caller_gc_settings_left_alone(state: str) -> None:
    """Objects the caller froze stay frozen (an unfreeze would release them too); a collector
    the caller turned off stays off and freezes nothing."""
    gc.collect()
    seen: list[int] = []
    if state == "frozen":
        gc.freeze()
    else:
        gc.disable()
    try:
        before = gc.get_freeze_count()
        pd.analyze(stateful_seq(nn.ReLU()).train(), BATCH6, _loss_seeing_freeze(seen))
        assert seen
        if state == "frozen":  # (frozen objects that die leave the count: it may only shrink)
            assert all(0 < c <= before for c in seen)
            assert 0 < gc.get_freeze_count() <= before
            assert gc.isenabled()
        else:
            assert seen == [0] * len(seen)
            assert gc.get_freeze_count() == 0
            assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


# --- the caller's batch ----------------------------------------------------------------------


def test_a_forward_that_writes_its_input_sees_the_same_batch_in_every_run() -> None:
    """Each run of the analysis starts from the caller's batch, and the caller gets it back:
    a model that doubles its input in place gets the report of one that doubles a copy (it
    got a false ERROR_GROWTH and a 0.7 final-loss error when the fp32 run read the batch the
    low run had doubled)."""
    in_place_report, copy_report = doubled_input_runs(
        lambda model, batch: pd.analyze(model, batch, sq_loss), wrap=lambda x: {"x": x}
    )
    assert in_place_report.losses == copy_report.losses
    assert [(f.unit, f.flag) for f in in_place_report.flags()] == [(f.unit, f.flag) for f in copy_report.flags()]


def test_a_batch_pytree_does_not_know_is_guarded_too() -> None:
    """A mapping pytree sees as one leaf (a `UserDict`, transformers' `BatchEncoding`) is the
    keyword arguments `run_model` unpacks: its tensors are the caller's batch too."""
    from collections import UserDict

    reports = doubled_input_runs(lambda model, batch: pd.analyze(model, batch, sq_loss), wrap=lambda x: UserDict(x=x))
    assert reports[0].losses == reports[1].losses


class _WritesInputAndWeight(nn.Module):
    """Writes its input, and then its own weight (which makes the kept low graph unusable: the
    low run is made again after the fp32 run, which must read the caller's batch too)."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(4, 8), nn.Linear(8, 1)
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mul_(2.0) if self.in_place else x * 2.0
        h = self.out(torch.relu(self.lin(x)))
        with torch.no_grad():
            self.lin.weight.clamp_(-10.0, 10.0)
        return h


def test_the_low_run_made_again_reads_the_callers_batch() -> None:
    reports = []
    for in_place in (True, False):
        torch.manual_seed(0)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        reports.append(pd.analyze(_WritesInputAndWeight(in_place), x, sq_loss))
    fidelity = [r.grad_fidelity for r in reports]
    assert fidelity[0] is not None and fidelity[1] is not None
    assert fidelity[0].rel_l2_error == pytest.approx(fidelity[1].rel_l2_error, rel=1e-6, abs=1e-9)
    assert [(f.unit, f.flag) for f in reports[0].flags()] == [(f.unit, f.flag) for f in reports[1].flags()]


class _TakesItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w.t()


def test_a_parameter_passed_in_the_batch_keeps_its_grad() -> None:
    """A batch that carries one of the model's parameters: guarded as the parameter it is
    (its `.grad` came back None when the batch's restore ran after the parameters')."""
    model = _TakesItsWeight()
    grad = torch.ones(4, 4)
    model.lin.weight.grad = grad
    pd.analyze(model, (torch.randn(2, 4), model.lin.weight), sq_loss)
    assert model.lin.weight.grad is grad


@pytest.mark.parametrize("had_grad", [False, True], ids=["no-grad", "grad"])
def test_a_batch_tensor_that_requires_grad_gets_its_grad_back(had_grad: bool) -> None:
    """The analysis' backwards (the low one loss-scaled) must not add into an input's
    `.grad`: it held 2^15 times the fp32 gradient after one analysis."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad = torch.full((8, 4), 3.0) if had_grad else None
    x.grad = grad
    pd.analyze(nn.Sequential(nn.Linear(4, 2)), x, sq_loss)
    assert x.grad is grad
    if grad is not None:
        assert torch.equal(grad, torch.full((8, 4), 3.0))

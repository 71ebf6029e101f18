"""The analysis against real low-precision execution.

For every sample model, the plain fixture with dropout (`cnn`) and the transformers fixtures,
in fp16 and bf16, each regime is checked against what real training executes on the CPU:

- `regime="autocast", policy="cpu"` against a copy of the model run under a real
  `torch.autocast("cpu", dtype=low)`;
- `regime="pure"` against a real `copy.deepcopy(model).to(low)` with floating inputs cast.

The real runs use the real CPU kernels (no emulation: fp16 CPU kernels are slow, the models
are small) and an independent harness: global module hooks copy each module call's floating
outputs, and a pass-through `TorchDispatchMode` names every value-making forward op as the
package keys them (`UnitTracker` + `OpKeyer`: unit, call of its module, aten op, ordinal) with
its input and output dtypes. Nothing of `capture/lowrun.py` is used for the reference.

Checked per case:

1. the dtypes: `low_run(record_ops=True).op_dtypes` has the real run's keys, and per key its
   input and output dtypes; the report's `units[].ops[].low_dtypes` (forward, value-making
   ops) are the real run's output dtypes per (unit, op) over the ops the fp32 run has too;
2. the errors, with the agreement rule of the acceptance text (both non-finite, or both
   <= 1e-3, or within a factor of 4): `report.losses.rel_error` against the real final-loss
   relative error, and each unit's `forward.propagated.rel_l2_error` against the relative L2
   error of the real low run's module outputs against the fp32 run's (over all calls and
   floating output tensors; positions where |fp32| >= 2**127 - mask constants, which the low
   dtypes turn into -inf - and non-finite fp32 values left out; a non-finite low value
   where fp32 is finite makes it inf). A unit without a propagated error (`None`) is taken
   as 0: the analysis leaves it out only where the fp32 outputs have norm 0 and no
   non-finite mismatch, so the real error must be <= 1e-3 there too (in these cases only
   T5's `shared`, which owns the tied embedding but never runs, has None, and it has no
   module outputs either). `<loss>` is no module and has no per-module counterpart; the
   final-loss comparison covers the loss (its pooled unit error is not the loss's error:
   see the strict xfails at the end).
3. the harness itself: both runs draw the same dropout masks (same seed before each).

bf16 is checked twice: `bf16` as this CPU decides (`capture.lowrun.cpu_bf16_emulated`: the real
kernels where oneDNN has bf16), and `bf16emu` with the analysis emulating bf16
(`PRECISION_DOCTOR_EMULATE_BF16=1`, as on a CPU without fast bf16 kernels) against the same
real bf16 kernels, on the models with dtype-dependent code (`EMULATED`).

Measured (torch 2.13 CPU): the module errors agree to ~1e-7 relative in every case, fp16
included (the CPU's fp16 kernels compute in fp32 and round, as the emulation does). The one
gap is the CPU's fp16 `nll_loss` mean, which rounds 1 ulp away from the fp32-accumulated
value the emulation gives: pure fp16 `tiny_transformer` loss error 9.9e-5 in the report
against 6.0e-4 real, `bert` 4.6e-4 against 3.8e-4 - inside the rule (both <= 1e-3).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from torch.nn.modules import module as nn_module
from torch.utils._python_dispatch import TorchDispatchMode

import precision_doctor as pd
from precision_doctor.capture.lowrun import EMULATE_BF16_ENV, low_run
from precision_doctor.capture.ops import op_info
from precision_doctor.capture.units import LOSS_UNIT, OpKey, OpKeyer, UnitTracker
from precision_doctor.formats import dtype_spelling
from precision_doctor.model.spec import load_model_file
from precision_doctor.options import Phase

from .fixtures import TRANSFORMERS, build

# Numbers compared with an independent reference: CI runs these again at one thread (.ci/run).
pytestmark = pytest.mark.numerics

SEED = 1234
ROOT = "<root>"
MASK = 2.0**127  # fp32's top binade: mask constants (finfo(float32).min), not values
LOW = {"fp16": torch.float16, "bf16": torch.bfloat16, "bf16emu": torch.bfloat16}
REGIMES = {"autocast-cpu": ("autocast", "cpu"), "pure": ("pure", "cpu")}  # pure ignores the policy
SAMPLES = {p.stem: p for p in sorted((Path(__file__).resolve().parents[1] / "sample_models").glob("*.py"))}
PLAIN = ("cnn",)  # the fixture with dropout: the harness's RNG check has something to check
MODELS = (*SAMPLES, *PLAIN, *TRANSFORMERS)
# The bf16emu cases: the plain fixture, the transformers and the samples whose code depends on
# dtypes (upcasts, dtype-dependent fill values, masked softmax).
EMULATED = ("tiny_transformer", "rmsnorm_upcast", "masked_softmax", "sentinel_fill", *PLAIN, *TRANSFORMERS)

Dtypes = tuple[tuple[torch.dtype, ...], tuple[torch.dtype, ...]]


# --- the reference harness ----------------------------------------------------------------


def _tensors(x: Any) -> list[torch.Tensor]:
    """Top-level tensors and tensors in top-level lists/tuples (the package's order)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


class OpRecorder(TorchDispatchMode):
    """Pass-through: each value-making forward op's key and (input, output) dtypes."""

    def __init__(self, tracker: UnitTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.keyer = OpKeyer(tracker)
        self.ops: dict[OpKey, Dtypes] = {}
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused and not op_info(func).preserves_values:
            key = self.keyer.key(self.tracker.current, op_info(func).name)
            ins = [t for a in (*args, *kwargs.values()) for t in _tensors(a)]
            self.ops[key] = (tuple(t.dtype for t in ins), tuple(t.dtype for t in _tensors(out)))
        return out


@dataclass
class Run:
    loss: float
    ops: dict[OpKey, Dtypes]
    outputs: dict[tuple[str, int], list[torch.Tensor]]
    dropouts: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@contextlib.contextmanager
def _module_hooks(model: torch.nn.Module, rec: OpRecorder, run: Run) -> Iterator[None]:
    """Copies of each module call's floating outputs (and each dropout's input and output),
    keyed (path, call index); the copies are paused in the recorder (no op of the model)."""
    paths = {id(m): name or ROOT for name, m in model.named_modules()}
    calls: dict[str, int] = defaultdict(int)
    stack: list[tuple[str, int]] = []
    dropout_in: dict[tuple[str, int], torch.Tensor] = {}

    def copies(x: Any) -> list[torch.Tensor]:
        leaves = pytree.tree_leaves(x)
        return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def pre(mod: torch.nn.Module, args: Any) -> None:
        path = paths.get(id(mod))
        if path is None:
            return
        stack.append((path, calls[path]))
        calls[path] += 1
        if isinstance(mod, torch.nn.Dropout) and args:
            rec.paused = True
            dropout_in[stack[-1]] = copies(args[0])[0]
            rec.paused = False

    def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
        if paths.get(id(mod)) is None:
            return
        key = stack.pop()
        rec.paused = True
        run.outputs[key] = copies(out)
        if key in dropout_in:
            run.dropouts[key] = (dropout_in.pop(key), run.outputs[key][0])
        rec.paused = False

    handles = [nn_module.register_module_forward_pre_hook(pre), nn_module.register_module_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss(out: Any, batch: Any, loss_fn: Any) -> torch.Tensor:
    if loss_fn is not None:
        loss: torch.Tensor = loss_fn(out, batch)
    elif isinstance(out, torch.Tensor):
        loss = out
    else:
        loss = out.loss
    return loss


def execute(model: torch.nn.Module, batch: Any, loss_fn: Any, low: torch.dtype | None, regime: str | None) -> Run:
    """Forward and loss of a copy of `model`: fp32 (`low` None), under a real
    `torch.autocast("cpu", low)`, or as a real `.to(low)` copy fed cast inputs."""
    m = copy.deepcopy(model)
    if regime == "pure":
        assert low is not None
        m.to(low)
        batch = pytree.tree_map(
            lambda x: x.to(low) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, batch
        )
    autocast = torch.autocast("cpu", dtype=low) if regime == "autocast" else contextlib.nullcontext()
    tracker = UnitTracker(m, on_exit=lambda path: None)
    rec = OpRecorder(tracker)
    run = Run(math.nan, {}, {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        with _module_hooks(m, rec, run), tracker, rec, autocast:
            out = _call(m, batch)
            tracker.outside = LOSS_UNIT
            loss = _loss(out, batch, loss_fn)
    run.loss = float(loss.detach().float())
    run.ops = rec.ops
    return run


def rel_l2(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Relative L2 error of the low tensors against the fp32 ones, over all pairs."""
    ref_sq = err_sq = 0.0
    for ref, lowt in pairs:
        ref, lowt = ref.double(), lowt.double()
        keep = ref.abs() < MASK  # also drops fp32 Inf/NaN
        ref, lowt = ref[keep], lowt[keep]
        if not bool(torch.isfinite(lowt).all()):
            return math.inf
        ref_sq += float((ref * ref).sum())
        err_sq += float(((lowt - ref) ** 2).sum())
    if err_sq == 0:
        return 0.0
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else math.inf


def loss_error(ref: float, lowv: float) -> float:
    if not math.isfinite(lowv):
        return math.inf
    return abs(lowv - ref) / abs(ref) if ref != 0 else abs(lowv)


def module_errors(ref: Run, real: Run) -> dict[str, float]:
    """Per module path: the real low run's output error over all calls both runs made."""
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for (path, call), refs in ref.outputs.items():
        lows = real.outputs.get((path, call))
        if lows is None or len(lows) != len(refs):
            continue
        pairs[path] += [(r, lo) for r, lo in zip(refs, lows, strict=True) if r.shape == lo.shape and r.numel()]
    return {path: rel_l2(p) for path, p in pairs.items() if p}


def agree(a: float, b: float) -> bool:
    """The acceptance rule: both non-finite, or both <= 1e-3, or within a factor of 4."""
    fa, fb = math.isfinite(a), math.isfinite(b)
    if not fa or not fb:
        return not fa and not fb
    if a <= 1e-3 and b <= 1e-3:
        return True
    return max(a, b) <= 4 * min(a, b)


def one_ulp_apart(a: float, b: float, dtype: torch.dtype) -> bool:
    """Whether two losses held in `dtype` are at most one ulp apart. Such a loss is quantized
    (bf16: 2^-8..2^-7 relative), and its error with it: two bf16 runs whose roundings differ
    by an ulp somewhere upstream (the emulation's rsqrt and the CPU's own bf16 rsqrt disagree
    by one ulp on ~1e-4 of values) may land on neighbouring values, 4e-4 and 8e-3 from the fp32
    loss (`rmsnorm_no_upcast`), which no factor rule calls the same error."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    top = max(abs(a), abs(b))
    return top == 0 or abs(a - b) <= 2.0 ** math.floor(math.log2(top)) * torch.finfo(dtype).eps


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _value_making(op: str) -> bool:
    packet, _, overload = op.partition(".")
    return not op_info(getattr(getattr(torch.ops.aten, packet), overload)).preserves_values


# --- the cases ----------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The models are tiny: a second intra-op thread buys nothing, and on a busy 2-core
    machine every parallel region waits for a descheduled thread (this file: 50 s with two
    threads under other load, 8 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _source(name: str) -> tuple[torch.nn.Module, Any, Any]:
    if name in SAMPLES:
        spec = load_model_file(SAMPLES[name])
        return spec.model, spec.batch, spec.loss_fn
    case = build(name)
    return case.model, case.batch, case.loss_fn


@dataclass
class Result:
    fp32: Run
    real: Run
    report: pd.Report
    low_ops: dict[OpKey, Dtypes]


@functools.cache
def result(name: str, dtype: str, regime: str) -> Result:
    model, batch, loss_fn = _source(name)
    low = LOW[dtype]
    run_regime, policy = REGIMES[regime]
    fp32 = execute(model, batch, loss_fn, None, None)
    real = execute(model, batch, loss_fn, low, run_regime)
    with pytest.MonkeyPatch.context() as mp:
        if dtype == "bf16emu":
            mp.setenv(EMULATE_BF16_ENV, "1")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            recorded = low_run(
                copy.deepcopy(model), batch, loss_fn, low, regime=run_regime, policy=policy, record_ops=True
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            report = pd.analyze(
                copy.deepcopy(model), batch, loss_fn, dtype=dtype.removesuffix("emu"), regime=run_regime, policy=policy
            )
    if dtype == "bf16emu":
        assert report.environment.emulated
    return Result(fp32, real, report, recorded.op_dtypes)


# Cases that cannot agree, with the reason (strict: they must keep failing).
XFAIL: dict[tuple[str, str, str], str] = {}


def _params() -> list[Any]:
    out = []
    for name in MODELS:
        for dtype in LOW:
            if dtype == "bf16emu" and name not in EMULATED:
                continue
            for regime in REGIMES:
                marks = []
                reason = XFAIL.get((name, dtype, regime))
                if reason is not None:
                    marks.append(pytest.mark.xfail(reason=reason, strict=True))
                out.append(pytest.param(name, dtype, regime, id=f"{name}-{dtype}-{regime}", marks=marks))
    return out


CASES = _params()


@pytest.mark.parametrize(("name", "dtype", "regime"), CASES)
def test_op_dtypes_match_real_run(name: str, dtype: str, regime: str) -> None:
    """(a) low_run's keyed ops are the real run's, with their input and output dtypes."""
    r = result(name, dtype, regime)
    assert r.low_ops.keys() == r.real.ops.keys(), (
        sorted(set(r.real.ops) - set(r.low_ops))[:5],
        sorted(set(r.low_ops) - set(r.real.ops))[:5],
    )
    wrong = {k: (r.low_ops[k], v) for k, v in r.real.ops.items() if r.low_ops[k] != v}
    assert not wrong, list(wrong.items())[:5]


@pytest.mark.parametrize(("name", "dtype", "regime"), CASES)
def test_report_low_dtypes_match_real_run(name: str, dtype: str, regime: str) -> None:
    """(b) the report's ops[].low_dtypes: per unit and forward op, the real run's output
    dtypes over the calls the fp32 run makes too."""
    r = result(name, dtype, regime)
    expected: dict[tuple[str, str], set[str]] = defaultdict(set)
    for key in r.real.ops.keys() & r.fp32.ops.keys():
        expected[(key[0], key[2])] |= {dtype_spelling(_dtype_name(d)) for d in r.real.ops[key][1]}
    found = {
        (u.name, o.op): set(o.low_dtypes)
        for u in r.report.units
        for o in u.ops
        if o.phase == Phase.FORWARD and _value_making(o.op)
    }
    assert expected.keys() <= found.keys(), sorted(expected.keys() - found.keys())[:5]
    wrong = {k: (v, expected.get(k, set())) for k, v in found.items() if v != expected.get(k, set())}
    assert not wrong, list(wrong.items())[:5]


@pytest.mark.parametrize(("name", "dtype", "regime"), CASES)
def test_errors_match_real_run(name: str, dtype: str, regime: str) -> None:
    """The final-loss error and each unit's propagated output error agree with the real run's."""
    r = result(name, dtype, regime)
    real_loss = loss_error(r.fp32.loss, r.real.loss)
    losses = r.report.losses
    quantized = losses.low_dtype == "bf16" and one_ulp_apart(losses.low, r.real.loss, torch.bfloat16)
    assert agree(losses.rel_error, real_loss) or quantized, ("loss", losses.rel_error, real_loss)
    real = module_errors(r.fp32, r.real)
    disagree = {}
    no_counterpart = []
    for unit in r.report.units:
        prop = unit.forward.propagated
        got = prop.rel_l2_error if prop is not None else 0.0
        if unit.name not in real:
            no_counterpart.append(unit.name)
            continue
        want = real[unit.name]
        if not agree(got, want):
            disagree[unit.name] = (got, want)
    assert not disagree, disagree
    # Without module outputs: the loss function, and modules that own a parameter but never
    # run themselves (T5's `shared`, whose weight the embed_tokens modules use): no error
    # claimed there, no forward op of their own.
    claimed = [
        u.name
        for u in r.report.units
        if u.name in no_counterpart
        and u.name != LOSS_UNIT
        and (u.forward.propagated is not None or any(o.phase == Phase.FORWARD for o in u.ops))
    ]
    assert not claimed, claimed
    # The other way: modules with outputs but no unit are containers that make no value of
    # their own (T5's `encoder`, GPT-2's `mlp`, a Dropout(0.0) that returns its input).
    own_ops = {key[0] for key in r.fp32.ops}
    units = {u.name for u in r.report.units}
    dropped = sorted(path for path in real if path not in units and path in own_ops)
    assert not dropped, dropped


@pytest.mark.parametrize(("name", "dtype", "regime"), [c for c in CASES if c.values[0] in PLAIN])
def test_harness_draws_the_same_dropout_masks(name: str, dtype: str, regime: str) -> None:
    r = result(name, dtype, regime)
    assert r.real.dropouts, "no dropout ran"
    for key, (x32, y32) in r.fp32.dropouts.items():
        xlo, ylo = r.real.dropouts[key]
        both = (x32 != 0) & (xlo != 0)
        assert torch.equal((y32 == 0)[both], (ylo == 0)[both]), key


# --- the loss unit ----------------------------------------------------------------------


def test_loss_unit_forward_ops_are_the_loss_functions() -> None:
    """Autograd's gradient seed (`ones_like(loss)`) is no forward op of the loss function."""
    r = result("deep_narrow_underflow", "fp16", "autocast-cpu")
    real = {k[2] for k in r.real.ops if k[0] == LOSS_UNIT}  # pow, mean, mul (1e-4 * ...)
    unit = r.report.by_module()[LOSS_UNIT]
    found = {o.op for o in unit.ops if o.phase == Phase.FORWARD and _value_making(o.op)}
    assert found == real, found - real


def test_loss_unit_error_is_the_final_loss_error() -> None:
    """What `<loss>` hands on is the loss: its propagated error is the final-loss error, not
    the pooled error of the squares it is made of (here 1e-4 * mean is an fp16 subnormal)."""
    r = result("deep_narrow_underflow", "fp16", "autocast-cpu")
    real_loss = loss_error(r.fp32.loss, r.real.loss)
    assert agree(r.report.losses.rel_error, real_loss)  # the report's loss error is right
    prop = r.report.by_module()[LOSS_UNIT].forward.propagated
    assert prop is not None
    assert agree(prop.rel_l2_error, real_loss), (prop.rel_l2_error, real_loss)

"""The real low-precision run (`capture/lowrun.py`) and CUDA's autocast policy on the CPU
(`capture/autocast_policy.py`), each checked against real runs: a copy of the model under a
real `torch.autocast("cpu", low)`, or a real `model.to(low)` with cast inputs, on the real
low-precision CPU kernels, recorded by a bare dispatch mode."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from torch.nn.modules import module as nn_module
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from precision_doctor.capture import autocast_policy as ap
from precision_doctor.capture.autocast_policy import autocast_policy
from precision_doctor.capture.lowrun import EMULATE_BF16_ENV, EmulateLowMode, LowRun, low_precision, low_run
from precision_doctor.capture.ops import op_info, outputs_of
from precision_doctor.capture.units import LOSS_UNIT
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.model.spec import LossFn, load_model_file, resolve_loss, run_model
from precision_doctor.options import AutocastPolicy, Regime

from .fixtures import TRANSFORMERS, ComplexGain, build

# Numbers compared with an independent reference: CI runs these again at one thread (.ci/run).
pytestmark = pytest.mark.numerics

SEED = 1234
F16, B16 = torch.float16, torch.bfloat16
DTYPES = {"fp16": F16, "bf16": B16}
MODELS = ("mlp", "cnn", "functional", *TRANSFORMERS)
SAMPLES = {p.stem: p for p in sorted((Path(__file__).resolve().parent.parent / "sample_models").glob("*.py"))}
CONFIGS = [pytest.param(DTYPES[d], Regime(r), id=f"{d}-{r}") for d in DTYPES for r in ("autocast", "pure")]
# The faithfulness configurations: fp16 (always emulated on the CPU), bf16 on the real kernels
# and bf16 emulated (as on a CPU without fast bf16 kernels), each decision forced.
FAITHFUL = [
    *(pytest.param(F16, Regime(r), None, id=f"fp16-{r}") for r in ("autocast", "pure")),
    *(pytest.param(B16, Regime(r), False, id=f"bf16-{r}") for r in ("autocast", "pure")),
    *(pytest.param(B16, Regime(r), True, id=f"bf16emu-{r}") for r in ("autocast", "pure")),
]
# Relative L2 distance of a module output of the emulated run from the real kernels': fp16 and
# emulated bf16 differ from the real kernels only where fp32 accumulation order rounds a result
# the other way (one ulp: 2^-11..2^-10 relative in fp16, 2^-8..2^-7 in bf16), in a few elements,
# and these propagate downstream; the real bf16 kernels agree to fp32 rounding.
OUTPUT_TOLERANCE = {(F16, None): 1e-2, (B16, False): 1e-5, (B16, True): 2.0**-5}
HEADER = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"


# --- real runs --------------------------------------------------------------------------------


class Recorder(TorchDispatchMode):
    """A bare mode: every aten op with its output dtypes, unless paused."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, tuple[torch.dtype, ...]]] = []
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.log.append((op_info(func).name, tuple(t.dtype for t in outputs_of(out))))
        return out


def cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, batch)


@contextlib.contextmanager
def module_outputs(model: torch.nn.Module, rec: Recorder) -> Iterator[dict[tuple[str, int], list[torch.Tensor]]]:
    """(module path, call index) -> copies of the call's floating outputs, by global hooks
    (the copies paused in the recorder: they are no op of the model)."""
    paths = {id(m): name or "<root>" for name, m in model.named_modules()}
    calls: collections.Counter[str] = collections.Counter()
    stack: list[tuple[str, int]] = []
    outputs: dict[tuple[str, int], list[torch.Tensor]] = {}

    def pre(mod: torch.nn.Module, args: Any) -> None:
        path = paths.get(id(mod))
        if path is not None:
            stack.append((path, calls[path]))
            calls[path] += 1

    def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
        if paths.get(id(mod)) is not None:
            rec.paused = True
            outputs[stack.pop()] = [
                t.detach().clone()
                for t in pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.is_floating_point()
            ]
            rec.paused = False

    handles = [nn_module.register_module_forward_pre_hook(pre), nn_module.register_module_forward_hook(post)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@dataclass
class RealRun:
    loss: float
    op_log: list[tuple[str, tuple[torch.dtype, ...]]]
    module_outputs: dict[tuple[str, int], list[torch.Tensor]]


def real_run(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None, dtype: torch.dtype, regime: Regime) -> RealRun:
    """Real training's forward and loss: a copy of the model, real kernels, real autocast."""
    m = copy.deepcopy(model)
    if regime == Regime.PURE:
        m.to(dtype)
        batch = cast_floats(batch, dtype)
    rec = Recorder()
    autocast = torch.autocast("cpu", dtype=dtype) if regime == Regime.AUTOCAST else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        with module_outputs(m, rec) as outputs, rec, autocast:
            loss = resolve_loss(run_model(m, batch), batch, loss_fn)
    return RealRun(float(loss.detach()), rec.log, outputs)


def seeded_low_run(
    model: torch.nn.Module, batch: Any, loss_fn: LossFn | None, dtype: torch.dtype, regime: Regime, policy: str = "cpu"
) -> LowRun:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return low_run(model, batch, loss_fn, dtype, regime=regime, policy=policy)


@contextlib.contextmanager
def bf16_emulated(emulated: bool | None) -> Iterator[None]:
    """bf16's emulation forced on or off (None: the CPU's default)."""
    with pytest.MonkeyPatch.context() as mp:
        if emulated is not None:
            mp.setenv(EMULATE_BF16_ENV, "1" if emulated else "0")
        yield


@functools.cache
def runs(source: str, dtype: torch.dtype, regime: Regime, emulated: bool | None = None) -> tuple[RealRun, LowRun]:
    """The real run (real kernels, the package not involved) and `low_run`, bf16 emulated or
    not as `emulated` forces."""
    if source in SAMPLES:
        spec = load_model_file(SAMPLES[source])
        model, batch, loss_fn = spec.model, spec.batch, spec.loss_fn
    else:
        case = build(source)
        model, batch, loss_fn = case.model, case.batch, case.loss_fn
    with bf16_emulated(emulated):
        low = seeded_low_run(model, batch, loss_fn, dtype, regime)
    return real_run(model, batch, loss_fn, dtype, regime), low


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of `a` against `b` over the positions where both are finite."""
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    ref = b[finite].norm().item()
    diff = (a[finite] - b[finite]).norm().item()
    return 0.0 if diff == 0 else diff / max(ref, 1e-30)


SOURCES = [*MODELS, *SAMPLES]


# --- low_run against the real run -------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "regime", "emulated"), FAITHFUL)
@pytest.mark.parametrize("source", SOURCES)
def test_op_dtypes_match_real_run(source: str, dtype: torch.dtype, regime: Regime, emulated: bool | None) -> None:
    """Op by op, the emulated run makes the ops and output dtypes of the real one: casts,
    the model's own upcasts, dtype branches and type promotion all happen for real."""
    real, low = runs(source, dtype, regime, emulated)
    assert [name for name, _ in low.op_log] == [name for name, _ in real.op_log]
    mismatches = [(i, r, e) for i, (r, e) in enumerate(zip(real.op_log, low.op_log, strict=True)) if r != e]
    assert not mismatches, mismatches[:5]
    # The keyed ops are the value-making ones of the log, in order, with its dtypes.
    made = [dts for name, dts in low.op_log if not op_info(ap._overload(name)).preserves_values]
    assert [outs for _, outs in low.op_dtypes.values()] == made


@pytest.mark.parametrize(("dtype", "regime", "emulated"), FAITHFUL)
@pytest.mark.parametrize("source", SOURCES)
def test_loss_and_module_outputs_match_real_run(
    source: str, dtype: torch.dtype, regime: Regime, emulated: bool | None
) -> None:
    real, low = runs(source, dtype, regime, emulated)
    tolerance = OUTPUT_TOLERANCE[(dtype, emulated)]
    if math.isfinite(real.loss) or math.isfinite(low.loss):
        assert abs(low.loss - real.loss) <= 1e-2 * abs(real.loss) + 1e-7, (low.loss, real.loss)
    assert low.module_outputs.keys() == real.module_outputs.keys()
    for key, real_outs in real.module_outputs.items():
        low_outs = low.module_outputs[key]
        assert [(t.dtype, t.shape) for t in low_outs] == [(t.dtype, t.shape) for t in real_outs], key
        for a, b in zip(low_outs, real_outs, strict=True):
            assert not a.requires_grad
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), key
            assert rel_error(a, b) <= tolerance, (key, rel_error(a, b))


def test_op_keys_name_units_calls_and_loss() -> None:
    case = build("mlp")
    low = seeded_low_run(case.model, case.batch, case.loss_fn, F16, Regime.AUTOCAST)
    keys = list(low.op_dtypes)
    assert ("fc1", 0, "addmm.default", 0) in keys and ("fc2", 0, "addmm.default", 0) in keys
    assert ("act", 0, "relu.default", 0) in keys
    # mlp_loss (pow, mean) runs after the forward: the loss unit, under the same autocast.
    assert [k[2] for k in keys if k[0] == LOSS_UNIT] == ["pow.Tensor_Scalar", "mean.default"]
    # autocast casts fc1's input, weight and bias to fp16 (value-preserving casts are not keyed).
    assert low.op_dtypes[("fc1", 0, "addmm.default", 0)] == ((F16, F16, F16), (F16,))
    assert not any(k[2].startswith(("_to_copy", "t.", "detach")) for k in keys)
    # A module called twice: two calls, each keyed separately.
    shared = torch.nn.Linear(4, 4)
    net = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    low = low_run(net, torch.randn(2, 4), lambda out, b: out.sum(), B16, regime="pure", policy="cpu", record_ops=False)
    assert {("0", 0), ("0", 1), ("1", 0), ("<root>", 0)} <= low.module_outputs.keys()
    assert ("0", 1, "addmm.default", 0) in low.op_dtypes
    assert low.op_log == []


def test_module_output_written_in_place_later_keeps_its_values() -> None:
    """A ReLU(inplace=True) after a Linear overwrites the Linear's output: the recorded
    output is what the Linear returned."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True))
    x = torch.randn(16, 4)
    low = low_run(net, x, lambda out, b: out.sum(), F16, regime="autocast", policy="cpu")
    linear_out = low.module_outputs[("0", 0)][0]
    assert linear_out.dtype == F16 and bool((linear_out < 0).any())
    assert bool((low.module_outputs[("1", 0)][0] >= 0).all())


# --- the model's own dtype-dependent code ---------------------------------------------------


@pytest.mark.parametrize(("dtype", "regime"), CONFIGS)
def test_llama_rmsnorm_upcast_honoured(dtype: torch.dtype, regime: Regime) -> None:
    """LlamaRMSNorm computes its variance in fp32 whatever the input: the low run does too."""
    _, low = runs("llama", dtype, regime)
    norms = [(k, v) for k, v in low.op_dtypes.items() if k[0].endswith("norm") and k[2] == "pow.Tensor_Scalar"]
    assert len(norms) == 5  # two per layer and the final norm
    assert all(outs == (torch.float32,) for _, (_, outs) in norms)
    if regime == Regime.PURE:  # ... and hands its output back in the input's dtype
        assert all(v[0].dtype == dtype for k, v in low.module_outputs.items() if k[0].endswith("norm"))


@pytest.mark.parametrize(("dtype", "regime"), CONFIGS)
def test_t5_clamp_only_in_pure_fp16(dtype: torch.dtype, regime: Regime) -> None:
    """T5 clamps its hidden states only when they are fp16: under autocast they are fp32
    (the residual stream), in bf16 never."""
    _, low = runs("t5", dtype, regime)
    clamps = sum(1 for name, _ in low.op_log if name.startswith("clamp"))
    if dtype == F16 and regime == Regime.PURE:
        assert clamps > 0
    else:
        assert clamps == 0


# --- the model comes out as it went in ----------------------------------------------------


def _snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "buffers": {n: (b, b.detach().clone()) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
        "hooks": (len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks)),
    }


def _assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before["params"].keys()
    for n, (p, values, requires_grad, grad) in before["params"].items():
        assert after[n] is p and p.dtype == values.dtype and torch.equal(p.detach(), values), n
        assert p.requires_grad == requires_grad and p.grad is grad, n
    buffers = dict(model.named_buffers())
    for n, (b, values) in before["buffers"].items():
        assert buffers[n] is b and torch.equal(b, values), n
    assert {n: m.training for n, m in model.named_modules()} == before["training"]
    assert torch.equal(torch.get_rng_state(), before["rng"])
    assert (len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks)) == before["hooks"]
    assert _get_current_dispatch_mode() is None
    assert not torch.is_autocast_enabled("cpu")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::softmax.int", "AutocastCPU")


@pytest.mark.parametrize("policy", ["cpu", "cuda"])
@pytest.mark.parametrize(("dtype", "regime"), CONFIGS)
def test_model_state_unchanged(dtype: torch.dtype, regime: Regime, policy: str) -> None:
    case = build("cnn")  # batch norm statistics and dropout
    model = case.model
    model.net.conv.weight.grad = torch.ones_like(model.net.conv.weight)
    before = _snapshot(model)
    low_run(model, case.batch, case.loss_fn, dtype, regime=regime, policy=policy)
    _assert_unchanged(model, before)


def test_rng_restored_so_fp32_run_draws_the_same_dropout() -> None:
    case = build("cnn")
    x = case.batch[0]
    torch.manual_seed(7)
    expected = case.model(*case.batch)
    torch.manual_seed(7)
    low_run(case.model, case.batch, case.loss_fn, F16, regime="autocast", policy="cuda")
    assert torch.equal(case.model(*case.batch), expected)
    assert x is case.batch[0]


class Boom(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        with torch.no_grad():
            self.fc.weight.mul_(2)  # a forward writing its own parameter: restored too
        self.fc(x)
        torch.rand(3)
        raise RuntimeError("boom")


@pytest.mark.parametrize("policy", ["cpu", "cuda"])
@pytest.mark.parametrize(("dtype", "regime"), CONFIGS)
def test_model_state_unchanged_when_forward_raises(dtype: torch.dtype, regime: Regime, policy: str) -> None:
    model = Boom()
    x = torch.randn(2, 4)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):  # the model's own error, unchanged
        low_run(model, x, None, dtype, regime=regime, policy=policy)
    _assert_unchanged(model, before)


# --- low_precision: training loops ------------------------------------------------------------


def _step(
    case_name: str, dtype: torch.dtype, regime: Regime, policy: str, emulate: bool
) -> tuple[float, list[Any], dict[str, torch.Tensor]]:
    case = build(case_name)
    model, batch = case.model, case.batch
    if regime == Regime.PURE:
        model.to(dtype)
        batch = cast_floats(batch, dtype)
    rec = Recorder()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        # The recorder inside the emulation: it sees the model's ops, not the emulation's.
        with low_precision(model, dtype, regime=regime, policy=policy, emulate=emulate), rec:
            loss = resolve_loss(run_model(model, batch), batch, case.loss_fn)
            loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), rec.log, grads


@pytest.mark.parametrize("policy", ["cpu", "cuda"])
@pytest.mark.parametrize(("dtype", "regime"), CONFIGS)
@pytest.mark.parametrize("name", ["cnn", "gpt2", "t5"])
def test_low_precision_forward_and_backward_match_real_kernels(
    name: str, dtype: torch.dtype, regime: Regime, policy: str
) -> None:
    """A training step under `low_precision`, emulated (bf16 too, when asked) against the
    real low-precision kernels: the same ops and dtypes, forward and backward."""
    real_loss, real_log, real_grads = _step(name, dtype, regime, policy, emulate=False)
    loss, log, grads = _step(name, dtype, regime, policy, emulate=True)
    assert log == real_log
    assert abs(loss - real_loss) <= 1e-2 * abs(real_loss)
    assert grads.keys() == real_grads.keys()
    total = math.sqrt(sum(g.double().pow(2).sum().item() for g in real_grads.values()))
    diff = math.sqrt(sum((grads[k].double() - g.double()).pow(2).sum().item() for k, g in real_grads.items()))
    assert diff <= 5e-2 * total


def test_low_precision_contexts() -> None:
    net = torch.nn.Linear(2, 1)
    with low_precision(net, F16, regime="autocast", policy="cuda"):
        assert isinstance(_get_current_dispatch_mode(), EmulateLowMode)
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == F16
        assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::softmax.int", "AutocastCPU")
        y = net(torch.tensor([[70000.0, 0.0]]))
    assert y.dtype == F16 and bool(torch.isinf(y).all())
    with bf16_emulated(False), low_precision(net, B16, regime="autocast", policy="cpu"):  # real bf16 kernels
        assert _get_current_dispatch_mode() is None and torch.get_autocast_dtype("cpu") == B16
    with bf16_emulated(True), low_precision(net, B16, regime="autocast", policy="cpu"):  # no fast bf16 kernels
        assert isinstance(_get_current_dispatch_mode(), EmulateLowMode) and torch.get_autocast_dtype("cpu") == B16
    with low_precision(net, F16, regime="pure", policy="cuda"):  # the caller cast the model
        assert isinstance(_get_current_dispatch_mode(), EmulateLowMode)
        assert not torch.is_autocast_enabled("cpu")
    with low_precision(net, F16, regime="pure", policy="cpu", device_type="cuda"):
        assert _get_current_dispatch_mode() is None  # never emulated on a GPU
    with (
        pytest.raises(PrecisionDoctorError),
        low_precision(net, F16, regime="pure", policy="cpu", device_type="cuda", emulate=True),
    ):
        pass
    assert _get_current_dispatch_mode() is None and not torch.is_autocast_enabled("cpu")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::softmax.int", "AutocastCPU")


def test_emulation_keeps_aliasing_and_dtype_arguments() -> None:
    x = torch.tensor([1.0, 2.0, 60000.0], dtype=F16)
    with EmulateLowMode():
        y = x.mul_(2)
        s = torch.ones(4, dtype=F16).sum(dtype=F16)
        out = torch.empty(3, dtype=F16)
        z = torch.add(x, 1, out=out)
        m = torch.ones(2, 2, dtype=F16).max(dim=0)
    assert y is x and x.dtype == F16 and torch.isinf(x[2]) and x[0] == 2
    assert s.dtype == F16 and s.item() == 4
    assert z is out and out[1].item() == 5
    assert m.values.dtype == F16 and m.indices.dtype == torch.int64


# --- the CUDA policy on the CPU -------------------------------------------------------------


def _parse_header(text: str) -> dict[str, list[str]]:
    """The op lists of autocast_mode.h: macro name -> `name` / `name.overload` entries."""
    lists: dict[str, list[str]] = {}
    for m in re.finditer(r"#define (AT_FORALL_\w+)\(_\)((?:[^\n]*\\\n)*[^\n]*)", text):
        body = m.group(2)
        if m.group(1) == "AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE":
            lists[m.group(1)] = re.findall(r'"([\w.]+)"', body)
        else:
            lists[m.group(1)] = [a + (f".{b}" if b else "") for a, b in re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", body)]
    return lists


@pytest.mark.skipif(not HEADER.exists(), reason="torch ships no ATen headers")
def test_cuda_lists_match_the_installed_header() -> None:
    lists = _parse_header(HEADER.read_text())
    assert list(ap.LOWER_PRECISION_FP) == lists["AT_FORALL_LOWER_PRECISION_FP"]
    assert list(ap.FP32) == lists["AT_FORALL_FP32"]
    assert list(ap.FP32_SET_OPT_DTYPE) == lists["AT_FORALL_FP32_SET_OPT_DTYPE"]
    assert list(ap.FP32_APPEND_DTYPE) == lists["AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE"]
    assert list(ap.PROMOTE) == lists["AT_FORALL_PROMOTE"]


def test_cuda_lists_cover_the_dispatchers_cuda_kernels() -> None:
    """Every aten op with a CUDA autocast kernel is in one of our lists (the banned one too),
    but the cuDNN convolutions no CPU run reaches; each dtype-appending target takes the
    source's arguments plus a dtype."""
    registered = {
        n.removeprefix("aten::")
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCUDA")
    }
    ours = {*ap.LOWER_PRECISION_FP, *ap.FP32, *ap.FP32_SET_OPT_DTYPE, *ap.FP32_APPEND_DTYPE, *ap.PROMOTE, *ap.BANNED}
    assert ours <= registered
    assert registered - ours <= {"cudnn_convolution", "cudnn_convolution_transpose"}
    for source, target in ap.FP32_APPEND_DTYPE.items():
        s, t = (ap._overload(n)._schema.arguments for n in (source, target))
        assert [a.name for a in t] == [a.name for a in s] + ["dtype"]


def _probe() -> dict[str, torch.dtype]:
    x = torch.randn(4, 8)
    w = torch.randn(8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=F16):
        return {
            "softmax": torch.softmax(x.half(), -1).dtype,
            "layer_norm": torch.nn.functional.layer_norm(x.half(), (8,)).dtype,
            "exp": torch.exp(x.half()).dtype,
            "sum": x.half().sum().dtype,
            "norm": x.half().norm().dtype,
            "mm": torch.mm(x, w).dtype,
            "linear": torch.nn.functional.linear(x, w).dtype,
            "cat": torch.cat([x, x.half()]).dtype,
        }


def test_cuda_policy_on_cpu_and_back() -> None:
    cpu = _probe()
    assert cpu["softmax"] == F16 and cpu["layer_norm"] == F16  # the CPU's own lists
    with autocast_policy(AutocastPolicy.CUDA, "cpu"):
        with autocast_policy("cuda"):  # nested: one registration, counted
            nested = _probe()
        cuda = _probe()
    assert nested == cuda
    assert {k: cuda[k] for k in ("softmax", "layer_norm", "exp", "sum", "norm")} == dict.fromkeys(
        ("softmax", "layer_norm", "exp", "sum", "norm"), torch.float32
    )
    assert cuda["mm"] == F16 and cuda["linear"] == F16 and cuda["cat"] == torch.float32
    assert _probe() == cpu
    with pytest.raises(KeyError), autocast_policy("cuda"):
        raise KeyError("inside")
    assert _probe() == cpu
    assert ap._depth == 0 and ap._library is None
    with autocast_policy("cpu", "cpu"), autocast_policy("cuda", "cuda"):  # each device's own: no-op
        assert _probe() == cpu


def test_cuda_policy_rejects_what_it_cannot_do() -> None:
    with pytest.raises(PrecisionDoctorError), autocast_policy("cpu", "cuda"):
        pass
    with pytest.raises(PrecisionDoctorError), autocast_policy("cuda"), autocast_policy("cpu"):
        pass
    assert ap._depth == 0
    x = torch.rand(4)
    with (
        pytest.raises(RuntimeError, match="unsafe to autocast"),
        autocast_policy("cuda"),
        torch.autocast("cpu", dtype=F16),
    ):
        torch.nn.functional.binary_cross_entropy(x, x)


def test_cuda_policy_weight_cache() -> None:
    """As autocast's cache: a weight is cast once per region however many ops read it, and
    (beyond torch's) cast afresh after an in-place update."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(2, 4)
    rec = Recorder()
    with autocast_policy("cuda"), torch.autocast("cpu", dtype=F16), rec:
        a = torch.mm(x, w)
        torch.mm(x, w)
        with torch.no_grad():
            w.mul_(2)
        b = torch.mm(x, w)
    casts = [dts for name, dts in rec.log if name == "_to_copy.default"]
    assert len(casts) == 1 + 3 + 1  # w once, x for each mm, w again after the update
    assert torch.allclose(b.float(), 2 * a.float(), rtol=1e-2)


def test_no_warning_and_no_dynamo_import() -> None:
    """torch warns once per process that a kernel is overridden: not the user's business. And
    neither the run nor the emulation imports torch._dynamo (~0.7 s of a CLI run): checked in
    a fresh interpreter, as this one has imported it through transformers."""
    code = (
        "import sys, warnings, torch\n"
        "from precision_doctor.capture.lowrun import low_precision, low_run\n"
        "warnings.simplefilter('error')\n"
        "net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.GELU())\n"
        "x = torch.randn(3, 4)\n"
        "low_run(net, x, lambda out, b: out.pow(2).mean(), torch.float16, regime='autocast', policy='cuda')\n"
        "low_run(net, x, lambda out, b: out.pow(2).mean(), torch.float16, regime='pure', policy='cpu')\n"
        "with low_precision(net, torch.float16, regime='autocast', policy='cuda'):\n"
        "    net(x).float().pow(2).mean().backward()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Overriding" not in done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [pytest.param(F16, id="fp16"), pytest.param(B16, id="bf16")])
@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_cuda_policy_on_cpu_matches_real_cuda_autocast(name: str, dtype: torch.dtype) -> None:
    case = build(name)
    on_gpu = copy.deepcopy(case.model).cuda()
    gpu_batch = pytree.tree_map(lambda x: x.cuda() if isinstance(x, torch.Tensor) else x, case.batch)
    real = Recorder()
    with real, torch.autocast("cuda", dtype=dtype):
        resolve_loss(run_model(on_gpu, gpu_batch), gpu_batch, case.loss_fn)
    ours = Recorder()
    with autocast_policy("cuda"), ours, torch.autocast("cpu", dtype=dtype):
        resolve_loss(run_model(case.model, case.batch), case.batch, case.loss_fn)
    assert ours.log == real.log


# --- a kept graph's parameter casts -------------------------------------------------------


def _cast_outputs(model: torch.nn.Module, run: Any) -> list[Any]:
    """Weak references to every cast of a parameter the low run makes (`_to_copy` of a
    parameter), seen by a bare mode around it."""
    import weakref

    params = {id(p) for p in model.parameters()}
    refs: list[Any] = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and id(args[0]) in params:
                refs.append(weakref.ref(out))
            return out

    with Casts():
        run()
    return refs


def _grads_sink() -> tuple[dict[str, torch.Tensor], Any]:
    got: dict[str, torch.Tensor] = {}

    def sink(names: list[str], g: torch.Tensor) -> None:
        for n in names:
            got[n] = g.clone()

    return got, sink


def test_a_complex_parameter_gradient_reaches_the_sink_complex() -> None:
    """The kept graph's backward hands a complex gradient on whole: `.float()` kept its real
    part only (and a sink that keeps gradients for the optimizer step stepped with that).
    Reference: the same step under torch's own CPU autocast."""
    torch.manual_seed(0)
    model, x = ComplexGain(), torch.randn(4, 8)

    def loss_fn(out: torch.Tensor, batch: Any) -> torch.Tensor:
        return out.pow(2).mean()

    ref_model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(ref_model(x), x)
    loss.backward()
    ref = ref_model.gain.grad
    assert ref is not None and ref.imag.abs().max() > 0
    got, sink = _grads_sink()
    low_run(model, x, loss_fn, torch.bfloat16, regime="autocast", policy="cpu", gradients_at=(0, sink))
    assert got["gain"].dtype == torch.complex64
    torch.testing.assert_close(got["gain"], ref, rtol=1e-2, atol=1e-3)
    assert model.gain.grad is None  # the model's own `.grad` as before


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["mlp", "gpt2"], ids=["mlp", "gpt2"])
def test_a_kept_graph_makes_its_parameter_casts_again(case: str, low: torch.dtype) -> None:
    """The low graph kept through the fp32 capture holds no cast of a parameter: each is saved
    as how to make it again (`lowrun._ParamCasts`), and the backward that makes them again
    gives the gradients a backward run at once (casts saved as they are) gives, bit for bit."""
    c = build(case)
    runs: list[LowRun] = []

    def kept() -> None:
        runs.append(low_run(c.model, c.batch, c.loss_fn, low, regime="autocast", policy="cuda", keep_graph=True))

    refs = _cast_outputs(c.model, kept)
    assert refs and all(r() is None for r in refs)  # no cast outlives the forward
    graph = runs[0].graph
    assert graph is not None
    kept_grads, sink = _grads_sink()
    graph.backward(10, sink)
    at_once, sink = _grads_sink()
    low_run(c.model, c.batch, c.loss_fn, low, regime="autocast", policy="cuda", gradients_at=(10, sink))
    assert kept_grads.keys() == at_once.keys() and kept_grads
    for name, g in at_once.items():
        assert torch.equal(kept_grads[name], g), name


def test_a_parameter_written_after_the_forward_is_not_cast_again() -> None:
    """A parameter written in place between the kept forward and its backward: its cast cannot
    be made again; the backward raises (the analysis then runs forward and backward at once)."""
    c = build("mlp")
    run = low_run(c.model, c.batch, c.loss_fn, torch.float16, regime="autocast", policy="cuda", keep_graph=True)
    assert run.graph is not None
    # The last layer's: its cast is saved (for the gradient of its input; the first layer's
    # input, the batch, needs none).
    weight = [m for m in c.model.modules() if isinstance(m, torch.nn.Linear)][-1].weight
    with torch.no_grad():
        weight.mul_(1.0)
    with pytest.raises(RuntimeError, match="written in place"):
        run.graph.backward(0, lambda names, g: None)


class _ClampsItsWeight(torch.nn.Module):
    """Writes its last weight through `.data` in its forward (weight clipping), which the
    weight's version does not count."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x)))
        self.b.weight.data.clamp_(-0.1, 0.1)
        return y


def test_a_parameter_written_through_data_in_the_forward_is_not_cast_again() -> None:
    torch.manual_seed(0)
    model = _ClampsItsWeight()
    with torch.no_grad():
        model.b.weight.mul_(10.0)  # so that the clamp changes it
    x = torch.randn(3, 4)

    def loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
        return out.float().pow(2).mean()

    run = low_run(model, x, loss, torch.float16, regime="autocast", policy="cuda", keep_graph=True)
    assert run.graph is not None
    with pytest.raises(RuntimeError, match="written in place"):
        run.graph.backward(0, lambda names, g: None)


class _WritesItsCast(torch.nn.Module):
    """Casts a weight itself and scales the cast in place (the cast's values are then no
    `weight.to(fp16)`)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        w = self.b.weight.to(torch.float16)
        w.mul_(2.0)
        return h.half() @ w.t()


class _ChannelsLastCast(torch.nn.Module):
    """Casts a convolution's weight with a memory format of its own: no cast autocast makes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3)
        self.w = torch.nn.Parameter(torch.randn(2, 4, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).half()
        return torch.nn.functional.conv2d(h, self.w.to(torch.float16, memory_format=torch.channels_last))


def _square_mean(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return out.float().pow(2).mean()


def test_a_cast_written_in_the_forward_is_not_made_again() -> None:
    torch.manual_seed(0)
    model = _WritesItsCast()
    run = low_run(
        model, torch.randn(3, 4), _square_mean, torch.float16, regime="autocast", policy="cuda", keep_graph=True
    )
    assert run.graph is not None
    with pytest.raises(RuntimeError, match="written in place"):
        run.graph.backward(0, lambda names, g: None)


def test_a_cast_with_a_layout_of_its_own_is_kept_as_it_is() -> None:
    torch.manual_seed(0)
    model = _ChannelsLastCast()
    x = torch.randn(2, 3, 8, 8)
    run = low_run(model, x, _square_mean, torch.float16, regime="autocast", policy="cuda", keep_graph=True)
    assert run.graph is not None
    kept, sink = _grads_sink()
    run.graph.backward(0, sink)
    at_once, sink = _grads_sink()
    low_run(model, x, _square_mean, torch.float16, regime="autocast", policy="cuda", gradients_at=(0, sink))
    assert kept.keys() == at_once.keys() == {"a.weight", "a.bias", "w"}
    for name, g in at_once.items():
        assert torch.equal(kept[name], g), name

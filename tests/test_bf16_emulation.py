"""bf16 on CPUs without fast bf16 kernels (issue 25).

A CPU without oneDNN's bf16 (an AVX2 one) runs bf16 matmuls in ATen's scalar loops, 55x an
fp32 GPT-2 step; there the low run emulates bf16 as it emulates fp16 (`EmulateLowMode`: fp32
kernels, each result rounded to the dtype the real op makes). Checked here:

- the decision (`capture.lowrun.cpu_bf16_emulated`): the CPU's oneDNN bf16 support by
  default, `PRECISION_DOCTOR_EMULATE_BF16` forcing it either way, never on a GPU, and on a
  CPU with bf16 kernels (this one, and any with AVX-512 or AMX) the real kernels, so its
  reports are what they were;
- the report says which ran (`environment.emulated`, `precision_text`);
- the emulated bf16 run against the real bf16 kernels on the test models, both regimes and
  both autocast policies: the same ops with the same dtypes, forward and backward, and the
  loss, every module output and every gradient within bf16's rounding.

The tolerances. The CPU's bf16 kernels compute in fp32 and round each result to bf16, as the
emulation does; the two runs differ only where a different fp32 accumulation order puts a
result on the other side of a rounding boundary: one bf16 ulp (2^-8..2^-7 relative) in a few
elements, which propagates downstream and into the backward. So:

- the loss and every module output: relative L2 distance <= 2^-6 (2 ulps at most, for a
  tensor whose every element moved by one). Measured (torch 2.13, the models below, three
  regimes): <= 6.2e-3, most exactly 0;
- the gradients, all parameters together: <= 2^-6 (measured <= 7.0e-3);
- each parameter's gradient: what the analysis reads from it is its bf16 error, the distance
  from the fp32 gradient; the emulated and the real bf16 errors agree within a factor 2 (plus
  a 2^-6 floor of the fp32 gradient's norm). Measured: within 1.25x. A per-parameter distance
  between the two runs would not do: gradients that are zero in exact arithmetic (a
  convolution's bias before a BatchNorm, BERT's attention key bias) are pure rounding noise in
  bf16 (1e4x their fp32 value), two different draws of it in the two runs; and in pure bf16 a
  LayerNorm's weight gradient (a sum over tokens) differs between the runs by 2.1e-2, the size
  of its own bf16 error (2.3e-2): the emulation is another bf16 run, as far from the real one
  as bf16 is from fp32, and no further.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

import precision_doctor as pd
from precision_doctor.capture.lowrun import (
    EMULATE_BF16_ENV,
    EmulateLowMode,
    cpu_bf16_emulated,
    emulates,
    low_precision,
    low_run,
)
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.model.spec import load_model_file, resolve_loss, run_model

from .fixtures import TRANSFORMERS, build

B16 = torch.bfloat16
SEED = 1234
ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 2.0**-6
"""Relative distance of the emulated run from the real bf16 kernels' (module docstring)."""
ERROR_FACTOR = 2.0
"""How far the emulated and the real bf16 errors of one gradient may be apart."""


def _native() -> bool:
    return bool(
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


# --- the decision ---------------------------------------------------------------------------


def test_default_follows_the_cpus_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EMULATE_BF16_ENV, raising=False)
    assert cpu_bf16_emulated() is not _native()
    assert emulates(B16, "cpu") is not _native()
    monkeypatch.setenv(EMULATE_BF16_ENV, "auto")
    assert cpu_bf16_emulated() is not _native()


@pytest.mark.skipif(not _native(), reason="this CPU has no oneDNN bf16 kernels")
def test_a_cpu_with_bf16_kernels_runs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """As before the emulation: reports made on such a CPU are unchanged."""
    monkeypatch.delenv(EMULATE_BF16_ENV, raising=False)
    assert not emulates(B16, "cpu")
    net = torch.nn.Linear(2, 1)
    with low_precision(net, B16, regime="autocast", policy="cpu"):
        assert _get_current_dispatch_mode() is None


def test_forced_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("1", "true", "ON"):
        monkeypatch.setenv(EMULATE_BF16_ENV, value)
        assert cpu_bf16_emulated() and emulates(B16, "cpu")
        assert not emulates(B16, "cuda")  # a GPU's kernels are real
    for value in ("0", "false", "off"):
        monkeypatch.setenv(EMULATE_BF16_ENV, value)
        assert not cpu_bf16_emulated() and not emulates(B16, "cpu")
        assert emulates(torch.float16, "cpu")  # fp16 is emulated on the CPU whatever bf16 does
    monkeypatch.setenv(EMULATE_BF16_ENV, "sometimes")
    with pytest.raises(PrecisionDoctorError, match=EMULATE_BF16_ENV):
        cpu_bf16_emulated()


def test_onednn_switched_off_emulates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without oneDNN, bf16 matmuls run ATen's scalar loops (a 512x512 one ~150x fp32's)."""
    monkeypatch.delenv(EMULATE_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert cpu_bf16_emulated()
    net = torch.nn.Linear(2, 1)
    with low_precision(net, B16, regime="autocast", policy="cpu"):
        assert isinstance(_get_current_dispatch_mode(), EmulateLowMode)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's x86 ISA cap")
def test_an_avx2_cpu_emulates() -> None:
    """oneDNN capped at AVX2 (as on an AVX2 CPU, where it has no bf16) decides the emulation."""
    code = "import torch; from precision_doctor.capture.lowrun import emulates; print(emulates(torch.bfloat16, 'cpu'))"
    # The user's environment (a conda torch needs its own variables), less our override.
    env = {k: v for k, v in os.environ.items() if k != EMULATE_BF16_ENV} | {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr


def test_the_report_says_which_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(4, 8)

    def loss_fn(out: torch.Tensor, batch: Any) -> torch.Tensor:
        return out.float().pow(2).mean()

    monkeypatch.setenv(EMULATE_BF16_ENV, "1")
    emulated = pd.analyze(net, x, loss_fn, dtype="bf16").environment
    assert emulated.emulated
    assert (
        emulated.precision_text() == "emulated: fp32 kernels, results rounded to bf16; the CPU has no fast bf16 kernels"
    )
    monkeypatch.setenv(EMULATE_BF16_ENV, "0")
    real = pd.analyze(net, x, loss_fn, dtype="bf16").environment
    assert not real.emulated and real.precision_text() == "native bf16 kernels"
    monkeypatch.setenv(EMULATE_BF16_ENV, "1")
    fp16 = pd.analyze(net, x, loss_fn, dtype="fp16").environment
    assert fp16.emulated and fp16.precision_text() == "emulated: fp32 kernels, results rounded to fp16"


# --- the emulated run against the real bf16 kernels ------------------------------------------


@dataclass
class Step:
    """One low run's forward, loss and backward, as the analysis makes them."""

    loss: float
    op_log: list[tuple[str, tuple[torch.dtype, ...]]]
    op_dtypes: dict[Any, Any]
    module_outputs: dict[tuple[str, int], list[torch.Tensor]]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)


def _source(name: str) -> tuple[torch.nn.Module, Any, Any]:
    if name == "tiny_transformer":
        spec = load_model_file(ROOT / "sample_models" / "tiny_transformer.py")
        return spec.model, spec.batch, spec.loss_fn
    case = build(name)
    return case.model, case.batch, case.loss_fn


def bf16_step(name: str, regime: str, policy: str, emulated: bool) -> Step:
    """`low_run` in bf16 with the backward (`gradients_at`, loss scale 2^0), bf16 emulated or
    on the real kernels."""
    model, batch, loss_fn = _source(name)
    grads: dict[str, torch.Tensor] = {}

    def sink(names: list[str], g: torch.Tensor) -> None:
        grads[names[0]] = g.clone()

    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.setenv(EMULATE_BF16_ENV, "1" if emulated else "0")
        torch.manual_seed(SEED)
        run = low_run(copy.deepcopy(model), batch, loss_fn, B16, regime=regime, policy=policy, gradients_at=(0, sink))
    return Step(run.loss, run.op_log, run.op_dtypes, run.module_outputs, grads)


def fp32_grads(name: str) -> dict[str, torch.Tensor]:
    """The fp32 step's gradients (plain torch, the same dropout draws)."""
    model, batch, loss_fn = _source(name)
    model = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        loss = resolve_loss(run_model(model, batch), batch, loss_fn)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance of `a` from `b` over the positions where both are finite."""
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    diff = float((a[finite] - b[finite]).norm())
    return 0.0 if diff == 0 else diff / max(float(b[finite].norm()), 1e-30)


def distances(emulated: Step, real: Step, fp32: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far the emulated run is from the real one: the loss's and the module outputs'
    largest relative distances, all gradients' relative distance, and the largest ratio of
    one gradient's bf16 errors (emulated against real, either way round)."""
    outputs = [
        rel_distance(a, b)
        for key, bs in real.module_outputs.items()
        for a, b in zip(emulated.module_outputs[key], bs, strict=True)
    ]
    names = sorted(real.grads)
    ratios = [0.0]
    for n in names:
        floor = TOLERANCE * float(fp32[n].double().norm())
        err_real = float((real.grads[n] - fp32[n]).double().norm())
        err_emulated = float((emulated.grads[n] - fp32[n]).double().norm())
        ratios.append(max((err_emulated - floor) / max(err_real, 1e-30), (err_real - floor) / max(err_emulated, 1e-30)))
    return {
        "loss": abs(emulated.loss - real.loss) / max(abs(real.loss), 1e-30),
        "outputs": max(outputs, default=0.0),
        "grads": rel_distance(
            torch.cat([emulated.grads[n].reshape(-1) for n in names]),
            torch.cat([real.grads[n].reshape(-1) for n in names]),
        ),
        "grad_error_ratio": max(ratios),
    }


MODELS = ("mlp", "cnn", "tiny_transformer", *TRANSFORMERS)
REGIMES = [("autocast", "cpu"), ("autocast", "cuda"), ("pure", "cpu")]


@pytest.mark.parametrize(("regime", "policy"), REGIMES, ids=["autocast-cpu", "autocast-cuda", "pure"])
@pytest.mark.parametrize("name", MODELS)
def test_emulated_bf16_matches_real_bf16_kernels(name: str, regime: str, policy: str) -> None:
    real = bf16_step(name, regime, policy, emulated=False)
    emulated = bf16_step(name, regime, policy, emulated=True)
    # The same ops in the same dtypes, forward (keyed by unit) and backward (the log).
    assert emulated.op_dtypes == real.op_dtypes
    assert emulated.op_log == real.op_log
    assert emulated.module_outputs.keys() == real.module_outputs.keys()
    for key, outs in real.module_outputs.items():
        assert [(t.dtype, t.shape) for t in emulated.module_outputs[key]] == [(t.dtype, t.shape) for t in outs], key
        for a, b in zip(emulated.module_outputs[key], outs, strict=True):
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), key
    assert emulated.grads.keys() == real.grads.keys() and real.grads
    assert math.isfinite(real.loss) == math.isfinite(emulated.loss)
    found = distances(emulated, real, fp32_grads(name))
    limits = {"loss": TOLERANCE, "outputs": TOLERANCE, "grads": TOLERANCE, "grad_error_ratio": ERROR_FACTOR}
    far = {k: (v, limits[k]) for k, v in found.items() if not v <= limits[k]}
    assert not far, far


def test_an_emulated_matmul_is_the_real_kernels_within_an_ulp() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(64, 256).bfloat16(), torch.randn(256, 64).bfloat16()
    real = a @ b
    with EmulateLowMode((B16,)):
        emulated = a @ b
    assert emulated.dtype == real.dtype == B16
    ulp = torch.finfo(B16).eps * real.float().abs()  # one ulp at the value's binade top: 2^-7 |x|
    assert bool(((emulated.float() - real.float()).abs() <= ulp).all())


@pytest.mark.parametrize("emulate", ["0", "1"], ids=["real-bf16-kernels", "emulated-bf16"])
def test_local_shadows_run_the_kernels_the_low_run_runs(emulate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local shadow reads what the real run reads low as it is where the low run has real
    kernels (a bf16 matmul, no fp32 upcast), and upcasts it where the low run emulates; its
    error is the one an independent bf16 computation of the op gives either way."""
    from precision_doctor.capture.local_shadow import LocalShadows

    monkeypatch.setenv(EMULATE_BF16_ENV, emulate)
    seen: list[tuple[torch.dtype, ...]] = []
    original = LocalShadows.call

    def call(self: LocalShadows, func: Any, info: Any, sargs: Any, out: Any, *, stored_low: bool) -> Any:
        if func is torch.ops.aten.addmm.default:
            seen.append(tuple(a.dtype for a in sargs[0] if isinstance(a, torch.Tensor)))
        return original(self, func, info, sargs, out, stored_low=stored_low)

    monkeypatch.setattr(LocalShadows, "call", call)
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    x = torch.randn(16, 256)
    report = pd.analyze(lin, x, lambda out, b: out.float().pow(2).mean(), dtype="bf16")
    expected_dtype = torch.float32 if emulate == "1" else torch.bfloat16
    assert seen == [(expected_dtype,) * 3]
    op = next(o for u in report.units for o in u.ops if o.op.startswith("addmm") and o.phase == "forward")
    with torch.no_grad():
        ref = lin(x)
        b, xb, w = lin.bias.bfloat16(), x.bfloat16(), lin.weight.bfloat16()
        if emulate == "1":  # fp32 kernel on the rounded inputs, its result rounded
            low = torch.addmm(b.float(), xb.float(), w.float().t()).bfloat16().float()
        else:
            low = torch.addmm(b, xb, w.t()).float()
    assert op.local_rel_l2_error == pytest.approx(float((low - ref).norm() / ref.norm()), rel=1e-5)

"""Regimes beyond the analysis: the plan's verification runs what `apply_plan` runs, the
pre-flight trains as the chosen regime trains, and stock decoders are not blamed for what real
mixed precision never computes."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import precision_doctor as pd
from precision_doctor.capture.lowrun import EMULATE_BF16_ENV, EmulateLowMode, low_precision
from precision_doctor.capture.statistics import relative_loss_error
from precision_doctor.cli import app
from precision_doctor.formats import dtype_spelling
from precision_doctor.model.spec import load_model_file
from precision_doctor.planning.export import render_python
from precision_doctor.planning.plan import Plan, apply_plan, plan_model, verify_plan
from tests.test_loss_scale import load
from tests.test_lowrun import Recorder

from .fixtures import Case, build

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
DECODERS = ("llama", "qwen2", "mistral")


def loud_decoder(name: str) -> Case:
    """A stock decoder (tiny config) whose hidden states reach |x| ~ 1000: squares of 1e6,
    past fp16's 65504, in any norm that squares them in fp16."""
    pytest.importorskip("transformers")
    case = build(name)
    w = case.model.model.embed_tokens.weight  # type: ignore[union-attr]
    with torch.no_grad():
        w.mul_(1000.0 / w.abs().mean())
    return case


@pytest.mark.parametrize("name", DECODERS)
def test_stock_decoder_norms_are_not_flagged_in_fp16(name: str) -> None:
    """Llama/Qwen2/Mistral's RMSNorm upcasts (`hidden_states.to(torch.float32)`) before it
    squares. The old all-low emulation rounded every op of a low unit to fp16, upcast or not,
    and flagged OVERFLOW, DIVERGENCE and ERROR_GROWTH on all five norms of each of these models
    (variance ~1.5e7); the real run squares in fp32 and nothing overflows."""
    case = loud_decoder(name)
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp16")
    assert report.environment.regime is pd.options.Regime.AUTOCAST
    norms = [u for u in report.units if "norm" in u.name]
    assert len(norms) == 5  # two per layer and the final one
    assert not [(u.name, f.flag.value) for u in norms for f in u.flags]
    assert report.losses.rel_error < 1e-4


def test_preflight_says_go_for_a_stock_llama_in_fp16() -> None:
    case = loud_decoder("llama")
    result = pd.preflight(case.model, case.batch, case.loss_fn, dtype="fp16", steps=3, name="llama")
    assert bool(result), result.verdict + "".join(f"\n{r.line()}" for r in result.reasons)
    assert result.regime is pd.options.Regime.AUTOCAST and result.policy is pd.options.AutocastPolicy.CUDA
    low = result.runs["low"]
    assert low.skipped_steps == [] and low.nonfinite_steps == [] and low.init_scale_log2 == 16
    assert low.max_divergence is not None and low.max_divergence < 1e-4
    assert result.planned_go is True and "planned" in result.runs


# --- recurrent layers ---------------------------------------------------------------------------


class _Recurrent(torch.nn.Module):
    """A recurrent layer reading the batch, an fp32 tensor under autocast; an optional
    Linear before it hands it a low one instead."""

    def __init__(self, kind: str, linear_first: bool = False) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(6, 6) if linear_first else torch.nn.Identity()
        self.rnn = getattr(torch.nn, kind)(6, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.rnn(self.inp(x))[0]
        return out


def _rnn_loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return out.float().pow(2).mean()


def _rnn_case(kind: str, linear_first: bool = False) -> tuple[_Recurrent, torch.Tensor]:
    torch.manual_seed(0)
    return _Recurrent(kind, linear_first), torch.randn(4, 5, 6)


def _forward_low_dtypes(report: pd.Report, unit: str) -> dict[str, set[str]]:
    """Op -> the dtypes the real low run gave its outputs, for the unit's value-making
    forward ops."""
    ops = report.by_module()[unit].ops
    return {o.op: set(o.low_dtypes) for o in ops if o.phase is pd.options.Phase.FORWARD and o.low_dtypes}


def _by_hand_fp16(net: _Recurrent, x: torch.Tensor, kind: str) -> float:
    """The loss of the recurrent layer run as cuDNN runs it under CUDA autocast: input, hidden
    state and weights in fp16, the layer in fp16, its output fp16. No autocast here: the LSTM
    as fp32 oneDNN (what it runs on the CPU) on fp16-rounded input and weights with its
    output rounded, which is what an fp32-accumulating fp16 kernel computes; the GRU's
    decomposition on fp16 weights and input, each op emulated so."""
    rnn = copy.deepcopy(net.rnn)
    with torch.no_grad():
        if kind == "LSTM":
            for p in rnn.parameters():
                p.copy_(p.half().float())
            out = rnn(x.half().float())[0].half()
        else:
            with EmulateLowMode():
                out = rnn.half()(x.half())[0]
    return float(_rnn_loss(out, x))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_layers_run_low_under_cudas_policy(kind: str) -> None:
    """CUDA autocasts nn.LSTM/GRU/RNN whole (`_cudnn_rnn`'s autocast kernel casts input,
    hidden state and weights to fp16); before the CUDA policy modelled it, an LSTM reading an
    fp32 tensor ran fp32 (local error 0) and a GRU its gates in fp32."""
    net, x = _rnn_case(kind)
    report = pd.analyze(net, x, _rnn_loss, dtype="fp16")
    assert report.environment.policy is pd.options.AutocastPolicy.CUDA
    low = _forward_low_dtypes(report, "rnn")
    # The recurrent op: oneDNN's fused layer (uint8: its workspace), or the GRU's gates.
    recurrent = "mkldnn_rnn_layer.default" if kind == "LSTM" else "sigmoid_.default"
    assert "fp16" in low[recurrent]
    # Nothing computed in fp32 (uint8: oneDNN's workspace). `zeros` is the fp32 initial state
    # the module makes for an fp32 input, before the layer casts it.
    assert all(d <= {"fp16", "uint8"} for n, d in low.items() if n != "zeros.default"), low
    unit = report.by_module()["rnn"]
    assert unit.forward.local.rel_l2_error > 0 and unit.forward.propagated.rel_l2_error > 0
    assert report.losses.low == pytest.approx(_by_hand_fp16(net, x, kind), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cudas_policy_runs_every_recurrent_layer_low(dtype: torch.dtype) -> None:
    """LSTM, GRU, RNN (tanh and relu), on tensors and on packed sequences: every output and
    hidden state in the low dtype under CUDA's policy, with fp32 weights and an fp32 initial
    state given; the CPU's own policy leaves a GRU's fp32."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 4, 2])
    h0 = torch.zeros(1, 3, 6)
    layers: list[tuple[torch.nn.Module, Any]] = [
        (torch.nn.LSTM(4, 6), (h0, h0)), (torch.nn.GRU(4, 6), h0), (torch.nn.RNN(4, 6), h0),
        (torch.nn.RNN(4, 6, nonlinearity="relu"), h0),
    ]  # fmt: skip
    for layer, hx in layers:
        for inp in (x, packed):
            # fp16 emulated: oneDNN trains no fp16 LSTM on this CPU.
            with low_precision(layer, dtype, regime="autocast", policy="cuda"):
                out, state = layer(inp, hx)
            values = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
            states = state if isinstance(state, tuple) else (state,)
            assert {values.dtype, *(t.dtype for t in states)} == {dtype}, (layer, type(inp))
    with torch.autocast("cpu", dtype=dtype):
        assert torch.nn.GRU(4, 6)(x, h0)[0].dtype == torch.float32


def test_an_lstm_fed_a_low_tensor_runs_the_fp32_runs_ops() -> None:
    """Fed an fp16 Linear output, torch's CPU LSTM would decompose into matmuls and gates
    (no oneDNN LSTM trains in fp16), ops the fp32 run lacks: the layer would have no op to
    compare. The CUDA policy runs it as oneDNN's layer, as in fp32."""
    net, x = _rnn_case("LSTM", linear_first=True)
    report = pd.analyze(net, x, _rnn_loss, dtype="fp16")
    low = _forward_low_dtypes(report, "rnn")
    assert "fp16" in low["mkldnn_rnn_layer.default"] and "addmm.default" not in low
    assert report.by_module()["rnn"].forward.local.rel_l2_error > 0


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_layers_under_the_cpus_policy_are_the_real_cpu_runs(kind: str) -> None:
    """`--policy cpu` keeps torch.autocast("cpu")'s own behaviour: oneDNN's LSTM layer on its
    list (fp16), a GRU's matmuls fp16 and its hidden state fp32 (the fp32 zeros it starts
    from promote the update). Every op's dtypes are the real run's."""
    if kind == "LSTM" and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        # Without oneDNN fp16 kernels torch runs the real fp16 LSTM another way (no fused
        # oneDNN layer to compare with): what autocast runs here depends on the CPU.
        pytest.skip("this CPU's oneDNN has no fp16 kernels")
    net, x = _rnn_case(kind)
    report = pd.analyze(net, x, _rnn_loss, dtype="fp16", policy="cpu")
    real = Recorder()
    # Without grad: oneDNN trains an fp16 LSTM only on CPUs with fp16 arithmetic (this one
    # refuses); the dtypes autocast gives do not depend on grad mode.
    with torch.no_grad(), real, torch.autocast("cpu", dtype=torch.float16):
        out = net(x)
    expected: dict[str, set[str]] = {}
    for name, dtypes in real.log:
        expected.setdefault(name, set()).update(dtype_spelling(str(d).removeprefix("torch.")) for d in dtypes)
    floats = {"fp16", "bf16", "fp32"}  # oneDNN returns its workspace only when it trains
    low = {n: d & floats for n, d in _forward_low_dtypes(report, "rnn").items()}
    assert low and {n: expected.get(n, set()) & floats for n in low} == low
    if kind == "LSTM":
        assert out.dtype == torch.float16 and "fp16" in low["mkldnn_rnn_layer.default"]
    else:
        assert out.dtype == torch.float32 and low["sub.Tensor"] == {"fp32"}


def test_a_gru_then_an_lstm_in_emulated_fp16() -> None:
    """A GRU splits its gates in 3, an LSTM in 4, with the same input dtypes: the emulation's
    cached output dtypes (keyed without sizes) once cut the LSTM's split to 3 tensors, and
    torch read past the list (a segfault)."""

    class Both(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(6, 6)
            self.gru = torch.nn.GRU(6, 6, batch_first=True)
            self.lstm = torch.nn.LSTM(6, 8, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lstm(self.gru(self.inp(x))[0])[0]
            return out

    torch.manual_seed(0)
    net, x = Both(), torch.randn(4, 5, 6)
    # The CPU's policy: both fed fp16 tensors, both decomposed into `unsafe_split`s.
    splits = Recorder()
    with low_precision(net, torch.float16, regime="autocast", policy="cpu"), splits:
        out = net(x)
    assert {len(dtypes) for name, dtypes in splits.log if name == "unsafe_split.Tensor"} == {3, 4}
    with torch.no_grad():
        assert relative_loss_error(float(_rnn_loss(net(x), x)), float(_rnn_loss(out, x))) < 1e-2
    report = pd.analyze(net, x, _rnn_loss, dtype="fp16", policy="cpu")
    assert math.isfinite(report.losses.low) and report.losses.rel_error < 1e-2


# --- the plan's verification ------------------------------------------------------------------


def _hand_run(mod: Any, plan: Plan) -> float:
    """The relative final-loss error of `plan` run by hand: `apply_plan` inside real CPU bf16
    autocast, against the plain fp32 model."""
    model, batch = mod.build_model(), mod.make_batch()
    args = batch if isinstance(batch, tuple) else (batch,)
    ref = float(mod.loss_fn(model(*args), batch).detach())
    with apply_plan(model, plan), torch.autocast("cpu", dtype=torch.bfloat16):
        low = float(mod.loss_fn(model(*args), batch).detach())
    return relative_loss_error(ref, low)


@pytest.mark.parametrize("name", ["plan_rescue", "ffn_overflow"])
def test_verified_plan_error_is_that_of_the_real_run(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification executes exactly what `apply_plan` runs: with the report made in bf16
    under the CPU's own autocast lists (real kernels, nothing emulated, also on a CPU without
    fast bf16 kernels) the plan's verified error is the error of a hand-run apply_plan +
    torch.autocast("cpu", torch.bfloat16)."""
    monkeypatch.setenv(EMULATE_BF16_ENV, "0")
    mod = load(name)
    model, batch = mod.build_model(), mod.make_batch()
    report = pd.analyze(model, batch, mod.loss_fn, dtype="bf16", policy="cpu")
    assert report.environment.policy is pd.options.AutocastPolicy.CPU
    plan = plan_model(model, batch, mod.loss_fn, report)
    assert plan.verification_passes >= 1 and any(d == "bf16" for d in plan.units.values())
    by_hand = _hand_run(mod, plan)
    assert by_hand > 0
    assert math.isclose(plan.verified_loss_rel_error, by_hand, rel_tol=1e-6), (plan.verified_loss_rel_error, by_hand)
    # Another assignment, verified directly: still the hand-run's error.
    units = {u: ("fp32" if i % 2 else "bf16") for i, u in enumerate(plan.units)}
    mixed = plan.model_copy(update={"units": units})
    check = verify_plan(model, batch, mod.loss_fn, torch.bfloat16, mixed.low_units, policy="cpu")
    assert math.isclose(check.loss_rel_error, _hand_run(mod, mixed), rel_tol=1e-6)


@pytest.mark.parametrize(("name", "first"), [("ffn_overflow", "block.ff.wi"), ("attention_unscaled", "attn")])
def test_verification_names_the_first_module_gone_non_finite(name: str, first: str) -> None:
    mod = load(name)
    model, batch = mod.build_model(), mod.make_batch()
    everything = {n or "<root>": True for n, _ in model.named_modules()}
    check = verify_plan(model, batch, mod.loss_fn, torch.float16, everything)
    assert check.first_nonfinite_unit == first and check.loss_rel_error == math.inf
    # ... and the plan keeps it fp32 (a hard flag, or promoted by verification).
    plan = plan_model(model, batch, mod.loss_fn, pd.analyze(model, batch, mod.loss_fn))
    assert plan.units[first] == "fp32" and plan.verified_loss_rel_error <= plan.tolerance


class _Dropped(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.5)
        self.bn = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.drop(self.fc(x))))


def test_verification_draws_the_same_dropout_and_restores_the_model() -> None:
    torch.manual_seed(0)
    model = _Dropped().train()
    x = torch.randn(16, 8)
    loss_fn = lambda out, b: out.pow(2).mean()  # noqa: E731
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    # All units fp32: the plan's run is the fp32 model itself, dropout masks included.
    fp32 = {n or "<root>": False for n, _ in model.named_modules()}
    assert verify_plan(model, x, loss_fn, torch.float16, fp32).loss_rel_error == 0.0
    low = {n or "<root>": True for n, _ in model.named_modules()}
    check = verify_plan(model, x, loss_fn, torch.float16, low)
    assert 0 < check.loss_rel_error < 1e-2 and check.first_nonfinite_unit is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())


def test_a_low_module_inside_an_fp32_one_hands_back_fp32() -> None:
    """attention_unscaled with `attn` fp32 and its projections low: `attn` runs without
    autocast, so `softmax(scores) @ v` would pair fp32 with the low `v` (an error in a real
    run). The low projections hand their results back in fp32; the exported snippet does the
    same."""
    mod = load("attention_unscaled")
    model, batch = mod.build_model(), mod.make_batch()
    report = pd.analyze(model, batch, mod.loss_fn, dtype="bf16", policy="cpu")
    base = plan_model(model, batch, mod.loss_fn, report)
    units = {u: ("fp32" if u in ("attn", "<loss>") else "bf16") for u in base.units}
    plan = base.model_copy(update={"units": units})
    seen: list[torch.dtype] = []
    hook = model.attn.v.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with apply_plan(model, plan), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    hook.remove()
    assert seen == [torch.float32] and out.dtype == torch.bfloat16  # head is low
    ns: dict[str, Any] = {}
    exec(compile(render_python(plan), "<plan snippet>", "exec"), ns)  # our own export
    remove = ns["install_precision_plan"](model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        snippet_out = model(batch)
    remove()
    assert torch.equal(out, snippet_out)
    check = verify_plan(model, batch, mod.loss_fn, torch.bfloat16, plan.low_units, policy="cpu")
    assert math.isfinite(check.loss_rel_error)


# --- the pre-flight's regimes -----------------------------------------------------------------


def test_preflight_pure_fp16_is_no_go_where_autocast_is_go() -> None:
    """pure_only_overflow's residual stream passes 65504 only when it is held in fp16."""
    spec = load_model_file(SAMPLES / "pure_only_overflow.py")
    pure = pd.preflight(spec.model, spec.batch, spec.loss_fn, steps=3, regime="pure", name="pure_only_overflow")
    assert not pure
    assert pure.regime is pd.options.Regime.PURE
    low = pure.runs["low"]
    assert low.init_scale_log2 is None and low.nonfinite_steps == [0, 1, 2]  # no GradScaler
    assert low.description.startswith("model.to(fp16)")
    assert any("no loss scaler" in m for m in pure.messages)
    assert {"OVERFLOW", "NONFINITE_STEPS"} <= {r.risk for r in pure.reasons}
    assert any(r.risk == "OVERFLOW" and r.unit == "blocks.2" for r in pure.reasons)
    assert "torch.autocast" in pure.runs["planned"].description  # plans run under autocast

    autocast = pd.preflight(spec.model, spec.batch, spec.loss_fn, steps=3, regime="autocast", name="pure_only_overflow")
    assert autocast, [r.line() for r in autocast.reasons]
    assert autocast.runs["low"].init_scale_log2 == 16 and autocast.runs["low"].nonfinite_steps == []


def test_pure_preflight_trains_the_low_model_with_a_copied_optimizer() -> None:
    """A copied optimizer with state goes low with its model; bf16 pure has no scaler either."""
    case = build("mlp")
    opt = torch.optim.Adam(case.model.parameters(), lr=1e-3)
    assert case.loss_fn is not None
    case.loss_fn(case.model(case.batch), case.batch).backward()
    opt.step()
    result = pd.preflight(
        case.model, case.batch, case.loss_fn, dtype="bf16", regime="pure", optimizer=opt, steps=2, plan=False
    )
    assert result, [r.line() for r in result.reasons]
    assert result.policy is None and result.runs["low"].init_scale_log2 is None
    assert all(p.dtype == torch.float32 for p in case.model.parameters())  # the user's stay fp32
    assert all(t.dtype == torch.float32 for s in opt.state.values() for t in s.values() if t.is_floating_point())


def test_cli_preflight_takes_the_regime() -> None:
    runner = CliRunner()
    path = str(SAMPLES / "pure_only_overflow.py")
    pure = runner.invoke(app, ["preflight", path, "--regime", "pure", "--steps", "2", "--no-plan", "--quiet"])
    assert pure.exit_code == 1, pure.output
    assert "pure" in pure.output and "no loss scaler" in pure.output
    autocast = runner.invoke(
        app, ["preflight", path, "--regime", "autocast", "--policy", "cpu", "--steps", "2", "--no-plan", "--quiet"]
    )
    assert autocast.exit_code == 0, autocast.output
    assert "cpu op lists" in autocast.output


def test_a_gru_layers_backward_ops_are_its_own() -> None:
    """The CPU GRU cell writes a chunk of its gates in place (`mul_` on a view): autograd
    rebuilds that view's history with nodes no captured op made. Their backward ops belong to
    the GRU's unit (what they read); they made a `<backward>` unit of their own, which the
    plan listed, and the python export refused as an unknown module."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.GRU(8, 16, num_layers=2, batch_first=True))
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(1))
    report = pd.analyze(model, ids, lambda out, b: out[0].float().pow(2).mean())
    names = [u.name for u in report.units]
    assert "<backward>" not in names and "1" in names, names
    assert report.by_module()["1"].op_count > 0

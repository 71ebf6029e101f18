"""The capture on real models: attribution, parameter gradients, op counts and losses, each
checked against an independent run (a deep copy of the model, our own dispatch mode)."""

from __future__ import annotations

import collections
import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import precision_doctor as pd
from precision_doctor.options import CapturePath

from .fixtures import TRANSFORMERS, Case, ComplexGain, build

ALL = ("mlp", "cnn", "functional", *TRANSFORMERS)
SEED = 1234


class OpCounter(TorchDispatchMode):
    """A bare mode: counts every aten op, split by whether autograd is executing."""

    def __init__(self) -> None:
        super().__init__()
        self.forward: list[str] = []
        self.backward: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        in_backward = torch._C._current_graph_task_id() != -1
        (self.backward if in_backward else self.forward).append(str(func).removeprefix("aten."))
        return func(*args, **(kwargs or {}))


def call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def loss_of(case: Case, out: Any) -> torch.Tensor:
    return case.loss_fn(out, case.batch) if case.loss_fn is not None else out.loss


def plain_run(case: Case, *, count: bool = False) -> tuple[float, dict[str, torch.Tensor], OpCounter | None]:
    """fp32 forward + loss + backward of a deep copy, optionally under a bare counting mode."""
    model = copy.deepcopy(case.model)
    counter = OpCounter() if count else None
    torch.manual_seed(SEED)
    if counter is not None:
        with counter:
            loss = loss_of(case, call(model, case.batch))
        seed = torch.ones_like(loss)  # autograd's gradient seed: no op of the model or the loss
        with counter:
            loss.backward(seed)
    else:
        loss = loss_of(case, call(model, case.batch))
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
    return float(loss.detach()), grads, counter


_reports: dict[str, tuple[Case, pd.Report]] = {}


def analyzed(name: str) -> tuple[Case, pd.Report]:
    """One analysis per model for the whole module (the model itself is left untouched)."""
    if name not in _reports:
        case = build(name)
        torch.manual_seed(SEED)
        report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp16")
        _reports[name] = (case, report)
    return _reports[name]


@pytest.mark.parametrize("name", ALL)
def test_analysis_runs(name: str) -> None:
    _, report = analyzed(name)
    assert report.units
    assert report.op_count_forward > 0 and report.op_count_backward > 0
    assert report.environment.dtype == pd.LowDtype.FP16
    assert report.loss_scale  # gradients were summarized


def test_functional_ops_attributed_to_the_module_that_ran_them() -> None:
    _, report = analyzed("functional")
    units = report.by_module()
    root_fwd = {o.op for o in units["<root>"].ops if o.phase == "forward"}
    # torch.softmax, torch.exp, @ and .sum in Functional.forward itself
    assert {"_softmax.default", "exp.default", "mm.default", "sum.dim_IntList"} <= root_fwd
    # ... and not in the submodules that ran before and after them
    for sub in ("proj", "inner"):
        sub_ops = {o.op for o in units[sub].ops if o.phase == "forward"}
        assert not sub_ops & {"_softmax.default", "exp.default", "sum.dim_IntList"}
        assert "addmm.default" in sub_ops
    # the loss_fn's ops belong to <loss>
    loss_ops = {o.op for o in units["<loss>"].ops if o.phase == "forward"}
    assert {"pow.Tensor_Scalar", "mean.default"} <= loss_ops
    # backward of the functional ops lands on the same unit
    root_bwd = {o.op for o in units["<root>"].ops if o.phase == "backward"}
    assert "_softmax_backward_data.default" in root_bwd


def test_gpt2_attention_ops_attributed_to_attention_module() -> None:
    _, report = analyzed("gpt2")
    units = report.by_module()
    attn = {o.op for o in units["transformer.h.0.attn"].ops}
    assert {"_softmax.default", "bmm.default", "_softmax_backward_data.default"} <= attn
    # the qkv projection (a Conv1D child) keeps its own addmm
    assert "addmm.default" in {o.op for o in units["transformer.h.0.attn.c_attn"].ops}
    assert "_softmax.default" not in {o.op for o in units["transformer.h.0.mlp.c_fc"].ops}


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gradient_is_summarized(name: str) -> None:
    case, report = analyzed(name)
    _, grads, _ = plain_run(case)
    assert grads
    param_grads: dict[str, Any] = {}
    for unit in report.units:
        param_grads.update(unit.backward.param_grads)
    assert set(param_grads) == set(grads)
    for pname, g in grads.items():
        stats = param_grads[pname]
        assert stats.numel == g.numel()
        assert stats.max_abs == pytest.approx(float(g.abs().max()), rel=1e-5)
        assert stats.zero_count == int((g == 0).sum())
        owner = pname.rpartition(".")[0] or "<root>"
        assert pname in report.by_module()[owner].backward.param_grads


@pytest.mark.parametrize("name", ALL)
def test_fp32_loss_equals_plain_run(name: str) -> None:
    case, report = analyzed(name)
    loss, _, _ = plain_run(case)
    assert report.losses.fp32 == pytest.approx(loss, rel=1e-6, abs=0)
    assert report.losses.low != report.losses.fp32  # fp16 rounding changed something


@pytest.mark.parametrize("name", ALL)
def test_op_count_equals_independent_count(name: str) -> None:
    case, report = analyzed(name)
    _, _, counter = plain_run(case, count=True)
    assert counter is not None
    assert report.op_count_forward + report.op_count_backward == len(counter.forward) + len(counter.backward)


_TOOL_OPS = {"view.default", "detach.default", "_local_scalar_dense.default", "_to_copy.default"}


@pytest.mark.parametrize("name", ALL)
def test_op_count_differs_only_by_loss_bookkeeping(name: str) -> None:
    """Every op the model, loss_fn and backward ran is counted, once, in the right phase;
    nothing else is counted (the loss readout runs outside the capture)."""
    case, report = analyzed(name)
    _, _, counter = plain_run(case, count=True)
    assert counter is not None
    n_fwd, n_bwd = len(counter.forward), len(counter.backward)
    assert report.op_count_forward >= n_fwd
    assert report.op_count_backward >= n_bwd
    ops: collections.Counter[str] = collections.Counter()
    for unit in report.units:
        for o in unit.ops:
            ops[f"{o.op}/{o.phase}"] += o.calls
    expected = collections.Counter(
        [f"{o}/forward" for o in counter.forward] + [f"{o}/backward" for o in counter.backward]
    )
    assert not expected - ops  # nothing missing
    extra = ops - expected
    assert sum(extra.values()) <= 6
    assert {k.partition("/")[0] for k in extra} <= _TOOL_OPS
    by_op_calls = sum(o.calls for o in report.by_op().values())
    assert by_op_calls == report.op_count_forward + report.op_count_backward


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2", "t5"])
def test_flops_equal_torch_flop_counter(name: str) -> None:
    """FLOPs per phase against torch's own FlopCounterMode over a plain run (the capture
    calls the same formulas, but with shapes it maps itself)."""
    case, report = analyzed(name)
    model = copy.deepcopy(case.model)
    torch.manual_seed(SEED)
    with FlopCounterMode(display=False) as forward_counter:
        loss = loss_of(case, call(model, case.batch))
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    expected = (forward_counter.get_total_flops(), backward_counter.get_total_flops())
    got = (sum(u.flops_forward for u in report.units), sum(u.flops_backward for u in report.units))
    assert expected[0] > 0 and expected[1] > 0
    assert got == expected


@pytest.mark.parametrize("name", ["mlp", "cnn", "functional"])
def test_fx_traceability_is_reported_beside_the_driver_that_ran(name: str) -> None:
    """symbolic_trace's verdict is its own field; the capture path names the driver (auto: the
    dispatch one for one analysis)."""
    _, report = analyzed(name)
    assert report.environment.capture_path == CapturePath.DISPATCH
    if name == "mlp":
        assert report.environment.fx_traceable
    assert report.environment.fx_error is None or not report.environment.fx_traceable


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_capture_path_dispatch_for_transformers(name: str) -> None:
    _, report = analyzed(name)
    env = report.environment
    assert env.capture_path == CapturePath.DISPATCH
    assert env.fx_traceable is False
    assert env.fx_error


# --- fp16 emulation, by hand -----------------------------------------------------------------


def _r(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float16).float()


def test_mlp_fp16_loss_matches_hand_emulation() -> None:
    """Every op of the model runs on fp16-rounded inputs in fp32 and its output is rounded to
    fp16; the loss function runs in fp32 on that output, as autocast runs it."""
    case, report = analyzed("mlp")
    m = case.model
    x = case.batch
    with torch.no_grad():
        h = _r(torch.addmm(_r(m.fc1.bias), _r(x), _r(m.fc1.weight).t()))
        h = _r(torch.relu(h))
        y = _r(torch.addmm(_r(m.fc2.bias), h, _r(m.fc2.weight).t()))
        loss = y.pow(2).mean()
        fp32 = m(x).pow(2).mean()
    assert float(loss) != float(fp32)
    assert report.losses.low == pytest.approx(float(loss), rel=1e-6)
    assert report.losses.rel_error == pytest.approx(abs(float(loss) - float(fp32)) / abs(float(fp32)), rel=1e-5)


def test_mlp_bf16_loss_matches_hand_emulation() -> None:
    case = build("mlp")
    m = case.model
    report = pd.analyze(m, case.batch, case.loss_fn, dtype="bf16")

    def r(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.bfloat16).float()

    with torch.no_grad():
        h = r(torch.relu(r(torch.addmm(r(m.fc1.bias), r(case.batch), r(m.fc1.weight).t()))))
        y = r(torch.addmm(r(m.fc2.bias), h, r(m.fc2.weight).t()))
        loss = y.pow(2).mean()  # the loss function in fp32
    assert report.environment.dtype == pd.LowDtype.BF16
    assert report.losses.low == pytest.approx(float(loss), rel=1e-6)


def test_mlp_local_error_of_first_layer_matches_hand_computation() -> None:
    """fc1's local error: its fp16 output (inputs rounded) against the fp32 output."""
    case, report = analyzed("mlp")
    m = case.model
    with torch.no_grad():
        ref = m.fc1(case.batch)
        low = _r(torch.addmm(_r(m.fc1.bias), _r(case.batch), _r(m.fc1.weight).t()))
        expected = float(torch.linalg.vector_norm((low - ref).double()) / torch.linalg.vector_norm(ref.double()))
    local = report.by_module()["fc1"].forward.local
    assert local is not None
    assert local.rel_l2_error == pytest.approx(expected, rel=1e-4)


class Cancel(torch.nn.Module):
    """Hands on x, by way of an intermediate 3000x larger: in fp16 the intermediate's
    rounding (step 2 near 3000) wipes x out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 3000.0) - 3000.0


class CancelIntoBuffer(torch.nn.Module):
    """The same values written into half of a zeroed buffer, which is what it hands on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[:8] = (x[:8] + 3000.0) - 3000.0
        return out


def _cancel_error(x: torch.Tensor, rows: int) -> float:
    """numpy fp16 casts: the rows that go through (x + 3000) - 3000, zeros below."""
    f16, f32 = np.float16, np.float32
    xn = x.numpy()[:rows]
    low = np.zeros(x.shape)
    ref = np.zeros(x.shape)
    low[:rows] = ((xn.astype(f16).astype(f32) + f32(3000)).astype(f16).astype(f32) - f32(3000)).astype(f16)
    ref[:rows] = (xn + f32(3000)) - f32(3000)
    return float(np.linalg.norm(low - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize(("module", "rows"), [(Cancel, 16), (CancelIntoBuffer, 8)], ids=["direct", "into-buffer"])
def test_unit_error_is_its_outputs_error_not_its_internals(module: type[torch.nn.Module], rows: int) -> None:
    """A unit's local error is that of the values it hands on, checked against numpy fp16
    casts: pooled with the large intermediate it was 2e-4, and the next unit took the blame
    (ERROR_GROWTH from an input error understated ~2000x)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(module(), torch.nn.Linear(8, 1))
    x = torch.randn(16, 8)
    # Pure fp16: every op of the numpy reference runs in fp16 (under autocast the batch and
    # the adds stay fp32, and there is no error to hand on).
    report = pd.analyze(net, x, loss_fn=lambda out, b: out.pow(2).mean(), regime="pure")
    expected = _cancel_error(x, rows)
    cancel = report.by_module()["0"]
    assert cancel.forward.local is not None and cancel.forward.propagated is not None
    assert cancel.forward.local.rel_l2_error == pytest.approx(expected, rel=1e-5)
    assert cancel.forward.propagated.rel_l2_error == pytest.approx(expected, rel=1e-5)  # the first unit
    assert expected > 0.3
    assert pd.Flag.DIVERGENCE in {f.flag for f in cancel.flags}
    assert pd.Flag.ERROR_GROWTH not in {f.flag for f in report.by_module()["1"].flags}


class CatOfTwo(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = Cancel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], -1)


def test_concatenation_passes_on_the_error_of_every_part() -> None:
    """The Linear after a cat reads b's large error too, not only a's (the first part)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(CatOfTwo(), torch.nn.Linear(16, 1))
    report = pd.analyze(net, torch.randn(16, 8), loss_fn=lambda out, b: out.pow(2).mean(), regime="pure")
    units = report.by_module()
    assert pd.Flag.DIVERGENCE in {f.flag for f in units["0.b"].flags}
    assert pd.Flag.ERROR_GROWTH not in {f.flag for f in units["1"].flags}


def test_unit_error_counts_only_the_outputs_read() -> None:
    """LayerNorm's op also returns its mean and 1/std (saved for backward, read by nobody
    else): the unit's error is its normalized output's, checked against a hand emulation."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    y = 5 + 0.01 * torch.randn(16, 8)  # fp16 rounding of 5.00x moves the statistics
    report = pd.analyze(net, y, loss_fn=lambda out, b: out.pow(2).mean(), regime="pure")
    ln = net[0]
    with torch.no_grad():
        ref = ln(y)
        low = _r(torch.nn.functional.layer_norm(_r(y), (8,), _r(ln.weight), _r(ln.bias)))
        expected = float(torch.linalg.vector_norm((low - ref).double()) / torch.linalg.vector_norm(ref.double()))
    local = report.by_module()["0"].forward.local
    assert local is not None and local.rel_l2_error == pytest.approx(expected, rel=1e-5)


class MaskedAttention(torch.nn.Module):
    """Causal attention scores masked the two ways transformers does: an additive
    `finfo(float32).min` constant, or `where(mask, scores, -inf)` from a filled tensor."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.q = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ x.transpose(-2, -1)
        causal = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).tril()
        if self.how == "finfo-min":
            scores = scores + torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
        else:
            scores = torch.where(causal, scores, torch.full(causal.shape, float("-inf")))
        return torch.softmax(scores, -1) @ x


@pytest.mark.parametrize("how", ["finfo-min", "inf-fill"])
def test_attention_masks_are_no_finding(how: str) -> None:
    """A mask's -inf and finfo.min constants (-inf in fp16, which masks as well) are not
    OVERFLOW, not NONFINITE_FP32 and no error; and the unit reading them is not taken as fed
    overflowed values, so its gradients are still judged (GRAD_OVERFLOW with the loss scaled
    up; before, the mask hid it)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(MaskedAttention(how), torch.nn.Linear(8, 1))
    x = torch.randn(2, 6, 8)
    report = pd.analyze(net, x, loss_fn=lambda out, b: out.pow(2).mean())
    attn = report.by_module()["0"]
    assert not [f for f in report.flags() if f.flag not in (pd.Flag.GRAD_OVERFLOW,)], report.flags()
    assert attn.forward.local is not None and attn.forward.local.rel_l2_error < 1e-2
    assert not attn.backward.reads_overflow
    scaled = pd.analyze(net, x, loss_fn=lambda out, b: out.pow(2).mean() * 3e4)
    assert pd.Flag.GRAD_OVERFLOW in {f.flag for f in scaled.by_module()["0"].flags}


def test_t5_is_not_flagged_for_its_masks_and_position_buckets() -> None:
    """Stock T5: `log(0)` on the way to the relative-position buckets (dropped by a `where`)
    and the decoder's finfo.min causal mask were NONFINITE_FP32 and OVERFLOW findings."""
    case = build("t5")
    report = pd.analyze(case.model, case.batch, case.loss_fn)
    assert not {f.flag for f in report.flags()} & {pd.Flag.NONFINITE_FP32, pd.Flag.OVERFLOW}, report.flags()


class InPlaceViews(torch.nn.Module):
    """In-place view ops on activations, and the module that made them common: `nn.GRU`
    with batch_first=True calls `transpose_`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.gru = torch.nn.GRU(6, 5, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)  # (4, 3, 6)
        h.transpose_(0, 1).transpose_(0, 1)
        h.unsqueeze_(0).squeeze_(0)
        return self.gru(h)[0]


def test_in_place_view_ops_move_their_shadows_too() -> None:
    torch.manual_seed(0)
    net = InPlaceViews()
    x = torch.randn(4, 3, 6)
    report = pd.analyze(net, x, loss_fn=lambda out, b: out.pow(2).mean())
    with torch.no_grad():
        ref = float(net(x).pow(2).mean())
    assert report.losses.fp32 == pytest.approx(ref, rel=1e-6)
    assert report.losses.rel_error < 1e-2  # the low run followed the reshaped shadows
    assert {"lin", "gru"} <= set(report.by_module())


def test_out_keyword_in_the_loss_leaves_the_fp32_loss_alone() -> None:
    """A shadow of an `out=` op writes into its own tensor, not into the fp32 one."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)

    def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        weights = torch.empty_like(out)  # per-element weights computed into a buffer
        torch.mul(out.detach(), 1000.0, out=weights)
        torch.add(weights, 0.123456, out=weights)
        return (weights * out).mean() * 1e-3

    report = pd.analyze(net, x, loss_fn=loss_fn)
    with torch.no_grad():
        ref = float(loss_fn(net(x), x))
    assert report.losses.fp32 == ref


class LossInForward(torch.nn.Module):
    """Returns its own loss, a sum of two terms (a VAE's recon + KL, auxiliary losses)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h.pow(2).mean() * 1e-3 + h.abs().mean() * 1e-3


def test_loss_terms_in_forward_are_not_judged_as_gradients() -> None:
    """d loss / d term = 1 reaches each term: 1.0 x 2^16 overflows fp16, but that is the
    (fp32, scaled) loss itself, as when the same sum is written in loss_fn."""
    torch.manual_seed(0)
    report = pd.analyze(LossInForward(), torch.randn(32, 8))
    assert not report.flags(), report.flags()
    # Under CUDA's lists `h.abs().mean() * 1e-3` stays fp16 (mean is on no fp32 list): its
    # gradient, d loss / d term = 1 times the scale, is an fp16 value, so the scale is 2^15
    # at most, as for an fp16 loss (before, 2^26 made every low gradient Inf).
    assert report.losses.low_term_grad_max_abs == 1.0
    assert pd.recommend_loss_scale(report).recommended_scale_log2 <= 15
    root = report.by_module()["<root>"].backward.stats
    assert root is not None and root.max_abs < 1.0  # the elementwise gradients, not the 1.0s


def test_sparse_and_complex_parameter_gradients() -> None:
    """A sparse embedding gradient is summarized over the rows it holds; a complex one gets
    no summary; neither ends the analysis (both did, with raw torch errors)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, sparse=True)
    ids = torch.tensor([[1, 2, 2], [7, 1, 9]])
    report = pd.analyze(emb, ids, loss_fn=lambda o, b: o.pow(2).mean())
    stats = report.by_module()["<root>"].backward.param_grads["weight"]
    assert stats.numel == 4 * 8  # rows 1, 2, 7, 9 (coalesced)
    report = pd.analyze(ComplexGain(), torch.randn(4, 8), loss_fn=lambda o, b: o.pow(2).mean())
    grads = report.by_module()["<root>"].backward.param_grads
    assert "gain" not in grads and "lin.weight" in report.by_module()["lin"].backward.param_grads


def test_lazy_module_not_yet_run_is_a_user_error() -> None:
    with pytest.raises(pd.PrecisionDoctorError, match="not initialized yet"):
        pd.analyze(torch.nn.Sequential(torch.nn.LazyLinear(4)), torch.randn(2, 3), loss_fn=lambda o, b: o.sum())


class ScalarNorm(torch.nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return (y * y).sum().sqrt()  # 0-dim; d sqrt / d x at 0 is Inf


class ScaledByNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.norm = ScalarNorm()
        self.head = torch.nn.Linear(8, 1)
        torch.nn.init.zeros_(self.lin.weight)
        torch.nn.init.zeros_(self.lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x * (1 + self.norm(self.lin(x)))).mean()


def test_inf_made_by_a_scalar_node_is_blamed_on_it() -> None:
    """0-dim gradients are not summarized, but their finiteness still decides which node made
    an Inf: the sqrt at 0, not the node past it."""
    report = pd.analyze(ScaledByNorm(), torch.randn(4, 8))
    roots = [(f.unit, f.evidence.op) for f in report.flags() if f.flag is pd.Flag.NONFINITE_FP32]
    assert roots == [("norm", "SqrtBackward0")]


def _saved_activation_bytes(case: Case) -> int:
    """Independent count: storages autograd saves in a plain run (pack hook), less the
    parameters', buffers' and batch's memory."""
    model = copy.deepcopy(case.model)
    external = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    external |= {
        t.untyped_storage().data_ptr()
        for t in torch.utils._pytree.tree_leaves(case.batch)
        if isinstance(t, torch.Tensor)
    }
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr not in external:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(SEED)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(case, call(model, case.batch))
    del loss
    return sum(saved.values())


@pytest.mark.parametrize("name", ["mlp", "cnn", "functional", "gpt2"])
def test_activation_bytes_are_what_autograd_saves(name: str) -> None:
    case, report = analyzed(name)
    assert sum(u.activation_bytes for u in report.units) == _saved_activation_bytes(case)


def test_activation_bytes_go_to_the_producing_unit() -> None:
    _, report = analyzed("mlp")  # Linear(8,16) -> ReLU -> Linear(16,4) on 6 rows, loss out^2
    units = report.by_module()
    assert units["fc1"].activation_bytes == 0  # relu saves its own output, not its input
    assert units["act"].activation_bytes == 6 * 16 * 4  # saved by relu and by fc2's addmm: once
    assert units["fc2"].activation_bytes == 6 * 4 * 4  # saved by the loss's pow


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _CustomFunctionNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Square.apply(self.fc(x)).sum()


def test_activation_bytes_of_custom_autograd_functions() -> None:
    report = pd.analyze(_CustomFunctionNet(), torch.randn(3, 4))
    assert report.by_module()["fc"].activation_bytes == 3 * 5 * 4  # ctx.save_for_backward(fc's output)


class _SqrtAtZero(torch.nn.Module):
    """Finite forward; the backward of sqrt at 0 is Inf: made in fp32 by the root unit's
    sqrt, inherited by `act` (whose ReLU backward receives it)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(3, 4)
        self.act = torch.nn.ReLU()
        self.scale = torch.nn.Parameter(torch.zeros(4))  # sqrt of a parameter at 0 too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.pre(x) - 100.0)  # all zeros
        return (torch.sqrt(h) + torch.sqrt(self.scale)).sum()


def test_nonfinite_gradient_is_blamed_on_the_node_that_made_it() -> None:
    model = _SqrtAtZero()
    report = pd.analyze(model, torch.randn(5, 3))
    flagged = {f.unit: f for u in report.units for f in u.flags if f.flag == "NONFINITE_FP32"}
    assert set(flagged) == {"<root>"}, flagged  # the sqrt ops ran in the root unit
    assert flagged["<root>"].evidence.op == "SqrtBackward0"
    assert flagged["<root>"].evidence.phase == "backward"
    inherited = report.by_module()["act"].backward.stats
    assert inherited is not None and inherited.inf_count > 0  # seen, but not act's doing
    assert report.by_module()["<root>"].backward.param_grads["scale"].inf_count == 4


class _SqrtOfParameter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 1)
        self.gain = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).sum() + torch.sqrt(self.gain).sum()


def test_nonfinite_parameter_gradient_is_blamed_through_accumulate_grad() -> None:
    report = pd.analyze(_SqrtOfParameter(), torch.randn(4, 3))
    flags = [f for u in report.units for f in u.flags if f.flag == "NONFINITE_FP32"]
    assert [(f.unit, f.evidence.op) for f in flags] == [("<root>", "SqrtBackward0")]


class _Lookup(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(50, 6)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids)).pow(2).mean()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_embedding_shadow_is_the_rounded_rows(dtype: str) -> None:
    model, ids = _Lookup(), torch.tensor([[3, 7, 7, 41], [0, 49, 12, 3]])
    report = pd.analyze(model, ids, dtype=dtype, regime="pure")  # the table itself low
    rows = model.table.weight.detach()[ids].numpy().astype(np.float64)
    low = np.float16 if dtype == "fp16" else None
    rounded = (
        rows.astype(np.float32).astype(low).astype(np.float64)
        if low is not None
        else torch.from_numpy(rows).float().bfloat16().double().numpy()
    )
    expected = float(np.linalg.norm(rounded - rows) / np.linalg.norm(rows))
    unit = report.by_module()["table"]
    assert unit.forward.local is not None and unit.forward.propagated is not None
    assert unit.forward.local.rel_l2_error == pytest.approx(expected, rel=1e-5)
    assert unit.forward.propagated.rel_l2_error == pytest.approx(expected, rel=1e-5)


def test_lookup_moves_its_rows_not_the_table() -> None:
    model, ids = _Lookup(), torch.tensor([[3, 7, 7, 41], [0, 49, 12, 3]])
    report = pd.analyze(model, ids)
    (lookup,) = [c for c in report.by_module()["table"].op_costs if c.op.startswith("embedding.")]
    rows_bytes = ids.numel() * 6 * 4
    assert lookup.bytes == 2 * rows_bytes + ids.numel() * 8  # not the 50x6 table


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2"])
def test_pooled_buffers_change_no_result(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large upcasts and large shadow results go through reused buffers (the results via
    the op's `out=` overload). Pooling every tensor must give the same losses and errors
    as pooling none."""
    import precision_doctor.capture.local_shadow as capture

    def run() -> pd.Report:
        case = build(name)
        torch.manual_seed(SEED)
        return pd.analyze(case.model, case.batch, case.loss_fn)

    monkeypatch.setattr(capture, "POOLED_ELEMENTS", 1 << 62)
    plain = run()
    monkeypatch.setattr(capture, "POOLED_ELEMENTS", 1)
    calls: list[str] = []
    real = capture.out_overload

    def spy(func: Any) -> Any:
        calls.append(str(func))
        return real(func)

    monkeypatch.setattr(capture, "out_overload", spy)
    pooled = run()
    assert calls  # results did go through out= overloads
    assert pooled.losses == plain.losses
    for a, b in zip(plain.units, pooled.units, strict=True):
        assert a.name == b.name
        assert a.forward.local == b.forward.local, a.name
        assert a.forward.propagated == b.forward.propagated, a.name


def test_gradient_passed_on_unchanged_is_summarized_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An add hands its output's gradient to both inputs as the same tensor: one summary,
    merged wherever that gradient reaches, with the same unit statistics as summarizing
    every time."""
    import precision_doctor.capture.shadow as capture

    counted: list[int] = []
    real, real_add = capture.summarize, capture.SummaryBatch.add

    def counting(t: torch.Tensor, **kw: Any) -> Any:
        if kw.get("with_sumsq"):
            counted.append(t.numel())
        return real(t, **kw)

    def counting_add(batch: Any, t: torch.Tensor) -> Any:
        if batch.with_sumsq:  # gradients go through the batch (large ones summarized at once)
            counted.append(t.numel())
        return real_add(batch, t)

    def run() -> pd.Report:
        case = build("gpt2")  # residual adds, NewGELU's adds (fp16 only in the pure regime)
        torch.manual_seed(SEED)
        return pd.analyze(case.model, case.batch, case.loss_fn, regime="pure")

    monkeypatch.setattr(capture, "summarize", counting)
    monkeypatch.setattr(capture.SummaryBatch, "add", counting_add)
    cached = run()
    n_cached = len(counted)
    counted.clear()
    monkeypatch.setattr(capture.ShadowCapture, "_grad_summary", lambda self, g: counting(g, with_sumsq=True))
    every = run()
    assert n_cached < len(counted)
    for a, b in zip(cached.units, every.units, strict=True):
        assert a.backward.stats == b.backward.stats, a.name


def test_cached_gradient_summary_follows_in_place_changes() -> None:
    import precision_doctor.capture.shadow as capture

    model = torch.nn.Linear(2, 2)
    with capture.capture_pass(model, torch.float16, capture.LowUnits({"": True})) as mode:
        pass
    g = torch.tensor([1.0, 2.0, 0.0, 3.0])
    first = mode._grad_summary(g)
    assert mode._grad_summary(g) is first
    assert mode._grad_summary(g.view(2, 2)) is not first  # another layout: its own summary
    mode.settle()  # small gradients wait in a batch until then
    g.mul_(1e6)  # bumps the version counter
    changed = mode._grad_summary(g)
    mode.settle()
    assert first.max_abs == 3.0
    assert changed is not first and changed.max_abs == 3e6


class _ScaleGradInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.mul_(1e3)  # writes the gradient it was handed


class _GradWriter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_ScaleGradInPlace.apply(self.lin(x)) * 2.0).sum()


def test_in_place_write_waits_for_the_gradient_batch() -> None:
    """Small gradients wait in a batch; a backward op writing one in place first has the
    batch computed, so the gradient is summarized as it arrived (2.0), not as rewritten."""
    model, x = _GradWriter(), torch.randn(3, 4)
    report = pd.analyze(model, x)
    root = report.by_module()["<root>"].backward.stats
    assert root is not None and root.max_abs == 2.0
    lin = report.by_module()["lin"].backward.stats
    assert lin is not None and lin.max_abs >= 2000.0  # downstream of the rewrite


@pytest.mark.parametrize("threshold, trims", [(0, 1), (1 << 62, 0)], ids=["large-forward", "small-forward"])
def test_heap_returned_before_backward_only_after_a_large_forward(
    threshold: int, trims: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import precision_doctor.capture.memory as memory
    import precision_doctor.capture.shadow as capture

    calls: list[int] = []
    monkeypatch.setattr(memory, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(capture, "TRIM_AFTER_BYTES", threshold)
    case = build("mlp")
    pd.analyze(case.model, case.batch, case.loss_fn)
    assert calls == [0] * trims


def test_weak_id_map_follows_tensor_lifetimes() -> None:
    """Entries by identity (equal values are different keys), gone when the tensor dies, and
    a later tensor that reuses a dead one's id is not taken for it."""
    import gc

    from precision_doctor.capture.memory import WeakIdMap

    store = WeakIdMap()
    a, b = torch.ones(3), torch.ones(3)
    store[a] = "a"
    assert a in store and b not in store
    assert store.get(a) == "a" and store.get(b, "none") == "none"
    store[b] = "b"
    old_id = id(b)
    del b
    gc.collect()
    assert len(store._data) == 1  # b's entry dropped with b
    reborn = [torch.zeros(3) for _ in range(50)]  # likely to reuse freed ids
    assert all(store.get(t) is None for t in reborn if id(t) == old_id) and all(t not in store for t in reborn)
    assert store.pop(a) == "a" and a not in store and store.pop(a, 7) == 7


def test_analysis_does_not_import_dynamo() -> None:
    """torch wraps a dispatch mode's handler in `torch._dynamo.disable` by default, and the
    wrapper's first call imports torch._dynamo (most of a CLI run's first analysis). Without
    dynamo imported nothing is compiled, so the capture opts out: checked in a fresh
    interpreter, as this one has imported dynamo through other modes."""
    import subprocess
    import sys

    code = (
        "import sys, torch, precision_doctor as pd\n"
        "pd.analyze(torch.nn.Linear(3, 2), torch.ones(4, 3), loss_fn=lambda out, b: out.sum())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False", res.stderr


def test_compiled_submodule_is_analyzed_without_tracing_the_capture() -> None:
    """With torch._dynamo imported, the handler is wrapped as torch would wrap it: a model
    with a torch.compile'd part is analyzed, and no graph dynamo captures holds the capture's
    own statistics ops (without the wrap it compiles the summaries: bitwise ops, bincount)."""
    graphs: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm.code)
        return gm.forward

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.compile(torch.nn.Linear(4, 4), backend=recording_backend)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    torch.manual_seed(0)
    net = Net()
    with pytest.warns(UserWarning, match="global hooks"):  # torch's note on the unit tracker's hooks
        report = pd.analyze(net, torch.randn(2, 4), loss_fn=lambda out, b: out.sum())
    assert {"a", "b._orig_mod"} <= set(report.by_module())
    assert report.by_module()["b._orig_mod"].forward.stats.numel == 8
    assert not any(op in code for code in graphs for op in ("bitwise", "bincount"))


class ComplexRotary(torch.nn.Module):
    """Meta-style rotary embedding: `torch.view_as_complex(q.float()...)`, which has no bf16
    kernel; the real run's `.float()` is a no-op on the fp32 reference."""

    def __init__(self, d: int = 16, seq: int = 8) -> None:
        super().__init__()
        self.q = torch.nn.Linear(d, d)
        freqs = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        angles = torch.outer(torch.arange(seq).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones(seq, d // 2), angles), persistent=False)
        self.out = torch.nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        qc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        return self.out(torch.view_as_real(qc * self.freqs_cis).flatten(-2).type_as(x))


@pytest.mark.parametrize("regime", ["autocast", "pure"])
def test_complex_rotary_embedding_in_bf16(regime: str) -> None:
    """It used to end in an internal error (exit 3); the final-loss error now agrees with a
    real bf16 run of the same regime."""
    import copy

    torch.manual_seed(0)
    model, x = ComplexRotary(), torch.randn(2, 8, 16)

    def loss_fn(out: torch.Tensor, b: Any) -> torch.Tensor:
        return out.pow(2).mean()

    report = pd.analyze(model, x, loss_fn, dtype="bf16", regime=regime, policy="cpu")
    with torch.no_grad():
        ref = float(loss_fn(model(x), x))
        if regime == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = float(loss_fn(model(x), x))
        else:
            low = float(loss_fn(copy.deepcopy(model).bfloat16()(x.bfloat16()), x))
    real_error = abs(low - ref) / abs(ref)
    assert real_error > 1e-4  # bf16 does cost something here
    assert real_error / 4 <= report.losses.rel_error <= real_error * 4


class _AddThousand(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + 1000.0


class _TakeThousand(torch.nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(1000.0) if self.inplace else x - 1000.0


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_module_writing_its_input_in_place_gets_its_own_error(inplace: bool) -> None:
    """A module that returns its input written in place hands on other values than its
    producer did: its propagated error is that of what it returns, as out of place, and the
    next unit is not blamed for the growth."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(_AddThousand(), _TakeThousand(inplace), torch.nn.Linear(8, 8))
    report = pd.analyze(net, torch.randn(4, 8), lambda o, b: o.pow(2).mean())
    torch.manual_seed(0)
    plain = pd.analyze(
        torch.nn.Sequential(_AddThousand(), _TakeThousand(False), torch.nn.Linear(8, 8)),
        torch.randn(4, 8),
        lambda o, b: o.pow(2).mean(),
    )
    for name in ("1", "2"):
        got, want = report.by_module()[name].forward.propagated, plain.by_module()[name].forward.propagated
        assert got is not None and want is not None
        assert got.rel_l2_error == pytest.approx(want.rel_l2_error, rel=1e-6), name
    assert report.by_module()["1"].forward.propagated.rel_l2_error > 0.1  # the cancellation's
    assert not any(f.flag is pd.Flag.ERROR_GROWTH for f in report.by_module()["2"].flags)

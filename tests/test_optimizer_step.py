"""The optimizer step with low-precision weights (`analysis.optimizer_step`), against real
execution: a model really in bf16 / fp16 (`.to(dtype)`), one real optimizer step, the weights
and state that did not change counted, and the analysis' prediction compared with that."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import precision_doctor as pd
from precision_doctor.analysis.optimizer_step import half_spacing, optimizer_step
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.model.spec import ModelSpec, load_model_file
from precision_doctor.options import LowDtype

Factory = Callable[[torch.nn.Module], torch.optim.Optimizer]


def _spread_model() -> torch.nn.Module:
    """Weights whose magnitudes spread over three decades: at any lr some updates survive
    the low dtype and some do not."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p).sign() * 10 ** torch.empty_like(p).uniform_(-3, 0))
    return net


def _loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def _small_loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Gradients ~1e-4: Adam's g^2 / 1000 is below fp16's smallest subnormal."""
    return out.float().pow(2).mean() * 1e-2


def _measured(
    net: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, build: Factory, loss: Callable[..., torch.Tensor]
) -> dict[str, dict[str, float]]:
    """One real step of `net.to(dtype)`: per parameter, the fraction of its elements (and of
    each state tensor's, which starts at zero) that did not change."""
    low = copy.deepcopy(net).to(dtype)
    opt = build(low)
    loss(low(x.to(dtype)), x).backward()
    before = {n: p.detach().clone() for n, p in low.named_parameters()}
    opt.step()
    out: dict[str, dict[str, float]] = {}
    for n, p in low.named_parameters():
        out[n] = {"weights": (p.detach() == before[n]).float().mean().item()}
        for key, s in opt.state[p].items():
            if isinstance(s, torch.Tensor) and s.shape == p.shape:
                out[n][key] = (s == 0).float().mean().item()
    return out


CASES = [
    ("bf16", "adamw-1e-5", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-5), _loss),
    ("bf16", "adamw-1e-3", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), _loss),
    ("fp16", "sgd-1e-2", lambda m: torch.optim.SGD(m.parameters(), lr=1e-2), _loss),
    ("fp16", "sgd-momentum", lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9), _loss),
    # Adam's second moment underflows fp16 where g^2 / 1000 < 2^-25: its state loses elements.
    ("fp16", "adam-state-underflow", lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), _small_loss),
]


@pytest.mark.parametrize(("dtype", "case", "build", "loss"), CASES, ids=[c[1] for c in CASES])
def test_predicted_unchanged_fraction_matches_a_real_low_step(
    dtype: str, case: str, build: Factory, loss: Callable[..., torch.Tensor]
) -> None:
    net = _spread_model()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    real = _measured(net, x, pd.formats.TORCH_DTYPES[LowDtype(dtype)], build, loss)
    report = pd.analyze(net, x, loss, dtype=dtype, regime="pure", build_optimizer=build)
    step = report.optimizer_step
    assert step is not None and step.optimizer == type(build(net)).__name__
    fractions = [real[p.name]["weights"] for p in step.params]
    assert max(fractions) > 0.05 or not case.startswith("adamw"), fractions  # the case does lose updates
    for p in step.params:
        assert abs(p.unchanged_fraction - real[p.name]["weights"]) <= 0.01, (p.name, p.unchanged_fraction, real[p.name])
        assert set(p.state) == set(real[p.name]) - {"weights"}
        for key, s in p.state.items():
            assert abs(s.unchanged_fraction - real[p.name][key]) <= 0.01, (p.name, key)
    if case == "adam-state-underflow":
        # exp_avg_sq flushed to 0: Adam divides by eps alone, the weights move far too much.
        assert all(p.state["exp_avg_sq"].lost_fraction > 0.5 for p in step.params)
        assert step.total.nonfinite > 0 and step.total.update_norm_ratio == float("inf")  # eps is 0 in fp16
    for p in net.parameters():  # the user's model untouched
        assert p.dtype == torch.float32 and p.grad is None


def test_half_spacing_is_the_smallest_update_that_survives() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        w = torch.tensor([0.02, 1.0, 3.0, 300.0]).to(dtype).float()  # weights held in dtype
        h = half_spacing(w, dtype)
        assert torch.equal((w + 1.01 * h).to(dtype) != w.to(dtype), torch.ones(4, dtype=torch.bool))
        assert torch.equal((w + 0.99 * h).to(dtype), w.to(dtype))


def test_counts_per_unit_and_effective_lr() -> None:
    net = _spread_model()
    net(torch.randn(4, 32)).pow(2).mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    step = optimizer_step(net, grads, LowDtype.BF16, lr=1e-4)
    assert [u.unit for u in step.units] == ["0", "2"]
    for u in step.units:
        assert 0 < u.lost_fraction < 1 and u.update_norm_ratio is not None and u.update_norm_ratio < 1
        assert u.survive_lr is not None and u.survive_lr_half is not None and u.survive_lr > u.survive_lr_half
    assert step.total.numel == sum(p.numel() for p in net.parameters())
    assert step.total.lost == sum(u.lost for u in step.units)
    higher = optimizer_step(net, grads, LowDtype.BF16, lr=1.0)
    assert all(u.lost_fraction < 0.02 for u in higher.units)


def test_no_step_without_an_optimizer_and_a_bad_lr_refused() -> None:
    net = _spread_model()
    x = torch.randn(4, 32)
    assert pd.analyze(net, x, _loss).optimizer_step is None
    with pytest.raises(PrecisionDoctorError, match="lr"):
        pd.analyze(net, x, _loss, lr=-1.0)


def test_a_version_7_report_reads_without_the_step() -> None:
    """Schema 8 added `optimizer_step` and the LOST_UPDATE thresholds: a version-7 report
    (neither) still loads, with no step and the thresholds' defaults."""
    import json

    net = _spread_model()
    raw = json.loads(pd.analyze(net, torch.randn(4, 32), _loss, lr=1e-3).to_json())
    raw["schema_version"] = 7
    del raw["optimizer_step"]
    for name in ("lost_update_fraction", "lost_update_partial_fraction"):
        del raw["thresholds"][name]
    old = pd.Report.from_json(json.dumps(raw))
    assert old.optimizer_step is None and old.thresholds.lost_update_fraction == 0.5


def test_views_show_the_step() -> None:
    """The terminal summary, the HTML report and the app's table say what the step loses."""
    from rich.console import Console

    from precision_doctor.views.figures import optimizer_step_rows
    from precision_doctor.views.html_report import render_html
    from precision_doctor.views.terminal import render_report

    net = _spread_model()
    report = pd.analyze(net, torch.randn(4, 32), _loss, dtype="bf16", regime="pure", lr=1e-5)
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    assert "optimizer step: AdamW at lr 1e-05 with bf16 weights" in text and "LOST_UPDATE" in text
    assert 'id="optimizer-step-units"' in render_html(report)
    rows = optimizer_step_rows(report)
    assert [r["unit"] for r in rows] == ["0", "2"] and {"exp_avg lost", "exp_avg_sq lost"} <= set(rows[0])


def test_app_shows_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from precision_doctor.views import figures
    from tests.test_app import all_frames, run_app

    report = pd.analyze(_spread_model(), torch.randn(4, 32), _loss, dtype="bf16", regime="pure", lr=1e-5)
    path = tmp_path / "r.json"
    report.save(path)
    at = run_app(monkeypatch, path)
    assert figures.optimizer_step_text(report) in [t.value for t in at.text]
    table = next(df for df in all_frames(at) if "lr for 90% to survive" in df.columns)
    assert list(table["unit"]) == ["0", "2"]


MODEL_FILE = """
import torch

def build_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))

def make_batch():
    return torch.randn(8, 16)

def loss_fn(out, batch):
    return out.pow(2).mean()
"""


def test_cli_lr_and_the_model_files_optimizer(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from precision_doctor.cli import app

    model = tmp_path / "m.py"
    model.write_text(MODEL_FILE)
    out = tmp_path / "r.json"
    args = ["analyze", str(model), "--quiet", "--dtype", "bf16", "--regime", "pure", "--no-bf16-check"]
    result = CliRunner().invoke(app, [*args, "--lr", "1e-6", "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "optimizer step: AdamW at lr 1e-06" in result.output
    step = pd.Report.load(out).optimizer_step
    assert step is not None and step.lr == 1e-6
    model.write_text(MODEL_FILE + "\ndef build_optimizer(m):\n    return torch.optim.SGD(m.parameters(), lr=1e-7)\n")
    result = CliRunner().invoke(app, [*args, "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    step = pd.Report.load(out).optimizer_step
    assert step is not None and step.optimizer == "SGD" and step.lr == 1e-7


# --- the finding: bf16_finetune_stall, and a healthy model --------------------------------------

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _sample(name: str) -> ModelSpec:
    return load_model_file(SAMPLES / f"{name}.py")


def test_stalled_finetune_flagged_under_pure_with_the_remedy() -> None:
    spec = _sample("bf16_finetune_stall")
    report = pd.analyze(
        spec.model, spec.batch, spec.loss_fn, dtype="bf16", regime="pure", build_optimizer=spec.build_optimizer
    )
    flagged = {f.unit: f for f in report.flags() if f.flag is pd.Flag.LOST_UPDATE}
    assert set(flagged) == {"backbone", "head"}, flagged  # the zero-started adapter keeps its updates
    for f in flagged.values():
        assert f.severity is pd.Severity.ERROR and f.evidence.values["lost_fraction"] > 0.99
        message = f.evidence.message
        assert "keep fp32 master weights for " + f.unit in message
        assert "Kahan summation" in message and "bf16_stochastic_round=True" in message
        # The lr at which 90% survive, from the weights' magnitudes (|w| up to 0.3: 2^-10..2^-9).
        assert 5e-4 < f.evidence.values["survive_lr"] < 2e-3 and "lr >= " in message
    assert not report.safe


def test_stalled_finetune_is_information_under_autocast() -> None:
    spec = _sample("bf16_finetune_stall")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="bf16", build_optimizer=spec.build_optimizer)
    assert {f.severity for f in report.flags()} == {pd.Severity.INFO}
    assert all("autocast keeps fp32 master weights" in f.evidence.message for f in report.flags())
    assert report.safe


def test_stalled_finetune_really_stalls_in_pure_bf16() -> None:
    """200 real AdamW steps at lr 1e-5: fp32 and fp32 master weights (autocast) descend, pure
    bf16 (`model.to(torch.bfloat16)`) does not move."""
    spec = _sample("bf16_finetune_stall")
    x, y = spec.batch
    assert spec.build_optimizer is not None and spec.loss_fn is not None

    def train(mode: str) -> tuple[float, float]:
        net = copy.deepcopy(spec.model)
        net = net.to(torch.bfloat16) if mode == "pure" else net
        opt = spec.build_optimizer(net)  # type: ignore[misc]
        losses = []
        for _ in range(200):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "master"):
                out = net(x.to(next(net.parameters()).dtype))
            loss = spec.loss_fn(out, (x, y))  # type: ignore[misc]
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses[0], losses[-1]

    for mode in ("fp32", "master"):
        first, last = train(mode)
        assert last < 0.7 * first, (mode, first, last)
    first, last = train("pure")
    assert abs(last - first) < 1e-3 * first, (first, last)


@pytest.mark.parametrize("lr", [4e-3, 1e-2])
def test_healthy_model_at_a_surviving_lr_has_no_finding(lr: float) -> None:
    spec = _sample("tiny_transformer")
    report = pd.analyze(spec.model, spec.batch, spec.loss_fn, dtype="bf16", regime="pure", lr=lr)
    assert report.optimizer_step is not None and not report.flags(), [f.evidence.message for f in report.flags()]


def test_fp16_adam_step_makes_nan_and_says_so() -> None:
    """Pure fp16 Adam: eps (1e-8) is 0 in fp16 and g^2 / 1000 flushes, so the step divides by 0:
    every weight of the sample is NaN after one real step, as the analysis predicts."""
    spec = _sample("bf16_finetune_stall")
    report = pd.analyze(
        spec.model, spec.batch, spec.loss_fn, dtype="fp16", regime="pure", build_optimizer=spec.build_optimizer
    )
    step = report.optimizer_step
    assert step is not None and step.total.nonfinite == step.total.numel
    f = report.flags()[0]
    assert f.severity is pd.Severity.ERROR and "Inf/NaN" in f.evidence.message
    assert "fp32 master weights and optimizer state" in f.evidence.message
    # The summary line says so, not "loses 0% of the updates ... update norm infx fp32's".
    from precision_doctor.views.figures import optimizer_step_text

    line = optimizer_step_text(report)
    assert line is not None and f"makes {step.total.nonfinite} weight(s) Inf/NaN" in line
    assert "loses" not in line and "infx" not in line


# --- over steps: the pre-flight in the pure regime ------------------------------------------------


def test_preflight_pure_trains_low_weights_beside_master_weights_and_says_no_go() -> None:
    spec = _sample("bf16_finetune_stall")
    result = pd.preflight(
        spec.model,
        spec.batch,
        spec.loss_fn,
        dtype="bf16",
        regime="pure",
        build_optimizer=spec.build_optimizer,
        plan=False,
    )
    assert not result.go
    risks = {(r.risk, r.unit) for r in result.reasons}
    assert ("STALLED_LOSS", None) in risks
    assert {("LOST_UPDATE", "backbone"), ("LOST_UPDATE", "head")} <= risks
    low, master, fp32 = result.runs["low"], result.runs["master"], result.runs["fp32"]
    assert "fp32 master weights" in master.description
    assert max(low.losses) - min(low.losses) < 1e-4 * low.losses[0]  # stalled
    assert master.losses[-1] < 0.99 * master.losses[0] and fp32.losses[-1] < 0.99 * fp32.losses[0]
    # Per step: backbone and head (2/3 of the weights) never move in bf16; fp32 moves every weight.
    assert all(s.unchanged_fraction is not None and s.unchanged_fraction > 0.6 for s in low.steps)
    assert all(s.unchanged_fraction == 0.0 for s in fp32.steps)
    stalled = next(r for r in result.reasons if r.risk == "STALLED_LOSS")
    assert "fp32 master weights make it fall" in stalled.message


def test_preflight_pure_at_a_surviving_lr_does_not_stall() -> None:
    spec = _sample("bf16_finetune_stall")
    result = pd.preflight(
        spec.model,
        spec.batch,
        spec.loss_fn,
        dtype="bf16",
        regime="pure",
        build_optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3),
        plan=False,
    )
    assert "STALLED_LOSS" not in {r.risk for r in [*result.reasons, *result.notes]}
    assert not any(r.risk == "LOST_UPDATE" and r.severity is pd.Severity.ERROR for r in result.reasons)


def test_large_parameters_step_in_pieces_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """An elementwise optimizer steps a large parameter in flat pieces (bounded memory): the
    same counts as the whole tensor, the norms to rounding."""
    import precision_doctor.analysis.optimizer_step as step_module

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 7))
    net(torch.randn(16, 300)).pow(2).mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    whole = optimizer_step(net, grads, LowDtype.BF16, lr=1e-4)
    monkeypatch.setattr(step_module, "CHUNK", 1000)
    pieces = optimizer_step(net, grads, LowDtype.BF16, lr=1e-4)
    assert 0 < whole.total.lost < whole.total.numel
    for a, b in zip([*whole.params, *whole.units], [*pieces.params, *pieces.units], strict=True):
        assert (a.numel, a.changed, a.applied_changed, a.lost, a.partly_lost) == (
            b.numel,
            b.changed,
            b.applied_changed,
            b.lost,
            b.partly_lost,
        )
        assert a.update_norm_ratio == pytest.approx(b.update_norm_ratio, rel=1e-9)
        assert {k: s.lost for k, s in a.state.items()} == {k: s.lost for k, s in b.state.items()}
    assert [u.survive_lr for u in whole.units] == [u.survive_lr for u in pieces.units]


def test_a_large_model_is_measured_on_an_even_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the budget, every k-th element of each large parameter, small parameters whole:
    the sample's unchanged fraction is that of the same elements after a real bf16 step."""
    import precision_doctor.analysis.optimizer_step as step_module

    net = _spread_model()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(step_module, "SAMPLE_BUDGET", 1000)
    monkeypatch.setattr(step_module, "WHOLE_MAX", 100)
    build: Factory = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4)  # noqa: E731
    step = pd.analyze(net, x, _loss, dtype="bf16", regime="pure", build_optimizer=build).optimizer_step
    assert step is not None and step.sampled_every == 4  # 3152 parameters over a budget of 1000
    low = copy.deepcopy(net).to(torch.bfloat16)
    opt = build(low)
    _loss(low(x.bfloat16()), x).backward()
    before = {n: p.detach().clone() for n, p in low.named_parameters()}
    opt.step()
    by_name = {p.name: p for p in step.params}
    for n, p in low.named_parameters():
        same = (p.detach() == before[n]).reshape(-1)
        same = same[::4] if p.numel() > 100 else same
        assert by_name[n].numel == same.numel()
        assert abs(by_name[n].unchanged_fraction - same.float().mean().item()) <= 0.01, n


def test_preflight_steps_the_users_optimizer_instance_in_the_analysis() -> None:
    """`preflight(optimizer=...)`: the analysis' optimizer step is that optimizer's class, groups
    and hyperparameters (SGD at lr 1e-7, over `fc` only, another lr on its bias), not none."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD([{"params": [net[2].weight]}, {"params": [net[2].bias], "lr": 3e-7}], lr=1e-7)
    result = pd.preflight(net, torch.randn(8, 4), lambda out, b: out.pow(2).mean(), optimizer=opt, steps=1, plan=False)
    step = result.report.optimizer_step
    assert step is not None and step.optimizer == "SGD" and step.lr == 1e-7
    assert [p.name for p in step.params] == ["2.weight", "2.bias"]  # the parameters it holds, no others
    assert opt.param_groups[1]["params"][0] is net[2].bias and not opt.state  # the user's, untouched


@pytest.mark.parametrize("lr", [1e-2, 3e-2])
def test_pure_applied_step_steps_the_low_runs_own_gradients_as_real_training_does(lr: float) -> None:
    """Under --regime pure the applied step steps the low run's gradients: its unchanged
    fraction is a real `model.to(bf16)` forward, backward and SGD step's, within 1% of the
    elements (SGD's update is lr * g, so the gradient's own bf16 errors move which updates
    round away)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    x, y = torch.randn(128, 32), torch.randn(128, 1)

    def loss_fn(out: torch.Tensor, _batch: object) -> torch.Tensor:
        return (out.float() - y).pow(2).mean()

    def build(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=lr)

    report = pd.analyze(net, x, loss_fn, dtype="bf16", regime="pure", build_optimizer=build)
    step = report.optimizer_step
    assert step is not None and step.sampled_every == 1
    real = copy.deepcopy(net).to(torch.bfloat16)
    before = [p.detach().clone() for p in real.parameters()]
    opt = build(real)
    loss_fn(real(x.to(torch.bfloat16)), x).backward()
    opt.step()
    same = sum(int((b == p.detach()).sum()) for b, p in zip(before, real.parameters(), strict=True))
    measured = same / sum(b.numel() for b in before)
    assert 0.5 < measured < 0.99  # a step where rounding decides for many elements
    assert abs(step.total.unchanged_fraction - measured) < 0.01, (step.total.unchanged_fraction, measured)


class _StochasticSGD(torch.optim.SGD):
    """SGD that rounds its bf16 weights stochastically, a setting kept on the optimizer (as
    torchao's `_AdamW.bf16_stochastic_round`), not in its parameter groups: the fp32 result
    plus random bits below bf16's last mantissa bit, truncated."""

    def __init__(self, params: Any, lr: float, stochastic_round: bool = False) -> None:
        super().__init__(params, lr=lr)
        self.stochastic_round = stochastic_round

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                new = p.float() - group["lr"] * p.grad.float()
                if self.stochastic_round and p.dtype == torch.bfloat16:
                    bits = new.view(torch.int32) + torch.randint_like(new, 0, 1 << 16, dtype=torch.int32)
                    new = (bits & -(1 << 16)).view(torch.float32)
                p.copy_(new)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_a_stochastically_rounding_optimizer_is_judged_by_what_arrives_on_average(stochastic: bool) -> None:
    """Weights of 1 with updates of a fifth of bf16's half-spacing: rounded to nearest, every
    update is lost (LOST_UPDATE); rounded stochastically, about a fifth of the weights move
    by a whole spacing and the mean update is the intended one (no finding). The optimizer's
    setting lives on the object: the step measured must be taken with it."""
    net = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    x = torch.ones(8, 64)
    lr = 0.2 * float(half_spacing(torch.tensor(1.0), torch.bfloat16))

    def build(m: torch.nn.Module) -> torch.optim.Optimizer:
        return _StochasticSGD(m.parameters(), lr=lr, stochastic_round=stochastic)

    def loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return out.float().sum() / batch.shape[0]  # every weight's gradient: 1

    report = pd.analyze(net, x, loss, dtype="bf16", regime="pure", build_optimizer=build)
    step = report.optimizer_step
    assert step is not None and step.stochastic_rounding is stochastic
    (unit,) = step.units
    assert unit.mean_update_ratio is not None
    # Independent reference: the same step of real bf16 weights over 20 draws, as a share of
    # the intended update (-lr).
    real = []
    for seed in range(20):
        torch.manual_seed(seed)
        w = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
        w.grad = torch.ones(64, 64, dtype=torch.bfloat16)
        _StochasticSGD([w], lr=lr, stochastic_round=stochastic).step()
        real.append((w.detach().float() - 1.0).mean().item() / -lr)
    expected = sum(real) / len(real)
    lost = [f for f in report.flags() if f.flag.value == "LOST_UPDATE"]
    if stochastic:
        assert 0.9 < expected < 1.1 and abs(unit.mean_update_ratio - expected) < 0.15, (
            unit.mean_update_ratio,
            expected,
        )
        assert unit.lost_fraction > 0.6  # one draw leaves most weights as they were...
        assert not lost, [f.evidence.message for f in lost]  # ...yet the updates arrive
    else:
        assert expected == 0.0 and unit.mean_update_ratio == 0.0 and unit.lost_fraction == 1.0
        assert lost and lost[0].severity.value == "error" and "rounded away" in lost[0].evidence.message


def test_torchaos_stochastic_rounding_adamw_keeps_its_setting() -> None:
    """torchao's `_AdamW(bf16_stochastic_round=True)`, which the LOST_UPDATE remedy names, is
    stepped with its stochastic rounding on (the per-parameter copy dropped it) and found to
    lose nothing on average where round-to-nearest loses every update."""
    pytest.importorskip("torchao.optim")
    from torchao.optim import _AdamW

    probe = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    probe.grad = torch.ones(4, dtype=torch.bfloat16)
    try:  # its step is torch.compile'd: on the CPU that needs a C++ compiler
        _AdamW([probe], lr=1e-3, bf16_stochastic_round=True).step()
    except Exception as e:  # pragma: no cover - a machine without one
        pytest.skip(f"torchao's compiled _AdamW step does not run here: {type(e).__name__}")
    net = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        net.weight.uniform_(0.5, 1.0)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    results = {}
    for sr in (False, True):
        report = pd.analyze(
            net, x, _loss, dtype="bf16", regime="pure",
            build_optimizer=lambda m, sr=sr: _AdamW(m.parameters(), lr=2e-4, bf16_stochastic_round=sr),
        )  # fmt: skip
        assert report.optimizer_step is not None and report.optimizer_step.stochastic_rounding is sr
        results[sr] = (report.optimizer_step.units[0], [f for f in report.flags() if f.flag.value == "LOST_UPDATE"])
    (nearest, nearest_flags), (sr_unit, sr_flags) = results[False], results[True]
    assert nearest.lost_fraction > 0.99 and nearest_flags  # lr 2e-4 < half of bf16's spacing below 1 (2^-9)
    assert sr_unit.mean_update_ratio is not None and 0.8 < sr_unit.mean_update_ratio < 1.2 and not sr_flags


def test_each_units_finding_names_its_own_groups_learning_rate() -> None:
    """Parameter groups at lr 1e-2 and 1e-5: the finding on the second names 1e-05, not the
    first group's rate."""
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.5, 1.0)

    def build(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": m[0].parameters(), "lr": 1e-2}, {"params": m[2].parameters(), "lr": 1e-5}])

    report = pd.analyze(net, torch.randn(8, 16), _loss, dtype="bf16", regime="pure", build_optimizer=build)
    step = report.optimizer_step
    assert step is not None and {u.unit: u.lr for u in step.units} == {"0": 1e-2, "2": 1e-5}
    lost = {f.unit: f.evidence for f in report.flags() if f.flag.value == "LOST_UPDATE"}
    assert set(lost) == {"2"}  # 1e-5 is below half of bf16's spacing for weights in [0.5, 1)
    assert "at lr 1e-05 " in lost["2"].message and lost["2"].values["lr"] == 1e-5


def test_stochastic_rounding_is_found_whatever_the_first_weights_and_few_moves_judge_nothing() -> None:
    """A first layer of weights in [64, 128], whose updates no rounding moves in one draw, hid
    the optimizer's stochastic rounding (found on the first parameter); and a unit whose few
    expected moves all missed in the one draw read "0% of the update arrives". The probe
    finds it on a weight of its own; a ratio within three standard errors of the draw of 1
    is no finding; two analyses give the same report (one seed)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 64))
    with torch.no_grad():
        net[0].weight.uniform_(64.0, 128.0)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))

    def build(m: torch.nn.Module) -> torch.optim.Optimizer:
        return _StochasticSGD(m.parameters(), lr=1e-3, stochastic_round=True)

    report = pd.analyze(net, x, _loss, dtype="bf16", regime="pure", build_optimizer=build)
    step = report.optimizer_step
    assert step is not None and step.stochastic_rounding
    first = next(u for u in step.units if u.unit == "0")
    assert first.mean_update_ratio_stderr is not None and first.mean_update_ratio_stderr > 0.3  # few moves
    assert not [f for f in report.flags() if f.flag.value == "LOST_UPDATE"]
    again = pd.analyze(net, x, _loss, dtype="bf16", regime="pure", build_optimizer=build).optimizer_step
    assert again is not None and [u.mean_update_ratio for u in again.units] == [u.mean_update_ratio for u in step.units]


def test_a_unit_across_parameter_groups_names_no_single_lr() -> None:
    """Biases at lr 1e-2, weights at 1e-6: each unit's parameters sit in two groups, and the
    finding named the first group's lr for the weights' lost updates."""
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.5, 1.0)

    def build(m: torch.nn.Module) -> torch.optim.Optimizer:
        weights = [p for n, p in m.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in m.named_parameters() if n.endswith("bias")]
        return torch.optim.AdamW([{"params": biases, "lr": 1e-2}, {"params": weights, "lr": 1e-6}])

    report = pd.analyze(net, torch.randn(8, 16), _loss, dtype="bf16", regime="pure", build_optimizer=build)
    step = report.optimizer_step
    assert step is not None and all(u.lr is None for u in step.units)
    lost = [f for f in report.flags() if f.flag.value == "LOST_UPDATE"]
    assert lost and all("at its parameter groups' lrs" in f.evidence.message for f in lost)
    assert all("lr" not in f.evidence.values for f in lost)


def test_the_preflight_steps_the_users_optimizer_with_its_own_settings() -> None:
    """`preflight(optimizer=...)` with an optimizer class that requires its lr and keeps a
    setting on itself: the analysis' step rebuilt it with defaults its constructor does not
    take (a TypeError), and a deep copy of it for the runs lost the setting."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.5, 1.0)
    opt = _StochasticSGD(net.parameters(), lr=1e-3, stochastic_round=True)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    result = pd.preflight(net, x, _loss, dtype="bf16", regime="pure", optimizer=opt, steps=2, plan=False)
    assert result.report is not None and result.report.optimizer_step is not None
    assert result.report.optimizer_step.stochastic_rounding  # its setting, in the analysis' step
    from precision_doctor.training.preflight import _Place

    _, copied = _Place.of(net).for_training(opt)
    assert isinstance(copied, _StochasticSGD) and copied.stochastic_round  # and in the runs' copy


def test_a_frozen_first_group_does_not_hide_stochastic_rounding() -> None:
    """A first parameter group at lr 0 (frozen, or warming up) moves no probe: the others are
    tried, and a stochastic step is found; the stderr is the stochastic step's alone (None for
    a rounding-to-nearest step and for every optimizer-state record)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    with torch.no_grad():
        net.weight.uniform_(0.5, 1.0)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))

    def build(stochastic: bool) -> Factory:
        return lambda m: _StochasticSGD(
            [{"params": [m.bias], "lr": 0.0}, {"params": [m.weight]}], lr=1e-3, stochastic_round=stochastic
        )

    for stochastic in (True, False):
        step = pd.analyze(net, x, _loss, dtype="bf16", regime="pure", build_optimizer=build(stochastic)).optimizer_step
        assert step is not None and step.stochastic_rounding is stochastic
        assert all((u.mean_update_ratio_stderr is not None) is stochastic for u in step.units)
    adam = pd.analyze(net, x, _loss, dtype="bf16", regime="pure", lr=1e-3).optimizer_step
    assert adam is not None and not adam.stochastic_rounding
    assert all(s.mean_update_ratio_stderr is None for p in adam.params for s in p.state.values())


def test_weights_at_zero_survive_at_any_lr() -> None:
    """A LayerNorm (weights 1, biases 0) at an lr whose updates bf16 rounds away on the weights:
    half its updates (the biases') survive at any lr, said so rather than "half at 9e-25"."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    report = pd.analyze(net, torch.randn(8, 16), _loss, dtype="bf16", regime="pure", lr=1e-5)
    (norm,) = [f for f in report.flags() if f.flag.value == "LOST_UPDATE" and f.unit == "1"]
    assert "half at any lr" in norm.evidence.message, norm.evidence.message

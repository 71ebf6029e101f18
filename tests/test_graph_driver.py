"""The graph driver (`capture.graph_driver`) against the dispatch driver: the same report on
every sample model and shared fixture, a fallback with its reason where the graph cannot
stand for the step, and the model handed back as it came in; the graph kept across analyses
(`capture.graph_cache`): walked again where the step is the same, traced again where it is not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import precision_doctor as pd
from precision_doctor.analysis import engine
from precision_doctor.capture.graph_cache import GRAPHS, GraphCache, fingerprint
from precision_doctor.capture.graph_driver import trace_step
from precision_doctor.cli import app
from precision_doctor.model.spec import load_model_file
from tests import fixtures

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
SAMPLE_FILES = sorted(SAMPLES.glob("**/*.py"))
# Samples whose step the graph cannot stand for: name -> what the reason says. (None today:
# every sample's step is captured; the fallback is tested on the models below.)
FALLS_BACK: dict[str, str] = {}
# Shared fixtures: the plain ones run in every suite, the transformers ones (seconds each) are
# marked. The headline cases come from their own builders.
FIXTURES: dict[str, Callable[[], fixtures.Case]] = {
    **{name: (lambda name=name: fixtures.build(name)) for name in fixtures.BUILDERS},
    "one_token_lm": lambda: fixtures.build_one_token_lm(tokens=256),
    "amplifier": fixtures.build_amplifier,
    "deep_se": fixtures.build_deep_se,
    # Its structure at a size that runs in a second (the full one takes 16 s for both drivers).
    "deep_se_small": lambda: fixtures.Case(
        "deep_se_small", fixtures.DeepSE(c=8, depth=4), torch.randn(2, 8, 16), fixtures.mlp_loss
    ),
}
HEAVY = {"gpt2", "bert", "t5", "llama", "qwen2", "mistral", "swin", "deep_se"}


def _both(model: torch.nn.Module, batch: Any, loss_fn: Any, **kw: Any) -> tuple[pd.Report, pd.Report]:
    dispatch = pd.analyze(model, batch, loss_fn, driver="dispatch", **kw)
    graph = pd.analyze(model, batch, loss_fn, driver="graph", **kw)
    return dispatch, graph


def _compare(dispatch: pd.Report, graph: pd.Report, expect_graph: bool = True) -> None:
    env = graph.environment
    assert dispatch.environment.capture_path is pd.CapturePath.DISPATCH
    assert dispatch.environment.driver_reason is None  # dispatch asked for: nothing to explain
    if expect_graph:
        assert env.capture_path is pd.CapturePath.GRAPH and env.driver_reason is None
    a, b = dispatch.model_dump(), graph.model_dump()
    a.pop("environment")
    b.pop("environment")
    fixtures.assert_same_fields(a, b, rel=1e-9)  # floats to 1e-9, NaN to NaN
    # Not vacuous: both captured ops with statistics and shadows, forward and backward.
    assert graph.op_count_forward and graph.op_count_backward
    assert any(u.forward.stats is not None for u in graph.units)
    assert any(u.backward.param_grads for u in graph.units)
    flags = [(u.name, f.flag, f.severity) for u in graph.units for f in u.flags]
    assert flags == [(u.name, f.flag, f.severity) for u in dispatch.units for f in u.flags]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            p, id=p.stem, marks=[pytest.mark.numerics] if p.stem in {"tiny_transformer", "healthy_mlp"} else []
        )
        for p in SAMPLE_FILES
    ],
)
def test_both_drivers_give_the_same_report_on_every_sample(path: Path) -> None:
    if path.parent.name == "fp8":
        pytest.importorskip("torchao.float8")
    spec = load_model_file(path)
    kw: dict[str, Any] = {"dtype": "fp8"} if path.parent.name == "fp8" else {}
    dispatch, graph = _both(spec.model, spec.batch, spec.loss_fn, **kw)
    if path.stem in FALLS_BACK:
        assert graph.environment.capture_path is pd.CapturePath.DISPATCH
        assert FALLS_BACK[path.stem] in (graph.environment.driver_reason or "")
    _compare(dispatch, graph, expect_graph=path.stem not in FALLS_BACK)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.numerics, pytest.mark.slow] if n in HEAVY else []) for n in FIXTURES],
)
def test_both_drivers_give_the_same_report_on_every_fixture(name: str) -> None:
    case = FIXTURES[name]()
    _compare(*_both(case.model, case.batch, case.loss_fn))


@pytest.mark.parametrize(("sample", "regime"), [("lost_update", "pure"), ("reduction_overflow", "autocast-cpu")])
def test_both_drivers_agree_in_the_other_regimes(sample: str, regime: str) -> None:
    """The low run's dtypes reach the walk's shadows as they reach the dispatch driver's: the
    pure regime (every tensor no op made is low) and the CPU op lists."""
    spec = load_model_file(SAMPLES / f"{sample}.py")
    kw = {"regime": "pure"} if regime == "pure" else {"policy": "cpu"}
    dispatch, graph = _both(spec.model, spec.batch, spec.loss_fn, **kw)
    assert dispatch.flags() or sample != "lost_update"  # the pure regime's planted findings
    _compare(dispatch, graph)


def _state(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for n, t in before[key].items():
            assert torch.equal(t, after[key][n]), (key, n)
    assert before["grads"] == after["grads"]  # None before, None after: identity
    assert before["training"] == after["training"]
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (fixtures.build_reseeding, "is not the traced step's"),
        (fixtures.build_numpy_alias, "aliases memory the step made without an op"),
    ],
)
def test_a_step_the_graph_cannot_stand_for_falls_back_with_its_reason(
    build: Callable[[], fixtures.Case], reason: str
) -> None:
    case = build()
    before = _state(case.model)
    dispatch, graph = _both(case.model, case.batch, case.loss_fn)
    _same_state(before, _state(case.model))
    env = graph.environment
    assert env.capture_path is pd.CapturePath.DISPATCH
    assert env.driver_reason is not None and reason in env.driver_reason
    if build is fixtures.build_numpy_alias:
        # The fallback is the dispatch driver's analysis, from the state the trace found. (The
        # reseeding model's step depends on how often forward ran: no two analyses agree.)
        _compare(dispatch, graph, expect_graph=False)


def test_the_graph_driver_hands_the_model_back_as_it_came_in() -> None:
    """BatchNorm's running statistics and dropout: the trace and the walk both write and draw;
    the user sees neither."""
    case = fixtures.build("cnn")
    case.model.train()
    before = _state(case.model)
    report = pd.analyze(case.model, case.batch, case.loss_fn, driver="graph")
    assert report.environment.capture_path is pd.CapturePath.GRAPH
    _same_state(before, _state(case.model))


def test_an_unknown_driver_is_refused_before_the_model_runs() -> None:
    calls = []
    model = torch.nn.Linear(2, 1)
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(pd.PrecisionDoctorError, match="unknown driver 'fx'; choose one of: auto, dispatch, graph"):
        pd.analyze(model, torch.randn(3, 2), lambda out, b: out.sum(), driver="fx")
    assert not calls


def test_the_cli_runs_the_driver_it_is_asked_for(tmp_path: Path) -> None:
    model = tmp_path / "model.py"
    model.write_text(fixtures.HEALTHY_FILE)
    out = {d: tmp_path / f"{d}.json" for d in ("graph", "dispatch")}
    for driver, path in out.items():
        result = CliRunner().invoke(app, ["analyze", str(model), "--driver", driver, "--out", str(path), "--quiet"])
        assert result.exit_code == 0, result.output
    graph, dispatch = (pd.Report.load(out[d]) for d in ("graph", "dispatch"))
    assert graph.environment.capture_path is pd.CapturePath.GRAPH
    _compare(dispatch, graph)


# --- the kept graph (capture.graph_cache) ----------------------------------------------------


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the engine's traces, from an empty cache."""
    calls: list[int] = []
    real = engine.trace_step

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "trace_step", counted)
    GRAPHS.clear()
    yield calls
    GRAPHS.clear()


def _graph_then_dispatch(case: fixtures.Case, **kw: Any) -> pd.Report:
    """A graph-driver analysis checked against the dispatch driver's on the same state."""
    graph = pd.analyze(case.model, case.batch, case.loss_fn, driver="graph", **kw)
    assert graph.environment.capture_path is pd.CapturePath.GRAPH
    _compare(pd.analyze(case.model, case.batch, case.loss_fn, driver="dispatch", **kw), graph)
    return graph


def test_a_kept_graph_is_walked_again_with_the_same_report(traces: list[int]) -> None:
    """The second analysis of the same step walks the first one's graph (no trace), in another
    low dtype too (the graph is the fp32 step's), and hands the model back as it came in:
    BatchNorm statistics and dropout included."""
    case = fixtures.build("cnn")
    case.model.train()
    before = _state(case.model)
    first = _graph_then_dispatch(case)
    assert len(traces) == 1
    again = _graph_then_dispatch(case)
    assert len(traces) == 1 and GRAPHS.hits == 1
    fixtures.assert_same_fields(first.model_dump(), again.model_dump(), rel=1e-9)
    _graph_then_dispatch(case, dtype="bf16", regime="pure")
    assert len(traces) == 1 and GRAPHS.hits == 2
    _same_state(before, _state(case.model))


def test_auto_walks_a_kept_graph_and_otherwise_takes_dispatch(traces: list[int]) -> None:
    case = fixtures.build("mlp")
    env = pd.analyze(case.model, case.batch, case.loss_fn).environment
    assert env.capture_path is pd.CapturePath.DISPATCH and (env.driver_reason or "").startswith("auto: no graph")
    pd.analyze(case.model, case.batch, case.loss_fn, driver="graph")
    auto = pd.analyze(case.model, case.batch, case.loss_fn, dtype="bf16")  # the CLI's bf16 check
    assert auto.environment.capture_path is pd.CapturePath.GRAPH and auto.environment.driver_reason is None
    assert len(traces) == 1
    _compare(pd.analyze(case.model, case.batch, case.loss_fn, dtype="bf16", driver="dispatch"), auto)
    other = fixtures.build("mlp")  # the same structure, another model object: nothing kept for it
    assert pd.analyze(other.model, other.batch, other.loss_fn).environment.capture_path is pd.CapturePath.DISPATCH


def _new_shape(case: fixtures.Case) -> None:
    case.batch = torch.randn(5, 8)


def _new_batch_object(case: fixtures.Case) -> None:
    case.batch = case.batch.clone()


def _batch_written(case: fixtures.Case) -> None:
    case.batch.mul_(2)


def _dtype_round_trip(case: fixtures.Case) -> None:
    case.model.double().float()  # the same parameter objects, new memory


def _eval_mode(case: fixtures.Case) -> None:
    case.model.eval()


def _optimizer_step(case: fixtures.Case) -> None:
    opt = torch.optim.SGD(case.model.parameters(), lr=0.5)
    case.loss_fn(case.model(case.batch), case.batch).backward()
    opt.step()
    case.model.zero_grad(set_to_none=True)


def _new_loss_fn(case: fixtures.Case) -> None:
    case.loss_fn = lambda out, b: out.abs().mean()


@pytest.mark.parametrize("change", [_new_shape, _new_batch_object, _dtype_round_trip, _eval_mode, _new_loss_fn])
def test_a_changed_step_is_traced_again(traces: list[int], change: Callable[[fixtures.Case], None]) -> None:
    """What the key holds changed: no kept graph is walked; the new trace's report is the
    dispatch driver's on the changed step."""
    case = fixtures.build("mlp")
    pd.analyze(case.model, case.batch, case.loss_fn, driver="graph")
    change(case)
    _graph_then_dispatch(case)
    assert len(traces) == 2 and GRAPHS.hits == 0


@pytest.mark.parametrize("change", [_batch_written, _optimizer_step])
def test_new_values_are_walked_and_a_changed_loss_traces_again(
    traces: list[int], change: Callable[[fixtures.Case], None]
) -> None:
    """Values are not in the key: the kept graph is walked on the new values, its loss is not
    the traced one, so the step is traced again (`graph`) or left to the dispatch driver
    (`auto`); either way the report is the dispatch driver's on the new values."""
    case = fixtures.build("mlp")
    pd.analyze(case.model, case.batch, case.loss_fn, driver="graph")
    change(case)
    _graph_then_dispatch(case)
    assert len(traces) == 2 and GRAPHS.hits == 1
    change(case)
    auto = pd.analyze(case.model, case.batch, case.loss_fn)
    assert GRAPHS.hits == 2 and len(traces) == 2 and len(GRAPHS) == 0
    assert auto.environment.capture_path is pd.CapturePath.DISPATCH
    assert "no longer stands for the step" in (auto.environment.driver_reason or "")
    _compare(pd.analyze(case.model, case.batch, case.loss_fn, driver="dispatch"), auto, expect_graph=False)


def test_a_kept_graph_walked_from_another_generator_state_is_traced_again(traces: list[int]) -> None:
    """The generator is no part of the key: dropout draws other masks, the loss is not the
    traced one, and the new trace is the dispatch driver's analysis from that state."""
    case = fixtures.build("cnn")
    case.model.train()
    pd.analyze(case.model, case.batch, case.loss_fn, driver="graph")
    torch.rand(1)
    _graph_then_dispatch(case)
    assert GRAPHS.hits == 1 and len(traces) == 2


def test_a_kept_graph_whose_walk_is_not_the_step_is_dropped_and_traced_again(traces: list[int]) -> None:
    """A tensor the loss function closes over is no part of the key: written in place, the
    kept graph's walk reads it, its loss is not the traced one and the step is traced again."""
    case = fixtures.build("mlp")
    scale = torch.ones(())

    def scaled(out: torch.Tensor, batch: Any) -> torch.Tensor:
        return (out * scale).pow(2).mean()

    case.loss_fn = scaled
    pd.analyze(case.model, case.batch, case.loss_fn, driver="graph")
    scale.fill_(3.0)
    _graph_then_dispatch(case)
    assert GRAPHS.hits == 1 and len(traces) == 2


def test_the_kept_graph_does_not_keep_the_model_alive(traces: list[int]) -> None:
    case = fixtures.build("mlp")
    pd.analyze(case.model, case.batch, case.loss_fn, driver="graph")
    assert len(GRAPHS) == 1
    model = weakref.ref(case.model)
    del case
    gc.collect()
    assert model() is None and len(GRAPHS) == 0


def test_fingerprint_sees_shape_dtype_mode_and_objects() -> None:
    """Direct: what `fingerprint` compares (the engine's misses above rest on it)."""
    case = fixtures.build("mlp")
    key = fingerprint(case.model, case.batch)
    assert key is not None and key == fingerprint(case.model, case.batch)
    case.model.double()
    assert fingerprint(case.model, case.batch.double()) != key
    assert fingerprint(case.model, {"x": object()}) is None  # an opaque leaf: never reused


def test_preflight_runs_its_analysis_by_the_driver_it_is_asked_for() -> None:
    case = fixtures.build("mlp")
    before = _state(case.model)
    result = pd.preflight(case.model, case.batch, case.loss_fn, steps=1, plan=False, driver="graph")
    assert result.report is not None and result.report.environment.capture_path is pd.CapturePath.GRAPH
    _same_state(before, _state(case.model))
    with pytest.raises(pd.PrecisionDoctorError, match="unknown driver 'fx'"):
        pd.preflight(case.model, case.batch, case.loss_fn, steps=1, plan=False, driver="fx")


def test_the_cache_matches_the_loss_function_by_object_and_none_only_to_none() -> None:
    case = fixtures.build("mlp")
    step = trace_step(case.model, case.batch, case.loss_fn)
    key = fingerprint(case.model, case.batch)
    cache = GraphCache()
    cache.keep(case.model, None, step, key)  # the output's own loss
    assert cache.get(case.model, None, key) is step and cache.get(case.model, case.loss_fn, key) is None

    def loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
        return out.sum()

    cache.keep(case.model, loss, step, key)
    assert cache.get(case.model, loss, key) is step and (cache.hits, cache.misses) == (2, 1)
    del loss
    gc.collect()
    assert cache.get(case.model, None, key) is None  # the kept one died: no match, not even None

"""The op pipeline's steps, called by a driver other than the dispatch mode: a walk over an FX
graph of aten ops (make_fx) gives the same records as `capture_pass` on the eager run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from precision_doctor.capture.pipeline import Op, OpPipeline
from precision_doctor.capture.records import OpRecord
from precision_doctor.capture.shadow import capture_pass
from precision_doctor.capture.units import LowUnits, UnitAttribution


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))
        self.b = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.w + self.b)
        h = h * 3.0
        h.add_(1.0)  # written in place: the shadow must not write the fp32 tensor
        return h.softmax(-1)[:, :3].sum()


def _fx_driver(model: nn.Module, x: torch.Tensor) -> list[OpRecord]:
    """A second driver: each call_function node of the graph through the same steps."""
    with torch.no_grad():
        graph = make_fx(model)(x)
    pipeline = OpPipeline(
        UnitAttribution(model),
        torch.float16,
        LowUnits({"": True}),
        collect=True,
        local=True,
        on_mutation=lambda t: None,
    )
    env: dict[torch.fx.Node, Any] = {}
    with torch.no_grad():
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "get_attr":
                env[node] = getattr(graph, node.target)
            elif node.op == "call_function":
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                info = pipeline.classify(node.target)
                assert not info.communicates and not info.bookkeeping
                # Every op of this model runs in its root module's forward.
                op = Op(node.target, info, args, dict(kwargs), False, pipeline.tracker.outside)
                env[node] = pipeline.run(op)
    pipeline.flush()  # the statistics are read back once, at the end of the pass
    return pipeline.records


def _fields(r: OpRecord) -> tuple[Any, ...]:
    s = r.summary
    return (
        r.op,
        r.unit,
        r.phase,
        r.inputs,
        r.input_slots,
        r.output_shapes,
        r.output_dtypes,
        r.output_bytes,
        r.flops,
        r.moved_bytes,
        r.stored_low,
        r.value_sources,
        r.out_max_abs,
        r.input_max_abs,
        None if s is None else (s.numel, s.zero_count, s.max_abs, s.min_nonzero_abs, s.hist.tolist()),
        r.local_rel_error,
        {k: (None if a is None else a.rel_l2) for k, (a, _) in r.output_errors.items()},
    )


def test_an_fx_graph_driver_gets_the_dispatch_modes_records() -> None:
    torch.manual_seed(0)
    model, x = _Block(), torch.randn(5, 4)
    with torch.no_grad(), capture_pass(model, torch.float16, LowUnits({"": True})) as capture:
        model(x)
    eager = capture.records
    walked = _fx_driver(model, x)
    assert [r.op for r in eager] == [r.op for r in walked]
    assert [_fields(r) for r in eager] == [_fields(r) for r in walked]
    # Not vacuous: the shadows ran, and the graph's edges are there.
    mm = next(r for r in walked if r.op == "mm.default")
    assert mm.local_rel_error is not None and mm.local_rel_error > 0
    assert any(i >= 0 for r in walked for i in r.inputs)


def test_execute_runs_between_the_shadows_inputs_and_its_run() -> None:
    """An in-place op through the steps one by one: the shadow reads the values from before the
    write, and the fp32 tensor is written once."""
    model = nn.Linear(2, 2)
    pipeline = OpPipeline(
        UnitAttribution(model),
        torch.float16,
        LowUnits({"": True}),
        collect=True,
        local=True,
        on_mutation=lambda t: None,
    )
    aten = torch.ops.aten
    x = torch.tensor([1.0, 2.0, 3.0])
    made = pipeline.run(Op(aten.mul.Tensor, pipeline.classify(aten.mul.Tensor), (x, 1.0001), {}, False, "<root>"))
    before = made.clone()
    op = Op(aten.add_.Tensor, pipeline.classify(aten.add_.Tensor), (made, 1.0), {}, False, "<root>")
    pipeline.attribute(op)
    pipeline.plan(op)
    pipeline.track_writes(op)
    pipeline.prepare_shadow(op)
    assert len(op.written) == 1 and op.written[0] is made and op.store is not None and op.shadow_args is not None
    pipeline.execute(op)
    assert torch.equal(made, before + 1.0)  # written once, by the fp32 op alone
    pipeline.shadow(op)
    shadow = op.store.get(made)
    assert shadow is not None and shadow.dtype == torch.float16
    assert torch.equal(shadow, (before.half().float() + 1.0).half())

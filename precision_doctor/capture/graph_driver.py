"""The graph driver: the training step captured once as an FX graph of aten ops (forward, loss
and backward), then walked through the op pipeline (`pipeline.OpPipeline`) with no dispatch
mode. Each call_function node of an aten op is one `OpPipeline.run` with what the capture
recorded on the node (its unit, whether it is backward, the sequence number of the autograd
node it made); marker nodes stand where the eager run had a module call begin or return, the
forward end, and autograd hand a node its output gradients (`GraphCapture.replay`).

How the graph is captured, and why so. `trace_step` runs the real fp32 step once under a
recording dispatch mode (`_TraceMode`, the mechanism of `make_fx`'s real tracing mode), which
appends one node per aten op to a `torch.fx.Graph`, with the unit and sequence number the
dispatch driver would compute for it. Not `torch.export` nor AOTAutograd, for three reasons:

- Same report by construction. Both functionalize: an in-place op (`add_`, a BatchNorm's
  running statistics, a model writing its parameters) becomes a functional op plus a copy at
  the graph's end, and views become copies or are regenerated. The records would then be of
  ops real training does not run, and the masks, writes and value sources they carry would
  differ. AOTAutograd's backward is also one autograd node (`CompiledFunctionBackward`):
  per-node gradient statistics would have to be rebuilt from `seq_nr`, and dropout draws from
  functionalized Philox seeds, not the eager generator the dispatch driver and the real low
  run use. The recording mode sees the ops the dispatch driver sees, post-autograd: the
  graph walk gets the same records field for field (tests/test_graph_driver.py).
- Coverage. `torch.export` and `make_fx` with fake tensors stop at data-dependent control
  flow (transformers' attention masks, `.item()`), `torch.compile` breaks graphs there. A
  trace on the real values takes the branch this batch takes, which is what one analysis of
  this batch must see.
- Cost. torch.compile with a pass-through AOTAutograd backend took 15.9 s on GPT-2 small
  (1.68 s eager step); the recording trace costs about one dispatch-mode step.

What the graph cannot carry falls back to the dispatch driver with a reason
(`GraphUnavailable`, `report.environment.driver_reason`): collectives and tensor subclasses
(DTensor: their own dispatch), a tensor an op reads that aliases memory the step made
without an op (`.data` of an activation), a gradient made outside the ops, a trace that
raises or whose loss is not finite (the dispatch driver reports the model's error), and a
step whose ops do not reproduce it: the walk's forward loss must equal the trace's bit for
bit (a forward that reseeds the generator, or reads Python state that changed, does not).
Between trace and walk the written state is put back (parameters, buffers the trace wrote,
`.grad`, the RNG), so the walk starts where the trace did and draws the same dropout masks.

Where it pays. The walk's fixed cost per op is below the dispatch mode's, the trace's several
times above it (benchmarks/overhead.py --drivers prints each; docs/architecture.md has the
numbers): a graph pays only where it is walked again, which `capture.graph_cache` provides
across analyses of the same step in a process. `Driver.AUTO` walks a kept graph and never
traces by itself (`analysis.engine`).
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from precision_doctor.capture.dispatch import dynamo_safe
from precision_doctor.capture.memory import WeakIdMap
from precision_doctor.capture.ops import rearranges, tensor_leaves
from precision_doctor.capture.pipeline import Op, _written, grad_seqs
from precision_doctor.capture.shadow import ShadowCapture, batch_storages, configure_capture
from precision_doctor.capture.units import LOSS_UNIT, LowUnits, OpDtypes, OpKey, UnitAttribution
from precision_doctor.model.parallel import storage_ptr
from precision_doctor.model.spec import LossFn, resolve_loss, run_model
from precision_doctor.model.state import ModuleAttributes


class GraphUnavailable(Exception):
    """The step cannot be captured as a graph that runs what the eager step runs: why, in one
    line (the report's `environment.driver_reason`)."""


@dataclass(eq=False, frozen=True, slots=True)
class GradNode:
    """What the gradient statistics read of an autograd node of the traced step: its sequence
    number (whose unit it is) and its name (`MmBackward0`). Keyed by identity, as the nodes."""

    seq: int
    node_name: str

    def _sequence_nr(self) -> int:
        return self.seq

    def name(self) -> str:
        return self.node_name


# Marker targets: call_function nodes that stand for events of the eager run, not ops.
def module_enter(path: str, call: int) -> None:
    """A module call begins (the unit tracker's stack grows)."""
    raise RuntimeError("a marker node: GraphCapture.replay handles it")


def module_exit(path: str) -> None:
    """A module call is left."""
    raise RuntimeError("a marker node: GraphCapture.replay handles it")


def module_output(path: str, call: int, outputs: list[Any]) -> None:
    """A module call returned these float tensors."""
    raise RuntimeError("a marker node: GraphCapture.replay handles it")


def forward_end(loss: Any) -> None:
    """The loss is made; the backward begins."""
    raise RuntimeError("a marker node: GraphCapture.replay handles it")


def gradients(node: GradNode, grads: tuple[Any, ...]) -> None:
    """Autograd hands `node` its output gradients."""
    raise RuntimeError("a marker node: GraphCapture.replay handles it")


@dataclass
class StepGraph:
    """One traced training step: the graph, the tensors it reads that no op of it made (by
    node target), and what the walk needs beside the ops."""

    graph: torch.fx.Graph
    constants: dict[str, Any]
    loss: torch.fx.Node
    loss_value: float
    grads: dict[str, torch.fx.Node]  # parameter name -> its gradient's value
    seq_units: dict[int, str]
    consumers: dict[int, list[GradNode]]  # id(GradNode) -> the nodes its gradient flows into
    accumulate: dict[int, GradNode]  # id(parameter) -> its AccumulateGrad
    root: GradNode | None
    saved_bytes: list[tuple[str, int]]  # unit -> bytes its autograd nodes saved, in count order
    written: list[tuple[torch.Tensor, torch.Tensor]]  # (tensor, its value before the trace)
    rng: _RngState
    # `compile_walk`'s program and the slots' initial values, made on the first walk and
    # shared by every later one (a kept graph, `graph_cache`).
    compiled: tuple[list[_Instruction], list[Any]] | None = None

    @property
    def op_count(self) -> int:
        return sum(
            1 for n in self.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        )

    def rewound(self) -> StepGraph:
        """The graph for one more walk from the state the model and the generator are in now
        (a kept graph: the analysis that traced it restored what it wrote): what `restore`
        puts back is this state."""
        self.program()  # compiled once, on the kept graph: the copies share it
        with torch.no_grad():
            written = [(t, t.detach().clone()) for t, _ in self.written]
        return replace(self, written=written, rng=_RngState.now(self.rng.device))

    def program(self) -> tuple[list[_Instruction], list[Any]]:
        """The walk's program and a fresh environment for it (`compile_walk`, compiled once)."""
        if self.compiled is None:
            self.compiled = compile_walk(self)
        program, env = self.compiled
        return program, list(env)

    def restore(self, model: torch.nn.Module) -> None:
        """Put back what a walk wrote, as the trace found it: the tensors written in place that
        no op of the step made, every parameter's `.grad`, the generator."""
        _put_back(self.written, model)
        self.rng.reset()


class _Recorder(ShadowCapture):
    """The trace's state: the graph being built, which node made each live tensor, and the
    trace's own unit attribution (its sequence numbers are the graph's)."""

    def __init__(self, attribution: UnitAttribution, on_mutation: Callable[[torch.Tensor], None]) -> None:
        super().__init__(
            attribution, torch.float16, LowUnits({"": False}), collect=False, local=False, on_mutation=on_mutation
        )
        self.graph = torch.fx.Graph()
        self.nodes = WeakIdMap()  # tensor -> the node whose value it is
        self.constants: dict[str, Any] = {}
        self._constant_nodes = WeakIdMap()
        # Memory op outputs live in: storage pointer -> the op outputs in it (weakly: freed
        # memory the allocator hands to a tensor made without an op is no alias).
        self.made_storages: dict[int, list[weakref.ref[torch.Tensor]]] = {}
        self.allowed_storages: set[int] = set()  # parameters', buffers', the batch's memory
        self.written: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._written_ids: set[int] = set()

    def ref(self, t: torch.Tensor) -> torch.fx.Node:
        node: torch.fx.Node | None = self.nodes.get(t)
        if node is not None:
            return node
        node = self._constant_nodes.get(t)
        if node is not None:
            return node
        ptr = storage_ptr(t)
        if ptr and ptr not in self.allowed_storages and self._aliases_made(ptr):
            raise GraphUnavailable(
                "an op reads a tensor that aliases memory the step made without an op (a NumPy round "
                "trip): the graph cannot follow it"
            )
        name = f"_const{len(self.constants)}"
        self.constants[name] = t
        node = self.graph.get_attr(name)
        self._constant_nodes[t] = node
        return node

    def _aliases_made(self, ptr: int) -> bool:
        live = [r for r in self.made_storages.get(ptr, ()) if (t := r()) is not None and storage_ptr(t) == ptr]
        if live:
            self.made_storages[ptr] = live
        else:
            self.made_storages.pop(ptr, None)
        return bool(live)

    def refs(self, value: Any) -> Any:
        """`value` with each tensor replaced by its node. By hand, not `pytree.tree_map_only`:
        an aten op's arguments are tensors, scalars and flat lists of them, and pytree's
        generality cost the trace 80 us per op instead of 58 on the demo
        (`overhead.py --drivers`, docs/benchmarks.md)."""
        if isinstance(value, torch.Tensor):
            return self.ref(value)
        kind = type(value)
        if kind is tuple or kind is list:
            return kind(self.refs(v) for v in value)
        if kind is dict:
            return {k: self.refs(v) for k, v in value.items()}
        return value

    def op(self, func: Any, args: Any, kwargs: dict[str, Any], meta: dict[str, Any]) -> Any:
        info = self.classify(func)
        if info.communicates:
            raise GraphUnavailable(f"a collective ({info.name}) runs once across the job: the dispatch driver runs it")
        if info.bookkeeping:
            return func(*args, **kwargs)
        node_args, node_kwargs = self.refs(args), self.refs(kwargs)
        for t in _written(info, args, kwargs):
            # What the step writes that it did not make is put back before the walk writes it again.
            if not isinstance(t, torch.Tensor) or id(t) in self._written_ids:
                continue
            # A view an op made of a parameter writes the parameter: put back through the view.
            if t not in self.nodes or storage_ptr(t) in self.allowed_storages:
                self.before_write(t)
                self._written_ids.add(id(t))
                with _disable_current_modes():
                    self.written.append((t, t.detach().clone()))
        out = func(*args, **kwargs)
        node = self.graph.call_function(func, tuple(node_args), dict(node_kwargs))
        node.meta.update(meta)
        if isinstance(out, torch.Tensor):
            self._made(out, node)
        elif isinstance(out, (tuple, list)):
            for k, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self._made(t, self.graph.call_function(operator.getitem, (node, k)))
        return out

    def _made(self, t: torch.Tensor, node: torch.fx.Node) -> None:
        self.nodes[t] = node
        ptr = storage_ptr(t)
        if ptr:
            self.made_storages.setdefault(ptr, []).append(weakref.ref(t))


class _TraceMode(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
    """Records each aten op of the step as a graph node, with the unit running it and the
    sequence number of the autograd node it made, as `ShadowMode` routes them."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # as ShadowMode: see there

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch's TorchDispatchMode is unannotated
        self.recorder = recorder

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        rec, attribution = self.recorder, self.recorder.attribution
        if types and any(t is not torch.Tensor and t is not torch.nn.Parameter for t in types):
            names = ", ".join(sorted({t.__name__ for t in types}))
            raise GraphUnavailable(f"a tensor subclass ({names}) runs its own dispatch: the dispatch driver follows it")
        kwargs = kwargs or {}
        backward = torch._C._current_graph_task_id() != -1
        if backward:
            meta = {"unit": attribution.backward_unit()[0], "backward": True, "seq": None}
            return rec.op(func, args, kwargs, meta)
        unit = rec.tracker.current
        # The autograd node exists before the op reaches a mode: numbered now, as ShadowMode does.
        meta = {"unit": unit, "backward": False, "seq": attribution.record_forward(unit)}
        # Read off the inputs' grad_fn as the pipeline's `record` would, for a walk without autograd.
        meta["input_seqs"] = tuple(grad_seqs(t) for t in tensor_leaves(args, kwargs))
        return rec.op(func, args, kwargs, meta)


@dataclass(frozen=True)
class _RngState:
    """The generators' state where the trace began: the walk draws the trace's dropout masks
    again from there."""

    device: torch.device
    cpu: torch.Tensor
    accelerator: torch.Tensor | None

    @classmethod
    def now(cls, device: torch.device) -> _RngState:
        return cls(device, torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def reset(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.cuda.set_rng_state(self.accelerator, self.device)


def trace_step(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    *,
    on_mutation: Callable[[torch.Tensor], None] = lambda t: None,
) -> StepGraph:
    """The fp32 training step (forward, loss, backward from a seed of ones) as a graph, the
    model's state as it was before (see `StepGraph.restore`) and the generator too. Raises
    `GraphUnavailable` where the graph cannot stand for the step."""
    recorder: _Recorder | None = None

    def on_exit(path: str) -> None:
        assert recorder is not None
        recorder.graph.call_function(module_exit, (path,))

    def on_output(path: str, call: int, out: Any) -> None:
        assert recorder is not None
        floats = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        recorder.graph.call_function(module_output, (path, call, [recorder.ref(t) for t in floats]))

    try:
        attribution = UnitAttribution(model, on_exit=on_exit, on_output=on_output)
        recorder = _Recorder(attribution, on_mutation)
        configure_capture(recorder, model, attribution)
        recorder.external_storages |= batch_storages(batch)
        recorder.allowed_storages = set(recorder.external_storages)
        tracker = attribution.tracker
        pre = tracker._pre

        def pre_recorded(mod: torch.nn.Module, args: Any) -> None:
            depth = len(tracker.stack)
            pre(mod, args)
            if len(tracker.stack) > depth:
                assert recorder is not None
                recorder.graph.call_function(module_enter, (tracker.stack[-1], tracker.call_stack[-1]))

        tracker._pre = pre_recorded  # type: ignore[method-assign]  # the tracker registers `self._pre` on enter
        attributes = ModuleAttributes(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        handles: list[Any] = []
        rng = _RngState.now(device)
        try:
            with tracker, dynamo_safe(_TraceMode)(recorder):
                output = run_model(model, batch)
                tracker.outside = LOSS_UNIT
                loss = resolve_loss(output, batch, loss_fn)
                with _disable_current_modes():
                    loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise GraphUnavailable(f"the fp32 loss is {loss_value}")
                loss_node = recorder.ref(loss)
                recorder.graph.call_function(forward_end, (loss_node,))
                grad_graph = _hook_backward(recorder, loss, handles)
                with _disable_current_modes():
                    seed = torch.ones_like(loss)
                loss.backward(seed)  # type: ignore[no-untyped-call]  # unannotated in torch
            grads: dict[str, torch.fx.Node] = {}
            for name, p in model.named_parameters(remove_duplicate=False):
                if p.grad is not None:
                    node = recorder.nodes.get(p.grad)
                    if node is None:
                        raise GraphUnavailable(f"the gradient of {name!r} is made outside the step's ops")
                    grads[name] = node
            del output, loss
        except GraphUnavailable:
            raise
        except (Exception, SystemExit) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise GraphUnavailable(f"the trace raised {type(e).__name__}: {first}"[:300]) from e
        finally:
            # The walk starts where the trace did: the state it wrote, the bindings its Python
            # side made (a cached mask), the generator.
            for h in handles:
                h.remove()
            attributes.restore()
            _put_back(recorder.written, model)
            rng.reset()
        consumers, accumulate, root = grad_graph
        graph = recorder.graph
        graph.output((loss_node, tuple(grads.values())))
        return StepGraph(
            graph=graph,
            constants=recorder.constants,
            loss=loss_node,
            loss_value=loss_value,
            grads=grads,
            seq_units=dict(attribution.seq_units),
            consumers=consumers,
            accumulate=accumulate,
            root=root,
            saved_bytes=[(u, r.saved_bytes) for u, r in recorder.units.items()],
            written=recorder.written,
            rng=rng,
        )
    finally:
        # The tracker's hooks reach the recorder through its cell, and the recorder holds the
        # tracker: a cycle that kept the trace's tensors alive until a full collection.
        recorder = None


def _put_back(written: list[tuple[torch.Tensor, torch.Tensor]], model: torch.nn.Module) -> None:
    with torch.no_grad():
        for t, before in written:
            t.copy_(before)
    for p in model.parameters():
        p.grad = None


def _hook_backward(
    recorder: _Recorder, loss: torch.Tensor, handles: list[Any]
) -> tuple[dict[int, list[GradNode]], dict[int, GradNode], GradNode | None]:
    """The autograd graph of the traced step, as `ShadowCapture.instrument_backward` walks it:
    the nodes' stand-ins, who consumes whose gradient, the saved activations per unit, and a
    prehook on each node the statistics read that records where autograd hands it its
    gradients."""
    consumers: dict[int, list[GradNode]] = {}
    accumulate: dict[int, GradNode] = {}
    stand_ins: dict[int, GradNode] = {}

    def stand_in(node: Any) -> GradNode:
        s = stand_ins.get(id(node))
        if s is None:
            s = stand_ins[id(node)] = GradNode(node._sequence_nr(), node.name())
        return s

    root = loss.grad_fn
    if root is None:
        return consumers, accumulate, None
    seen: set[int] = set()
    stack = [root]
    with _disable_current_modes():
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            recorder._count_saved(node)
            nexts = [n for n, _ in node.next_functions if n is not None]
            for n in nexts:
                consumers.setdefault(id(stand_in(n)), []).append(stand_in(node))
            variable = getattr(node, "variable", None)
            if variable is not None:
                accumulate[id(variable)] = stand_in(node)
            elif node is not root and not rearranges(node):
                handles.append(node.register_prehook(_grad_recorder(recorder, stand_in(node))))
            stack.extend(nexts)
    return consumers, accumulate, stand_in(root)


def _grad_recorder(recorder: _Recorder, node: GradNode) -> Callable[[Any], None]:
    def hook(grad_outputs: Any) -> None:
        with _disable_current_modes():
            refs = tuple(recorder.ref(g) if isinstance(g, torch.Tensor) else g for g in grad_outputs)
        args: tuple[Any, ...] = (node, refs)  # a GradNode is no fx Argument: the walk reads it as is
        recorder.graph.call_function(gradients, args)

    return hook


# --- the walk --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ref:
    slot: int


@dataclass(frozen=True, slots=True)
class _Seq:
    kind: type
    items: tuple[Any, ...]


def _encode(value: Any, slots: dict[torch.fx.Node, int]) -> Any:
    if isinstance(value, torch.fx.Node):
        return _Ref(slots[value])
    if isinstance(value, (tuple, list)):
        # fx keeps lists as its immutable_list: the op gets a plain one, as it did when traced.
        kind = list if isinstance(value, list) else tuple
        items = tuple(_encode(v, slots) for v in value)
        return _Seq(kind, items) if any(_has_ref(v) for v in items) else kind(items)
    return value


def _load(env: list[Any], value: Any) -> Any:
    kind = type(value)
    if kind is _Ref:
        return env[value.slot]
    if kind is _Seq:
        return value.kind(_load(env, v) for v in value.items)
    return value


def _has_ref(value: Any) -> bool:
    return type(value) is _Ref or (type(value) is _Seq and any(_has_ref(v) for v in value.items))


# Instruction kinds of the compiled walk.
_OP, _GETITEM, _ENTER, _EXIT, _OUTPUT, _FORWARD_END, _GRADS, _RESULT = range(8)


@dataclass(frozen=True, slots=True)
class _Instruction:
    kind: int
    slot: int
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    plain: bool  # no argument reads a slot: args and kwargs as they are
    meta: tuple[Any, ...]  # an op's (unit, backward, seq, the grad_fn sequence numbers of its inputs)
    free: tuple[int, ...]  # slots nothing reads after this instruction


def compile_walk(step: StepGraph) -> tuple[list[_Instruction], list[Any]]:
    """The graph as a flat program over numbered slots (the environment's initial values: the
    constants), each value's slot emptied after its last reader, as the eager run frees it."""
    nodes = list(step.graph.nodes)
    slots = {n: i for i, n in enumerate(nodes)}
    env: list[Any] = [None] * len(nodes)
    last_use: dict[torch.fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for used in n.all_input_nodes:
            last_use[used] = i
    frees: dict[int, list[int]] = {}
    for n, i in last_use.items():
        frees.setdefault(i, []).append(slots[n])
    program: list[_Instruction] = []
    kinds = {
        module_enter: _ENTER,
        module_exit: _EXIT,
        module_output: _OUTPUT,
        forward_end: _FORWARD_END,
        gradients: _GRADS,
        operator.getitem: _GETITEM,
    }
    for i, n in enumerate(nodes):
        if n.op == "get_attr":
            env[i] = step.constants[str(n.target)]
            continue
        if n.op == "output":
            kind = _RESULT
        elif n.op == "call_function":
            kind = kinds.get(n.target, _OP)
        else:
            raise GraphUnavailable(f"unexpected graph node {n.op}")
        args = tuple(_encode(a, slots) for a in n.args)
        kwargs = {k: _encode(v, slots) for k, v in n.kwargs.items()}
        meta: tuple[Any, ...] = ()
        if kind == _OP:
            meta = (n.meta["unit"], n.meta["backward"], n.meta["seq"], n.meta.get("input_seqs"))
        plain = not any(_has_ref(a) for a in (*args, *kwargs.values()))
        free = tuple(frees.get(i, ())) if kind != _RESULT else ()
        program.append(_Instruction(kind, i, n.target, args, kwargs, plain, meta, free))
    return program, env


class GraphCapture(ShadowCapture):
    """The pipeline driven by a walk over a `StepGraph` (`replay`): the same records, units
    and gradient statistics as `ShadowCapture` under `ShadowMode` gets from the eager step."""

    def replay(self, step: StepGraph, model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Walk the step: returns the fp32 loss and each parameter's gradient. Raises
        `GraphUnavailable` where the walk's loss is not the trace's (nothing of the walk is
        undone then: `StepGraph.restore` puts the state back)."""
        program, env = step.program()
        self.seq_units.update(step.seq_units)
        tracker = self.tracker
        run, classify = self.run, self.classify
        result: Any = None
        with torch.no_grad():
            for ins in program:
                kind = ins.kind
                if kind == _OP:
                    if ins.plain:
                        args, kwargs = ins.args, ins.kwargs
                    else:
                        args = tuple(_load(env, a) for a in ins.args)
                        kwargs = {k: _load(env, v) for k, v in ins.kwargs.items()} if ins.kwargs else {}
                    unit, backward, seq, input_seqs = ins.meta
                    op = Op(ins.target, classify(ins.target), args, kwargs, backward, unit, seq)
                    op.input_seqs = input_seqs
                    env[ins.slot] = run(op)
                elif kind == _GETITEM:
                    env[ins.slot] = env[ins.args[0].slot][ins.args[1]]
                elif kind == _ENTER:
                    tracker.stack.append(ins.args[0])
                    tracker.call_stack.append(ins.args[1])
                elif kind == _EXIT:
                    tracker.stack.pop()
                    tracker.call_stack.pop()
                    self.unit_exited(ins.args[0])
                elif kind == _OUTPUT:
                    path, call, outs = ins.args
                    self.module_output(path, call, _load(env, outs))
                elif kind == _FORWARD_END:
                    self._forward_end(step, _load(env, ins.args[0]))
                elif kind == _GRADS:
                    node, grads = ins.args
                    self._gradient_hook(node)(_load(env, grads))
                else:
                    result = _load(env, ins.args[0])
                for s in ins.free:
                    env[s] = None
        self.settle()
        loss, grad_values = result
        return loss, dict(zip(step.grads, grad_values, strict=True))

    def _forward_end(self, step: StepGraph, loss: torch.Tensor) -> None:
        """Between forward and backward, as `engine._fp32_backward` has it: the walk's loss must
        be the trace's, the forward's shadows go, the backward graph is adopted."""
        value = float(loss)
        if value != step.loss_value:
            raise GraphUnavailable(
                f"the walked forward's loss {value!r} is not the traced step's {step.loss_value!r}: the step "
                "depends on something its ops do not carry (a reseeded generator, Python state)"
            )
        self.instrument_backward(loss)  # no autograd graph here: only the forward's shadows go
        for unit, saved in step.saved_bytes:
            self.unit(unit).saved_bytes += saved
        self._consumers.update(step.consumers)
        self._accumulate_nodes.update(step.accumulate)
        if step.root is not None:
            self._grad_finite[id(step.root)] = True


def graph_capture(
    model: torch.nn.Module,
    low_dtype: torch.dtype,
    low_units: LowUnits,
    *,
    on_mutation: Callable[[torch.Tensor], None] = lambda t: None,
    op_dtypes: Mapping[OpKey, OpDtypes] | None = None,
    module_outputs: dict[tuple[str, int], list[torch.Tensor]] | None = None,
    default_low: bool = False,
) -> GraphCapture:
    """A `GraphCapture` set up as `shadow.capture_pass` sets up its `ShadowCapture` (no hooks,
    no mode: the walk says which unit runs)."""
    attribution = UnitAttribution(model)
    capture = GraphCapture(
        attribution,
        low_dtype,
        low_units,
        collect=True,
        local=True,
        on_mutation=on_mutation,
        op_dtypes=op_dtypes,
        default_low=default_low,
    )
    capture.module_outputs = module_outputs if module_outputs is not None else {}
    configure_capture(capture, model, attribution)
    return capture

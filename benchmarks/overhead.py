"""Overhead of `precision_doctor.analyze` against one plain fp32 training step.

    python benchmarks/overhead.py [--model demo|gpt2|all] [--dtype fp16|bf16|all] [--repeats N] [--analyze-repeats N]
    python benchmarks/overhead.py --drivers [--model demo|gpt2|gpt2-short|all] [--repeats N]

For each model (the demo `sample_models/tiny_transformer.py`, and a GPT-2-small-sized
`transformers.GPT2LMHeadModel(GPT2Config())` with random weights, 124M parameters, batch of
2 x 128 tokens with labels = input_ids) this measures, in one process:

1. the wall time of one plain fp32 training step: forward + loss + backward +
   `optimizer.step()`, grads zeroed (set to None) between steps. The optimizer is plain
   SGD (lr=1e-3, no momentum): it is the cheapest optimizer, so its update adds almost
   nothing on top of forward + backward and the step time is close to the fp32 fwd+bwd
   cost the analysis has to be compared with; Adam would add ~3 extra parameter-sized
   passes per step (and 2x parameter memory of state), which would flatter the ratios.
   Median of `--repeats` steps after a warm-up step;
2. the wall time of the same step under a bare pass-through `TorchDispatchMode` (for
   context: the cost of Python dispatch alone, and the number of aten ops in a step), and
   under a mode that also reruns each forward float op once on fp16-rounded inputs and
   rounds the result (`ShadowFloor`): the least any per-op shadow can cost, before the
   second (local) shadow, statistics, records and the report that the analysis adds;
3. the wall time of the same step as the analysis' low run executes it (`low_precision`:
   autocast with CUDA's op lists, the arithmetic emulated where the analysis emulates it -
   fp16 on the CPU, bf16 on a CPU without fast bf16 kernels) and the *two-run floor*, the fp32
   step plus that low step: the least any analysis that runs both can take;
4. the wall time of a full `precision_doctor.analyze(model, batch, loss_fn, dtype)` on
   the same batch (median of a few repeats after a warm-up one, fewer for GPT-2, each
   followed by two more timed steps that join the step median);
5. peak memory of a step and of an analysis. RSS high-water (`ru_maxrss`) is
   process-wide and never goes down, so each is measured in a fresh subprocess
   (`--child step|analyze`) that builds the model, records its baseline, runs, and reports
   `ru_maxrss` back as JSON, with how much of the increment is file-backed (library code
   paged in on first use, shared and clean) rather than anonymous memory.

Targets (issue 25): GPT-2 small 2x128 <= 2.5x a step and memory <= 1.3x; a model with a
step under 100 ms (the demo) <= 5x or 0.5 s, whichever is larger.

`--drivers` measures the capture drivers instead (`analyze(driver=...)`), in process CPU time
at one thread (the least of `--repeats`): the fixed cost per captured op, in microseconds, of
each driver on its own (the op pipeline replaced by running
the op: `null_pipeline`), over a plain fp32 forward + loss + backward, for the dispatch
driver (`ShadowMode` on the eager step), the graph driver's trace (`trace_step`) and its walk
(`GraphCapture.replay` of the traced graph); then whole analyses by each driver: dispatch, the
graph traced and walked, and a kept graph walked again (`capture.graph_cache`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import precision_doctor  # noqa: E402
from precision_doctor.model.spec import load_model_file, resolve_loss, run_model  # noqa: E402

DEMO_FILE = ROOT / "sample_models" / "tiny_transformer.py"
MEM_TARGET = 1.3


def time_target(model_name: str, step_s: float) -> float:
    """The issue's time target as a ratio to the step: 2.5 for GPT-2 small, 3 for a step of
    100 ms or more, else 5x or 0.5 s whichever is larger."""
    if model_name == "gpt2":
        return 2.5
    if step_s >= 0.1:
        return 3.0
    return max(5.0, 0.5 / step_s)


GPT2_BATCH, GPT2_SEQ = 2, 128


# --- models --------------------------------------------------------------------------------


def build(name: str) -> tuple[torch.nn.Module, Any, Callable[[Any, Any], torch.Tensor] | None]:
    """(model, batch, loss_fn). loss_fn None means: the output's `.loss`."""
    if name == "demo":
        spec = load_model_file(DEMO_FILE)
        return spec.model, spec.batch, spec.loss_fn
    if name in ("gpt2", "gpt2-short"):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config())  # random weights, nothing downloaded
        model.train()  # a training step: dropout on, as analyze sees it
        g = torch.Generator().manual_seed(1)
        # gpt2-short (`--drivers`): the same ops on 1 x 8 tokens, where the kernels are short
        # enough for a driver's per-op cost to show.
        shape = (GPT2_BATCH, GPT2_SEQ) if name == "gpt2" else (1, 8)
        ids = torch.randint(0, model.config.vocab_size, shape, generator=g)
        return model, {"input_ids": ids, "labels": ids}, None
    raise SystemExit(f"unknown model {name!r}")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def make_low_step(model: torch.nn.Module, batch: Any, loss_fn: Any, dtype: str) -> Callable[[], None]:
    """The step as the analysis' low run executes it, no optimizer: forward and loss in
    `low_precision` (autocast, CUDA's op lists, emulated where the analysis emulates), the
    backward of the loss scaled by 2^10 in `low_precision_backward`."""
    from precision_doctor.capture.lowrun import low_precision, low_precision_backward

    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with low_precision(model, low, regime="autocast", policy="cuda"):
            loss = resolve_loss(run_model(model, batch), batch, loss_fn)
        with low_precision_backward(model, low):
            (loss.float() * 1024.0).backward()
        model.zero_grad(set_to_none=True)

    return step


def make_step(model: torch.nn.Module, batch: Any, loss_fn: Any) -> Callable[[], float]:
    # SGD without momentum: no optimizer state, the cheapest update (see the module doc).
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = resolve_loss(run_model(model, batch), batch, loss_fn)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


class PassThrough(TorchDispatchMode):
    """A bare dispatch mode: every aten op goes through Python once, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


class ShadowFloor(PassThrough):
    """PassThrough plus one low-precision shadow of every forward float op: inputs rounded to
    fp16 and back, the op run again, its result rounded. No statistics, no records."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = super().__torch_dispatch__(func, types, args, kwargs)
        forward = torch._C._current_graph_task_id() == -1
        if forward and not func.is_view and isinstance(out, torch.Tensor) and out.dtype == torch.float32:

            def rounded(a: Any) -> Any:
                is_float = isinstance(a, torch.Tensor) and a.dtype == torch.float32
                return a.to(torch.float16).float() if is_float else a

            func(*[rounded(a) for a in args], **kwargs).to(torch.float16)
        return out


# --- measurements --------------------------------------------------------------------------


def timed(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, kernel: list[float] | None = None
) -> tuple[list[float], list[float]]:
    """(wall times, process CPU times) of `repeats` calls after `warmup` calls; the CPU time
    spent in the kernel (system time: on Linux mostly page faults) appended to `kernel`."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        t0, c0, k0 = time.perf_counter(), time.process_time(), os.times().system
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if kernel is not None:
            kernel.append(os.times().system - k0)
    return walls, cpus


def rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_split_mib() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory now."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) / 1024
    return found.get("RssAnon", math.nan), found.get("RssFile", math.nan)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return maxrss_mib()


class RssSampler:
    """Polls the current RSS every ~2 ms on a thread and keeps the maximum: a cross-check
    of the kernel's high-water mark for memory the allocator returns with madvise."""

    def __init__(self) -> None:
        import threading

        self.peak = rss_now_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_now_mib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_now_mib())


def warm_imports(analyze: Callable[..., Any] = precision_doctor.analyze) -> None:
    """A step and an analysis (`analyze(model, batch, loss_fn)`) of a 2-parameter model, and
    the statistics' compiled loops: what either side imports lazily is in the baseline of both
    (the first `optimizer.step()` imports torch._dynamo & co., ~85 MiB)."""
    from precision_doctor.capture import cpu_kernels
    from precision_doctor.capture.statistics import ErrorAccumulator, summarize

    tiny = torch.nn.Linear(2, 1)
    make_step(tiny, torch.ones(1, 2), lambda out, b: out.sum())()
    analyze(tiny, torch.ones(1, 2), lambda out, b: out.sum())
    del tiny
    # The statistics' compiled loops (numba and its LLVM: ~120 MiB, 80 of them file-backed)
    # load at the first tensor of MIN_ELEMENTS values, which the tiny analysis has none of.
    x = torch.ones(cpu_kernels.MIN_ELEMENTS)
    summarize(x, with_sumsq=True)
    ErrorAccumulator().add(x, x.half())
    gc.collect()


def reset_high_water() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (`/proc/self/clear_refs` <- 5);
    False where that is not possible (not Linux >= 4.0, or not allowed: the baseline is then
    the high-water mark)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_mib(run: Callable[[], Any]) -> tuple[float, float]:
    """(baseline, peak) RSS in MiB around `run()`: the high-water mark reset to the current RSS
    first, the peak the larger of the kernel's mark and a 2 ms sampler's (see `child`)."""
    gc.collect()
    reset_high_water()
    base = vm_hwm_mib()
    with RssSampler() as sampler:
        run()
    return base, max(vm_hwm_mib(), sampler.peak)


def child(kind: str, model_name: str, dtype: str = "fp16") -> None:
    """Runs in a fresh process; prints one JSON line with the RSS figures (MiB).

    Peak = the kernel's RSS high-water mark, reset to the current RSS once the model and
    batch are built (`/proc/self/clear_refs` <- 5). Building GPT-2 peaks far above what
    the built model holds (3.8 GiB vs ~0.8 GiB), so without the reset that transient would
    be the "peak" of both the step and the analysis. After the reset the high-water mark is
    read from /proc/self/status (VmHWM), not from getrusage: `ru_maxrss` also folds in the
    process-wide maximum saved when a thread exits (torch's worker threads), which the reset
    does not clear. `ru_maxrss` is still reported (`ru_maxrss`) and a 2 ms RSS sampler
    cross-checks the high-water mark; the larger of the two is the peak.
    """
    # Both children first import everything either side imports lazily: the first
    # optimizer.step() pulls in torch._dynamo & co. (~800 modules, ~85 MiB), analyze pulls
    # in torch.fx bits. A tiny model's step and analysis do that here, before the baseline,
    # so neither increment counts library code.
    warm_imports()
    rss_import = rss_now_mib()
    model, batch, loss_fn = build(model_name)
    step = make_step(model, batch, loss_fn) if kind == "step" else None
    gc.collect()
    build_hwm = vm_hwm_mib()
    reset = reset_high_water()
    base = vm_hwm_mib()
    anon0, file0 = rss_split_mib()
    with RssSampler() as sampler:
        if kind == "step":
            assert step is not None
            step()
            step()  # the second step runs with the allocator warm; the peak is a max anyway
        else:
            precision_doctor.analyze(model, batch, loss_fn=loss_fn, dtype=dtype)
    anon1, file1 = rss_split_mib()
    out = {
        # Library code pages stay resident once touched, so the file-backed part of the
        # increment at the end is what it was at the peak.
        "file_increment": file1 - file0,
        "anon_increment": anon1 - anon0,
        "rss_import": rss_import,
        "build_hwm": build_hwm,
        "base": base,
        "reset": reset,
        "hwm": vm_hwm_mib(),
        "sampled": sampler.peak,
        "ru_maxrss": maxrss_mib(),
    }
    out["peak"] = max(out["hwm"], out["sampled"])
    print(json.dumps(out))


def run_child(kind: str, model_name: str, dtype: str = "fp16") -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", model_name, "--dtype", dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child {kind}/{model_name} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench(model_name: str, repeats: int, analyze_repeats: int | None, dtype: str = "fp16") -> dict[str, Any]:
    model, batch, loss_fn = build(model_name)
    step = make_step(model, batch, loss_fn)
    step_kernel: list[float] = []
    analyze_kernel: list[float] = []
    step_times, step_cpu = timed(step, repeats, kernel=step_kernel)

    def bare_step() -> None:
        with PassThrough():
            step()

    bare_times, bare_cpu = timed(bare_step, max(1, repeats // 2))

    def floor_step() -> None:
        with ShadowFloor():
            step()

    floor_times, _ = timed(floor_step, max(1, repeats // 2))
    low_times, _ = timed(make_low_step(model, batch, loss_fn, dtype), max(1, repeats // 2))
    with PassThrough() as counter:
        step()
    bare_ops = counter.ops

    # analyze restores the model (grads, RNG, buffers) on exit, so repeats see the same state.
    reports: list[Any] = []

    def one_analysis() -> None:
        reports[:] = [precision_doctor.analyze(model, batch, loss_fn=loss_fn, dtype=dtype)]

    # One warm-up analysis, as the step gets one: the first call in a process pays one-time
    # costs (op schema parsing, first-touch of the allocator's pages) a user pays once.
    # Analyses are interleaved with steps, so a slow spell on a shared machine hits both
    # sides of the ratio alike; those steps join the step median.
    a_reps = analyze_repeats or (repeats if model_name == "demo" else 5)
    one_analysis()
    analyze_times, analyze_cpu = [], []
    for _ in range(a_reps):
        walls, cpus = timed(one_analysis, 1, warmup=0, kernel=analyze_kernel)
        analyze_times += walls
        analyze_cpu += cpus
        walls, cpus = timed(step, 2, warmup=0, kernel=step_kernel)
        step_times += walls
        step_cpu += cpus
    report = reports[0]
    params = n_params(model)
    reports.clear()
    gc.collect()  # the parent's memory is not measured: the children below build their own

    mem_step = run_child("step", model_name)
    mem_analyze = run_child("analyze", model_name, dtype)
    return {
        "model": model_name,
        "dtype": dtype,
        "emulated": report.environment.emulated,
        "low_step": statistics.median(low_times),
        "params": params,
        "step": statistics.median(step_times),
        "step_all": step_times,
        "step_cpu": statistics.median(step_cpu),
        "bare_cpu": statistics.median(bare_cpu),
        "analyze_cpu": statistics.median(analyze_cpu),
        "step_kernel": statistics.median(step_kernel),
        "analyze_kernel": statistics.median(analyze_kernel),
        "bare": statistics.median(bare_times),
        "floor": statistics.median(floor_times),
        "bare_ops": bare_ops,
        "analyze": statistics.median(analyze_times),
        "analyze_all": analyze_times,
        "ops_fwd": report.op_count_forward,
        "ops_bwd": report.op_count_backward,
        "mem_step": mem_step,
        "mem_analyze": mem_analyze,
    }


# --- drivers -------------------------------------------------------------------------------


def null_pipeline(capture: Any) -> Any:
    """`capture` with the op pipeline's work taken out: each op only runs, module outputs and
    gradients are not looked at. What is left is the driver's own cost."""
    capture.run = lambda op: op.func(*op.args, **op.kwargs)
    capture.module_output = lambda *a: None
    capture._gradient_hook = lambda node: lambda grads: None
    return capture


def bench_drivers(model_name: str, repeats: int) -> dict[str, Any]:
    from precision_doctor.capture.graph_cache import GRAPHS
    from precision_doctor.capture.graph_driver import graph_capture, trace_step
    from precision_doctor.capture.shadow import LowUnits, capture_pass
    from precision_doctor.capture.units import LOSS_UNIT

    model, batch, loss_fn = build(model_name)
    units = LowUnits({"": True, LOSS_UNIT: False})

    def eager() -> None:
        loss = resolve_loss(run_model(model, batch), batch, loss_fn)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    def dispatch() -> None:
        with capture_pass(model, torch.float16, units) as capture:
            null_pipeline(capture)
            eager()

    state = torch.get_rng_state()
    step = trace_step(model, batch, loss_fn)

    def trace() -> None:
        trace_step(model, batch, loss_fn)

    def walk() -> None:
        step.restore(model)  # the generator where the trace began: the walk's loss is the trace's
        null_pipeline(graph_capture(model, torch.float16, units)).replay(step, model)

    # Process CPU time at one thread, the least of the repeats: the fixed costs are Python's,
    # and a machine shared with other jobs inflates wall times by several times.
    # Interleaved, round by round: a slow spell weighs on every driver alike.
    kinds = {"eager": eager, "dispatch": dispatch, "trace": trace, "walk": walk}
    cpu: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in kinds.items():
            torch.set_rng_state(state)
            cpu[name] += timed(fn, 1, warmup=0)[1]
    times = {name: min(ts[1:]) for name, ts in cpu.items()}
    step.restore(model)
    analyses = {}
    for driver in ("dispatch", "graph"):

        def one(driver: str = driver) -> None:
            GRAPHS.clear()  # a first analysis: the graph driver traces
            precision_doctor.analyze(model, batch, loss_fn=loss_fn, dtype="fp16", driver=driver)

        analyses[driver] = min(timed(one, max(1, repeats // 2))[1])
    GRAPHS.clear()
    precision_doctor.analyze(model, batch, loss_fn=loss_fn, dtype="fp16", driver="graph")

    def kept() -> None:
        report = precision_doctor.analyze(model, batch, loss_fn=loss_fn, dtype="fp16", driver="auto")
        assert report.environment.capture_path == "graph", report.environment.driver_reason

    analyses["kept"] = min(timed(kept, max(1, repeats // 2), warmup=0)[1])
    return {"model": model_name, "ops": step.op_count, "times": times, "analyses": analyses, "hits": GRAPHS.hits}


def print_drivers(rows: list[dict[str, Any]]) -> None:
    load = os.getloadavg()
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread, load average {load[0]:.1f}; process CPU "
        "time, the least of the repeats"
    )
    hdr = (
        f"{'model':<6} {'ops':>5} {'eager ms':>9} {'dispatch us/op':>15} {'trace us/op':>12} {'walk us/op':>11} "
        f"{'analyze: dispatch s':>20} {'graph s':>8} {'kept graph s':>13}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        t, a, n = r["times"], r["analyses"], r["ops"]
        per_op = {k: 1e6 * (t[k] - t["eager"]) / n for k in ("dispatch", "trace", "walk")}
        print(
            f"{r['model']:<6} {n:>5} {1e3 * t['eager']:>9.1f} {per_op['dispatch']:>15.1f} {per_op['trace']:>12.1f} "
            f"{per_op['walk']:>11.1f} {a['dispatch']:>20.3f} {a['graph']:>8.3f} {a['kept']:>13.3f}"
        )
    print(
        "\nus/op: (the driver's pass with the op pipeline taken out - a plain fp32 forward+loss+backward) / the "
        "step's aten ops. analyze: fp16 by the dispatch driver, by the graph driver tracing; kept graph: the same "
        "analysis again, which walks the graph the first one kept (driver auto)."
    )


# --- output --------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    def ok(v: float, target: float) -> str:
        return "ok" if v <= target else "MISS"

    print()
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; times are medians, memory is RSS in MiB"
    )
    hdr = (
        f"{'model':<6} {'dtype':<10} {'params':>7} {'step s':>8} {'low step s':>10} {'floor x':>7} {'analyze s':>10} "
        f"{'time x':>7} {'target':>6} {'':>4} {'peak step':>10} {'peak anlz':>10} {'+step':>8} {'+anlz':>8} "
        f"{'mem x':>6} {'(<=1.3)':>7} {'raw x':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ms, ma = r["mem_step"], r["mem_analyze"]
        # The memory ratio checked against the 1.5 target is the ratio of the INCREMENTS
        # (peak RSS minus the RSS after imports + model construction). The raw peaks also
        # hold the Python interpreter, torch's libraries (~400 MiB) and the weights, which
        # neither the step nor the analysis allocates: including them dilutes the ratio
        # towards 1 (the larger the runtime, the better any tool would look). The raw-peak
        # ratio is printed as `raw x` for reference only.
        inc_s = ms["peak"] - ms["base"]
        inc_a = ma["peak"] - ma["base"]
        mem_x = inc_a / inc_s if inc_s > 0 else float("inf")
        raw_x = ma["peak"] / ms["peak"]
        time_x = r["analyze"] / r["step"]
        target = time_target(r["model"], r["step"])
        floor_x = (r["step"] + r["low_step"]) / r["step"]
        dtype = f"{r['dtype']}{' (emu)' if r['emulated'] else ''}"
        print(
            f"{r['model']:<6} {dtype:<10} {r['params'] / 1e6:>6.2f}M {r['step']:>8.3f} {r['low_step']:>10.3f} "
            f"{floor_x:>7.2f} {r['analyze']:>10.3f} {time_x:>7.2f} {target:>6.1f} {ok(time_x, target):>4} "
            f"{ms['peak']:>10.0f} {ma['peak']:>10.0f} {inc_s:>8.0f} {inc_a:>8.0f} {mem_x:>6.2f} "
            f"{ok(mem_x, MEM_TARGET):>7} {raw_x:>6.2f}"
        )
    print()
    print("details:")
    for r in rows:
        ms, ma = r["mem_step"], r["mem_analyze"]
        print(
            f"  {r['model']}: step times {[round(t, 3) for t in r['step_all']]}, "
            f"analyze times {[round(t, 3) for t in r['analyze_all']]}"
        )
        print(
            f"  {r['model']}: bare dispatch-mode step {r['bare']:.3f} s = {r['bare'] / r['step']:.2f}x step, "
            f"{r['bare_ops']} aten ops per step (incl. optimizer); analyze records {r['ops_fwd']} forward + "
            f"{r['ops_bwd']} backward ops, {1e3 * r['analyze'] / max(1, r['ops_fwd'] + r['ops_bwd']):.2f} ms per op"
        )
        print(
            f"  {r['model']}: shadow floor (bare mode + one fp16-rounded rerun of each forward float op, nothing "
            f"else) {r['floor']:.3f} s = {r['floor'] / r['step']:.2f}x step"
        )
        print(
            f"  {r['model']}: process CPU time (robust to other load on the machine): step {r['step_cpu']:.3f} s, "
            f"bare-mode {r['bare_cpu']:.3f} s, analyze {r['analyze_cpu']:.3f} s, ratio {r['analyze_cpu'] / r['step_cpu']:.1f}x"
        )
        print(
            f"  {r['model']}: of which in the kernel (system time; page faults of fresh memory, whose cost "
            f"depends on the host): step {r['step_kernel']:.3f} s, analyze {r['analyze_kernel']:.3f} s"
        )
        print(
            f"  {r['model']}: baseline RSS after model construction: step child {ms['base']:.0f} MiB, "
            f"analyze child {ma['base']:.0f} MiB (high-water reset: {ms['reset']}; before building the model: "
            f"{ms['rss_import']:.0f} MiB; ru_maxrss step/analyze {ms['ru_maxrss']:.0f}/{ma['ru_maxrss']:.0f} MiB); "
            f"increment ratio incl. weights (peak - RSS before the model): "
            f"{(ma['peak'] - ma['rss_import']) / (ms['peak'] - ms['rss_import']):.2f}"
        )
        print(
            f"  {r['model']}: file-backed part of the increment (library code paged in): step "
            f"{ms['file_increment']:.1f} MiB, analyze {ma['file_increment']:.1f} MiB; anonymous at the end: step "
            f"{ms['anon_increment']:.1f} MiB, analyze {ma['anon_increment']:.1f} MiB"
        )
    print()
    print(
        "columns: step = plain fp32 fwd+loss+bwd+SGD.step; low step = fwd+loss+bwd as the analysis' low run "
        "executes it ((emu): emulated on this CPU); floor x = (step + low step) / step, the least an analysis "
        "running both can take; time x = analyze/step, against the issue's target; peak step/anlz = RSS high-water (VmHWM, reset after model build) of a fresh process; "
        "+step/+anlz = peak minus RSS after model construction; mem x = +anlz/+step (the target ratio); "
        "raw x = peak anlz/peak step"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["demo", "gpt2", "gpt2-short", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=10, help="timed training steps (median)")
    ap.add_argument(
        "--analyze-repeats",
        type=int,
        default=None,
        help="timed analyses after one warm-up (default: repeats for demo, 5 for gpt2)",
    )
    ap.add_argument("--dtype", choices=["fp16", "bf16", "all"], default="fp16", help="the analysis' low dtype")
    ap.add_argument("--drivers", action="store_true", help="the capture drivers' fixed cost per op instead")
    ap.add_argument("--child", choices=["step", "analyze"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model, a.dtype)
        return
    names = ["demo", "gpt2"] if a.model == "all" else [a.model]
    if a.drivers:
        torch.set_num_threads(1)
        print_drivers([bench_drivers(name, a.repeats) for name in names])
        return
    rows = []
    dtypes = ["fp16", "bf16"] if a.dtype == "all" else [a.dtype]
    for name in names:
        for dtype in dtypes:
            print(f"benchmarking {name} {dtype} ...", file=sys.stderr, flush=True)
            rows.append(bench(name, a.repeats, a.analyze_repeats, dtype))
    print_table(rows)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

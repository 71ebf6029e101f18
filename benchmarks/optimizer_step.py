"""What the optimizer step's measurement adds to an analysis (`analyze --lr`, LOST_UPDATE).

    python benchmarks/optimizer_step.py [--model demo|gpt2] [--lr 1e-4] [--dtype fp16|bf16]
        [--regime autocast|pure] [--repeats N]

In one process, interleaved so a slow spell of a shared machine weighs on every side alike:
the plain fp32 training step of `overhead.py` (SGD, the cheapest update), an analysis without
the step, and the same analysis that also runs one real AdamW step at `--lr` twice on copies
(fp32 parameters, and parameters and state in the low dtype) and compares them parameter by
parameter. Then the peak RSS increment of each analysis in a fresh process (`overhead.py`'s
method: the kernel's high-water mark reset after the model is built). Prints the times, the
process CPU times, both ratios to the step, and the memory of each analysis against a step.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead

import precision_doctor


def _analyze(model: Any, batch: Any, loss_fn: Any, dtype: str, regime: str, lr: float | None) -> Any:
    return precision_doctor.analyze(model, batch, loss_fn=loss_fn, dtype=dtype, regime=regime, lr=lr)


def child(model_name: str, dtype: str, regime: str, lr: float | None) -> None:
    """A fresh process: the RSS increment (MiB) of one step (lr < 0) or one analysis."""
    overhead.warm_imports(lambda m, b, f: _analyze(m, b, f, dtype, regime, 1e-3))  # the step's imports too
    model, batch, loss_fn = overhead.build(model_name)
    if lr is not None and lr < 0:
        step = overhead.make_step(model, batch, loss_fn)
        base, peak = overhead.peak_mib(lambda: (step(), step()))
    else:
        base, peak = overhead.peak_mib(lambda: _analyze(model, batch, loss_fn, dtype, regime, lr))
    print(json.dumps({"increment": peak - base}))


def increment(model_name: str, dtype: str, regime: str, lr: float | None) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model_name]
    cmd += ["--dtype", dtype, "--regime", regime, "--lr", str(lr if lr is not None else 0.0)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["increment"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["demo", "gpt2"], default="gpt2")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--regime", choices=["autocast", "pure"], default="autocast")
    ap.add_argument("--repeats", type=int, default=3, help="timed analyses of each kind")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:  # --lr 0: no optimizer step; --lr -1: a plain training step
        child(a.model, a.dtype, a.regime, a.lr if a.lr != 0 else None)
        return
    model, batch, loss_fn = overhead.build(a.model)
    step = overhead.make_step(model, batch, loss_fn)
    step_t, step_c = overhead.timed(step, 2)
    times: dict[str, list[float]] = {"without": [], "with": []}
    cpus: dict[str, list[float]] = {"without": [], "with": []}
    reports: dict[str, Any] = {}
    for kind, lr in (("without", None), ("with", a.lr)):  # warm-up analyses
        reports[kind] = _analyze(model, batch, loss_fn, a.dtype, a.regime, lr)
    for _ in range(a.repeats):
        for kind, lr in (("without", None), ("with", a.lr)):
            gc.collect()
            w, c = overhead.timed(lambda lr=lr: _analyze(model, batch, loss_fn, a.dtype, a.regime, lr), 1, warmup=0)
            times[kind] += w
            cpus[kind] += c
        w, c = overhead.timed(step, 1, warmup=0)
        step_t += w
        step_c += c
    del reports
    gc.collect()
    s, sc = statistics.median(step_t), statistics.median(step_c)
    mem_step = increment(a.model, a.dtype, a.regime, -1.0)
    print(f"{a.model}: {a.dtype}, regime {a.regime}, AdamW at lr {a.lr:g}; torch {torch.__version__}")
    print(f"  plain fp32 step: {s:.3f} s (CPU {sc:.3f} s), RSS increment {mem_step:.0f} MiB")
    for kind, lr in (("without", None), ("with", a.lr)):
        t, c = statistics.median(times[kind]), statistics.median(cpus[kind])
        mem = increment(a.model, a.dtype, a.regime, lr)
        print(
            f"  analysis {kind} the optimizer step: {t:.3f} s = {t / s:.2f}x the step (CPU {c / sc:.2f}x; "
            f"all {[round(x, 3) for x in times[kind]]}), RSS increment {mem:.0f} MiB = {mem / mem_step:.2f}x"
        )


if __name__ == "__main__":
    main()

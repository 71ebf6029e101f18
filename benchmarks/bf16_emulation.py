"""bf16 on the CPU: real bf16 kernels against the emulation (fp32 kernels, rounded results).

    python benchmarks/bf16_emulation.py [--model demo|gpt2-fixture|gpt2-4l|all] [--repeats N]

Per model, in one process (medians of `--repeats` after one warm-up):

1. `fp32 s`: a plain fp32 forward + loss + backward;
2. `bf16 real s`: the same under a real `torch.autocast("cpu", torch.bfloat16)` on the CPU's
   bf16 kernels, backward outside the region;
3. `bf16 emul s`: the same in `capture.lowrun.low_precision(..., emulate=True)` (autocast with
   CPU's op lists, each bf16 op run as an fp32 kernel with its results rounded to bf16) and
   `low_precision_backward`;
4. `analyze s`: `precision_doctor.analyze(model, batch, loss_fn, dtype="bf16")` with the
   package's default decision (`capture.lowrun.emulates`), and whether it emulated.

To see a CPU without fast bf16 kernels on one that has them, run under oneDNN's and ATen's ISA
caps: `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bf16_emulation.py`
(oneDNN then refuses bf16, and bf16 matmuls fall back to ATen's scalar loops, as on an AVX2
CPU). `PRECISION_DOCTOR_EMULATE_BF16=0|1` forces the decision either way.

Models: `demo` is `sample_models/tiny_transformer.py`; `gpt2-fixture` is the test suite's
2-layer GPT-2 (`tests/fixtures.build_gpt2`, 32 wide, 2 x 8 tokens); `gpt2-4l` is a 4-layer
GPT-2 of GPT-2 small's width (768, 50257 tokens) on 2 x 128 tokens, random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import precision_doctor  # noqa: E402
from precision_doctor.capture.lowrun import emulates, low_precision, low_precision_backward  # noqa: E402
from precision_doctor.model.spec import load_model_file, resolve_loss, run_model  # noqa: E402

MODELS = ("demo", "gpt2-fixture", "gpt2-4l")


def build(name: str) -> tuple[torch.nn.Module, Any, Any]:
    """(model, batch, loss_fn); loss_fn None: the output's `.loss`."""
    if name == "demo":
        spec = load_model_file(ROOT / "sample_models" / "tiny_transformer.py")
        return spec.model, spec.batch, spec.loss_fn
    if name == "gpt2-fixture":
        from tests.fixtures import build_gpt2

        case = build_gpt2()
        return case.model, case.batch, case.loss_fn
    if name == "gpt2-4l":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=4)).train()
        ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1))
        return model, {"input_ids": ids, "labels": ids}, None
    raise SystemExit(f"unknown model {name!r}")


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of `repeats` calls after `warmup` calls. On a
    loaded machine the CPU time is the steadier of the two."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def step(model: torch.nn.Module, batch: Any, loss_fn: Any, mode: str) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        if mode == "fp32":
            forward, backward = contextlib.nullcontext(), contextlib.nullcontext()
        elif mode == "real":
            forward, backward = torch.autocast("cpu", dtype=torch.bfloat16), contextlib.nullcontext()
        else:
            forward = low_precision(model, torch.bfloat16, regime="autocast", policy="cpu", emulate=True)
            backward = low_precision_backward(model, torch.bfloat16, emulate=True)
        with forward:
            loss = resolve_loss(run_model(model, batch), batch, loss_fn)
        with backward:
            loss.backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all", choices=[*MODELS, "all"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--analyze-repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's)")
    parser.add_argument("--skip-real", action="store_true", help="skip the real bf16 step (slow without bf16 kernels)")
    args = parser.parse_args()
    names = MODELS if args.model == "all" else (args.model,)
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "PRECISION_DOCTOR_EMULATE_BF16")
    caps = {k: os.environ[k] for k in keys if k in os.environ}
    print(
        f"torch {torch.__version__}, ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
        f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, threads {torch.get_num_threads()}, env {caps}; "
        f"bf16 emulated by default: {emulates(torch.bfloat16, 'cpu')}"
    )
    print("wall seconds (process CPU seconds), medians")
    header = f"{'model':14} {'fp32 s':>16} {'bf16 real s':>16} {'bf16 emul s':>16} {'analyze s':>16}  emulated"
    print(header)
    for name in names:
        model, batch, loss_fn = build(name)
        fp32 = median_time(step(model, batch, loss_fn, "fp32"), args.repeats, args.warmup)
        real_step = step(model, batch, loss_fn, "real")
        real = (math.nan, math.nan) if args.skip_real else median_time(real_step, args.repeats, args.warmup)
        emul = median_time(step(model, batch, loss_fn, "emulated"), args.repeats, args.warmup)
        reports: list[precision_doctor.Report] = []

        def analysis(
            model: torch.nn.Module = model,
            batch: Any = batch,
            loss_fn: Any = loss_fn,
            reports: list[precision_doctor.Report] = reports,
        ) -> None:
            reports.append(precision_doctor.analyze(model, batch, loss_fn, dtype="bf16"))

        analyze = median_time(analysis, args.analyze_repeats, args.warmup)
        emulated = reports[-1].environment.emulated
        cells = " ".join(f"{f'{w:.3f} ({c:.3f})':>16}" for w, c in (fp32, real, emul, analyze))
        print(f"{name:14} {cells}  {emulated}", flush=True)


if __name__ == "__main__":
    main()

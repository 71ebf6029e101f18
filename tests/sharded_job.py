"""One rank of the 2-rank gloo job `tests/test_sharded.py` launches (`python -m
tests.sharded_job OUT_DIR` under torchrun's environment). It runs every FSDP2 and tensor-
parallel scenario once and writes what each rank saw to OUT_DIR/rank{r}.json, so the process
start-up is paid once for all the tests.

Scenarios (`fixtures.build_head_mlp`: an MLP whose 1-row head leaves rank 1 an empty shard):
- `fsdp/<dtype>`: FSDP2 (`fully_shard` on every Linear and the root), rank r analyzing rows
  [4r, 4r+4) of the 8-row batch (scaled past fp16's range in `fsdp/fp16`), three times in a
  row; the test compares with one process analyzing the whole batch;
- `fsdp_grads`: FSDP2 on the halves in bf16 with CPU autocast's op lists (real kernels, which
  the test redoes by hand) and a `grad_rel_error` threshold between the units' gradient
  errors: the job's gradient fidelity and GRAD_DIVERGENCE;
- `fsdp_counts`: the collectives a plain forward and backward issue, and those an analysis
  issues (with how many forward and backward passes it ran);
- `fsdp_mixed`: `MixedPrecisionPolicy(param_dtype=bf16)`;
- `fsdp_state`, `tp_state`: the sharded parameters before and after the analysis, and a
  training step after it against a replica that was never analyzed;
- `fsdp_failed`: rank 1's shard holds a NaN (the analysis fails on both ranks midway): the
  collectives of a training step after it, and the step against a replica's;
- `placements`: what each rank counts of a DTensor by placement (`model.parallel`);
- `fsdp_preflight`, `tp_preflight`: the pre-flight (its analysis, plan search with verification
  and short training runs) of the FSDP2 model on the halves (fp16) and of the tensor-parallel
  one on the whole batch (bf16), then a plan search on the model itself (FSDP2's at a
  tolerance below the all-low run's error, which promotes units; the pre-flight plans a copy
  of a tensor-parallel model, and an FSDP2 one, which torch cannot copy, itself): the results,
  the model before and after, and a training step after them (its collectives, and against a
  replica's);
- `tp_fp16_preflight`: the fp16 pre-flight of the tensor-parallel model (GradScaler cannot
  unscale its mix of DTensor and plain gradients);
- `tp/<dtype>`: tensor parallel (fc1 column-wise, fc2 row-wise), the whole batch on both
  ranks: the report, a real `torch.autocast("cpu")` run's loss, the collectives issued and
  any left unwaited;
- `fsdp_raises` (last: the process group is aborted): rank 1's fp32 forward raises inside
  the FSDP2 model while rank 0 waits in its all-gather: the error on each rank, and how long
  it took.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROWS = 4
FP16_SCALE = 1e5  # fc1's outputs overflow fp16: flags to compare
GRAD_THRESHOLD = 0.0025  # bf16 gradient errors (relative L2) on the halves: fc1 ~0.0037, fc2 ~0.0029, head ~0.0019
PREFLIGHT_STEPS = 2
COLLECTIVES = ("_allgather_base_", "_reduce_scatter_base_", "all_reduce", "wait_tensor", "allreduce_")


class CountOps(TorchDispatchMode):
    """Counts every op by name (`_allgather_base_`), as it reaches torch's kernels; a
    DTensor's ops are counted on its local tensors (its own dispatch runs them)."""

    def __init__(self, wrappers: tuple[type, ...]) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.wrappers = wrappers

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(issubclass(t, self.wrappers) for t in types):
            return NotImplemented
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def collectives(self) -> dict[str, int]:
        return {k: self.counts[k] for k in COLLECTIVES}


def checksum(model: nn.Module) -> str:
    """Of the parameters this rank holds (a DTensor's local shard), their gradients and the
    buffers: bitwise."""
    h = hashlib.sha256()
    for name, t in [
        *model.named_parameters(),
        *((f"{n}.grad", p.grad) for n, p in model.named_parameters()),
        *model.named_buffers(),
    ]:
        h.update(name.encode())
        if t is not None:
            local = t.to_local() if hasattr(t, "to_local") else t
            h.update(local.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def failure(e: BaseException) -> dict[str, Any]:
    return {"type": type(e).__name__, "bases": [c.__name__ for c in type(e).__mro__], "message": str(e)}


def passes(model: nn.Module, run: Callable[[], Any], wrappers: tuple[type, ...]) -> dict[str, Any]:
    """The collectives `run` issues, and how many forward passes of `model` it ran."""
    forwards = [0]
    handle = model.register_forward_pre_hook(lambda m, a: forwards.__setitem__(0, forwards[0] + 1))
    try:
        with CountOps(wrappers) as counter:
            run()
    finally:
        handle.remove()
    return {"forwards": forwards[0], **counter.collectives()}


def main(out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    wrappers = (DTensor, AsyncCollectiveTensor)
    import precision_doctor as pd
    from precision_doctor.formats import TORCH_DTYPES
    from tests.fixtures import build_head_mlp

    results: dict[str, Any] = {}
    case = build_head_mlp()
    loss_fn = case.loss_fn
    assert loss_fn is not None

    def fsdp_of(**kw: Any) -> nn.Module:
        model = build_head_mlp().model
        for m in (model.fc1, model.fc2, model.head):
            fully_shard(m, mesh=mesh, **kw)
        fully_shard(model, mesh=mesh, **kw)
        return model

    def tp_of() -> nn.Module:
        model = build_head_mlp().model
        parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        return model

    def step(model: nn.Module, x: torch.Tensor) -> str:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        loss_fn(model(x), x).backward()
        opt.step()
        return checksum(model)

    # FSDP2 on the batch halves, three analyses of one model.
    half = case.batch[ROWS * rank : ROWS * (rank + 1)].clone()
    for dtype, scale in (("bf16", 1.0), ("fp16", FP16_SCALE)):
        model = fsdp_of()
        results[f"fsdp/{dtype}"] = [
            json.loads(pd.analyze(model, half * scale, loss_fn, dtype=dtype).to_json()) for _ in range(3)
        ]

    th = pd.Thresholds(grad_rel_error=GRAD_THRESHOLD)
    results["fsdp_grads"] = json.loads(
        pd.analyze(fsdp_of(), half, loss_fn, dtype="bf16", policy="cpu", thresholds=th).to_json()
    )

    # Collectives: a plain step's forward and backward, then an analysis.
    model = fsdp_of()
    out: list[torch.Tensor] = []
    forward = passes(model, lambda: out.append(loss_fn(model(half), half)), wrappers)
    backward = passes(model, lambda: out.pop().backward(), wrappers)
    model = fsdp_of()
    analysis = passes(model, lambda: pd.analyze(model, half, loss_fn, dtype="bf16"), wrappers)
    results["fsdp_counts"] = {"forward": forward, "backward": backward, "analysis": analysis}

    try:
        pd.analyze(fsdp_of(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)), half, loss_fn, dtype="bf16")
        results["fsdp_mixed"] = None
    except Exception as e:
        results["fsdp_mixed"] = failure(e)

    # The model comes out as it went in, and a training step after the analysis equals one
    # of a replica never analyzed.
    for name, make, x in (("fsdp_state", fsdp_of, half), ("tp_state", tp_of, case.batch)):
        model, replica = make(), make()
        before = checksum(model)
        params_before = [id(p) for p in model.parameters()]
        pd.analyze(model, x, loss_fn, dtype="bf16")
        results[name] = {
            "before": before,
            "after": checksum(model),
            "same_parameters": params_before == [id(p) for p in model.parameters()],
            "stepped": step(model, x),
            "replica_stepped": step(replica, x),
        }

    # A failure midway (after the fp32 forward, before its backward) leaves FSDP2 ready to train.
    model, replica = fsdp_of(), fsdp_of()
    bad = half.clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    try:
        pd.analyze(model, bad, loss_fn, dtype="bf16")
        error = None
    except Exception as e:
        error = failure(e)
    counted = passes(model, lambda: step(model, half), wrappers)
    results["fsdp_failed"] = {
        "error": error,
        "step": counted,
        "stepped": checksum(model),
        "replica_stepped": step(replica, half),
    }

    from torch.distributed.tensor import Partial, Replicate, Shard

    from precision_doctor.model.parallel import counted_part, reduced

    base = torch.arange(4.0) + 10 * rank
    placements = {}
    for name, placement in (("shard", Shard(0)), ("replicate", Replicate()), ("partial", Partial())):
        dt = DTensor.from_local(base, mesh, [placement], run_check=False)
        part = counted_part(reduced(dt))
        placements[name] = None if part is None else part.tolist()
    results["placements"] = placements

    # Pre-flight and plan search on the sharded models; a training step after them.
    from precision_doctor.planning.pipeline import plan_report
    from precision_doctor.planning.plan import DEFAULT_TOLERANCE

    for name, make, x, dtype in (("fsdp", fsdp_of, half, "fp16"), ("tp", tp_of, case.batch, "bf16")):
        model, replica = make(), make()
        before = checksum(model)
        params_before = [id(p) for p in model.parameters()]
        result = pd.preflight(model, x, loss_fn, dtype=dtype, steps=PREFLIGHT_STEPS)
        assert result.report is not None
        # FSDP2: a tolerance below the all-low run's error, so units are promoted between
        # verification passes, each decided on the worst rank's error (the halves differ).
        # Tensor parallel (one batch): the default one (below it, fp32 costs least here).
        tolerance = result.report.losses.rel_error / 2 if name == "fsdp" else DEFAULT_TOLERANCE
        plan = plan_report(model, x, loss_fn, result.report, tolerance=tolerance).extras.plan
        after = checksum(model)
        stepped: list[str] = []
        counted = passes(model, lambda model=model, x=x, stepped=stepped: stepped.append(step(model, x)), wrappers)
        results[f"{name}_preflight"] = {
            "result": json.loads(result.to_json()),
            "plan": plan.model_dump(mode="json") if plan is not None else None,
            "before": before,
            "after": after,
            "same_parameters": params_before == [id(p) for p in model.parameters()],
            "step": counted,
            "stepped": stepped[0],
            "replica_stepped": step(replica, x),
        }
    try:
        pd.preflight(tp_of(), case.batch, loss_fn, dtype="fp16", steps=1)
        results["tp_fp16_preflight"] = None
    except Exception as e:
        results["tp_fp16_preflight"] = failure(e)

    # Tensor parallel: the whole batch on both ranks.
    for dtype in ("bf16", "fp16"):
        model = tp_of()
        with torch.autocast("cpu", dtype=TORCH_DTYPES[dtype]):
            real = float(loss_fn(model(case.batch), case.batch).detach())
        reports: list[Any] = []

        def analyze(model: nn.Module = model, dtype: str = dtype, reports: list[Any] = reports) -> None:
            reports.append(pd.analyze(model, case.batch, loss_fn, dtype=dtype, policy="cpu"))

        counts = passes(model, analyze, wrappers)
        results[f"tp/{dtype}"] = {
            "report": json.loads(reports[0].to_json()),
            "real_low_loss": real,
            "analysis": counts,
            "unwaited": torch._C._distributed_c10d._get_work_registry_size(),
        }
    model = tp_of()
    out = []
    forward = passes(model, lambda: out.append(loss_fn(model(case.batch), case.batch)), wrappers)
    backward = passes(model, lambda: out.pop().backward(), wrappers)
    results["tp_counts"] = {"forward": forward, "backward": backward}

    # Last: it aborts the process group. Rank 1's fp32 forward raises in fc2 while rank 0 is in
    # an FSDP2 all-gather; both must fail at once (not after the 30 s timeout), rank 1 named.
    model = fsdp_of()

    def boom(module: nn.Module, args: Any) -> None:
        if rank == 1 and not torch.is_autocast_enabled("cpu"):  # the fp32 pass, not the low run
            raise ValueError("planted in fc2")

    model.fc2.register_forward_pre_hook(boom)
    began = time.monotonic()
    try:
        pd.analyze(model, half, loss_fn, dtype="bf16")
        results["fsdp_raises"] = None
    except Exception as e:
        results["fsdp_raises"] = {**failure(e), "seconds": time.monotonic() - began, "group": dist.is_initialized()}

    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        sys.exit(1)

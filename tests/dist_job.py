"""One rank of the 2-rank gloo job `tests/test_distributed.py` launches (`python -m
tests.dist_job OUT_DIR`, with torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT). It runs every scenario once and writes what each rank saw to
OUT_DIR/rank{r}.json, so the process start-up (~2 s a rank) is paid once for all the tests.

Scenarios (rank r gets rows [3r, 3r+3) of `fixtures.build_mlp`'s 6-row batch, scaled):
- `healthy`, `overflow`: DDP on the batch halves (the test compares with one process on the
  whole batch);
- `grads`: DDP on the batch halves in bf16 with CPU autocast's op lists (real kernels, which
  the test redoes by hand), and a `grad_rel_error` threshold between fc1's and fc2's gradient
  errors: the job's gradient fidelity and GRAD_DIVERGENCE;
- `fault`: rank 1's shard alone scaled past fp16's range; `diluted`: the same, with an
  overflow threshold above the job's overflow fraction and below rank 1's own;
- `nonfinite`: rank 1's shard holds a NaN (the fp32 loss is NaN there only);
- `mismatch`: rank 1's data takes a branch rank 0's does not (a different computation);
- `buffers`: a DDP model with buffers (which DDP's own forward broadcasts);
- `state`: the DDP model before and after the analysis, and a DDP training step after it
  against a replica that was never analyzed;
- `preflight`: the pre-flight of the DDP model on the shards.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCALES = {"healthy": 1.0, "overflow": 6e4}
FAULT_SCALE = 1e5
DILUTED_THRESHOLD = 0.15
GRAD_THRESHOLD = 0.006  # fc1's bf16 gradients are off by ~0.0071 (relative L2), fc2's by ~0.0048
ROWS = 3
PREFLIGHT_STEPS = 3


def shard(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[ROWS * rank : ROWS * (rank + 1)].clone()


class Branchy(nn.Module):
    """Doubles its input when the batch sums above 0: data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.fc(x)


def checksum(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in [*model.state_dict().items(), *((f"{n}.grad", p.grad) for n, p in model.named_parameters())]:
        h.update(name.encode())
        if t is not None:
            h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def failure(e: BaseException) -> dict[str, Any]:
    return {"type": type(e).__name__, "bases": [c.__name__ for c in type(e).__mro__], "message": str(e)}


def main(out_dir: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    import precision_doctor as pd
    from tests.fixtures import build_mlp

    results: dict[str, Any] = {}
    case = build_mlp()

    def ddp_of(scale: float) -> tuple[nn.parallel.DistributedDataParallel, torch.Tensor]:
        fresh = build_mlp()
        return nn.parallel.DistributedDataParallel(fresh.model), shard(fresh.batch * scale, rank)

    for name, scale in SCALES.items():
        model, x = ddp_of(scale)
        results[name] = json.loads(pd.analyze(model, x, case.loss_fn).to_json())

    model, x = ddp_of(1.0)
    th = pd.Thresholds(grad_rel_error=GRAD_THRESHOLD)
    results["grads"] = json.loads(
        pd.analyze(model, x, case.loss_fn, dtype="bf16", policy="cpu", thresholds=th).to_json()
    )

    model, x = ddp_of(1.0)
    if rank == 1:
        x = x * FAULT_SCALE
    results["fault"] = json.loads(pd.analyze(model, x, case.loss_fn).to_json())

    # The same fault judged at a threshold between rank 1's own overflow fraction and the
    # job's: a flag is judged on the combined statistics, not OR-ed from a rank's.
    model, x = ddp_of(1.0)
    if rank == 1:
        x = x * FAULT_SCALE
    th = pd.Thresholds(overflow_fraction=DILUTED_THRESHOLD)
    results["diluted"] = json.loads(pd.analyze(model, x, case.loss_fn, thresholds=th).to_json())

    model, x = ddp_of(1.0)
    if rank == 1:
        x[0, 0] = float("nan")
    try:
        pd.analyze(model, x, case.loss_fn)
        results["nonfinite"] = None
    except Exception as e:
        results["nonfinite"] = failure(e)

    torch.manual_seed(0)
    branchy = nn.parallel.DistributedDataParallel(Branchy())
    x = torch.full((2, 8), 1.0 if rank == 1 else -1.0)
    try:
        pd.analyze(branchy, x, lambda out, b: out.pow(2).mean())
        results["mismatch"] = None
    except Exception as e:
        results["mismatch"] = failure(e)

    # DDP broadcasts buffers at every forward of its own: the analysis runs the module, so no
    # collective is captured (nor re-run by a shadow), and the buffers come out as they went in.
    torch.manual_seed(0)
    with_buffers = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
    buffers = checksum(with_buffers.module)
    report = pd.analyze(with_buffers, shard(case.batch, rank), lambda out, b: out.pow(2).mean())
    results["buffers"] = {"ops": sorted(report.by_op()), "same": checksum(with_buffers.module) == buffers}

    # The model comes out as it went in (a gradient of the user's own included), and DDP's
    # reducer still works: a step of the analyzed model equals one of a replica never analyzed.
    model, x = ddp_of(1.0)
    replica, _ = ddp_of(1.0)
    for m in (model, replica):
        m.module.fc1.weight.grad = torch.full_like(m.module.fc1.weight, 0.5)
    before = checksum(model.module)
    pd.analyze(model, x, case.loss_fn)
    after = checksum(model.module)
    sums = []
    for m in (model, replica):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad()
        case.loss_fn(m(x), x).backward()
        opt.step()
        sums.append(checksum(m.module))
    results["state"] = {"before": before, "after": after, "stepped": sums[0], "replica_stepped": sums[1]}

    model, x = ddp_of(1.0)
    results["preflight"] = json.loads(pd.preflight(model, x, case.loss_fn, steps=PREFLIGHT_STEPS).to_json())

    # Pure regime, rank 0 with one batch and rank 1 with two: whether batches vary (the
    # `untrained` run) is the job's, or rank 0 paired its planned run's collectives with rank
    # 1's untrained run.
    model, x = ddp_of(1.0)
    batches = [x] if rank == 0 else [x, x * 2]
    pure = pd.preflight(
        model, x, case.loss_fn, dtype="bf16", regime="pure", steps=2, plan=False, make_batches=lambda: batches
    )
    results["pure_runs"] = sorted(pure.runs)

    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except BaseException:
        traceback.print_exc()
        sys.exit(1)

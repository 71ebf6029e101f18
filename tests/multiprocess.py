"""Multi-process jobs for the distributed tests (`test_distributed.py`, `test_sharded.py`): each
rank launched with the environment torchrun gives it (RANK, WORLD_SIZE, MASTER_ADDR/PORT), a
hang turned into a test failure; and the by-hand reference of a data-parallel job's gradient
fidelity, with the check of a job's numbers against it."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from precision_doctor.report import Report
from tests.fixtures import Case
from tests.test_grad_fidelity import by_hand, real_gradients

ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 120  # a hang fails the test instead of the suite (each rank's own timeout is 30 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(argv: Sequence[str], world: int = 2) -> list[subprocess.Popen[str]]:
    """`argv` on `world` ranks with the environment torchrun gives each rank."""
    port = str(free_port())
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
        procs.append(
            subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def finish(procs: Sequence[subprocess.Popen[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Every process's exit code and output; a hang fails the test (`JOB_TIMEOUT_S`)."""
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=JOB_TIMEOUT_S)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def rank_results(done: Sequence[subprocess.CompletedProcess[str]], out_dir: Path) -> list[dict[str, Any]]:
    """What each rank of a finished job module (`tests/dist_job.py`, `tests/sharded_job.py`)
    wrote to OUT_DIR/rank{r}.json; a rank that failed fails the test with its stderr."""
    for r, p in enumerate(done):
        assert p.returncode == 0, f"rank {r} failed:\n{p.stderr[-3000:]}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(len(done))]


def data_parallel_fidelity(
    case: Case, shards: Sequence[Any], dtype: str, scale_log2: int
) -> dict[str, tuple[float, float | None]]:
    """Per unit, by hand: the relative L2 error and cosine of a data-parallel job's low
    parameter gradients against its fp32 ones. Each rank's gradients from real runs on its
    shard (`test_grad_fidelity.real_gradients`: a real `torch.autocast("cpu", low)` run at
    loss scale 2^k, and plain fp32), averaged as DDP and FSDP2 average them (each divided by
    the world size, then summed, in fp32), compared in float64. Not one process on the whole
    batch: each rank's low gradient is rounded before the average, the whole batch's after
    its sum (they differ by ~10% in relative error here)."""
    rng = torch.get_rng_state()
    world = np.float32(len(shards))

    def averaged(low: str | None, k: int) -> dict[str, np.ndarray]:
        runs = [real_gradients(case.model, x, case.loss_fn, low, "autocast", k, rng) for x in shards]
        return {
            n: functools.reduce(np.add, [r[n].astype(np.float32) / world for r in runs]).astype(np.float64)
            for n in runs[0]
        }

    return by_hand(averaged(None, 0), averaged(dtype, scale_log2))


def assert_job_fidelity(job: Report, expected: Mapping[str, tuple[float, float | None]]) -> None:
    """The job's per-unit gradient fidelity equals `data_parallel_fidelity`'s. 1e-5 (relative
    L2 error) and 1e-8 (cosine) are the sums' own rounding: the report's squared norms are fp32
    reductions (~1e-7 relative at these sizes: `capture.statistics.squared_norm`) added in
    float64 in another order (per rank slice or shard); the reference sums in float64."""
    got = job.grad_fidelity_by_unit()
    assert set(got) == set(expected)
    for unit, (rel, cos) in expected.items():
        assert rel > 1e-3  # bf16 rounding shows: not a run compared with itself
        assert got[unit].rel_l2_error == pytest.approx(rel, rel=1e-5), unit
        assert cos is not None and got[unit].cosine == pytest.approx(cos, abs=1e-8), unit

"""Distributed analysis on 2 gloo ranks on the CPU: one job (`tests/dist_job.py`) runs every
API scenario once, launched as torchrun launches it (RANK, WORLD_SIZE, MASTER_ADDR/PORT), and
the tests read what each rank wrote. The reference is one process analyzing the whole batch."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import precision_doctor as pd
from precision_doctor.analysis.distributed import StatsReducer
from precision_doctor.capture.statistics import ErrorAccumulator, TensorSummary, summarize
from precision_doctor.report import Report
from tests.dist_job import FAULT_SCALE, SCALES
from tests.fixtures import build_mlp

ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 120  # a hang fails the test instead of the suite (each rank's own timeout is 30 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: Sequence[str], world: int = 2, cwd: Path = ROOT) -> list[subprocess.CompletedProcess[str]]:
    """`argv` on `world` ranks with the environment torchrun gives each rank; every rank's
    exit code and output."""
    port = str(free_port())
    procs = []
    for r in range(world):
        env = {
            **os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
        }
        procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
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


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist_job")
    procs = launch([sys.executable, "-m", "tests.dist_job", str(out)])
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{p.stderr[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def report_of(ranks: list[dict[str, Any]], scenario: str) -> Report:
    # Every rank returns the same report: the job's.
    assert ranks[0][scenario] == ranks[1][scenario]
    return Report.from_json(json.dumps(ranks[0][scenario]))


def flag_set(report: Report) -> set[tuple[str, str, str]]:
    return {(f.flag.value, f.unit, f.severity.value) for f in report.flags()}


@pytest.mark.parametrize("scenario", list(SCALES))
def test_ddp_on_batch_halves_equals_one_process_on_the_batch(ranks: list[dict[str, Any]], scenario: str) -> None:
    job = report_of(ranks, scenario)
    case = build_mlp()
    whole = pd.analyze(case.model, case.batch * SCALES[scenario], case.loss_fn)
    assert job.environment.distributed is not None
    assert (job.environment.distributed.world_size, job.environment.distributed.wrapper) == (2, "ddp")
    assert [u.name for u in job.units] == [u.name for u in whole.units]  # no `module.` prefix
    for unit in whole.units:
        if unit.name == "<loss>":  # a mean over each rank's half, not over the batch
            continue
        mine = job.by_module()[unit.name]
        a, b = mine.forward.stats, unit.forward.stats
        assert a is not None and b is not None
        assert a.histogram == b.histogram, unit.name
        assert (a.numel, a.zero_count, a.fp16, a.bf16) == (b.numel, b.zero_count, b.fp16, b.bf16)
        assert a.max_abs == pytest.approx(b.max_abs, rel=2**-23, abs=0), unit.name
        # DDP averages the gradients: the same parameter gradients as the whole batch's mean loss.
        for pname, g in unit.backward.param_grads.items():
            assert mine.backward.param_grads[pname].max_abs == pytest.approx(g.max_abs, rel=1e-6)
            assert mine.backward.param_grads[pname].numel == g.numel
    assert flag_set(job) == flag_set(whole)
    if scenario == "overflow":
        assert ("OVERFLOW", "fc1", "error") in flag_set(job)  # the comparison is not vacuous
        over = next(f for f in job.flags() if f.flag == "OVERFLOW")
        ref = next(f for f in whole.flags() if f.flag == "OVERFLOW")
        assert over.evidence.values["overflow_count"] == ref.evidence.values["overflow_count"]
    # The job's loss is the mean of the ranks' (their halves are equal in size: the batch's).
    assert job.losses.fp32 == pytest.approx(whole.losses.fp32, rel=1e-6)
    assert [r.rank for r in job.ranks] == [0, 1]
    assert job.losses.fp32 == pytest.approx(sum(r.loss_fp32 for r in job.ranks) / 2)


def test_a_fault_in_one_ranks_shard_is_the_jobs_and_named_by_rank(ranks: list[dict[str, Any]]) -> None:
    job = report_of(ranks, "fault")
    assert ("OVERFLOW", "fc1", "error") in flag_set(job)
    own = {r.rank: {(f.flag.value, f.unit) for f in r.flags} for r in job.ranks}
    assert ("OVERFLOW", "fc1") in own[1] and not own[0]
    # The counts are the job's: rank 1's overflowing values, out of both ranks' values.
    case = build_mlp()
    x = case.batch[3:6] * FAULT_SCALE
    fc1 = torch.nn.functional.linear(x, case.model.fc1.weight, case.model.fc1.bias)
    over = next(f for f in job.flags() if f.flag == "OVERFLOW")
    assert over.evidence.values["overflow_count"] == int((fc1.abs() > 65504).sum())
    assert job.by_module()["fc1"].forward.stats is not None
    assert job.by_module()["fc1"].forward.stats.numel == 2 * 3 * 16
    assert not job  # not safe as-is


def test_a_nonfinite_loss_on_one_rank_fails_every_rank_naming_it(ranks: list[dict[str, Any]]) -> None:
    errors = [r["nonfinite"] for r in ranks]
    assert errors[0] == errors[1]
    assert "PrecisionDoctorError" in errors[0]["bases"]
    assert errors[0]["message"].startswith("rank 1: the fp32 loss is nan")


def test_ranks_that_run_different_ops_are_refused(ranks: list[dict[str, Any]]) -> None:
    errors = [r["mismatch"] for r in ranks]
    assert errors[0] == errors[1]
    assert "PrecisionDoctorError" in errors[0]["bases"]
    assert "ranks 0 and 1 differ" in errors[0]["message"] and "mul.Tensor" in errors[0]["message"]


def test_the_ddp_model_comes_out_unchanged_and_trains(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        state = r["state"]
        assert state["before"] == state["after"]
        assert state["stepped"] == state["replica_stepped"] != state["before"]
    assert ranks[0]["state"]["stepped"] == ranks[1]["state"]["stepped"]  # DDP kept the replicas equal


# --- the reducer alone, one process ---------------------------------------------------------


def test_reducer_one_process_hands_back_equal_values() -> None:
    s = summarize(torch.tensor([0.0, 1e5, 2.0**-30, -3.0]), with_sumsq=True)
    acc = ErrorAccumulator(4.0, 1e-4, 0)
    got: dict[str, Any] = {}
    red = StatsReducer()
    red.summary("s", s, lambda v: got.update(s=v), grad=True)
    red.summary("none", None, lambda v: got.update(none=v))
    red.error("e", acc, lambda v: got.update(e=v))
    red.minimum("lo", 0.25, lambda v: got.update(lo=v))
    red.any("flag", True, lambda v: got.update(flag=v))
    red.text("t", "MulBackward0", lambda v: got.update(t=v))
    red.reduce()
    t: TensorSummary = got["s"]
    assert (t.numel, t.zero_count, t.max_abs, t.min_nonzero_abs) == (s.numel, s.zero_count, s.max_abs, s.min_nonzero_abs)
    assert np.array_equal(t.hist, s.hist) and t.tails == s.tails
    assert t.sumsq is not None and s.sumsq is not None and np.array_equal(t.sumsq, s.sumsq)
    assert t.sumsq_total == s.sumsq_total
    assert got["none"] is None and got["e"] == acc and got["lo"] == 0.25 and got["flag"] is True
    assert got["t"] == "MulBackward0"
    assert math.isclose(got["e"].rel_l2, acc.rel_l2)



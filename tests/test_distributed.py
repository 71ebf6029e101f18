"""Distributed analysis on 2 gloo ranks on the CPU: one job (`tests/dist_job.py`) runs every
API scenario once, launched as torchrun launches it (RANK, WORLD_SIZE, MASTER_ADDR/PORT), and
the tests read what each rank wrote. The reference is one process analyzing the whole batch.
The CLI runs under a real torchrun, and with torchrun's environment for exact per-rank exit codes."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import precision_doctor as pd
from precision_doctor.analysis.distributed import StatsReducer
from precision_doctor.capture.statistics import ErrorAccumulator, TensorSummary, summarize
from precision_doctor.report import Report
from tests.dist_job import (
    DILUTED_THRESHOLD,
    FAULT_SCALE,
    GRAD_THRESHOLD,
    PREFLIGHT_STEPS,
    SCALES,
    shard,
)
from tests.fixtures import build_mlp
from tests.multiprocess import (
    ROOT,
    assert_job_fidelity,
    data_parallel_fidelity,
    finish,
    rank_results,
    start,
)

# Model files for the CLI: each rank takes its half of the batch (torchrun's RANK). The plain
# one leaves the process group to the CLI; the DDP one initializes it itself (with a short
# timeout), and its rank 1 has a NaN in its shard.
PLAIN_FILE = """
import os
from tests.fixtures import build_mlp, mlp_loss

def build_model():
    return build_mlp().model

def make_batch():
    r = int(os.environ["RANK"])
    return build_mlp().batch[3 * r : 3 * r + 3]

loss_fn = mlp_loss
"""
DDP_NAN_FILE = """
import datetime, os
import torch
import torch.distributed as dist
from tests.fixtures import build_mlp, mlp_loss

def build_model():
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    return torch.nn.parallel.DistributedDataParallel(build_mlp().model)

def make_batch():
    r = int(os.environ["RANK"])
    x = build_mlp().batch[3 * r : 3 * r + 3].clone()
    if r == 1:
        x[0, 0] = float("nan")
    return x

loss_fn = mlp_loss
"""


@dataclass
class Jobs:
    api: list[dict[str, Any]]
    out_dir: Path
    cli: subprocess.CompletedProcess[str]
    nan: list[subprocess.CompletedProcess[str]]
    preflight: list[subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    """The jobs, run at once: the API scenarios; `precision-doctor analyze` under a real
    torchrun; and, with torchrun's environment, the CLI on a DDP file whose rank 1 has a NaN
    and `precision-doctor preflight`."""
    d = tmp_path_factory.mktemp("dist")
    (d / "plain.py").write_text(PLAIN_FILE)
    (d / "ddp_nan.py").write_text(DDP_NAN_FILE)
    cli = shutil.which("precision-doctor")
    assert cli is not None
    api = start([sys.executable, "-m", "tests.dist_job", str(d)])
    torchrun = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--log-dir",
            str(d / "logs"),
            "--redirects",
            "3",
            "--no-python",
            cli,
            "analyze",
            str(d / "plain.py"),
            "--out",
            str(d / "r.json"),
            "--quiet",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    nan = start([cli, "analyze", str(d / "ddp_nan.py"), "--out", str(d / "nan.json"), "--quiet"])
    pre = start([cli, "preflight", str(d / "plain.py"), "--steps", "2", "--no-plan", "--json", "--quiet"])
    api_done, (cli_done,), nan_done, pre_done = finish(api), finish([torchrun]), finish(nan), finish(pre)
    return Jobs(rank_results(api_done, d), d, cli_done, nan_done, pre_done)


@pytest.fixture(scope="module")
def ranks(jobs: Jobs) -> list[dict[str, Any]]:
    return jobs.api


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
        # A half batch's matmuls may block, and so sum, in another order than the whole
        # batch's: reordering a k-term fp32 sum moves it by up to ~k * 2^-24 of its terms'
        # magnitudes, and the MLP's longest reduction has 16 terms (measured: 1-2 ulp).
        assert a.max_abs == pytest.approx(b.max_abs, rel=16 * 2**-24, abs=0), unit.name
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


def test_ddp_gradient_fidelity_is_the_jobs(ranks: list[dict[str, Any]]) -> None:
    """The low gradients' error and cosine against fp32's are summed over the ranks' slices
    of the averaged gradients before GRAD_DIVERGENCE is judged: a job's numbers, redone by
    hand from real runs on each half averaged as DDP averages them (tolerances: the sums' own
    rounding, `multiprocess.assert_job_fidelity`)."""
    job = report_of(ranks, "grads")
    assert job.grad_fidelity is not None
    case = build_mlp()
    expected = data_parallel_fidelity(
        case, [shard(case.batch, r) for r in range(2)], "bf16", job.grad_fidelity.scale_log2
    )
    assert set(expected) == {"fc1", "fc2"}
    assert_job_fidelity(job, expected)
    # Every element compared once in the job (each rank its slice of the averaged gradient).
    numel = {n: p.numel() for n, p in case.model.named_parameters()}
    assert job.grad_fidelity.numel == sum(numel.values())
    for u in job.units:
        for pname, f in u.backward.param_grad_fidelity.items():
            assert f.numel == numel[pname], pname
    # GRAD_DIVERGENCE judged on the job's sums: fc1 over the threshold, fc2 under it, as for
    # one process on the whole batch (whose numbers differ: its low gradients are rounded
    # after the whole batch's sum, not per half).
    whole = pd.analyze(
        case.model,
        case.batch,
        case.loss_fn,
        dtype="bf16",
        policy="cpu",
        thresholds=pd.Thresholds(grad_rel_error=GRAD_THRESHOLD),
    )
    grad_flags = {f for f in flag_set(job) if f[0] == "GRAD_DIVERGENCE"}
    assert grad_flags == {("GRAD_DIVERGENCE", "fc1", "warning")}
    assert flag_set(job) == flag_set(whole)
    # Each rank's own GRAD_DIVERGENCE (`ranks[]`): its own gradients against its own fp32 ones,
    # before the average, judged with the same threshold; redone by hand on its half alone.
    for r in job.ranks:
        alone = data_parallel_fidelity(case, [shard(case.batch, r.rank)], "bf16", job.grad_fidelity.scale_log2)
        own = {f.unit for f in r.flags if f.flag == "GRAD_DIVERGENCE"}
        assert own == {u for u, (rel, _) in alone.items() if rel > GRAD_THRESHOLD}, (r.rank, alone)
        if r.rank == 1:  # its half's fc2 gradients are off by more than the job's
            assert own == {"fc1", "fc2"}


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


def test_flags_are_judged_on_the_combined_statistics_not_or_ed(ranks: list[dict[str, Any]]) -> None:
    job = report_of(ranks, "diluted")
    fc1 = job.by_module()["fc1"].forward.stats
    assert fc1 is not None
    over, values = fc1.fp16.overflow_count, fc1.numel
    rank1 = next(r for r in job.ranks if r.rank == 1)
    # Rank 1 alone overflows in over / (values / 2) of its values, above the threshold; the job
    # in over / values, below it: rank 1 raises OVERFLOW on its own, the job does not.
    assert over / values < DILUTED_THRESHOLD < over / (values / 2)
    assert ("OVERFLOW", "fc1") in {(f.flag.value, f.unit) for f in rank1.flags}
    assert "OVERFLOW" not in {f.flag.value for f in job.flags()}


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


def test_no_collective_of_ddp_is_captured(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        ops = r["buffers"]["ops"]
        assert any(op.startswith("native_batch_norm") for op in ops)  # the module ran, captured
        assert not [op for op in ops if "c10d" in op]  # DDP's buffer broadcast did not
        assert r["buffers"]["same"]


def test_the_ddp_model_comes_out_unchanged_and_trains(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        state = r["state"]
        assert state["before"] == state["after"]
        assert state["stepped"] == state["replica_stepped"] != state["before"]
    assert ranks[0]["state"]["stepped"] == ranks[1]["state"]["stepped"]  # DDP kept the replicas equal


def test_preflight_under_ddp_trains_data_parallel_and_agrees(ranks: list[dict[str, Any]]) -> None:
    job = pd.PreflightResult.from_json(json.dumps(ranks[0]["preflight"]))
    result = [copy.deepcopy(r["preflight"]) for r in ranks]
    for r in result:  # each rank's own clock
        r.pop("timings_s")
        for run in r["runs"].values():
            run.pop("seconds")
    assert result[0] == result[1]  # one verdict, the same runs, on every rank
    case = build_mlp()
    whole = pd.preflight(case.model, case.batch, case.loss_fn, steps=PREFLIGHT_STEPS)
    assert job.go == whole.go
    assert set(job.runs) == set(whole.runs)
    for mode, run in job.runs.items():
        for s, w in zip(run.steps, whole.runs[mode].steps, strict=True):
            # Averaged gradients train the copies as one process trains on the whole batch.
            assert len(s.rank_losses) == 2 and s.loss == pytest.approx(sum(s.rank_losses) / 2)
            assert s.loss == pytest.approx(w.loss, rel=1e-5), (mode, s.step)
        assert run.skipped_steps == whole.runs[mode].skipped_steps


def test_whether_batches_vary_is_the_jobs(ranks: list[dict[str, Any]]) -> None:
    """Rank 0 with one batch, rank 1 with two (pure regime): both run the `untrained` run, or
    their collectives pair different runs' steps (rank 1 died "lost the other ranks")."""
    assert ranks[0]["pure_runs"] == ranks[1]["pure_runs"] and "untrained" in ranks[0]["pure_runs"]


def rank_logs(logs: Path) -> dict[int, tuple[str, str]]:
    """torchrun's per-rank stdout and stderr (`--log-dir`, `--redirects 3`)."""
    return {
        int(d.name): ((d / "stdout.log").read_text(), (d / "stderr.log").read_text())
        for d in logs.glob("*/attempt_0/*")
    }


def test_cli_under_torchrun_writes_one_report_from_rank_0(jobs: Jobs) -> None:
    assert jobs.cli.returncode == 0, jobs.cli.stderr[-3000:]
    logs = rank_logs(jobs.out_dir / "logs")
    assert set(logs) == {0, 1}
    assert "report written to" in logs[0][0] and "distributed: 2 ranks (gloo, none)" in logs[0][0]
    assert logs[1] == ("", "")  # the other rank stays silent
    report = Report.load(jobs.out_dir / "r.json")
    assert report.environment.distributed is not None
    assert (report.environment.distributed.world_size, report.environment.distributed.backend) == (2, "gloo")
    assert [r.rank for r in report.ranks] == [0, 1]
    # Each rank's half of the batch: the forward statistics of one process on the whole batch.
    case = build_mlp()
    whole = pd.analyze(case.model, case.batch, case.loss_fn)
    for u in whole.units:
        if u.name != "<loss>":
            assert report.by_module()[u.name].forward.stats == u.forward.stats, u.name
    assert report.extras.plan is not None  # planned alike on every rank
    # A plain module's gradients are each rank's own: compared on each rank and summed, as
    # their statistics are (both ranks' values counted).
    assert report.grad_fidelity is not None
    stats = {n: g.numel for u in report.units for n, g in u.backward.param_grads.items()}
    assert report.grad_fidelity.numel == sum(stats.values()) == 2 * sum(p.numel() for p in case.model.parameters())


def test_cli_a_nonfinite_loss_on_one_rank_exits_alike_everywhere(jobs: Jobs) -> None:
    assert [p.returncode for p in jobs.nan] == [2, 2]
    assert jobs.nan[0].stderr.startswith("precision-doctor: error: rank 1: the fp32 loss is nan"), jobs.nan[0].stderr
    assert jobs.nan[1].stderr == "" and jobs.nan[1].stdout == ""  # said once, by rank 0
    assert not (jobs.out_dir / "nan.json").exists()


def test_cli_preflight_under_torchrun_one_verdict(jobs: Jobs) -> None:
    assert [p.returncode for p in jobs.preflight] == [0, 0], jobs.preflight[0].stderr[-2000:]
    result = pd.PreflightResult.from_json(jobs.preflight[0].stdout)
    assert result.go and all(len(s.rank_losses) == 2 for run in result.runs.values() for s in run.steps)
    assert jobs.preflight[1].stdout == ""  # printed once, by rank 0


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
    assert (t.numel, t.zero_count, t.max_abs, t.min_nonzero_abs) == (
        s.numel,
        s.zero_count,
        s.max_abs,
        s.min_nonzero_abs,
    )
    assert np.array_equal(t.hist, s.hist) and t.tails == s.tails
    assert t.sumsq is not None and s.sumsq is not None and np.array_equal(t.sumsq, s.sumsq)
    assert t.sumsq_total == s.sumsq_total
    assert got["none"] is None and got["e"] == acc and got["lo"] == 0.25 and got["flag"] is True
    assert got["t"] == "MulBackward0"
    assert math.isclose(got["e"].rel_l2, acc.rel_l2)

"""FSDP2 and tensor parallel on 2 gloo ranks on the CPU: one job (`tests/sharded_job.py`)
runs every scenario once, launched with the environment torchrun gives each rank, and the
tests read what each rank wrote. References: one process analyzing the whole batch, a plain
training step's collectives, a real `torch.autocast("cpu")` run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import precision_doctor as pd
from precision_doctor.report import Report
from tests.fixtures import build_head_mlp
from tests.sharded_job import FP16_SCALE

ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 120  # a hang fails the tests instead of the suite (each rank's own timeout is 30 s)
FSDP_SCALES = {"bf16": 1.0, "fp16": FP16_SCALE}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sharded_job")
    port = str(_free_port())
    procs = []
    for r in range(2):
        env = {
            **os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
        }
        argv = [sys.executable, "-m", "tests.sharded_job", str(out)]
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for r, p in enumerate(procs):
            _, err = p.communicate(timeout=JOB_TIMEOUT_S)
            assert p.returncode == 0, f"rank {r} failed:\n{err[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def flag_set(report: Report) -> set[tuple[str, str, str]]:
    return {(f.flag.value, f.unit, f.severity.value) for f in report.flags()}


def _rank_own(report: dict[str, Any]) -> dict[str, Any]:
    """`report` without what is still each rank's own under sharding: the gradient fidelity
    compares each rank's shards (its sums are not combined across ranks yet)."""
    out = {k: v for k, v in report.items() if k != "grad_fidelity"}
    out["units"] = [
        {**u, "backward": {k: v for k, v in u["backward"].items() if "fidelity" not in k}} for u in report["units"]
    ]
    return out


def fsdp_reports(ranks: list[dict[str, Any]], dtype: str) -> list[Report]:
    runs = ranks[0][f"fsdp/{dtype}"]
    # Every rank returns the job's report.
    assert [_rank_own(r) for r in runs] == [_rank_own(r) for r in ranks[1][f"fsdp/{dtype}"]]
    return [Report.from_json(json.dumps(r)) for r in runs]


@pytest.mark.parametrize("dtype", list(FSDP_SCALES))
def test_fsdp_on_batch_halves_equals_one_process_on_the_batch(ranks: list[dict[str, Any]], dtype: str) -> None:
    job = fsdp_reports(ranks, dtype)[0]
    case = build_head_mlp()
    whole = pd.analyze(case.model, case.batch * FSDP_SCALES[dtype], case.loss_fn, dtype)
    assert job.environment.distributed is not None
    assert job.environment.distributed.wrapper == "fsdp2"
    assert job.environment.capture_path == "dispatch" and not job.environment.fx_traceable
    mine = job.by_module()
    for unit in whole.units:
        if unit.name == "<loss>":  # a mean over each rank's half, not over the batch
            continue
        a, b = mine[unit.name].forward.stats, unit.forward.stats
        assert a is not None and b is not None
        assert a.histogram == b.histogram, unit.name
        assert (a.numel, a.zero_count, a.fp16, a.bf16) == (b.numel, b.zero_count, b.fp16, b.bf16), unit.name
        assert abs(a.max_abs - b.max_abs) <= np.spacing(np.float32(b.max_abs)), unit.name
        # FSDP2 averages the sharded gradients: the whole batch's mean-loss gradients, each
        # element counted once (the head's 1-row weight and its bias are empty on rank 1).
        assert set(mine[unit.name].backward.param_grads) == set(unit.backward.param_grads)
        for pname, g in unit.backward.param_grads.items():
            assert mine[unit.name].backward.param_grads[pname].numel == g.numel, pname
            assert mine[unit.name].backward.param_grads[pname].max_abs == pytest.approx(g.max_abs, rel=1e-5), pname
        assert mine[unit.name].param_bytes == unit.param_bytes
    assert flag_set(job) == flag_set(whole)
    if dtype == "fp16":
        assert ("OVERFLOW", "fc1", "error") in flag_set(job)  # the comparison is not vacuous
    assert job.losses.fp32 == pytest.approx(whole.losses.fp32, rel=1e-6)


def test_fsdp_communication_buffers_get_no_statistics(ranks: list[dict[str, Any]]) -> None:
    """The all-gather output is uninitialized where the other rank's shard lands until the
    collective does: summarized, it was a different false OVERFLOW (|x| ~ 1e17) each run."""
    for dtype in FSDP_SCALES:
        runs = fsdp_reports(ranks, dtype)
        assert len({frozenset(flag_set(r)) for r in runs}) == 1, dtype
        assert len({r.model_dump_json(include={"units"}) for r in runs}) == 1, dtype
        for unit in runs[0].units:
            for op in unit.ops:
                if op.op.startswith(("c10d.", "fsdp.")):
                    assert op.max_abs is None and op.nonfinite_count == 0, op
    bf16 = fsdp_reports(ranks, "bf16")[0]
    assert not bf16.flags()
    # Charged as cost to the unit whose parameters they gather.
    for unit in ("fc1", "fc2", "head"):
        gathers = [c for c in bf16.by_module()[unit].op_costs if c.op == "c10d._allgather_base_.default"]
        assert gathers and all(c.bytes > 0 for c in gathers), unit


def test_fsdp_analysis_issues_the_all_gathers_its_passes_need(ranks: list[dict[str, Any]]) -> None:
    counts = ranks[0]["fsdp_counts"]
    forward, backward, analysis = counts["forward"], counts["backward"], counts["analysis"]
    assert forward["_allgather_base_"] == 3 and backward["_allgather_base_"] == 3  # one per fully_shard'ed Linear
    # Backward passes of the analysis, by their reduce-scatters (one per module each).
    assert analysis["_reduce_scatter_base_"] % backward["_reduce_scatter_base_"] == 0
    backwards = analysis["_reduce_scatter_base_"] // backward["_reduce_scatter_base_"]
    assert analysis["forwards"] >= 2 and backwards >= 1
    expected = analysis["forwards"] * forward["_allgather_base_"] + backwards * backward["_allgather_base_"]
    assert analysis["_allgather_base_"] == expected
    assert ranks[1]["fsdp_counts"] == counts


def test_fsdp_mixed_precision_policy_is_refused_in_one_line(ranks: list[dict[str, Any]]) -> None:
    errors = [r["fsdp_mixed"] for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "PrecisionDoctorError" in errors[0]["bases"]
    message = errors[0]["message"]
    assert "\n" not in message
    assert "MixedPrecisionPolicy(param_dtype=torch.bfloat16)" in message and "--dtype bf16" in message


@pytest.mark.parametrize("scenario", ["fsdp_state", "tp_state"])
def test_the_model_comes_out_as_it_went_in_and_trains(ranks: list[dict[str, Any]], scenario: str) -> None:
    for rank in ranks:
        state = rank[scenario]
        assert state["after"] == state["before"]  # local shards, gradients and buffers, bitwise
        assert state["same_parameters"]  # FSDP2 resharded: the registered DTensors are back
        assert state["stepped"] == state["replica_stepped"]  # a step after it: a replica's, bitwise


def test_fsdp_trains_after_an_analysis_that_failed_midway(ranks: list[dict[str, Any]]) -> None:
    plain = ranks[0]["fsdp_counts"]
    for rank in ranks:
        failed = rank["fsdp_failed"]
        assert failed["error"] is not None and "rank 1" in failed["error"]["message"]
        # FSDP2's iteration state was reset: the step gathers each module once per pass.
        assert failed["step"]["_allgather_base_"] == plain["forward"]["_allgather_base_"] + plain["backward"]["_allgather_base_"]
        assert failed["stepped"] == failed["replica_stepped"]


def test_dtensors_are_counted_once_per_element_by_placement(ranks: list[dict[str, Any]]) -> None:
    # Rank r holds arange(4) + 10 r as its local tensor.
    got = [rank["placements"] for rank in ranks]
    assert [g["shard"] for g in got] == [[0, 1, 2, 3], [10, 11, 12, 13]]  # each its shard
    assert [g["replicate"] for g in got] == [[0, 1, 2, 3], None]  # one copy: rank 0's
    assert [g["partial"] for g in got] == [[10, 12, 14, 16], None]  # the sum, once


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tensor_parallel_low_loss_is_a_real_autocast_runs(ranks: list[dict[str, Any]], dtype: str) -> None:
    tp = ranks[0][f"tp/{dtype}"]
    report = Report.from_json(json.dumps(tp["report"]))
    assert report.environment.distributed is not None and report.environment.distributed.wrapper == "tp"
    real = tp["real_low_loss"]
    assert abs(report.losses.low - real) <= 1e-3 * abs(real)
    assert report.losses.low != report.losses.fp32  # the low run did run low
    assert not [f for f in report.flags() if f.flag == "DIVERGENCE"]
    assert report.losses.rel_error < report.thresholds.divergence_rel_error


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tensor_parallel_issues_no_extra_collective_and_waits_for_all(ranks: list[dict[str, Any]], dtype: str) -> None:
    plain = ranks[0]["tp_counts"]
    for rank in ranks:
        tp = rank[f"tp/{dtype}"]
        analysis = tp["analysis"]
        # fc2's row-parallel all-reduce, once per forward of the model (the low run's and
        # the fp32 run's); backward issues none here. The shadows issue none of their own.
        assert plain["forward"]["all_reduce"] == 1 and plain["backward"]["all_reduce"] == 0
        assert analysis["all_reduce"] == analysis["forwards"] * plain["forward"]["all_reduce"]
        assert analysis["wait_tensor"] == analysis["all_reduce"]
        assert tp["unwaited"] == 0


def test_tensor_parallel_parameters_are_counted_once_per_element(ranks: list[dict[str, Any]]) -> None:
    report = Report.from_json(json.dumps(ranks[0]["tp/bf16"]["report"]))
    model = build_head_mlp().model
    numel = {n: p.numel() for n, p in model.named_parameters()}
    grads = {n: g.numel for u in report.units for n, g in u.backward.param_grads.items()}
    # fc1 column-wise (Shard(0)), fc2 row-wise (weight Shard(1), bias Replicate), the head a
    # plain module every rank holds a copy of.
    assert grads == numel
    assert sum(u.param_bytes for u in report.units) == 4 * sum(numel.values())

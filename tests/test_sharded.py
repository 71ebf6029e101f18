"""FSDP2 and tensor parallel on 2 gloo ranks on the CPU: one job (`tests/sharded_job.py`)
runs every scenario once, launched with the environment torchrun gives each rank, and the
tests read what each rank wrote. References: one process analyzing the whole batch, a plain
training step's collectives, a real `torch.autocast("cpu")` run."""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import pytest

import precision_doctor as pd
from precision_doctor.report import Report
from tests.fixtures import build_head_mlp
from tests.multiprocess import (
    assert_job_fidelity,
    data_parallel_fidelity,
    finish,
    rank_results,
    start,
)
from tests.sharded_job import FP16_SCALE, GRAD_THRESHOLD, PREFLIGHT_STEPS, ROWS

FSDP_SCALES = {"bf16": 1.0, "fp16": FP16_SCALE}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sharded_job")
    return rank_results(finish(start([sys.executable, "-m", "tests.sharded_job", str(out)])), out)


def flag_set(report: Report) -> set[tuple[str, str, str]]:
    return {(f.flag.value, f.unit, f.severity.value) for f in report.flags()}


def fsdp_reports(ranks: list[dict[str, Any]], dtype: str) -> list[Report]:
    runs = ranks[0][f"fsdp/{dtype}"]
    # Every rank returns the job's report, gradient fidelity included.
    assert runs == ranks[1][f"fsdp/{dtype}"]
    return [Report.from_json(json.dumps(r)) for r in runs]


@pytest.mark.parametrize("dtype", list(FSDP_SCALES))
def test_fsdp_on_batch_halves_equals_one_process_on_the_batch(ranks: list[dict[str, Any]], dtype: str) -> None:
    job = fsdp_reports(ranks, dtype)[0]
    case = build_head_mlp()
    whole = pd.analyze(case.model, case.batch * FSDP_SCALES[dtype], case.loss_fn, dtype=dtype)
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
        # Another summation order on a half batch (see test_distributed): up to ~k * 2^-24 of
        # the sum for a k-term reduction, k = 32 in HeadMLP.
        assert a.max_abs == pytest.approx(b.max_abs, rel=32 * 2**-24, abs=0), unit.name
        # FSDP2 averages the sharded gradients: the whole batch's mean-loss gradients, each
        # element counted once (the head's 1-row weight and its bias are empty on rank 1).
        assert set(mine[unit.name].backward.param_grads) == set(unit.backward.param_grads)
        for pname, g in unit.backward.param_grads.items():
            assert mine[unit.name].backward.param_grads[pname].numel == g.numel, pname
            assert mine[unit.name].backward.param_grads[pname].max_abs == pytest.approx(g.max_abs, rel=1e-5), pname
        assert mine[unit.name].param_bytes == unit.param_bytes
        # The activation gradients each unit is charged with: the same values' count (each
        # rank's mean over its half doubles them, so not their magnitudes). FSDP2's hook on a
        # sharded module's inputs passes the gradient of the module before it; charged to the
        # module it sits on, it added fc1's output gradient to fc2's, and so on.
        a_g, b_g = mine[unit.name].backward.stats, unit.backward.stats
        assert (a_g.numel if a_g else 0) == (b_g.numel if b_g else 0), unit.name
    assert flag_set(job) == flag_set(whole)
    if dtype == "fp16":
        assert ("OVERFLOW", "fc1", "error") in flag_set(job)  # the comparison is not vacuous
    assert job.losses.fp32 == pytest.approx(whole.losses.fp32, rel=1e-6)


def test_fsdp_gradient_fidelity_is_the_jobs(ranks: list[dict[str, Any]]) -> None:
    """The low gradients' error and cosine are summed over the ranks' shards (the head's
    1-row weight and its bias all on rank 0, an empty shard on rank 1) before GRAD_DIVERGENCE
    is judged: the job's numbers, redone by hand from real runs on each half averaged as FSDP2
    averages them. Tolerances: the sums' own rounding (`multiprocess.assert_job_fidelity`)."""
    assert ranks[0]["fsdp_grads"] == ranks[1]["fsdp_grads"]
    job = Report.from_json(json.dumps(ranks[0]["fsdp_grads"]))
    assert job.grad_fidelity is not None
    case = build_head_mlp()
    halves = [case.batch[ROWS * r : ROWS * (r + 1)] for r in range(2)]
    expected = data_parallel_fidelity(case, halves, "bf16", job.grad_fidelity.scale_log2)
    assert set(expected) == {"fc1", "fc2", "head"}
    assert_job_fidelity(job, expected)
    numel = {n: p.numel() for n, p in case.model.named_parameters()}
    assert job.grad_fidelity.numel == sum(numel.values())
    assert {n: f.numel for u in job.units for n, f in u.backward.param_grad_fidelity.items()} == numel
    whole = pd.analyze(
        case.model,
        case.batch,
        case.loss_fn,
        dtype="bf16",
        policy="cpu",
        thresholds=pd.Thresholds(grad_rel_error=GRAD_THRESHOLD),
    )
    grad_flags = {f for f in flag_set(job) if f[0] == "GRAD_DIVERGENCE"}
    assert grad_flags == {("GRAD_DIVERGENCE", "fc1", "warning"), ("GRAD_DIVERGENCE", "fc2", "warning")}
    assert flag_set(job) == flag_set(whole)


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
        assert (
            failed["step"]["_allgather_base_"]
            == plain["forward"]["_allgather_base_"] + plain["backward"]["_allgather_base_"]
        )
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


def test_tensor_parallel_gradients_are_charged_as_in_one_process(ranks: list[dict[str, Any]]) -> None:
    """The units charged with activation gradients under tensor parallel (the whole batch on
    both ranks) are one process's: DTensor's to_local / from_local nodes pass the gradient on,
    and charged to the unit that made them they added a copy of it to `<root>`. The sharded
    units' gradients count each element once. (A plain tensor every rank holds, the head's,
    is counted on each rank: `docs/distributed.md`.)"""
    report = Report.from_json(json.dumps(ranks[0]["tp/bf16"]["report"]))
    case = build_head_mlp()
    whole = pd.analyze(case.model, case.batch, case.loss_fn, dtype="bf16", policy="cpu")

    def numel(r: Report) -> dict[str, int]:
        return {u.name: u.backward.stats.numel for u in r.units if u.backward.stats and u.backward.stats.numel}

    mine, one = numel(report), numel(whole)
    assert set(mine) == set(one)
    assert {u: mine[u] for u in ("fc1", "act", "fc2")} == {u: one[u] for u in ("fc1", "act", "fc2")}


def test_tensor_parallel_parameters_are_counted_once_per_element(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["tp/bf16"]["report"] == ranks[1]["tp/bf16"]["report"]  # the job's, gradient fidelity included
    report = Report.from_json(json.dumps(ranks[0]["tp/bf16"]["report"]))
    model = build_head_mlp().model
    numel = {n: p.numel() for n, p in model.named_parameters()}
    grads = {n: g.numel for u in report.units for n, g in u.backward.param_grads.items()}
    # fc1 column-wise (Shard(0)), fc2 row-wise (weight Shard(1), bias Replicate), the head a
    # plain module every rank holds a copy of.
    assert grads == numel
    assert sum(u.param_bytes for u in report.units) == 4 * sum(numel.values())
    # The gradient comparison counts the same parts: each element once in the job.
    assert {n: f.numel for u in report.units for n, f in u.backward.param_grad_fidelity.items()} == numel
    assert report.grad_fidelity is not None and report.grad_fidelity.numel == sum(numel.values())


def _same_on_every_rank(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The pre-flight result every rank returned, less each rank's own clock."""
    stripped = []
    for r in results:
        r = copy.deepcopy(r)
        r.pop("timings_s")
        for run in r["runs"].values():
            run.pop("seconds")
        stripped.append(r)
    assert stripped[0] == stripped[1]
    return results[0]


@pytest.mark.parametrize("wrapper", ["fsdp", "tp"])
def test_preflight_and_plan_search_on_a_sharded_model(ranks: list[dict[str, Any]], wrapper: str) -> None:
    """The pre-flight (analysis, plan search with verification passes decided on the worst
    rank's error, short training runs) reaches one verdict and one plan on every rank, and
    the model comes out as it went in: a training step after it issues a plain step's
    collectives and equals a replica's that was never analyzed."""
    got = [r[f"{wrapper}_preflight"] for r in ranks]
    job = pd.PreflightResult.from_json(json.dumps(_same_on_every_rank([g["result"] for g in got])))
    assert job.plan is not None and job.plan.verification_passes >= 1
    assert got[0]["plan"] == got[1]["plan"] and got[0]["plan"] is not None
    assert got[0]["plan"]["verification_passes"] >= (2 if wrapper == "fsdp" else 1)
    if wrapper == "fsdp":
        # FSDP2's last gradient reduction runs outside any module: no module to plan for.
        assert job.plan.units["<backward>"] == "fp32"
    plain = ranks[0][f"{wrapper}_counts"]
    for g in got:
        assert g["after"] == g["before"] and g["same_parameters"]
        assert g["stepped"] == g["replica_stepped"]
        for name, n in g["step"].items():
            if name != "forwards":
                assert n == plain["forward"][name] + plain["backward"][name], name
    # Against one process on the whole batch: FSDP2 trains data parallel on the halves (its
    # averaged gradients, the ranks' mean loss), tensor parallel on the batch itself.
    case = build_head_mlp()
    dtype = "fp16" if wrapper == "fsdp" else "bf16"
    whole = pd.preflight(case.model, case.batch, case.loss_fn, dtype=dtype, steps=PREFLIGHT_STEPS)
    assert job.go and whole.go
    assert set(job.runs) == set(whole.runs) == {"fp32", "low", "planned"}
    assert whole.plan is not None
    for module in ("fc1", "fc2", "head"):  # FSDP2's root runs no op of its own: no unit there
        assert job.plan.units[module] == whole.plan.units[module], module
    for mode, run in job.runs.items():
        if wrapper == "tp" and mode != "fp32":
            continue  # its low runs all-reduce low partial sums: another rounding than one process's
        for s, w in zip(run.steps, whole.runs[mode].steps, strict=True):
            assert len(s.rank_losses) == 2
            assert s.loss == pytest.approx(w.loss, rel=1e-5), (mode, s.step)


def test_fp16_preflight_of_a_model_with_plain_and_dtensor_parameters_is_refused(ranks: list[dict[str, Any]]) -> None:
    errors = [r["tp_fp16_preflight"] for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "PrecisionDoctorError" in errors[0]["bases"] and "\n" not in errors[0]["message"]
    assert "GradScaler cannot unscale DTensor and plain gradients" in errors[0]["message"]
    assert "'head.weight'" in errors[0]["message"] and "--dtype bf16" in errors[0]["message"]


def test_an_exception_in_one_ranks_sharded_forward_fails_every_rank_naming_it(ranks: list[dict[str, Any]]) -> None:
    """Rank 0 waits in an FSDP2 all-gather when rank 1's forward raises: rank 1 posts its
    failure to the store, aborts its process group and raises at once; when its process exits
    (right after, as the CLI's would) rank 0's collective fails, and rank 0 raises rank 1's
    error (a user error: exit code 2 from the CLI on both) instead of waiting out the 30 s
    process-group timeout."""
    errors = [r["fsdp_raises"] for r in ranks]
    assert errors[0] is not None and errors[1] is not None
    assert errors[0]["type"] == errors[1]["type"] == "RanksFailedError"
    assert "PrecisionDoctorError" in errors[0]["bases"]
    assert errors[0]["message"] == errors[1]["message"]
    assert errors[0]["message"].startswith("rank 1: the model's forward raised ValueError: planted in fc2")
    assert not errors[0]["group"] and not errors[1]["group"]  # aborted: the job can only end
    # Rank 0 is released by rank 1's exit, not by the process group's timeout (30 s).
    assert errors[1]["seconds"] < errors[0]["seconds"] < 15, errors

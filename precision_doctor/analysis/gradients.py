"""Gradient fidelity: the real low-precision run's parameter gradients against the fp32 run's.

The low run's backward (`capture.lowrun.LowGraph`) runs at the loss scale real training would
use (`grad_scale_log2`) and its gradients are unscaled in fp32, as GradScaler unscales them;
what is left is what low precision costs the update itself: rounding in the backward,
gradients flushed at that scale, errors of the forward carried into the backward. Each
parameter's gradient is compared with fp32's (relative L2 error, cosine, non-finite values),
then per unit over the parameters it owns (`owner_of`) and over the model; GRAD_DIVERGENCE
is judged on the units (`flags.grad_divergence_flags`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from precision_doctor.analysis.distributed import StatsReducer
from precision_doctor.analysis.flags import grad_divergence_flags
from precision_doctor.analysis.loss_scale import recommend_loss_scale
from precision_doctor.capture.memory import TRIM_AFTER_BYTES, return_free_heap
from precision_doctor.capture.readback import Held, Job, Parallel, Readback
from precision_doctor.capture.statistics import (
    ErrorAccumulator,
    Workspace,
    compiled_squared_sums,
    squared_norm_job,
    true_count_job,
)
from precision_doctor.capture.units import owner_of
from precision_doctor.options import Flag, LowDtype, Regime
from precision_doctor.report import FlagRecord, GradFidelity, ModelGradFidelity, Report


def grad_scale_log2(report: Report) -> int:
    """The loss scale 2^k the low backward runs at: the recommended initial scale, which
    GradScaler keeps when started there (its headroom keeps the gradients finite); 2^0 in
    pure fp16, which trains without a scaler (GradScaler refuses to unscale fp16 gradients,
    and a scaled fp16 loss would overflow from 2^16: its gradient reaches it in fp16)."""
    env = report.environment
    if env.regime is Regime.PURE and env.dtype is LowDtype.FP16:
        return 0
    if env.dtype is LowDtype.FP8:
        return 0  # fp8 training scales each cast itself: no loss scaler
    return recommend_loss_scale(report).recommended_scale_log2


@dataclass
class GradComparison:
    """Sums over one or more gradient pairs (fp32, low), where the fp32 gradient is finite:
    its squared norm, the low one's and their squared distance (the last two where the low
    one is finite too; each tensor's to fp32's relative precision, `squared_norm`; summed in
    float64), and the count of low Inf/NaN there."""

    sum_sq_ref: float = 0.0
    sum_sq_low: float = 0.0
    sum_sq_err: float = 0.0
    nonfinite: int = 0
    numel: int = 0

    def add_job(self, ref: Held, low: Held, workspace: Workspace) -> Job[None]:
        """Add one gradient pair, as a job (capture/readback.py). On the CPU the three sums
        come from one compiled pass; elsewhere, or where that pass met an Inf/NaN, the norms
        in one read, the distance in a second, more reads only where fp64 or an Inf/NaN is
        involved."""
        r, lo = ref.t, low.t
        self.numel += r.numel()
        sums = compiled_squared_sums(r, lo)  # on the CPU, the three sums in one pass
        if sums is not None and all(map(math.isfinite, sums)):
            self.sum_sq_err += sums[0]
            self.sum_sq_ref += sums[1]
            self.sum_sq_low += sums[2]
            return
        # The pass's norms are `squared_norm`'s (the same loop over the same blocks).
        a, b = (sums[1], sums[2]) if sums is not None else (yield Parallel([squared_norm_job(r), squared_norm_job(lo)]))
        if math.isfinite(a) and math.isfinite(b):
            acc = ErrorAccumulator()
            yield from acc.add_job(r, lo, a, workspace)
            self.sum_sq_ref += a
            self.sum_sq_low += b
            self.sum_sq_err += acc.sum_sq_err
            return
        # Inf/NaN somewhere (rare): the low and error sums over the positions where both are
        # finite, fp32's norm over all of its own finite values: it is what the gradient
        # weighs in the model's (a low gradient that is Inf everywhere does not make fp32's
        # 0). Where the low values are finite wherever fp32's are, the two sets are one and
        # the cosine's identity holds; elsewhere `nonfinite` leaves no cosine to compute.
        ref_finite, low_finite = torch.isfinite(r), torch.isfinite(lo)
        keep = ref_finite & low_finite
        kept_ref, kept_low = r[keep], lo[keep]
        nonfinite, sq_ref, sq_low, sq_err = yield Parallel(
            [
                true_count_job(ref_finite & ~low_finite, r.shape),
                squared_norm_job(r[ref_finite]),
                squared_norm_job(kept_low),
                squared_norm_job(kept_low - kept_ref),
            ]
        )
        self.nonfinite += nonfinite
        self.sum_sq_ref += sq_ref
        self.sum_sq_low += sq_low
        self.sum_sq_err += sq_err

    def merge(self, other: GradComparison) -> None:
        self.sum_sq_ref += other.sum_sq_ref
        self.sum_sq_low += other.sum_sq_low
        self.sum_sq_err += other.sum_sq_err
        self.nonfinite += other.nonfinite
        self.numel += other.numel

    @property
    def rel_l2_error(self) -> float:
        if self.nonfinite:
            return math.inf
        if self.sum_sq_err == 0:
            return 0.0
        return math.sqrt(self.sum_sq_err / self.sum_sq_ref) if self.sum_sq_ref > 0 else math.inf

    @property
    def cosine(self) -> float | None:
        a, b = self.sum_sq_ref, self.sum_sq_low
        if self.nonfinite or a <= 0 or b <= 0:
            return None
        # a.b from the norms: ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b (no fourth pass over
        # the values; accurate to the sums' own relative precision).
        return max(-1.0, min(1.0, (a + b - self.sum_sq_err) / (2.0 * math.sqrt(a * b))))

    def fidelity(self) -> GradFidelity:
        return GradFidelity(
            rel_l2_error=self.rel_l2_error,
            cosine=self.cosine,
            nonfinite_count=self.nonfinite,
            numel=self.numel,
            fp32_l2_norm=math.sqrt(self.sum_sq_ref),
        )


def _dense(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


class GradComparer:
    """Compares the low run's parameter gradients with fp32's one by one, as they arrive
    (`add`, a `LowGraph.backward` sink): only the sums are kept, so the low gradients never
    all exist at once. `fp32_grads`: by parameter name (every name of a tied parameter, one
    tensor). `drop_compared`: `fp32_grads` is a dict the caller needs no more than this
    comparison does, and each fp32 gradient leaves it once compared, so its memory goes as the
    low backward goes on (GPT-2 small's 0.5 GB of them were held through the whole low
    backward, the analysis' peak)."""

    def __init__(
        self, fp32_grads: Mapping[str, torch.Tensor], workspace: Workspace | None = None, *, drop_compared: bool = False
    ) -> None:
        assert not drop_compared or isinstance(fp32_grads, dict)
        self._fp32 = fp32_grads
        self._drop = drop_compared
        self._dropped_bytes = 0
        self._ws = workspace or Workspace()
        self._by_name: dict[str, GradComparison] = {}
        self._by_tensor: dict[int | str, GradComparison] = {}  # fp32 tensor (else name) -> its comparison
        self._model = GradComparison()
        # The comparisons' host reads wait here and are read back together (`_settle`), a
        # handful of rounds for all gradients rather than a few per gradient; what the
        # pending ones hold is bounded by `readback.HOLD_BUDGET_BYTES`.
        self._readback = Readback()

    def _settle(self) -> None:
        self._readback.flush()

    def add(self, names: list[str], low: torch.Tensor) -> None:
        """One low gradient (unscaled, fp32) under every name of its parameter. A parameter
        already compared is left as it is: a low run rerun after its kept graph failed
        (`engine._low_backward`) sends the gradients made before the failure again."""
        if names[0] in self._by_name:
            return
        found = next((self._fp32[n] for n in names if n in self._fp32), None)
        key: int | str = id(found) if found is not None else names[0]
        comparison = self._by_tensor.get(key)
        if comparison is None:
            # A gradient only one run has is compared with zeros: the other run's optimizer
            # leaves that parameter alone.
            ref = _dense(found) if found is not None else torch.zeros_like(low)
            comparison = self._by_tensor[key] = GradComparison()
            if not (ref.is_complex() or low.is_complex()):  # nothing here rounds complex values
                hold = self._readback.hold
                self._readback.submit(comparison.add_job(hold(ref.float()), hold(low), self._ws))
                self._readback.then(functools.partial(self._model.merge, comparison))  # in arrival order
                if self._readback.over_budget:
                    self._settle()
            del ref
        for n in names:
            self._by_name[n] = comparison
        if self._drop and found is not None:
            assert isinstance(self._fp32, dict)
            for n in names:
                self._fp32.pop(n, None)  # the pending comparison holds it till it has run
            if found.device.type == "cpu" and not found.is_sparse:  # the trim is the host heap's
                self._dropped_bytes += found.numel() * found.element_size()
            del found
            if self._dropped_bytes >= TRIM_AFTER_BYTES:
                # Freed gradients of a few MiB stay in the heap, where the large allocations
                # still to come (a tied embedding's gradient, summed) cannot use them.
                self._settle()
                return_free_heap()
                self._dropped_bytes = 0

    def add_all(self, low_grads: Mapping[str, torch.Tensor]) -> None:
        """`add` for gradients by name (tied names sharing one tensor)."""
        names: dict[int, list[str]] = {}
        for n, g in low_grads.items():
            names.setdefault(id(g), []).append(n)
        for n, g in low_grads.items():
            if names[id(g)][0] == n:
                self.add(names[id(g)], _dense(g).float())

    def combine_ranks(
        self, params: Sequence[Sequence[str]], rank_flags: Sequence[FlagRecord] = ()
    ) -> list[list[FlagRecord]]:
        """Replace this rank's sums by the job's: each parameter's summed across the ranks of
        a torch.distributed job (`distributed.StatsReducer`: one checkpoint and batched
        all_reduces, not one per parameter), the model's recomputed from those, each tied
        parameter once. `params`: every parameter's names (a tied one's together), the same
        on every rank; each rank's gradients must be the parts it counts (see
        `distributed.Job.counted_gradients`). Outside a job the sums stay as they are.
        Returns every rank's `rank_flags` (its own GRAD_DIVERGENCE findings), in rank order,
        carried by the same checkpoint."""
        self._settle()
        red = StatsReducer()
        every_rank: list[list[FlagRecord]] = [list(rank_flags)]

        def gathered(values: list[Any]) -> None:
            every_rank[:] = [list(v) for v in values]

        red.gather(list(rank_flags), gathered)
        combined: list[tuple[Sequence[str], GradComparison]] = []
        for names in params:
            mine = next((self._by_name[n] for n in names if n in self._by_name), GradComparison())
            job = GradComparison()
            key = f"grad fidelity {names[0]}"
            for field in ("sum_sq_ref", "sum_sq_low", "sum_sq_err"):
                red.float_total(f"{key} {field}", getattr(mine, field), functools.partial(setattr, job, field))
            for field in ("nonfinite", "numel"):
                red.total(f"{key} {field}", getattr(mine, field), functools.partial(setattr, job, field))
            combined.append((names, job))
        red.reduce()
        self._by_name = {n: c for names, c in combined for n in names}
        self._model = GradComparison()
        for _, c in combined:
            self._model.merge(c)
        return every_rank

    def with_fidelity(
        self,
        report: Report,
        scale_log2: int,
        *,
        job_params: Sequence[Sequence[str]] | None = None,
        rank_flags: Sequence[FlagRecord] = (),
    ) -> Report:
        """`report` with the comparison: per parameter and unit (`backward.param_grad_fidelity`,
        `backward.grad_fidelity`), over the model (`grad_fidelity`), and GRAD_DIVERGENCE
        findings. A parameter with an fp32 gradient that the low run did not give one is
        compared with zeros. `job_params`: in a torch.distributed job, every parameter's
        names (see `combine_ranks`): the sums are the job's before anything is judged, and
        `rank_flags` (this rank's own GRAD_DIVERGENCE, `rank_grad_divergence`) join this
        rank's entry of `report.ranks`."""
        missing: dict[int, list[str]] = {}
        for n, g in self._fp32.items():
            if n not in self._by_name:
                missing.setdefault(id(g), []).append(n)
        for group in missing.values():
            ref = self._fp32[group[0]]
            self.add(group, torch.zeros_like(_dense(ref), dtype=torch.float32))
        self._settle()
        ranks = report.ranks
        if job_params is not None:
            every_rank = self.combine_ranks(job_params, rank_flags)
            if ranks:
                ranks = [r.model_copy(update={"flags": [*r.flags, *every_rank[r.rank]]}) for r in ranks]
        per_param = {n: c for n, c in self._by_name.items() if c.numel}

        units: dict[str, GradComparison] = {}
        for name, comparison in per_param.items():
            units.setdefault(owner_of(name), GradComparison()).merge(comparison)
        fidelity = {u: c.fidelity() for u, c in units.items()}
        model = self._model
        flags = grad_divergence_flags(report, fidelity, report.thresholds, scale_log2, math.sqrt(model.sum_sq_ref))

        new_units = []
        for u in report.units:
            if u.name not in fidelity:
                new_units.append(u)
                continue
            backward = u.backward.model_copy(
                update={
                    "grad_fidelity": fidelity[u.name],
                    "param_grad_fidelity": {
                        p: per_param[p].fidelity() for p in u.backward.param_grads if p in per_param
                    },
                }
            )
            new_units.append(u.model_copy(update={"backward": backward, "flags": [*u.flags, *flags.get(u.name, [])]}))
        return report.model_copy(
            update={
                "units": new_units,
                "ranks": ranks,
                "grad_fidelity": ModelGradFidelity(**model.fidelity().model_dump(), scale_log2=scale_log2)
                if model.numel
                else None,
            }
        )


def with_grad_fidelity(
    report: Report,
    fp32_grads: Mapping[str, torch.Tensor],
    low_grads: Mapping[str, torch.Tensor],
    scale_log2: int,
    workspace: Workspace | None = None,
    *,
    job_params: Sequence[Sequence[str]] | None = None,
    rank_flags: Sequence[FlagRecord] = (),
) -> Report:
    """`GradComparer.with_fidelity` for gradients all at hand, by parameter name."""
    comparer = GradComparer(fp32_grads, workspace)
    comparer.add_all(low_grads)
    return comparer.with_fidelity(report, scale_log2, job_params=job_params, rank_flags=rank_flags)


def rank_grad_divergence(
    own: Report,
    fp32_grads: Mapping[str, torch.Tensor],
    low_grads: Mapping[str, torch.Tensor],
    scale_log2: int,
    workspace: Workspace | None = None,
) -> list[FlagRecord]:
    """The GRAD_DIVERGENCE one rank of a job raises alone (`Report.ranks`): its own gradients
    (not averaged or summed with the others': no collective), judged with the same thresholds
    on `own`, its own report."""
    judged = with_grad_fidelity(own, fp32_grads, low_grads, scale_log2, workspace)
    return [f for f in judged.flags() if f.flag is Flag.GRAD_DIVERGENCE]

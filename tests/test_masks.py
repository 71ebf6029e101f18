"""Values meant to be zero or masked are recognised from the dataflow, not from their size
(capture/masks.py): -100, -1e4, -1e38, finfo(float32).min and -inf masks on causal attention,
added to the scores or written by `masked_fill` / `where`, in fp16 and bf16 and every regime,
are no UNDERFLOW and no OVERFLOW; an overflow or an underflow of computed values in the same
tensor, and a row the low dtype turns into NaN, still are.

References: real low-precision runs of a copy of the model - `torch.autocast("cpu", dtype)`
for `--policy cpu`, `model.to(dtype)` for `--regime pure` - read through forward hooks on the
softmax, and numpy counts over the fp32 run's values.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import precision_doctor as pd
from precision_doctor.report import Report

from .fixtures import build_swin

T, D, B = 32, 8, 4
FP32_MIN = torch.finfo(torch.float32).min
MASKS = {"-100": -100.0, "-1e4": -1e4, "-1e38": -1e38, "finfo.min": FP32_MIN, "-inf": -math.inf}
LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}
SMALLEST_SUBNORMAL = {"fp16": 2.0**-24, "bf16": 2.0**-133}
REGIMES = {"autocast-cuda": ("autocast", "cuda"), "autocast-cpu": ("autocast", "cpu"), "pure": ("pure", "cuda")}
MASKED = B * T * (T - 1) // 2  # the future positions of every query of every sequence


class Attention(nn.Module):
    """Causal attention whose future positions get `value`, `how`: "add" (a constant mask built
    in fp32, cast to the scores' dtype and added, as transformers' 4-D masks are), "fill"
    (`scores.masked_fill(blocked, value)`), "where" (`torch.where(blocked, torch.tensor(value),
    scores)`, GPT-2's literal), "views" (the additive mask through cat, expand, transposes and a
    cast first). `temperature` scales the logits, `gain` the masked scores (controls: values
    that underflow or overflow beside the mask); `full_row` masks the first query entirely."""

    def __init__(
        self, value: float, how: str, *, temperature: float = 1.0, gain: float = 1.0, full_row: bool = False
    ) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.softmax = nn.Softmax(-1)
        self.proj = nn.Linear(D, D)
        self.value, self.how, self.temperature, self.gain, self.full_row = value, how, temperature, gain, full_row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        s = (q @ k.transpose(-2, -1)) * (self.temperature / math.sqrt(D))
        blocked = torch.ones(T, T, dtype=torch.bool).triu(1)
        if self.full_row:
            blocked[0] = True
        if self.how == "fill":
            s = s.masked_fill(blocked, self.value)
        elif self.how == "where":
            s = torch.where(blocked, torch.tensor(self.value), s)
        else:
            mask = torch.zeros(T, T).masked_fill(blocked, self.value)
            if self.how == "views":
                mask = torch.cat([mask[:, : T // 2], mask[:, T // 2 :]], 1)[None].expand(B, T, T)
                mask = mask.transpose(1, 2).transpose(1, 2).contiguous()
            s = s + mask.to(s.dtype)
        if self.gain != 1.0:
            s = s * self.gain
        return self.proj(self.softmax(s) @ v)


class Net(nn.Module):
    def __init__(self, value: float, how: str, **kwargs: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention(value, how, **kwargs)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x))


def _loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return out.pow(2).mean()


BATCH = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))


def _analyze(net: nn.Module, dtype: str, regime: str) -> Report:
    run_regime, policy = REGIMES[regime]
    return pd.analyze(net, BATCH, _loss, dtype=dtype, regime=run_regime, policy=policy)


def _blocked(full_row: bool = False) -> torch.Tensor:
    blocked = torch.ones(T, T, dtype=torch.bool).triu(1)
    if full_row:
        blocked[0] = True
    return blocked.expand(B, T, T)


def _softmax_run(net: nn.Module, dtype: str | None, regime: str = "pure") -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, probabilities) at `attn.softmax` in a real run: fp32 (`dtype` None), under a
    real `torch.autocast("cpu")` or after `model.to(low)`; both returned in fp32."""
    model = copy.deepcopy(net)
    batch = BATCH
    low = LOW[dtype] if dtype else None
    if low is not None and regime == "pure":
        model, batch = model.to(low), BATCH.to(low)
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        seen["scores"], seen["probs"] = args[0].detach().float(), out.detach().float()

    handle = model.attn.softmax.register_forward_hook(hook)
    region = torch.autocast("cpu", dtype=low) if low is not None and regime != "pure" else contextlib.nullcontext()
    try:
        with torch.no_grad(), region:
            model(batch)
    finally:
        handle.remove()
    return seen["scores"], seen["probs"]


def _fits(value: float, dtype: str) -> bool:
    """Whether `masked_fill` of a low tensor takes `value`: torch refuses a finite number the
    dtype cannot hold ("value cannot be converted ... without overflow")."""
    return not math.isfinite(value) or abs(value) <= torch.finfo(LOW[dtype]).max


# --- masks are no finding -----------------------------------------------------------------


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("dtype", sorted(LOW))
@pytest.mark.parametrize("how", ["add", "fill"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_masks_are_no_underflow_or_overflow(mask: str, how: str, dtype: str, regime: str) -> None:
    """No finding, in any form, dtype and regime; every masked probability is counted as the
    zero it stands for. Where the low dtype cannot take the filled number, real training fails
    in `masked_fill` - and so does the analysis, saying so in one line."""
    net = Net(MASKS[mask], how)
    if how == "fill" and not _fits(MASKS[mask], dtype):
        with pytest.raises(RuntimeError, match="without overflow"):
            _softmax_run(net, dtype, "autocast" if regime != "pure" else "pure")
        with pytest.raises(pd.PrecisionDoctorError, match=f"fails in {dtype} .* not in fp32: .*without overflow"):
            _analyze(net, dtype, regime)
        return
    report = _analyze(net, dtype, regime)
    assert not report.flags(), report.flags()
    assert bool(report), report.verdict
    stats = report.by_module()["attn.softmax"].forward.stats
    assert stats is not None
    assert stats.masked_count == MASKED
    assert getattr(stats, dtype).underflow_count == 0
    assert stats.numel - stats.zero_count == B * T * T - MASKED


@pytest.mark.parametrize("how", ["where", "views"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_literal_and_viewed_masks_are_recognised(mask: str, how: str) -> None:
    """GPT-2's `where` with a literal, and an additive mask handed on through cat, expand,
    transposes and a cast: recognised all the same (pure fp16, where everything is held low)."""
    report = _analyze(Net(MASKS[mask], how), "fp16", "pure")
    assert not report.flags(), report.flags()
    stats = report.by_module()["attn.softmax"].forward.stats
    assert stats is not None and stats.masked_count == MASKED


@pytest.mark.parametrize("regime", ["autocast-cpu", "pure"])
@pytest.mark.parametrize("dtype", sorted(LOW))
def test_masked_probabilities_are_zero_in_the_real_low_run(dtype: str, regime: str) -> None:
    """-100: e^-100 ~ 4e-44 is an fp32 subnormal, below fp16's and bf16's smallest subnormal
    (a few are 0 already in fp32), and the real low run's softmax gives exactly 0 there. By
    their size these probabilities are an underflow (what the analysis counted before); they
    are counted as zeros, and the unmasked probabilities are untouched."""
    net = Net(-100.0, "add")
    blocked = _blocked()
    _, ref = _softmax_run(net, None)
    _, low = _softmax_run(net, dtype, "autocast" if regime == "autocast-cpu" else "pure")
    masked_ref = ref[blocked].numpy().astype(np.float64)
    assert (masked_ref < SMALLEST_SUBNORMAL[dtype]).all() and (masked_ref > 0).sum() > 0.9 * MASKED
    assert bool((low[blocked] == 0).all())
    report = _analyze(net, dtype, regime)
    stats = report.by_module()["attn.softmax"].forward.stats
    assert stats is not None and stats.masked_count == MASKED
    assert getattr(stats, dtype).underflow_count == 0
    assert not report.flags(), report.flags()


@pytest.mark.parametrize("mask", ["-1e38", "finfo.min"])
def test_sentinel_held_as_inf_still_masks(mask: str) -> None:
    """fp16 holds -1e38 and finfo.min as -inf: the real fp16 run's scores are -inf at every
    masked position, its probabilities there 0 and nowhere NaN - the mask works, and the report
    shows no overflow, finite errors, and a final-loss error as small as the real run's."""
    net = Net(MASKS[mask], "add")
    blocked = _blocked()
    scores, probs = _softmax_run(net, "fp16")
    assert bool(torch.isneginf(scores[blocked]).all()) and bool(torch.isfinite(scores[~blocked]).all())
    assert bool((probs[blocked] == 0).all()) and not bool(probs.isnan().any())
    report = _analyze(net, "fp16", "pure")
    assert not report.flags(), report.flags()
    attn = report.by_module()["attn"]
    assert attn.forward.stats is not None and attn.forward.stats.fp16.overflow_count == 0
    assert attn.forward.propagated is not None and math.isfinite(attn.forward.propagated.rel_l2_error)
    assert report.losses.rel_error < 1e-2


# --- what the masks do not hide -------------------------------------------------------------


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_overflow_beside_the_mask_is_still_flagged(regime: str) -> None:
    """Masked scores scaled by 3e4 after a -1e4 `where`: the masked positions (-3e8) are mask
    values; the computed ones above 65504 are an overflow of `mul`, counted exactly (numpy over
    the fp32 values), the masked ones not."""
    net = Net(-1e4, "where", gain=3e4)
    blocked = _blocked()
    scores, _ = _softmax_run(net, None)
    computed = scores[~blocked].numpy().astype(np.float64)
    expected = int((np.abs(computed) > 65504).sum())
    assert expected > 0 and bool((scores[blocked].abs() > 65504).all())
    report = _analyze(net, "fp16", regime)
    flags = [f for f in report.by_module()["attn"].flags if f.flag is pd.Flag.OVERFLOW]
    assert len(flags) == 1, report.flags()
    assert flags[0].severity is pd.Severity.ERROR and flags[0].evidence.op == "mul.Tensor"
    assert flags[0].evidence.values["overflow_count"] == expected
    # bf16 holds both (its coarse logits may pick another maximum: not a range finding)
    assert not [f for f in _analyze(net, "bf16", regime).flags() if f.flag is pd.Flag.OVERFLOW]


@pytest.mark.parametrize("regime", ["autocast-cpu", "pure"])
def test_underflow_beside_the_mask_is_still_flagged(regime: str) -> None:
    """Logits at temperature 30 behind a -100 mask: most unmasked probabilities fall below fp16's
    2^-24 and flush in the real fp16 run - an underflow, counted exactly, the masked positions
    not. (CUDA's autocast runs softmax in fp32: nothing flushes there.)"""
    net = Net(-100.0, "add", temperature=30.0)
    blocked = _blocked()
    _, ref = _softmax_run(net, None)
    _, low = _softmax_run(net, "fp16", "autocast" if regime == "autocast-cpu" else "pure")
    unmasked = ref[~blocked].numpy().astype(np.float64)
    expected = int(((unmasked > 0) & (unmasked < 2.0**-24)).sum())
    assert expected > 0.1 * (B * T * T - MASKED)
    flushed_real = int(((ref[~blocked] > 0) & (low[~blocked] == 0)).sum())
    assert 0 < flushed_real <= expected  # the definition counts (2^-25, 2^-24) too; the cast rounds those up
    report = _analyze(net, "fp16", regime)
    flags = report.by_module()["attn.softmax"].flags
    assert [f.flag for f in flags] == [pd.Flag.UNDERFLOW], report.flags()
    assert flags[0].evidence.values["underflow_count"] == expected
    assert not _analyze(net, "fp16", "autocast-cuda").by_module()["attn.softmax"].flags


@pytest.mark.parametrize(
    ("mask", "dtype", "nan"),
    [("-1e38", "fp16", True), ("finfo.min", "fp16", True), ("finfo.min", "bf16", True), ("-1e38", "bf16", False)],
)
def test_a_fully_masked_row_the_low_dtype_makes_nan_is_flagged(mask: str, dtype: str, nan: bool) -> None:
    """A query with every key masked: in fp32 its probabilities are uniform; where the low dtype
    holds the mask as -inf (-1e38 in fp16, finfo.min in both) the real low run's softmax gives
    NaN there, which training cannot survive - an error finding at the softmax. bf16 holds
    -1e38: uniform, as in fp32, and no finding."""
    net = Net(MASKS[mask], "add", full_row=True)
    _, ref = _softmax_run(net, None)
    _, low = _softmax_run(net, dtype)
    assert bool(torch.isfinite(ref).all())
    assert bool(low[:, 0].isnan().all()) is nan and bool(low[:, 1:].isfinite().all())
    report = _analyze(net, dtype, "pure")
    if not nan:
        assert not report.flags(), report.flags()
        return
    flags = report.by_module()["attn.softmax"].flags
    assert flags and all(f.severity is pd.Severity.ERROR for f in flags), report.flags()
    assert flags[0].evidence.op == "_softmax.default" and flags[0].evidence.values["nonfinite_count"] == B * T
    assert not report


def test_stock_swin_shifted_window_masks_are_not_underflow() -> None:
    """transformers' Swin: the shifted windows' -100 mask (built in forward from a constant,
    `masked_fill(mask != 0, -100.0)`) is recognised in every shifted block; the probabilities it
    zeroes were counted as fp16 underflow before."""
    case = build_swin()
    report = pd.analyze(case.model, case.batch, case.loss_fn, dtype="fp16", regime="pure")
    shifted = [u for u in report.units if u.name.endswith("blocks.1.attention")]
    assert len(shifted) == 2
    for unit in shifted:
        assert unit.forward.stats is not None and unit.forward.stats.masked_count > 0
        assert unit.forward.stats.fp16.underflow_count == 0, unit.name
    assert not [f for f in report.flags() if f.flag in (pd.Flag.UNDERFLOW, pd.Flag.OVERFLOW)]

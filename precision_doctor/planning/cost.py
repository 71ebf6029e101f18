"""The cost model: estimated step time and activation memory of a per-unit dtype plan.

Each op the capture recorded, forward and backward, costs a roofline, max(FLOPs / peak for
its dtype, bytes / bandwidth) (FLOPs from `torch.utils.flop_counter`'s formulas, bytes
read and written from the recorded shapes; views move none); a unit costs the sum over its
ops. A unit that runs low moves half the bytes (integer tensors such as indices are halved
too, a small overestimate of the saving), and pays for casting its weights (read fp32,
write low; autocast caches the cast for the step).

A cast costs its bytes at every forward dataflow edge whose producer and consumer run in
different dtypes, once forward (the activation) and once backward (its gradient): read one
dtype, write the other. This is what makes an isolated fp32 island inside a low region
expensive, and what the search trades against the islands' error.

Device profiles are published dense datasheet figures (no sparsity); `cpu` is measured
on this machine once per process. `timing.measure_cost_model` replaces the rooflines by
times measured on the model's own device.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

import torch

from precision_doctor.capture.fp8 import MX_BLOCK
from precision_doctor.capture.units import LOSS_UNIT
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.options import Fp8Recipe, LowDtype, Phase, Regime, Target
from precision_doctor.report import Report, Unit

CAST_BYTES_FACTOR = 1.5
"""A cast reads the tensor in one dtype and writes it in the other: 4 + 2 bytes per fp32 4."""


@dataclass(frozen=True)
class DeviceProfile:
    """Peak dense throughput per dtype and memory bandwidth of one device."""

    name: str
    fp32_flops_per_s: float
    tf32_flops_per_s: float
    fp16_flops_per_s: float
    bf16_flops_per_s: float
    bandwidth_bytes_per_s: float
    source: str
    fp8_flops_per_s: float | None = None
    """Dense fp8 (e4m3/e5m2) tensor-core peak with fp32 accumulation; None where the device
    has no fp8 matmul (A100) or no verified figure."""
    mx_fp8: bool = False
    """Whether its tensor cores run MX block-scaled fp8 matmuls (an e8m0 scale per 32 values,
    `_scaled_mm` with block scales): Blackwell (B200) does, at its fp8 peak; Hopper (H100,
    H200) has per-tensor scaled fp8 only, so torchao's `MXFP8Linear` has no kernel there."""

    def peak_flops_per_s(self, dtype: str) -> float:
        """fp32 units run without TF32: PyTorch's default matmul precision is "highest"."""
        if dtype == "fp8":
            if self.fp8_flops_per_s is None:
                raise PrecisionDoctorError(f"{self.name} has no fp8 matmul peak: plan fp8 for h100, h200 or b200")
            return self.fp8_flops_per_s
        return {
            "fp32": self.fp32_flops_per_s,
            "tf32": self.tf32_flops_per_s,
            "fp16": self.fp16_flops_per_s,
            "bf16": self.bf16_flops_per_s,
        }[dtype]


TERA = 1e12
# The datasheets print tensor-core figures with 2:4 sparsity ("* With sparsity"); the dense
# peaks here are half of them. H100 SXM (NVIDIA H100 Tensor Core GPU datasheet): FP8 3,958*,
# BF16/FP16 1,979*, TF32 989*, FP32 67 TFLOPS, 3.35 TB/s. H200 SXM (NVIDIA H200 datasheet):
# the same GH100 compute (FP8 3,958*, BF16 1,979*), HBM3e at 4.8 TB/s. HGX B200 (NVIDIA HGX
# B200 datasheet, "Individual Blackwell GPU Specifications", 1,000 W): FP8/FP6 9 PFLOPS*,
# FP16/BF16 4.5 PFLOPS*, TF32 2.2 PFLOPS*, FP32 75 TFLOPS, 7.7 TB/s (8 TB/s is the GB200's
# GPU). Checked against the datasheet tables as quoted at glennklockwood.com/garden/processors
# (h100, B200) and zdszero.github.io/Computer/Artificial_Intelligence/Hardware.html (HGX B200).
PROFILES: dict[Target, DeviceProfile] = {
    Target.H100: DeviceProfile(
        "NVIDIA H100 SXM",
        67 * TERA,
        495 * TERA,
        989 * TERA,
        989 * TERA,
        3.35 * TERA,
        "NVIDIA H100 datasheet, dense tensor-core figures",
        fp8_flops_per_s=1979 * TERA,
    ),
    Target.H200: DeviceProfile(
        "NVIDIA H200 SXM",
        67 * TERA,
        495 * TERA,
        989 * TERA,
        989 * TERA,
        4.8 * TERA,
        "NVIDIA H200 datasheet, dense tensor-core figures (H100 SXM compute, HBM3e)",
        fp8_flops_per_s=1979 * TERA,
    ),
    Target.B200: DeviceProfile(
        "NVIDIA B200 (HGX)",
        75 * TERA,
        1100 * TERA,
        2250 * TERA,
        2250 * TERA,
        7.7 * TERA,
        "NVIDIA HGX B200 datasheet, dense tensor-core figures",
        fp8_flops_per_s=4500 * TERA,
        mx_fp8=True,  # MXFP8 at the FP8 rate: the datasheet prints one FP8 figure for Blackwell's tensor cores
    ),
    Target.A100: DeviceProfile(
        "NVIDIA A100 SXM 80GB",
        19.5 * TERA,
        156 * TERA,
        312 * TERA,
        312 * TERA,
        2.039 * TERA,
        "NVIDIA A100 datasheet, dense tensor-core figures",
    ),
    Target.RTX4090: DeviceProfile(
        # 165 TFLOP/s is fp16/bf16 with fp32 accumulate (330 with fp16 accumulate).
        "NVIDIA RTX 4090",
        82.6 * TERA,
        82.6 * TERA,
        165 * TERA,
        165 * TERA,
        1.008 * TERA,
        "NVIDIA Ada architecture whitepaper, dense, fp32 accumulate",
    ),
}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU), so a timer sees them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_it(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / reps


def measure_device_profile(device: torch.device | str) -> DeviceProfile:
    """A device, measured: a matmul per dtype (256^3 on a CPU, 4096^3 on a GPU) and a
    copy of 32 MiB (256 MiB on a GPU). ~0.2 s."""
    dev = torch.device(device)
    gpu = dev.type != "cpu"
    n = 4096 if gpu else 256
    flops = 2 * n**3
    peaks: dict[str, float] = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.full((n, n), 0.5, device=dev, dtype=dt)  # no draw from the user's RNG
        peaks[name] = flops / _time_it(functools.partial(torch.matmul, a, a), 5, dev)
    src = torch.empty((64 if gpu else 8) * 2**20, device=dev)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / _time_it(lambda: dst.copy_(src), 5, dev)
    return DeviceProfile(
        f"measured {dev}",
        peaks["fp32"],
        peaks["fp32"],
        peaks["fp16"],
        peaks["bf16"],
        bw,
        f"measured on this machine's {dev} (matmul {n}^3, {src.numel() * 4 // 2**20} MiB copy)",
    )


@functools.cache
def local_cpu_profile() -> DeviceProfile:
    """This CPU, measured once per process."""
    return measure_device_profile("cpu")


def profile_for(target: str | Target) -> DeviceProfile:
    try:
        t = Target(target)
    except ValueError:
        choices = ", ".join(m.value for m in Target)
        raise PrecisionDoctorError(f"unknown target {target!r}; choose one of: {choices}") from None
    return local_cpu_profile() if t is Target.CPU else PROFILES[t]


@dataclass(frozen=True)
class UnitCost:
    """One unit's step time (forward + backward) and saved activations in each dtype."""

    name: str
    fp32_time_s: float
    low_time_s: float
    fp32_activation_bytes: int
    low_activation_bytes: int
    fp32_under_autocast: bool = False
    """Autocast runs it in fp32 whatever the plan labels it (a LayerNorm, the loss): its low
    choice costs its fp32 time and hands its neighbours fp32 values."""


@dataclass(frozen=True)
class EdgeCost:
    src: str
    dst: str
    bytes: int
    cast_time_s: float
    """Forward cast of the activation plus backward cast of its gradient."""


@dataclass(frozen=True)
class CostModel:
    """Unit and edge costs of one report on one device, for one low dtype."""

    profile: DeviceProfile
    dtype: LowDtype
    units: tuple[UnitCost, ...]
    edges: tuple[EdgeCost, ...]

    @functools.cached_property
    def fp32_under_autocast(self) -> frozenset[str]:
        """The units `UnitCost.fp32_under_autocast`."""
        return frozenset(u.name for u in self.units if u.fp32_under_autocast)

    def runs_low(self, low: Mapping[str, bool]) -> dict[str, bool]:
        """Which units run low under a plan (unit -> planned low): a unit autocast runs in fp32
        (`fp32_under_autocast`) runs fp32 under either label. (A unit that takes its inputs'
        dtype is costed as labelled: per call it follows its own inputs, which a per-unit cost
        cannot follow.)"""
        return {n: v and n not in self.fp32_under_autocast for n, v in low.items()}

    def step_time_s(self, low: Mapping[str, bool]) -> float:
        """Estimated step time of a plan (unit -> planned low; missing units run fp32), of the
        units as they run (`runs_low`)."""
        low = self.runs_low(low)
        t = sum(u.low_time_s if low.get(u.name, False) else u.fp32_time_s for u in self.units)
        t += sum(e.cast_time_s for e in self.edges if low.get(e.src, False) != low.get(e.dst, False))
        return t

    def label_low_where_fp32_anyway(self, labels: dict[str, str], forced: Collection[str], low: str) -> set[str]:
        """Relabel `low`, in `labels` (unit -> label, "fp32" kept), the units a search kept fp32
        that autocast runs in fp32 under either label (`fp32_under_autocast`), but for those
        kept fp32 for a reason of their own (`forced`): they then run as plain autocast runs
        them, and no export lists them as kept fp32 (a plan listed every LayerNorm "on a
        tie"). Returns the units relabelled."""
        relabelled = {n for n in self.fp32_under_autocast if labels.get(n) == "fp32" and n not in forced}
        labels.update(dict.fromkeys(relabelled, low))
        return relabelled

    def activation_bytes(self, low: Mapping[str, bool]) -> int:
        low = self.runs_low(low)
        return sum(u.low_activation_bytes if low.get(u.name, False) else u.fp32_activation_bytes for u in self.units)


def _roofline(flops: float, bytes_: float, peak: float, bw: float) -> float:
    return max(flops / peak, bytes_ / bw)


def unit_roofline_s(
    unit: Unit, peak_flops_per_s: float, bandwidth_bytes_per_s: float, *, bytes_scale: float = 1.0
) -> float:
    """Sum of the per-op rooflines of one unit's forward and backward ops."""
    return sum(
        c.calls * _roofline(c.flops, c.bytes * bytes_scale, peak_flops_per_s, bandwidth_bytes_per_s)
        for c in unit.op_costs
    )


def build_cost_model(report: Report, profile: DeviceProfile, dtype: LowDtype | str | None = None) -> CostModel:
    low = LowDtype(dtype) if dtype is not None else report.environment.dtype
    bw = profile.bandwidth_bytes_per_s
    p32 = profile.peak_flops_per_s("fp32")
    # fp8: every unit's low choice here is bf16 (autocast around torchao's Float8Linears);
    # the fp8 Linears' own times are `fp8_linear_time_s`.
    plow = profile.peak_flops_per_s(LowDtype.BF16.value if low is LowDtype.FP8 else low.value)
    units = []
    for u in report.units:
        t32 = unit_roofline_s(u, p32, bw)
        tlow = unit_roofline_s(u, plow, bw, bytes_scale=0.5) + weight_cast_s(u, bw)
        units.append(UnitCost(u.name, t32, tlow, u.activation_bytes, u.activation_bytes // 2))
    return with_fp32_under_autocast(CostModel(profile, low, tuple(units), cast_edges(report, bw)), report)


def with_fp32_under_autocast(costs: CostModel, report: Report) -> CostModel:
    """`costs` for plans of `report`: outside the pure regime a plan's low unit takes its
    inputs as autocast does, so one that autocast runs in fp32 whatever it holds (a LayerNorm,
    the loss: `autocast_kind`) costs its fp32 time and hands on fp32 values when planned low
    too (nothing for the search to save there, no cast to or from it)."""
    if report.environment.regime is Regime.PURE:
        return costs
    fp32_only = {u.name for u in report.units if autocast_kind(u) == "fp32"}
    units = tuple(
        replace(u, low_time_s=u.fp32_time_s, low_activation_bytes=u.fp32_activation_bytes, fp32_under_autocast=True)
        if u.name in fp32_only
        else u
        for u in costs.units
    )
    return replace(costs, units=units)


def weight_cast_s(unit: Unit, bandwidth_bytes_per_s: float) -> float:
    return CAST_BYTES_FACTOR * unit.param_bytes / bandwidth_bytes_per_s


def cast_edges(report: Report, bandwidth_bytes_per_s: float) -> tuple[EdgeCost, ...]:
    return tuple(
        EdgeCost(e.src, e.dst, e.bytes, 2 * CAST_BYTES_FACTOR * e.bytes / bandwidth_bytes_per_s) for e in report.edges
    )


# --- fp8 Linear layers ---------------------------------------------------------------------
GEMM_OPS = frozenset({"mm", "addmm", "matmul", "linear", "bmm", "baddbmm", "addbmm"})
"""aten names of the matmuls a Linear runs (what torchao's Float8Linear replaces)."""

FP8_BYTES = 1
BF16_BYTES = 2
FP32_BYTES = 4
SCALE_BYTES = 4
"""torchao's scales are fp32: one per tensor (tensorwise), one per row (rowwise)."""
MX_SCALE_BYTES = 1
"""An MX block's scale is one e8m0 byte (a power of two) per `MX_BLOCK` values."""
MX_NEEDS = "mxfp8 needs MX tensor cores: target b200"
"""Why a device without `mx_fp8` gets no `fp8:mxfp8` choice (Blackwell runs MX matmuls)."""


@dataclass(frozen=True)
class Fp8Operand:
    """One operand torchao casts to fp8 for one matmul: its elements, the bytes each holds
    before the cast, and how many elements share one scale."""

    numel: float
    hp_bytes: int
    group: float


def fp8_casts(
    tokens: float, in_features: int, out_features: int, weight_calls: int, recipe: Fp8Recipe
) -> list[Fp8Operand]:
    """The casts torchao's `matmul_with_hp_or_float8_args` runs per step for one Linear, eager:
    every matmul casts both its operands anew from the high-precision tensors it saved
    (fprop: input, weight; dgrad: grad_output, weight; wgrad: grad_output, input), except
    where the recipe keeps an operand in high precision (`rowwise_with_gw_hp`: wgrad's two).
    The input and grad_output arrive in bf16 (autocast), the weight is the fp32 parameter.
    `tokens` is the rows of all the layer's calls together; `weight_calls` how many calls
    cast the weight."""
    rowwise = recipe is not Fp8Recipe.TENSORWISE
    x = tokens * in_features
    g = tokens * out_features
    w = float(weight_calls * in_features * out_features)

    def op(numel: float, hp: int, row: float) -> Fp8Operand:
        if recipe is Fp8Recipe.MXFP8:  # a scale per 32 values along the matmul's inner dimension
            return Fp8Operand(numel, hp, MX_BLOCK)
        return Fp8Operand(numel, hp, row if rowwise else numel)

    casts = [
        op(x, BF16_BYTES, in_features),  # fprop: input, a scale per token
        op(w, FP32_BYTES, in_features),  # fprop: weight, a scale per output row
        op(g, BF16_BYTES, out_features),  # dgrad: grad_output, per token
        op(w, FP32_BYTES, out_features),  # dgrad: weight, per input column
    ]
    if recipe is not Fp8Recipe.ROWWISE_WITH_GW_HP:
        casts += [
            op(g, BF16_BYTES, tokens),  # wgrad: grad_output, per output feature
            op(x, BF16_BYTES, tokens),  # wgrad: input, per input feature
        ]
    return casts


def fp8_cast_bytes(casts: list[Fp8Operand], recipe: Fp8Recipe = Fp8Recipe.TENSORWISE) -> float:
    """Bytes the casts move. torchao's Float8Linear recipes: each cast is an amax reduction
    (reads the operand), the scale it computes (written once per group) and the cast itself
    (reads the operand again, writes fp8): three memory-bound passes, unfused as torchao runs
    them eagerly. `mxfp8`: a block's amax is local to its 32 values, so torchao's MX cast
    kernels (`triton_to_mxfp8_dim0`, the CUDA dim1 cast) read the operand once and write the
    fp8 values and one e8m0 byte per block in the same pass."""
    if recipe is Fp8Recipe.MXFP8:
        return sum(c.numel * (c.hp_bytes + FP8_BYTES) + MX_SCALE_BYTES * c.numel / c.group for c in casts)
    return sum(c.numel * (2 * c.hp_bytes + FP8_BYTES) + SCALE_BYTES * c.numel / max(c.group, 1.0) for c in casts)


def fp8_linear_time_s(
    unit: Unit, in_features: int, out_features: int, recipe: Fp8Recipe, profile: DeviceProfile
) -> float:
    """A Linear unit's step time converted by torchao under `recipe`: its matmuls at the
    device's dense fp8 peak (`rowwise_with_gw_hp`'s weight-gradient matmul, a third of the
    matmul FLOPs, at the bf16 peak), moving bf16-sized bytes (the recorded fp32 bytes halved:
    fp8 operands and a bf16 output, an over-estimate kept on the safe side); its other ops
    (the bias) as under bf16; plus every cast of `fp8_casts` (`fp8_cast_bytes`) at the
    memory bandwidth. The layer's rows come from its forward matmul FLOPs (2 rows x in x out
    each). `mxfp8` (torchao's `MXFP8Linear`): its three matmuls at the fp8 peak (block-scaled
    on a device with `mx_fp8`, an error elsewhere), its six casts one pass each."""
    if recipe is Fp8Recipe.MXFP8 and not profile.mx_fp8:
        raise PrecisionDoctorError(f"{profile.name} has no MX tensor cores: {MX_NEEDS}")
    bw = profile.bandwidth_bytes_per_s
    p8 = profile.peak_flops_per_s("fp8")
    p16 = profile.peak_flops_per_s("bf16")
    gemm_flops_fwd = 0.0
    weight_calls = 0
    t = 0.0
    for c in unit.op_costs:
        if c.op.split(".", 1)[0] not in GEMM_OPS:
            t += c.calls * _roofline(c.flops, c.bytes * 0.5, p16, bw)
            continue
        peak = p8
        if c.phase is Phase.FORWARD:
            gemm_flops_fwd += c.calls * c.flops
            weight_calls += c.calls
        elif recipe is Fp8Recipe.ROWWISE_WITH_GW_HP:
            peak = 2 / (1 / p8 + 1 / p16)  # half the backward matmuls (wgrad) in bf16
        t += c.calls * _roofline(c.flops, c.bytes * 0.5, peak, bw)
    tokens = gemm_flops_fwd / (2 * in_features * out_features) if in_features * out_features else 0.0
    casts = fp8_casts(tokens, in_features, out_features, weight_calls, recipe)
    return t + fp8_cast_bytes(casts, recipe) / bw


# --- what plain autocast would do --------------------------------------------------------
# aten-level names (what the dispatch capture records) of torch.autocast's op lists.
AUTOCAST_LOW_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "addbmm",
        "mv",
        "addmv",
        "addr",
        "matmul",
        "linear",
        "einsum",
        "chain_matmul",
        "linalg_multi_dot",
        "linalg_vecdot",
        "prelu",
        "_prelu_kernel",
        "convolution",
        "_convolution",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_tbc",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "cudnn_convolution",
        "mkldnn_convolution",
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
        "lstm_cell",
        "gru_cell",
        "rnn_tanh_cell",
        "rnn_relu_cell",
        "_thnn_fused_lstm_cell",
        "_thnn_fused_gru_cell",
        "mkldnn_rnn_layer",
    }
)
AUTOCAST_FP32_OPS = frozenset(
    {
        "acos",
        "asin",
        "cosh",
        "erfinv",
        "exp",
        "expm1",
        "log",
        "log10",
        "log2",
        "log1p",
        "reciprocal",
        "rsqrt",
        "sinh",
        "tan",
        "pow",
        "softplus",
        "layer_norm",
        "native_layer_norm",
        "group_norm",
        "native_group_norm",
        "frobenius_norm",
        "nuclear_norm",
        "cosine_similarity",
        "poisson_nll_loss",
        "cosine_embedding_loss",
        "nll_loss",
        "nll_loss_forward",
        "nll_loss2d",
        "nll_loss2d_forward",
        "hinge_embedding_loss",
        "kl_div",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "mse_loss",
        "margin_ranking_loss",
        "multilabel_margin_loss",
        "soft_margin_loss",
        "triplet_margin_loss",
        "multi_margin_loss",
        "binary_cross_entropy_with_logits",
        "dist",
        "pdist",
        "_pdist_forward",
        "cdist",
        "_cdist_forward",
        "renorm",
        "logsumexp",
        # fp32 unless a dtype is passed
        "prod",
        "softmax",
        "_softmax",
        "log_softmax",
        "_log_softmax",
        "cumprod",
        "cumsum",
        "linalg_vector_norm",
        "linalg_matrix_norm",
        "norm",
        "sum",
    }
)


def _base(op: str) -> str:
    return op.split(".", 1)[0]


def autocast_kind(unit: Unit) -> str:
    """How autocast runs a unit, judged from its forward ops: "low" with an op from autocast's
    low list, else "fp32" with one from its fp32 list (the loss unit too), else "inherit" (its
    inputs' dtype)."""
    ops = {_base(o.op) for o in unit.ops if o.phase == "forward"}
    if unit.name == LOSS_UNIT:
        return "fp32"
    if ops & AUTOCAST_LOW_OPS:
        return "low"
    return "fp32" if ops & AUTOCAST_FP32_OPS else "inherit"


def autocast_assignment(report: Report) -> dict[str, bool]:
    """Which units plain autocast runs low, judged per unit (`autocast_kind`): "low" and "fp32"
    units as their kind says; the others in their inputs' dtype (low only if every producer
    is low, as type promotion widens mixed inputs; fp32 with no producing unit, as model inputs
    are fp32)."""
    producers: dict[str, list[str]] = {}
    for e in report.edges:
        producers.setdefault(e.dst, []).append(e.src)
    low: dict[str, bool] = {}
    for u in sorted(report.units, key=lambda u: u.order):
        kind = autocast_kind(u)
        if kind == "inherit":
            srcs = producers.get(u.name, [])
            low[u.name] = bool(srcs) and all(low.get(s, False) for s in srcs)
        else:
            low[u.name] = kind == "low"
    return low

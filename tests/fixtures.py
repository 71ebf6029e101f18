"""Shared toy models for the tests: each builder returns a `Case` (model, batch, loss_fn).

Everything is built from code or configs with random weights (no downloads); transformers
is imported lazily inside its builders so the rest of the suite runs without it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class Case:
    name: str
    model: nn.Module
    batch: Any
    loss_fn: LossFn | None


# --- plain torch models -------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp_loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return out.pow(2).mean()


def build_mlp(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = MLP()
    g = torch.Generator().manual_seed(seed + 1)
    return Case("mlp", model, torch.randn(6, 8, generator=g), mlp_loss)


class UnscaledAttention(nn.Module):
    """Attention without 1/sqrt(d): on large inputs its own `q @ k^T` overflows fp16, and its
    child, the output projection, reads the Inf/NaN softmax makes of it."""

    def __init__(self, d: int = 32, heads: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class RawPixelViT(nn.Module):
    """Patches of raw 0..255 pixels into an unscaled attention: its bf16 run leaves fp32's
    loss by far more than fp32 moves from its weights rounded to bf16 once."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.patch = nn.Linear(48, d)
        self.attn = UnscaledAttention(d, heads=2)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x)
        return self.head((h + self.attn(h)).mean(1))


def build_raw_pixel_vit(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    x = torch.rand(4, 16, 48) * 255.0
    labels = torch.randint(0, 10, (4,))
    model = RawPixelViT()
    return Case("raw_pixel_vit", model, x, lambda out, batch: F.cross_entropy(out, labels))


class HeadMLP(nn.Module):
    """An MLP ending in a one-output head: sharded over 2 ranks by rows (FSDP2's Shard(0)),
    the head's weight (1 row) and bias leave rank 1 an empty shard."""

    def __init__(self, d_in: int = 8, d_hidden: int = 32, d_mid: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d_hidden, d_mid)
        self.head = nn.Linear(d_mid, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.act(self.fc1(x))))


def build_head_mlp(seed: int = 0, rows: int = 8) -> Case:
    torch.manual_seed(seed)
    model = HeadMLP()
    g = torch.Generator().manual_seed(seed + 1)
    return Case("head_mlp", model, torch.randn(rows, 8, generator=g), mlp_loss)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.bn(self.conv(x))))
        return self.head(h.flatten(1))


def cnn_loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    _, labels = batch
    return F.cross_entropy(out, labels)


class CNNWithLabels(nn.Module):
    """Takes (images, labels) as the batch but only uses the images."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_cnn(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = CNNWithLabels().train()
    g = torch.Generator().manual_seed(seed + 1)
    batch = (torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g))
    return Case("cnn", model, batch, cnn_loss)


class Functional(nn.Module):
    """softmax / exp / sum / @ called as functions in the module's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.inner = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        scores = torch.softmax(h, dim=-1)
        e = torch.exp(scores)
        m = e @ self.w
        return self.inner(m).sum(dim=-1)


def functional_loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return out.pow(2).mean()


def build_functional(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    return Case("functional", Functional(), torch.randn(5, 8, generator=g), functional_loss)


# --- transformers models (random weights, built from configs) -----------------------------

VOCAB = 100


class ComplexGain(nn.Module):
    """A complex parameter beside a real Linear (nothing rounds complex values)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.gain = nn.Parameter(torch.randn(8, dtype=torch.cfloat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) * self.gain).abs()


def plan_of(units: dict[str, str], *, model: str, regime: str = "autocast", masters: tuple[str, ...] = ()) -> Any:
    """A bf16 `Plan` with these unit dtypes and nothing measured (costs 1 s, no bytes), built
    by hand rather than searched."""
    from precision_doctor.extras import PlanBytes, PlanCosts
    from precision_doctor.options import LowDtype, Regime
    from precision_doctor.planning.plan import MasterUnit, Plan

    return Plan(
        model=model,
        dtype=LowDtype.BF16,
        target="h100",
        tolerance=1e-2,
        units=units,  # type: ignore[arg-type]
        fp32_units=[],
        estimated_step_time_s=PlanCosts(fp32=1.0, autocast=1.0, plan=1.0),
        activation_bytes=PlanBytes(fp32=0, autocast=0, plan=0),
        verified_loss_rel_error=0.0,
        verification_passes=1,
        regime=Regime(regime),
        master_weights=[MasterUnit(unit=u, params=0, reason="test") for u in masters],
    )


def _tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def _needs_transformers() -> None:
    """A test of a transformers model is skipped, not failed, where the optional extra is not
    installed (pytest imported here: the benchmarks import these builders too)."""
    import pytest

    pytest.importorskip("transformers")


def build_gpt2(seed: int = 0, layers: int = 2) -> Case:
    _needs_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    cfg._attn_implementation = "eager"  # softmax and matmul as separate ops in the attention
    model = GPT2LMHeadModel(cfg).train()
    ids = _tokens(2, 8, seed + 1)
    return Case("gpt2", model, {"input_ids": ids, "labels": ids}, None)


def build_bert(seed: int = 0) -> Case:
    _needs_transformers()
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(cfg).train()
    ids = _tokens(2, 8, seed + 1)
    return Case("bert", model, {"input_ids": ids, "labels": ids}, None)


def build_t5(seed: int = 0) -> Case:
    _needs_transformers()
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = T5ForConditionalGeneration(cfg).train()
    ids = _tokens(2, 8, seed + 1)
    labels = _tokens(2, 6, seed + 2)
    return Case("t5", model, {"input_ids": ids, "labels": labels}, None)


def _decoder(name: str, config_cls: str, model_cls: str, seed: int, kv_heads: int) -> Case:
    """A tiny stock decoder-only transformers model (Llama family: RMSNorm that upcasts)."""
    _needs_transformers()
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        intermediate_size=64,
        max_position_embeddings=32,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"  # softmax and matmul as separate ops in the attention
    model = getattr(transformers, model_cls)(cfg).train()
    ids = _tokens(2, 8, seed + 1)
    return Case(name, model, {"input_ids": ids, "labels": ids}, None)


def build_llama(seed: int = 0) -> Case:
    return _decoder("llama", "LlamaConfig", "LlamaForCausalLM", seed, kv_heads=2)


def build_qwen2(seed: int = 0) -> Case:
    return _decoder("qwen2", "Qwen2Config", "Qwen2ForCausalLM", seed, kv_heads=1)


def build_mistral(seed: int = 0) -> Case:
    return _decoder("mistral", "MistralConfig", "MistralForCausalLM", seed, kv_heads=1)


def build_swin(seed: int = 0) -> Case:
    """A tiny stock Swin classifier: its second block per stage shifts the windows and adds
    transformers' -100 mask (built in forward) to the attention scores."""
    _needs_transformers()
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(seed)
    cfg = SwinConfig(
        image_size=32,
        patch_size=2,
        num_channels=3,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=4,
        num_labels=5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    cfg._attn_implementation = "eager"  # softmax and matmul as separate ops in the attention
    model = SwinForImageClassification(cfg).train()
    g = torch.Generator().manual_seed(seed + 1)
    batch = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.tensor([1, 3])}
    return Case("swin", model, batch, None)


BUILDERS: dict[str, Callable[..., Case]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "functional": build_functional,
    "gpt2": build_gpt2,
    "bert": build_bert,
    "t5": build_t5,
    "llama": build_llama,
    "qwen2": build_qwen2,
    "mistral": build_mistral,
    "swin": build_swin,
}
TRANSFORMERS = ("gpt2", "bert", "t5", "llama")


# --- the headline-output cases (issue 23) -------------------------------------------------


class DoublesInput(nn.Module):
    """Doubles its input, in place (writing the caller's batch) or into a copy: the two give
    the same training, if every run and step reads the batch as given."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mul_(2.0) if self.in_place else x * 2.0)


def doubled_input_runs(run: Any, wrap: Any = lambda x: x) -> list[Any]:
    """`run(model, batch)` for the in-place DoublesInput, then the copying one, each from the
    same seed on the same values (`wrap(x)` the batch); the caller's `x` is checked to come
    back unchanged from each."""
    results = []
    for in_place in (True, False):
        torch.manual_seed(0)
        model = DoublesInput(in_place)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        before = x.clone()
        results.append(run(model, wrap(x)))
        assert torch.equal(x, before)
    return results


class OneTokenLM(nn.Module):
    """embedding -> Linear -> LayerNorm (bias 3.0) -> bias-free LM head. Every labelled
    position names one token, so the head's weight gradient is ~100x any other gradient, and
    under autocast it is first held in fp16 (the gradient of the weight's fp16 copy)."""

    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            self.norm.bias.fill_(3.0)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.norm(self.proj(self.embed(ids))))


def one_token_lm_loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[1].reshape(-1), ignore_index=-100)


def build_one_token_lm(seed: int = 0, tokens: int = 2000) -> Case:
    torch.manual_seed(seed)
    model = OneTokenLM()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model.vocab, (1, tokens), generator=g)
    labels = torch.full((1, tokens), -100)
    labels[0, ::2] = 5
    return Case("one_token_lm", model, (ids, labels), one_token_lm_loss)


class Amplifier(nn.Module):
    """inp -> relu (the root's own functional op) -> amplifier (weights x `gain`) -> GELU ->
    squash (weights x1e-5) -> head: at gain 2e5 `amplifier` overflows fp16 from finite
    inputs; at 3e4 `squash`'s weight gradient overflows fp16 at GradScaler's 2^16."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.amplifier = nn.Linear(64, 64)
        self.act = nn.GELU()
        self.squash = nn.Linear(64, 64)
        self.head = nn.Linear(64, 1)
        with torch.no_grad():
            self.amplifier.weight.mul_(gain)
            self.squash.weight.mul_(1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.squash(self.act(self.amplifier(torch.relu(self.inp(x))))))


def build_amplifier(seed: int = 0, gain: float = 3e4) -> Case:
    torch.manual_seed(seed)
    model = Amplifier(gain)
    return Case("amplifier", model, torch.randn(64, 32, generator=torch.Generator().manual_seed(seed + 1)), mlp_loss)


class ConvBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """EfficientNet's SE: its convs read the mean its own forward computes."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = nn.Conv1d(c, c // 4, 1)
        self.expand = nn.Conv1d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(2, keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class DeepSE(nn.Module):
    """`depth` Conv1d+BatchNorm+SiLU blocks (bf16 error accumulates), an SE block, a head."""

    def __init__(self, c: int = 32, depth: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[ConvBlock(c) for _ in range(depth)])
        self.se = SqueezeExcite(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.se(self.blocks(x)).mean(2))


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class DeepMLP(nn.Module):
    """`depth` residual Linear+GELU blocks of one width and a head: the op count grows with
    `depth`, the values' scale does not (the residual path keeps activations and gradients
    near 1 at any depth)."""

    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def build_deep_se(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = DeepSE()
    return Case("deep_se", model, torch.randn(8, 32, 64, generator=torch.Generator().manual_seed(seed + 1)), mlp_loss)


class OutlierWeightLM(nn.Module):
    """A tiny language model whose head weight carries one outlier column (x `gain`) that its
    input channel undoes (x 1/`gain`): fp32 logits are ordinary. Under fp8 the column sets the
    weight's scale (per tensor, and per row for rowwise, every row holding it), and the rest
    of the head's weights flush or keep a bit or two: no recipe passes the head. The MLP's
    matmuls are healthy in fp8. Trains in seconds on the CPU (memorizing its one batch)."""

    def __init__(self, vocab: int = 64, d: int = 64, gain: float = 1e5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        scale = torch.ones(d)
        scale[0] = 1 / gain
        self.register_buffer("scale", scale)
        with torch.no_grad():
            self.head.weight[:, 0] *= gain

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h * self.scale)


def next_token_loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.cross_entropy(out[:-1].float(), batch[1:])


def gemm_unit(tokens: int, k: int, n: int) -> Any:
    """A Linear unit's ops as the capture records them (fp32 bytes): the fprop addmm, the
    dgrad and wgrad mm; for the cost model's fp8 times by hand."""
    from precision_doctor.options import Phase
    from precision_doctor.report import OpCost, Unit

    f = 2 * tokens * k * n
    ops = [
        OpCost(
            op="addmm.default", phase=Phase.FORWARD, flops=f, bytes=4 * (tokens * k + k * n + 2 * tokens * n), calls=1
        ),
        OpCost(op="mm.default", phase=Phase.BACKWARD, flops=f, bytes=4 * (tokens * n + k * n + tokens * k), calls=2),
    ]
    return Unit.model_construct(name="lin", op_costs=ops, param_bytes=4 * k * n)


def build_outlier_weight_lm(seed: int = 0, tokens: int = 64) -> Case:
    torch.manual_seed(seed)
    model = OutlierWeightLM()
    batch = torch.randint(0, 64, (tokens + 1,), generator=torch.Generator().manual_seed(seed + 1))
    return Case("outlier_weight_lm", model, batch, next_token_loss)


# --- steps the graph driver cannot stand for (tests/test_graph_driver.py) --------------------


class Reseeding(nn.Module):
    """Reseeds the generator inside forward from a call counter, then draws dropout: the draw
    depends on Python state and a call no aten op carries, so a graph of the step's ops,
    walked from where the trace began, draws another mask."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.calls = [0]  # counted in place: no rebinding for the analysis to put back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls[0] += 1
        torch.manual_seed(1000 + self.calls[0])
        return F.dropout(self.fc(x), 0.5, training=True)


class NumpyAlias(nn.Module):
    """Reads an activation through a NumPy round trip: the tensor `from_numpy` makes shares
    the activation's memory, and no aten op made it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        return h * torch.from_numpy(h.detach().numpy())


def build_reseeding(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    return Case("reseeding", Reseeding(), torch.randn(16, 8), mlp_loss)


def build_numpy_alias(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    return Case("numpy_alias", NumpyAlias(), torch.randn(16, 8), mlp_loss)


def build(name: str, seed: int = 0) -> Case:
    return BUILDERS[name](seed)


# --- model files for the CLI --------------------------------------------------------------

HEALTHY_FILE = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

def make_batch():
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

def loss_fn(out, batch):
    return out.pow(2).mean()
"""


def trained_report() -> Any:
    """A healthy MLP's report with what later stages add: a real pre-flight (2 steps, no
    plan) and a real GradScaler monitor of 5 steps, the first two skipped (an Inf input)."""
    import precision_doctor as pd

    case = build_mlp()
    result = pd.preflight(case.model, case.batch, case.loss_fn, steps=2, plan=False)
    report = result.annotated_report()
    net = copy.deepcopy(case.model)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    monitor = pd.ScalerMonitor(torch.amp.GradScaler("cpu", init_scale=2.0**16), prediction=result.prediction())
    bad = torch.full_like(case.batch, float("inf"))
    for x in (bad, bad, case.batch, case.batch, case.batch):
        opt.zero_grad()
        assert case.loss_fn is not None
        monitor.scale(case.loss_fn(net(x), x)).backward()
        monitor.step(opt)
        monitor.update()
    assert report is not None and monitor.skipped_steps == [0, 1]
    return report.with_extras(scaler_monitor=monitor.to_extras())


def as_job_report(report: Any) -> Any:
    """`report` dressed as a 2-rank DDP job's (for the views, which only render what a
    report holds): rank 1 alone raised the report's flags, rank 0 none."""
    from precision_doctor.options import Wrapper
    from precision_doctor.report import DistributedJob, RankResult

    env = report.environment.model_copy(
        update={"distributed": DistributedJob(world_size=2, backend="gloo", wrapper=Wrapper.DDP, mesh_shape=[2])}
    )
    losses = report.losses
    ranks = [
        RankResult(
            rank=r,
            loss_fp32=losses.fp32,
            loss_low=losses.low,
            loss_rel_error=losses.rel_error,
            flags=report.flags() if r == 1 else [],
        )
        for r in range(2)
    ]
    return report.model_copy(update={"environment": env, "ranks": ranks})


def assert_same_fields(a: Any, b: Any, *, rel: float, abs_tol: float = 0.0, where: str = "report") -> None:
    """Two reports' dumps (`model_dump()`) equal field for field: exact but for floats, which
    agree to `rel` (and `abs_tol`), NaN to NaN; histograms and counts are ints, so identical."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_fields(a[k], b[k], rel=rel, abs_tol=abs_tol, where=f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_fields(x, y, rel=rel, abs_tol=abs_tol, where=f"{where}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol), where
    else:
        assert a == b, where

"""Windowed attention with Swin's -100 additive mask: probabilities meant to be zero.

Each window of 16 tokens holds four regions of 4 tokens (as Swin's shifted windows hold
pieces of several windows). Tokens of different regions must not attend to each other; Swin
builds the mask from the differences of region ids and adds -100 there
(`mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)`), so three quarters of the
softmax's probabilities are ~e^-100 = 4e-44 in fp32 (an fp32 subnormal) and exactly 0 in
fp16 and bf16, as in real low-precision training. They are meant to be 0: the mask is
recognised from the dataflow (a constant filled with -100, added to the scores, through the
softmax), so they count as zeros, not as underflow.

Expected, fp16 and bf16, in every regime: no finding, verdict "Safe to train" without
warnings. (Before masks were recognised, `attn` got UNDERFLOW - a warning - wherever the
softmax runs low: `--policy cpu` and `--regime pure`; CUDA's autocast runs softmax in fp32.)
"""

import math

import torch
from torch import nn

DIM, HEADS, WINDOW, REGION = 16, 2, 16, 4


class WindowAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        windows = x.reshape(b * n // WINDOW, WINDOW, c)
        qkv = self.qkv(windows).reshape(-1, WINDOW, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // HEADS)
        region = torch.arange(WINDOW, device=x.device) // REGION
        mask = (region[None, :] - region[:, None]).float()
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        probs = (scores + mask.to(scores.dtype)).softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.attn = WindowAttention()
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x)).mean(1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return torch.randn(4, 2 * WINDOW, 8, generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()

"""Planted fault: self-attention without the 1/sqrt(d) scale; its softmax input overflows fp16.

Queries and keys have entries around 42, so q·k over 64 dimensions reaches ~1e5 > 65504.
Expected: `attn` (the unit that runs the q @ k^T matmul itself) flagged OVERFLOW; the
projections and the rest of the model not flagged.
"""

import torch
from torch import nn

D, HEADS, BATCH, SEQ = 128, 2, 2, 16


class UnscaledAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, D, bias=False)
        self.k = nn.Linear(D, D, bias=False)
        self.v = nn.Linear(D, D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            for lin in (self.q, self.k):
                lin.weight.copy_(torch.eye(D) * 60.0 + 0.01 * torch.randn(D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = HEADS
        q = self.q(x).view(b, t, h, d // h).transpose(1, 2)
        k = self.k(x).view(b, t, h, d // h).transpose(1, 2)
        v = self.v(x).view(b, t, h, d // h).transpose(1, 2)
        scores = q @ k.transpose(-2, -1)  # the bug: no / sqrt(d // h)
        y = torch.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = UnscaledAttention()
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, D, generator=g)
    return x / x.norm(dim=-1, keepdim=True) * 8.0  # |x_i| ~ 0.7, so q_i, k_i ~ 42


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()

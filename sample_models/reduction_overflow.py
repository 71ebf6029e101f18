"""Planted fault: a hand-written RMS norm whose sum-of-squares reduction overflows fp16.

`norm` computes x.pow(2).sum(-1) over 1024 features of magnitude ~30: each square (~900)
fits fp16, their sum (~1e6) does not. Expected: `norm` flagged OVERFLOW (the `sum` op);
the linear layers not flagged.
"""

import torch
from torch import nn

D, BATCH = 1024, 8


class SumRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = x.pow(2).sum(dim=-1, keepdim=True)  # the bug: sum, not mean, in low precision
        return x * torch.rsqrt(sq / x.shape[-1] + 1e-6) * self.weight


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.norm = SumRMSNorm()
        self.head = nn.Linear(D, 1)
        with torch.no_grad():
            self.inp.weight.copy_(torch.eye(D) * 30.0)
            self.inp.bias.zero_()
            self.head.weight.mul_(0.01)  # keep the gradients well inside fp16 at 2^16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.inp(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return torch.randn(BATCH, D, generator=torch.Generator().manual_seed(1)).clamp(-2, 2)


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()

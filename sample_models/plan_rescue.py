"""Planted fault: a hand-written LayerNorm with the naive variance formula, fed large values.

`norm` scales its input by 300 and computes var = E[y^2] - E[y]^2: y^2 (~1e5) overflows
fp16, inf - inf is NaN, and the whole model in fp16 has a NaN loss. Everything else is
healthy. Expected: `norm` flagged OVERFLOW; a plan that keeps only `norm` in fp32 trains
like fp32, while all-fp16 goes non-finite.
"""

import torch
from torch import nn

D_IN, HIDDEN, BATCH = 16, 32, 64


class NaiveNorm(nn.Module):
    def __init__(self, d: int, gain: float = 300.0) -> None:
        super().__init__()
        self.gain = gain
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.gain
        mean = y.mean(-1, keepdim=True)
        var = (y * y).mean(-1, keepdim=True) - mean * mean  # the fault: E[y^2] overflows fp16
        return (y - mean) / torch.sqrt(var + 1e-5) * self.weight


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.norm = NaiveNorm(HIDDEN)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.norm(self.fc1(x))))))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, D_IN, generator=g)
    return x, x[:, :1].sin()


def loss_fn(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (output - batch[1]).pow(2).mean()

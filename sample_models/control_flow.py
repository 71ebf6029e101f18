"""Data-dependent control flow that torch.fx cannot trace; otherwise healthy.

The number of refinement steps and the branch taken depend on tensor values, so
`torch.fx.symbolic_trace` fails; the dispatch capture still sees every op. Expected: no
unit flagged, capture path "dispatch".
"""

import torch
from torch import nn

D, BATCH = 32, 16


class Refiner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = 1 + int(x.abs().mean() > 0.5)  # data-dependent trip count
        for _ in range(steps):
            x = x + 0.5 * torch.tanh(self.step(x))
        return x


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.refine = Refiner()
        self.pos = nn.Linear(D, 1)
        self.neg = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.refine(torch.relu(self.inp(x)))
        if h.sum() > 0:  # data-dependent branch
            return self.pos(h)
        return self.neg(h)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return torch.randn(BATCH, D, generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()

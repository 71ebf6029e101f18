"""Planted fault: a deep, narrow sigmoid network whose early gradients underflow fp16.

Each sigmoid layer shrinks the backward signal (sigmoid' <= 1/4) and the loss carries a
small weight (1e-4), so the first layers' gradients fall below 2^-24 / 2^16: they are lost
even at GradScaler's default scale. Expected: the early `layers.N` units flagged
GRAD_UNDERFLOW, the last layers not; the forward pass is healthy.
"""

import torch
from torch import nn

WIDTH, DEPTH, BATCH = 16, 16, 32


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
        self.act = nn.Sigmoid()
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, WIDTH, generator=g),)


def loss_fn(out: torch.Tensor, batch: tuple[torch.Tensor]) -> torch.Tensor:
    return 1e-4 * out.pow(2).mean()

"""Planted fault: gradients that overflow fp16 at GradScaler's default scale 2^16.

The loss is a sum (not a mean) over a large batch with large targets, so the output
gradients are O(100) and the weight gradients O(1e3): scaled by 2^16 they exceed fp16's
65504, and GradScaler skips steps while it backs the scale off. The forward pass is healthy.
Expected: GRAD_OVERFLOW; recommended initial loss scale well below 2^16.
"""

import torch
from torch import nn

D_IN, HIDDEN, BATCH = 16, 32, 256


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, D_IN, generator=g)
    return x, 5.0 * torch.randn(BATCH, 1, generator=g)


def loss_fn(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (output - batch[1]).pow(2).sum()  # the fault: a sum over the batch

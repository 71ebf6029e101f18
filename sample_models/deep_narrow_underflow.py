"""Planted fault: a deep, narrow sigmoid network whose early gradients underflow fp16.

Each sigmoid layer shrinks the backward signal (sigmoid' <= 1/4) and the loss carries a
small weight (1e-4), so the first layers' gradients fall below 2^-24 / 2^16: they are lost
even at GradScaler's default scale. Expected: the early `layers.N` units flagged
GRAD_UNDERFLOW, the last layers not; the forward pass is healthy. The gradients of
`layers.0`..`layers.5` are lost even at the recommended initial scale (2^29 in fp16 under
autocast; above it the last layers' gradients would overflow): GRAD_DIVERGENCE, severity
error. Pure fp16 trains without a loss scaler: at 2^0 every layer's gradients flush (all of
them up to `layers.14`, most of `layers.15`'s; the head's survive), GRAD_DIVERGENCE (error)
on all 16 layers. bf16: no flag, but the final loss drifts ~2e-2 from fp32's, over the 0.01
tolerance: not safe as-is either (the verdict names where the error grows most).
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

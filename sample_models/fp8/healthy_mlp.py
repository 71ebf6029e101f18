"""fp8 sample: a healthy MLP that takes fp8 in every Linear under every torchao recipe.

Expected with `--dtype fp8`: no FP8_ERROR, no FP8_UNDERFLOW.
"""

import torch
from torch import nn

D, HIDDEN, TOKENS = 64, 128, 32


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, HIDDEN)
        self.act = nn.GELU()
        self.down = nn.Linear(HIDDEN, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return (out.float() - batch).pow(2).mean()

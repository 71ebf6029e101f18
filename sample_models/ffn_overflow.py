"""Planted fault: a T5-style feed-forward block whose hidden activations overflow fp16.

`block.ff.wi` produces values around 1e5 (fp16's max is 65504): in fp16 they become Inf,
and `wo` turns Inf into NaN. This is the T5 failure. Expected: `block.ff.wi` flagged
OVERFLOW; nothing else flagged (units downstream only inherit the Inf).
"""

import torch
from torch import nn

D, HIDDEN, BATCH, SEQ = 32, 128, 4, 16


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wi = nn.Linear(D, HIDDEN, bias=False)
        self.act = nn.ReLU()
        self.wo = nn.Linear(HIDDEN, D, bias=False)
        with torch.no_grad():
            # Large input projection, small output projection: the product is well scaled,
            # the hidden layer in between is not (as in T5's pre-trained checkpoints).
            self.wi.weight.mul_(4e4)
            self.wo.weight.mul_(1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.ff = FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.block = Block()
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return torch.randn(BATCH, SEQ, D, generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()

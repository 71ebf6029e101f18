"""Healthy under autocast, broken in pure fp16: a residual stream that grows past 65504.

The input is 3.5e4..4.5e4 and each of three blocks adds `ff(norm(x))` scaled to at most ~7e3.
Under autocast the Linear's output is fp16 (fits) but the residual stream stays fp32:
an fp16 tensor added to an fp32 one promotes to fp32. After `model.half()` (pure fp16) the
residual adds run in fp16 and the stream passes 65504 in the last block (52e3, 59e3, 66e3
after each block).

Expected in fp16: `--regime autocast` (either policy): no flag; `--regime pure`: `blocks.2`
flagged OVERFLOW. In bf16: no overflow in either regime (pure bf16 holds the stream in steps
of 256, which the first norm's output shows as error growth; autocast keeps it fp32).
"""

import torch
from torch import nn

D, BATCH, BLOCKS = 32, 8, 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.ff = nn.Linear(D, D)
        with torch.no_grad():
            self.ff.weight.copy_(torch.eye(D) * 0.5)
            self.ff.bias.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ff(norm(x)) is at most ~1.4 per element; times 5e3 it is ~7e3, an fp16 value.
        return x + self.ff(self.norm(x)) * 5e3


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return 3.5e4 + 1e4 * torch.rand(BATCH, D, generator=g)


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()

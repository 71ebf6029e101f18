"""GradScaler skips exactly one step: the largest gradient overflows fp16 at its starting
scale 2^16 and fits at 2^15.

A zero-initialised Linear regressed to 0.75 on x = 1: d loss / d w = d loss / d b = -1.5,
so at scale 2^16 the scaled gradients are 98304 > 65504 and at 2^15 they are 49152. A real
`torch.amp.GradScaler` skips the first step, halves its scale once and trains on. Expected in
fp16, in every regime (the analysis judges gradients at `thresholds.grad_scale_log2`, 2^16):
`head` flagged GRAD_OVERFLOW with severity *warning* ("GradScaler backs off in 1 step(s)"),
verdict "Safe to train ... with 1 warning(s)". bf16: no flag.
"""

import torch
from torch import nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def build_model() -> nn.Module:
    return Model()


def make_batch() -> torch.Tensor:
    return torch.ones(1, 1)


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, torch.full_like(out, 0.75))

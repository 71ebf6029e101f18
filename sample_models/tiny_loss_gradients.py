"""A loss weighted by 1e-14: every gradient is ~1e-15 and flushes to zero in fp16 at
GradScaler's starting scale 2^16 - but GradScaler's fp32 scale holds far larger powers of two.

Expected in fp16 under `--policy cuda` (the default): the loss is computed in fp32 (pow and
mean run fp32 there), and `fc1`, `act` and `fc2` are flagged GRAD_UNDERFLOW with severity
*warning* (a larger initial scale keeps the gradients: `fixing_scale_log2` in the evidence; the
plan recommends a scale near 2^64 and moves no unit to fp32 for underflow): "Safe to train ...
with 3 warning(s)". Under `--policy cpu` and `--regime pure` the loss itself is computed in
fp16, where 1e-14 x mean flushes to 0: final-loss error 100%, "Not safe as-is", and with the
loss the gradients: `fc1` and `fc2` GRAD_DIVERGENCE (error); the GRAD_UNDERFLOWs are errors
there, as an fp16 loss takes no scale above 2^15 (its gradient is the scale). bf16: no flag
(bf16 has fp32's range).
"""

import torch
from torch import nn

D, BATCH = 16, 32


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, D)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return torch.randn(BATCH, D, generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return 1e-14 * out.pow(2).mean()

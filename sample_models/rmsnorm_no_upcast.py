"""Planted fault: the same RMSNorm without the upcast, squaring with `x * x`.

`proj` makes hidden states of |x| ~ 1000, stored in fp16 under autocast (a Linear runs low)
and in pure fp16. `norm` squares them with `x * x`: an elementwise multiply, in no autocast
list, so it runs in its inputs' dtype (fp16) and the squares (~1e6) overflow to inf.
(`x.pow(2)` would not: CUDA's autocast runs `pow` in fp32.)

Expected in fp16, under `--regime autocast` (either policy) and `--regime pure`: `norm`
flagged OVERFLOW. In bf16 (range of fp32): no flag.
"""

import torch
from torch import nn

D, BATCH = 64, 8


class SquaringRMSNorm(nn.Module):
    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = (x * x).mean(-1, keepdim=True)  # the bug: squares in the input's dtype
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.norm = SquaringRMSNorm()
        self.head = nn.Linear(D, 4)
        with torch.no_grad():
            self.proj.weight.mul_(1000.0 / self.proj.weight.abs().mean())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return torch.randn(BATCH, D, generator=torch.Generator().manual_seed(1)).clamp(-2, 2)


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()

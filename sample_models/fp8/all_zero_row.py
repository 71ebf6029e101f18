"""fp8 sample: an all-zero token under rowwise scaling (a padded position, a LoRA input).

Its row's amax is 0, and a per-row scale fp8_max / amax divides by zero: torchao made NaN
there (torchao #3356) until it bounded the amax from below (EPS); 0.18 does.
Expected with `--dtype fp8 --fp8-recipe rowwise`: finite loss and gradients, the fprop input's
cast records 1 all-zero row of 16, and no fp8 finding.
"""

import torch
from torch import nn

D, TOKENS, ZERO_ROW = 32, 16, 5


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    x = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1))
    x[ZERO_ROW] = 0
    return x


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()

"""Gradients that only a loss scale keeps: pure fp16 trains without one and loses them.

`embed` reads small features (~1e-4, as raw sensor values might be) and the output layer
starts near zero (weights ~3e-3: recipes initialize the last layer small so that the first
outputs are ~0), so the gradients reaching `embed`'s weight are ~1e-9: below fp16's smallest
subnormal (6e-8) at scale 1, while the forward values, the loss and `head`'s gradients sit
inside fp16's range.

Expected in fp16: `--regime pure` (no GradScaler: torch refuses to unscale fp16 gradients,
so pure fp16 trains unscaled) flags `embed` GRAD_DIVERGENCE with severity *error*: its
gradients are all 0 at 2^0 (relative L2 error 1), while the final-loss error is 0 and the
model-wide gradient error ~3e-4 (`head`'s gradients outweigh `embed`'s by ~10^5).
Under `--regime autocast` the recommended loss scale (2^22) keeps them: no flag. No
GRAD_UNDERFLOW in any regime: at GradScaler's 2^16, where that flag judges gradients, they
fit. bf16: no flag (bf16 has fp32's range).
"""

import torch
from torch import nn

D_IN, WIDTH, D_OUT, BATCH = 32, 64, 256, 64


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, WIDTH, bias=False)
        self.act = nn.Tanh()
        self.head = nn.Linear(WIDTH, D_OUT)
        nn.init.normal_(self.head.weight, std=3e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.embed(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return 1e-4 * torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1))


TARGET = torch.randn(BATCH, D_OUT, generator=torch.Generator().manual_seed(2))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return (out - TARGET).pow(2).mean()

"""A small update lost against a large value: `base + ((u + 512) - 512)`.

`step` adds the update u (~0.1, from a learnt gain) to 512 and takes 512 away again before
adding it to `base` (~100). Held in bf16 (steps of 4 at 512) the update is lost entirely inside
the unit, while the unit's own output (~100) carries only a ~0.2% error; the loss measures
what the update changed, so the final-loss error is ~100%.

Expected: `--regime pure` in bf16: `step` flagged ERROR_GROWTH (severity error) naming the
`sub` op; in fp16 (steps of 0.5 at 512: part of the update survives, final-loss error ~0.5%)
the same flag. The gain's gradient goes with the update: `<root>` (which owns `gain`) flagged
GRAD_DIVERGENCE, an error in bf16 (the gradient is 0), a warning in fp16 (a third of it lost,
the sign kept). Under `--regime autocast` the adds of fp32 values stay fp32 (no autocast op
touches them): no loss, no flag, in either dtype.
"""

import torch
from torch import nn

N = 64


class LostUpdate(nn.Module):
    def forward(self, base: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return base + ((u + 512.0) - 512.0)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.step = LostUpdate()

    def forward(self, base: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.step(base, self.gain * u)


def build_model() -> nn.Module:
    return Model()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return 100.0 + torch.rand(N, generator=g), 0.1 * torch.randn(N, generator=g)


def loss_fn(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (out - batch[0]).pow(2).mean()  # what the update changed

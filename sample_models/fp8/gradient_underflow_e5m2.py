"""fp8 sample: a weight gradient that underflows e5m2.

One token's loss weight is 1e7 the others': its output gradient sets grad_output's amax, and
under tensorwise scaling the other tokens' gradients land below e5m2's smallest subnormal
(2^-16) after scaling and flush to 0, so the input gradient (dgrad) loses them. rowwise scales
dgrad's grad_output per token and keeps them.
Expected with `--dtype fp8`: under tensorwise `proj` flagged FP8_UNDERFLOW (grad_output, e5m2)
and FP8_ERROR (dgrad), naming a rowwise recipe; no dgrad finding under rowwise.
"""

import torch
from torch import nn

D, TOKENS, LOUD = 32, 16, 1e7


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
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    weight = torch.ones(out.shape[0], 1)
    weight[0] = LOUD  # the one loud token
    return (out.float() * weight).pow(2).mean()

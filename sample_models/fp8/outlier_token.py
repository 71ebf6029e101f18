"""fp8 sample: a Linear fed one outlier *token* (one row 1e6x the others).

Under torchao's `tensorwise` recipe the one amax sets the input's scale, and the other
tokens' values flush under e4m3's smallest subnormal: their outputs are lost. `rowwise`
scales each token by its own amax and rescues the forward; but its weight-gradient matmul
scales the input per *column*, where the outlier token sits in every one, so wgrad still
flushes: `rowwise_with_gw_hp` (wgrad in high precision) passes everything.
Expected with `--dtype fp8`: under tensorwise `proj` flagged FP8_ERROR and FP8_UNDERFLOW
(fprop, role input), naming `rowwise` (its gradients are all 0 in that run: the zeroed
outputs give none, so the backward is unjudged and the message says to confirm); under
rowwise FP8_ERROR (wgrad), naming `rowwise_with_gw_hp`; no fp8 finding under that one.
"""

import torch
from torch import nn

D, TOKENS, OUTLIER = 64, 32, 1e6


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
    x[0] *= OUTLIER  # the outlier token
    return x


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out[1:].float().pow(2).mean()  # the ordinary tokens' outputs

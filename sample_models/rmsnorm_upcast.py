"""Healthy in every regime: a Llama-style RMSNorm that upcasts before squaring, fed huge
activations.

`proj` makes hidden states of |x| ~ 1000 (stored in fp16 under autocast and in pure fp16).
`norm` does what transformers' LlamaRMSNorm does: `x.to(torch.float32)` first, so the squares
(~1e6, far above fp16's 65504) are computed and averaged in fp32, then casts back to the input
dtype. Real fp16 training of this model is fine, and so is the analysis of the low run as it
really executes: expected, in fp16 and bf16, under `--regime autocast` (either policy) and
`--regime pure`: no flag. (An analysis that rounds every op to fp16 would see the squares
overflow: that cast is a no-op on the fp32 reference and invisible to a dispatch mode.)
"""

import torch
from torch import nn

D, BATCH = 64, 8


class UpcastRMSNorm(nn.Module):
    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(input_dtype)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.norm = UpcastRMSNorm()
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

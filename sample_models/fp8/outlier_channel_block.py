"""fp8 sample: a wide projection fed one outlier *channel*, confined to one 32-channel block.

Channel 0 of the input is 1e5x the others (a massive activation), and the weight reads it with
a matching 1e-5 gain, so fp32 outputs are ordinary. The channel sits in every token's row:
tensorwise and rowwise (per token) scaling both squeeze the other 255 channels into e4m3's
subnormals, and the forward matmul loses precision (rowwise_with_gw_hp casts the forward as
rowwise does). mxfp8 scales each 32-channel block on its own: only the outlier's block is
squeezed, the other seven keep full e4m3 precision, and the matmul passes.
Expected with `--dtype fp8`: under tensorwise, rowwise and rowwise_with_gw_hp `proj` flagged
FP8_ERROR (fprop, role input) naming the `mxfp8` recipe; no fp8 finding under mxfp8.
"""

import torch
from torch import nn

D, OUT, TOKENS, GAIN = 256, 64, 32, 1e5


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, OUT, bias=False)
        gain = torch.ones(D)
        gain[0] = GAIN
        self.register_buffer("gain", gain)
        with torch.no_grad():
            self.proj.weight[:, 0] /= GAIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x * self.gain)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()

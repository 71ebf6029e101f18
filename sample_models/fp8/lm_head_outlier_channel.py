"""fp8 sample: a tiny language model whose lm_head reads one outlier *channel*.

The residual stream carries one channel 1e5x the others (as massive activations do), and the
lm_head's weight reads it with a matching 1e-5 gain, so fp32 logits are ordinary. In fp8 the
channel sets the scale of every token's row: tensorwise and rowwise (per token) both flush the
other channels of the lm_head's input. The MLP before it reads no outlier.
Expected with `--dtype fp8`: `lm_head` flagged FP8_ERROR (fprop, role input) under every
recipe, its fix `bf16`; `mlp` takes fp8; the conventional exclusion of the last layer is
needed here, the first layer's is not.
"""

import torch
from torch import nn

VOCAB, D, TOKENS, GAIN = 128, 64, 32, 1e5


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.mlp = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        gain = torch.ones(D)
        gain[0] = GAIN
        self.register_buffer("gain", gain)
        with torch.no_grad():
            self.lm_head.weight[:, 0] /= GAIN

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + torch.nn.functional.gelu(self.mlp(h))
        return self.lm_head(h * self.gain)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    # TOKENS ids, each predicting the next: a multiple of 32 rows, as mxfp8's blocks need.
    return torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out[:-1].float(), batch[1:])

"""fp8 sample: a tiny transformer whose lm_head is the one layer that must stay bf16.

One pre-norm block (causal single-head attention, an MLP) and an lm_head. The final hidden
state carries one channel 1e5x the others (as massive activations do), and the lm_head's
weight reads it with a matching 1e-5 gain, so fp32 logits are ordinary. In fp8 the channel
sets the scale of every token's row: tensorwise and rowwise (per token) both flush the other
channels of the lm_head's input, and mxfp8 flushes the other channels of its 32-channel block.
The block's four Linear layers read no outlier.
Expected with `--dtype fp8`: `lm_head` flagged FP8_ERROR (fprop, role input) under every
recipe, its fix `bf16`; the attention and MLP layers take fp8; of the conventional exclusions
the last layer's (lm_head) is needed here, the first layer's is not.
"""

import math

import torch
from torch import nn

VOCAB, D, HIDDEN, TOKENS, GAIN = 128, 64, 128, 32, 1e5


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        causal = torch.ones(h.shape[0], h.shape[0], dtype=torch.bool).tril()
        return self.out(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, HIDDEN)
        self.down = nn.Linear(HIDDEN, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(h)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.attn = Attention()
        self.ln2 = nn.LayerNorm(D)
        self.mlp = Mlp()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.block = Block()
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        gain = torch.ones(D)
        gain[0] = GAIN
        self.register_buffer("gain", gain)
        with torch.no_grad():
            self.lm_head.weight[:, 0] /= GAIN

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(self.block(self.embed(ids))) * self.gain)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    # TOKENS ids, each predicting the next: a multiple of 32 rows, as mxfp8's blocks need.
    return torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out[:-1].float(), batch[1:])

"""A running maximum started at a -1e38 sentinel, as RWKV keeps its linear-attention state.

`wkv` is RWKV's numerically stable recurrence: a weighted average of the values whose
weights e^k are kept relative to the largest key seen so far, `state`. Before the first token
there is none, so `state` starts at -1e38 (`torch.zeros_like(k[:, 0]) - 1e38`, as RWKV's CPU
path writes it); `exp(state - m)` is then 0 and `maximum(state, k)` picks the key. In fp16
-1e38 is -inf, which does the same: real fp16 training computes the same averages. The
sentinel is recognised from the dataflow (a constant written by the program, handed on by a
subtraction and an add), so it is no overflow, and its positions are no error.

Expected, fp16 and bf16, in every regime: no finding, verdict "Safe to train" without
warnings. (Before sentinels were recognised from the dataflow, only values at or above 2^127
were taken for mask constants: `wkv` got OVERFLOW - an error, "Not safe" - in fp16 in every
regime; bf16 holds -1e38.)
"""

import torch
from torch import nn

DIM, STEPS = 16, 8


class WKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.time_decay = nn.Parameter(torch.full((DIM,), -0.5))

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        num = torch.zeros_like(k[:, 0])
        den = torch.zeros_like(k[:, 0])
        state = torch.zeros_like(k[:, 0]) - 1e38  # no key seen yet
        outs = []
        for t in range(k.shape[1]):
            kt, vt = k[:, t], v[:, t]
            m = torch.maximum(state, kt)
            old, new = torch.exp(state - m), torch.exp(kt - m)
            num, den = old * num + new * vt, old * den + new
            outs.append(num / den)
            state = m + self.time_decay  # older keys weigh less
        return torch.stack(outs, 1)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.key = nn.Linear(8, DIM)
        self.value = nn.Linear(8, DIM)
        self.wkv = WKV()
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.wkv(self.key(x), self.value(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Model()


def make_batch() -> torch.Tensor:
    return torch.randn(4, STEPS, 8, generator=torch.Generator().manual_seed(1))


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()

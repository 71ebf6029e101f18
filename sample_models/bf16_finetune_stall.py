"""Fine-tuning a "pretrained" model in pure bf16 at lr 1e-5: the weight updates round away.

`backbone` and `head` hold pretrained-sized weights (|w| 0.05..0.3, biases too); the batch's
targets are what the same network gives with every weight moved by 1e-2 (a fine-tuning
shift). AdamW at lr 1e-5 moves each weight by ~1e-5 per step: below half the bf16 spacing of
every such weight (2^-8 of |w|: 2e-4..1.2e-3), so `model.to(torch.bfloat16)` with a stock
optimizer (Lightning's `bf16-true`) leaves them as they were and the loss stays flat, nothing
NaN. fp32 training, and bf16 compute over fp32 master weights (autocast), descend. `adapter`
is a LoRA-style update started at zero (scaled by 0.01): weights that small keep their updates
in bf16.

Expected, analyzed with `--lr 1e-5` (AdamW): under `--regime pure --dtype bf16`, LOST_UPDATE
errors on `backbone` and `head` (~100% of their updates lost; the message names fp32 master
weights, torch-optimi's Kahan summation, torchao's stochastic rounding and the lr at which the
updates survive, ~1e-3), none on `adapter`; under autocast the same units get LOST_UPDATE as
information only (master weights are fp32 there). Measured over 200 real steps
(tests/test_optimizer_step.py): fp32's loss falls 0.00865 -> 0.00504, autocast bf16's (fp32
master weights) 0.00866 -> 0.00505, pure bf16's 0.00866 -> 0.00866. In fp16 (spacing 2^-11 of
|w|) the same updates partly survive. Without an optimizer (`build_optimizer`, `--lr`) the
analysis runs no step: no flag in any regime.
"""

import torch
from torch import nn

D, N, SHIFT = 64, 256, 1e-2


class FineTune(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(D, D)
        self.head = nn.Linear(D, D)
        self.adapter = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """`target`: the batch's second element, read by `loss_fn` only."""
        h = torch.tanh(self.backbone(x))
        return self.head(h) + 0.01 * self.adapter(h)


def build_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = FineTune()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("adapter"):
                p.zero_()
            else:  # pretrained-sized: |w| in 0.05..0.3, random signs
                magnitude = 0.05 + 0.25 * torch.rand(p.shape, generator=g)
                p.copy_(magnitude * torch.randn(p.shape, generator=g).sign())
    return model


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs, and the fine-tuned network's outputs on them: every pretrained weight moved by
    +-SHIFT."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g)
    tuned = build_model()
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if not name.startswith("adapter"):
                p.add_(SHIFT * torch.randn(p.shape, generator=g).sign())
        y = tuned(x)
    return x, y


def loss_fn(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (out.float() - batch[1].float()).pow(2).mean()


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-5)

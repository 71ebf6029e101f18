"""Number-format limits, derived from `torch.finfo`, and the rounding that emulates them.

Emulation follows what tensor cores do: low-precision inputs, fp32 accumulate, a
low-precision output. On the CPU that is `x.to(low).float()` around fp32 kernels, which is
~30x faster than CPU fp16 kernels and rounds the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from precision_doctor.options import LowDtype

TORCH_DTYPES: dict[LowDtype, torch.dtype] = {
    LowDtype.FP16: torch.float16,
    LowDtype.BF16: torch.bfloat16,
}
_SPELLING = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def dtype_spelling(name: str) -> str:
    """The report's spelling of a torch dtype name (`float16` -> `fp16`); other dtypes
    (`int64`, `bool`) keep torch's name."""
    return _SPELLING.get(name, name)


@dataclass(frozen=True)
class FormatLimits:
    """The representable range of a floating-point format."""

    name: str
    max_value: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float

    @property
    def max_log2(self) -> float:
        return math.log2(self.max_value)

    @classmethod
    def of(cls, dtype: torch.dtype, name: str) -> FormatLimits:
        info = torch.finfo(dtype)
        # finfo has no smallest subnormal; for IEEE-like formats it is tiny * eps.
        return cls(
            name=name,
            max_value=float(info.max),
            smallest_normal=float(info.smallest_normal),
            smallest_subnormal=float(info.smallest_normal) * float(info.eps),
            eps=float(info.eps),
        )


FP16 = FormatLimits.of(torch.float16, "fp16")
BF16 = FormatLimits.of(torch.bfloat16, "bf16")
LIMITS: dict[LowDtype, FormatLimits] = {LowDtype.FP16: FP16, LowDtype.BF16: BF16}

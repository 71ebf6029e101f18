"""precision-doctor: find where a PyTorch model breaks in fp16/bf16 training, and why.

>>> import torch, precision_doctor as pd
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
>>> report = pd.analyze(net, torch.randn(8, 4), loss_fn=lambda out, b: out.pow(2).mean())
>>> report.environment.capture_path.value
'fx'
"""

from __future__ import annotations

__version__ = "0.1.0"

from .analysis import analyze
from .errors import PrecisionDoctorError, PrecisionDoctorInternalError
from .loss_scale import recommend_loss_scale
from .monitor import ScalerMonitor
from .options import CapturePath, Flag, LowDtype, Thresholds
from .plan import Plan, apply_plan, plan_model
from .preflight import PreflightResult, preflight
from .report import SCHEMA_VERSION, Report

__all__ = [
    "SCHEMA_VERSION",
    "CapturePath",
    "Flag",
    "LowDtype",
    "Plan",
    "PrecisionDoctorError",
    "PrecisionDoctorInternalError",
    "PreflightResult",
    "Report",
    "ScalerMonitor",
    "Thresholds",
    "__version__",
    "analyze",
    "apply_plan",
    "plan_model",
    "preflight",
    "recommend_loss_scale",
]

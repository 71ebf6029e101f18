"""precision-doctor: find where a PyTorch model breaks in fp16/bf16 training, and why.

>>> import torch, precision_doctor as pd
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
>>> report = pd.analyze(net, torch.randn(8, 4), loss_fn=lambda out, b: out.pow(2).mean())
>>> report.environment.capture_path.value
'dispatch'
"""

from __future__ import annotations

from precision_doctor.analysis.engine import analyze
from precision_doctor.analysis.fp8_recipes import compare_fp8_recipes
from precision_doctor.analysis.loss_scale import recommend_loss_scale
from precision_doctor.errors import PrecisionDoctorError, PrecisionDoctorInternalError
from precision_doctor.options import (
    AutocastPolicy,
    CapturePath,
    Driver,
    Flag,
    Judge,
    LowDtype,
    Regime,
    Severity,
    Target,
    Thresholds,
)
from precision_doctor.planning.master import MasterWeights
from precision_doctor.planning.pipeline import plan_report
from precision_doctor.planning.plan import Plan, apply_plan
from precision_doctor.planning.timing import measure_cost_model
from precision_doctor.report import SCHEMA_VERSION, Report
from precision_doctor.training.monitor import ScalerMonitor
from precision_doctor.training.preflight import PreflightResult, preflight
from precision_doctor.version import __version__

__all__ = [
    "SCHEMA_VERSION",
    "AutocastPolicy",
    "CapturePath",
    "Driver",
    "Flag",
    "Judge",
    "LowDtype",
    "MasterWeights",
    "Plan",
    "PrecisionDoctorError",
    "PrecisionDoctorInternalError",
    "PreflightResult",
    "Regime",
    "Report",
    "ScalerMonitor",
    "Severity",
    "Target",
    "Thresholds",
    "__version__",
    "analyze",
    "apply_plan",
    "compare_fp8_recipes",
    "measure_cost_model",
    "plan_report",
    "preflight",
    "recommend_loss_scale",
]


def __getattr__(name: str) -> object:
    # Old spellings kept for users' scripts; not in __all__.
    if name == "plan_model":
        import warnings

        from precision_doctor.planning import plan

        warnings.warn(
            "precision_doctor.plan_model is deprecated: plan a report with plan_report(model, batch, loss_fn, "
            "report) and take its plan with Plan.from_report(planned) (or pass the planned report to apply_plan)",
            DeprecationWarning,
            stacklevel=2,
        )
        return plan.plan_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

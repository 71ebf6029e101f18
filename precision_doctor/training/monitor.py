"""A training-time monitor for `torch.amp.GradScaler`: what the loss scale really did.

`ScalerMonitor` wraps a GradScaler and is used in its place (`scale`, `unscale_`, `step`,
`update` pass through; anything else is forwarded to the scaler). It records, per training
step (one `update()` call ends a step):

- the scale history, as change points `[step, scale]` ("from this step on, the scale was
  this"), so a million-step run with a stable scale stays a few lines of JSON;
- the steps the scaler skipped: the optimizer step was skipped because the unscaled
  gradients held inf/NaN, or the scale decreased in `update()`.

`save(path)` writes a JSON document (atomically; the `MonitorSection` schema, which is also
the report's `extras.scaler_monitor`) that the report and the app show beside the
pre-flight's prediction (`PreflightResult.prediction()`):

    scaler = torch.amp.GradScaler("cuda")
    monitor = ScalerMonitor(scaler, path="run/scaler.json", save_every=100)
    for batch in data:
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(batch)
        monitor.scale(loss).backward()
        monitor.step(optimizer)
        monitor.update()
    monitor.save()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import (
    MONITOR_KIND,
    MONITOR_SCHEMA_VERSION,
    MonitorSection,
    PreflightPrediction,
)
from precision_doctor.report import write_atomic
from precision_doctor.schema import parse_json, read_text, validated


class ScalerMonitor:
    """Records a GradScaler's scale history and skipped steps during a real run.

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> mon = ScalerMonitor(torch.amp.GradScaler("cpu", init_scale=2.0**16))
    >>> mon.scale(net(torch.tensor([[float("inf"), 1.0]])).sum()).backward()
    >>> mon.step(opt); mon.update()
    >>> mon.skipped_steps, mon.scale_history
    ([0], [[0, 65536.0], [1, 32768.0]])
    """

    def __init__(
        self,
        scaler: torch.amp.GradScaler | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        save_every: int | None = None,
        prediction: PreflightPrediction | None = None,
    ) -> None:
        if scaler is None:
            scaler = torch.amp.GradScaler("cuda" if torch.cuda.is_available() else "cpu")
        if not isinstance(scaler, torch.amp.GradScaler):
            raise PrecisionDoctorError(f"ScalerMonitor wraps a torch.amp.GradScaler, not {type(scaler).__name__}")
        if save_every is not None and save_every < 1:
            raise PrecisionDoctorError(f"save_every must be at least 1, not {save_every}")
        self.scaler = scaler
        self.path = Path(path) if path is not None else None
        self.save_every = save_every
        self.prediction = prediction
        """Optional: the pre-flight's prediction (`PreflightResult.prediction()`), saved alongside."""
        self.step_count = 0
        """Steps completed (calls to `update()`)."""
        self.skipped_steps: list[int] = []
        self.scale_history: list[list[float | int]] = []
        self._skipped_this_step = False

    # --- GradScaler pass-through ----------------------------------------------------------
    def scale(self, outputs: Any) -> Any:
        return self.scaler.scale(outputs)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """`scaler.step(optimizer)`, noting whether it skipped the optimizer step."""
        result = self.scaler.step(optimizer, *args, **kwargs)
        if self.scaler.is_enabled() and self._found_inf(optimizer):
            self._skipped_this_step = True
        return result

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """`scaler.update()`; ends the step and records it."""
        enabled = self.scaler.is_enabled()
        before = self.scaler.get_scale() if enabled else 1.0
        self.scaler.update(new_scale)
        after = self.scaler.get_scale() if enabled else 1.0
        step = self.step_count
        if not self.scale_history:
            self.scale_history.append([step, float(before)])
        # A scale that went down without an explicit new_scale is a backoff: a skipped step.
        if new_scale is None and after < before:
            self._skipped_this_step = True
        if self._skipped_this_step:
            self.skipped_steps.append(step)
        if after != self.scale_history[-1][1]:
            self.scale_history.append([step + 1, float(after)])
        self._skipped_this_step = False
        self.step_count += 1
        if self.path is not None and self.save_every and self.step_count % self.save_every == 0:
            self.save()

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the monitor lacks: get_scale, state_dict, is_enabled...
        if name == "scaler":  # not yet set (during unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.scaler, name)

    def _found_inf(self, optimizer: torch.optim.Optimizer) -> bool:
        # GradScaler keeps found_inf per optimizer until update(); a private but long-stable
        # structure (torch >= 1.6). If it ever changes, the scale decrease in update() still
        # marks the step.
        try:
            state = self.scaler._per_optimizer_states[id(optimizer)]
            return bool(sum(float(v.item()) for v in state["found_inf_per_device"].values()))
        except (AttributeError, KeyError, TypeError):
            return False

    # --- results ------------------------------------------------------------------------------
    def scale_at(self, step: int) -> float:
        """The scale used at `step` (from the change points)."""
        value = float(self.scale_history[0][1]) if self.scale_history else float(self.scaler.get_scale())
        for s, v in self.scale_history:
            if s <= step:
                value = float(v)
        return value

    def to_extras(self) -> MonitorSection:
        """The record so far: the report's `extras.scaler_monitor`, and what `save` writes."""
        s = self.scaler
        enabled = s.is_enabled()
        return MonitorSection(
            enabled=enabled,
            init_scale=float(getattr(s, "_init_scale", 1.0)) if enabled else 1.0,
            growth_factor=float(s.get_growth_factor()) if enabled else 1.0,
            backoff_factor=float(s.get_backoff_factor()) if enabled else 1.0,
            growth_interval=int(s.get_growth_interval()) if enabled else 0,
            steps=self.step_count,
            current_scale=float(s.get_scale()) if enabled else 1.0,
            scale_history=[(int(a), float(b)) for a, b in self.scale_history],
            skipped_steps=list(self.skipped_steps),
            skipped_count=len(self.skipped_steps),
            prediction=self.prediction,
        )

    def to_dict(self) -> dict[str, Any]:
        """`to_extras()` as plain JSON values."""
        return self.to_extras().model_dump(mode="json")

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        target = Path(path) if path is not None else self.path
        if target is None:
            raise PrecisionDoctorError("ScalerMonitor.save() needs a path (none was given to the monitor)")
        write_atomic(target, self.to_extras().model_dump_json(indent=1))
        return target

    @staticmethod
    def load(path: str | os.PathLike[str]) -> MonitorSection:
        """Read a saved monitor file back (kind, version and schema validated)."""
        source = f"monitor file {Path(path)}"
        raw = parse_json(read_text(path, "monitor file"), source)
        if not isinstance(raw, dict) or raw.get("kind") != MONITOR_KIND:
            raise PrecisionDoctorError(f"{Path(path)} is not a precision-doctor scaler monitor file")
        if raw.get("schema_version") != MONITOR_SCHEMA_VERSION:
            raise PrecisionDoctorError(
                f"{Path(path)} has schema_version {raw.get('schema_version')!r}; this version reads {MONITOR_SCHEMA_VERSION}"
            )
        return validated(MonitorSection, raw, f"{source} does not match the monitor schema")

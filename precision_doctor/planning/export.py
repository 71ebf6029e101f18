"""Exports of a plan: each renderer returns text to write to a file.

- `json`: the plan itself, versioned (read back by `Plan.load` / `apply_plan`).
- `python`: a standalone snippet (torch only, no precision-doctor) installing the same
  per-module overrides as `apply_plan`.
- `deepspeed`: DeepSpeed's config block. Up to DeepSpeed 0.17.1 (and when DeepSpeed is not
  installed) the `fp16` block with the recommended `initial_scale_power`, or `bf16`. From
  0.17.2 the `torch_autocast` block with `lower_precision_safe_modules` (DeepSpeed refuses
  `torch_autocast` together with `fp16`/`bf16`, so it is one or the other).
- `hf`: transformers `TrainingArguments` keyword arguments (`fp16`/`bf16`: the plan's dtype),
  `check_training_args(args)` refusing arguments of another precision, and how to attach the
  overrides (apply_plan / the python snippet refuse an autocast region of another dtype).
- `torchao` (fp8 plans): `module_filter_fn(module, fqn)` for `convert_to_float8_training`,
  True for exactly the plan's Float8Linear layers, one per recipe where the plan mixes
  recipes, and `convert_planned(model)` calling torchao once per recipe and swapping the
  `mxfp8` layers for torchao's `MXFP8Linear` (`convert_mx`).
- `te` (fp8 plans): the Linear modules to swap for Transformer Engine's `te.Linear` (which
  run in fp8 inside `te.fp8_autocast`), each one's TE recipe (`MXFP8BlockScaling` for
  `mxfp8`), and the Linears the plan keeps out of fp8.

An fp8 plan exports `json`, `torchao` and `te`; an fp16/bf16 plan the other four
(`formats_for`).

`plan_section` is the one writer of a report's `extras.plan`: the plan with every export.
"""

from __future__ import annotations

import inspect
import json
from importlib import metadata

from precision_doctor.capture.units import LOSS_UNIT, ROOT_UNIT, UNATTRIBUTED_UNIT
from precision_doctor.errors import PrecisionDoctorError
from precision_doctor.extras import PlanSection
from precision_doctor.formats import TORCH_DTYPES, format_bytes
from precision_doctor.options import ExportFormat, Fp8Recipe, LowDtype, Regime, fp8_recipe_of
from precision_doctor.planning.fp8 import planned_recipes
from precision_doctor.planning.master import MasterWeights
from precision_doctor.planning.plan import Plan
from precision_doctor.report import fp32_modules

DEEPSPEED_TORCH_AUTOCAST_SINCE = (0, 17, 2)
# Documented DeepSpeed keys (deepspeed.ai/docs/config-json).
DEEPSPEED_FP16_KEYS = frozenset(
    {
        "enabled",
        "auto_cast",
        "loss_scale",
        "initial_scale_power",
        "loss_scale_window",
        "hysteresis",
        "consecutive_hysteresis",
        "min_loss_scale",
    }
)
DEEPSPEED_BF16_KEYS = frozenset({"enabled"})
DEEPSPEED_TORCH_AUTOCAST_KEYS = frozenset({"enabled", "dtype", "lower_precision_safe_modules"})
LOSS_SCALE_WINDOW = 1000
HYSTERESIS = 2
MIN_LOSS_SCALE = 1
DEEPSPEED_USUAL_MAX_SCALE_POWER = 32
"""The top of `initial_scale_power`'s usual range: DeepSpeed's config default is 16, and 2^32
is the highest start in common use (the `init_scale` default of DeepSpeed's and Megatron's
`DynamicLossScaler`). Above it the low units' largest gradient is below ~2^-20 (a tiny loss
weight, say). Such a scale is still right - a Python float, it can go to fp32's 2^127 - so the
export writes it, and `export_caveats` says it is unusual."""


def _torch_dtype_name(dtype: LowDtype) -> str:
    """ "float16" / "bfloat16": torch's own name, as the snippet and DeepSpeed spell it."""
    return str(TORCH_DTYPES[dtype]).removeprefix("torch.")


def render_json(plan: Plan) -> str:
    return plan.to_json() + "\n"


_SNIPPET = '''"""Per-module dtype plan for {model} ({dtype}), exported by precision-doctor.
Standalone: needs only torch. Inside your torch.autocast region, fp32 modules run with
autocast disabled and inputs cast to fp32, low modules under {dtype} autocast on their inputs
as they come (with CAST_LOW_INPUTS, a pure-regime plan's, cast to {dtype}), results handed
back in fp32 to an fp32 module calling them; outside it nothing changes. Inside an autocast region of
another dtype it raises RuntimeError: re-plan for that dtype.

    remove = install_precision_plan(model)
    with torch.autocast("cuda", dtype=LOW_DTYPE):
        loss = loss_fn(model(batch), batch)
    remove()  # takes the overrides off again
"""
import copy
import functools

import torch

LOW_DTYPE = torch.{torch_dtype}
PLAN = {units}
MODULE_COUNT = {module_count}  # of the planned model: another count is another model
# Low modules cast their inputs to LOW_DTYPE only in a pure-regime plan (model.to() holds every
# activation low); else they take them as autocast does (the residual stream stays fp32).
CAST_LOW_INPUTS = {cast_low_inputs}
_SPELLING = {{torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}}


def _check_region(dev):
    # An fp16 plan inside a bf16 autocast region would switch that region to fp16, with no
    # loss scaler: refused (the same one line as apply_plan gives).
    if not torch.is_autocast_enabled(dev):
        return
    region = torch.get_autocast_dtype(dev)
    if region == LOW_DTYPE:
        return
    plan, there = _SPELLING[LOW_DTYPE], _SPELLING.get(region, str(region).replace("torch.", ""))
    replan = (
        f"re-plan with `precision-doctor analyze model.py --dtype {{there}} --export ...`, or "
        if there in ("fp16", "bf16") else ""
    )
    raise RuntimeError(
        f"this plan was made for {{plan}} but runs inside a {{there}} ({{region}}) autocast region: "
        f"{{replan}}run it under torch.autocast({{dev!r}}, dtype={{LOW_DTYPE}})"
    )


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {{k: _cast(v, dtype) for k, v in obj.items()}}
    return obj


def _results_to(out, dtype):
    # A module's results in `dtype`, containers kept as their own type (a ModelOutput).
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() and out.dtype != dtype else out
    if isinstance(out, tuple):
        items = [_results_to(o, dtype) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(out, list):
        return type(out)(_results_to(o, dtype) for o in out)
    if isinstance(out, dict):
        cast = {{k: _results_to(v, dtype) for k, v in out.items()}}
        if type(out) is dict:
            return cast
        copied = copy.copy(out)
        for k, v in cast.items():
            if v is not out[k]:
                copied[k] = v
        return copied
    return out


def install_precision_plan(model):
    """Install the plan's overrides on `model`; returns a function that removes them."""
    modules = {{name or "{ROOT_UNIT}": m for name, m in model.named_modules()}}
    # The loss and backward ops outside any module are units of the plan, not modules.
    unknown = [u for u in PLAN if u not in ("{LOSS_UNIT}", "{UNATTRIBUTED_UNIT}") and u not in modules]
    if unknown:
        raise ValueError(f"this plan does not match the model: unknown modules {{unknown[:3]}}")
    if MODULE_COUNT is not None and len(modules) != MODULE_COUNT:
        raise ValueError(f"this plan does not match the model: {{len(modules)}} modules, the plan's had {{MODULE_COUNT}}")
    p = next(model.parameters(), None)
    _check_region(p.device.type if p is not None else "cpu")
    depth = [0]
    installed = []

    def wrap(module, low):
        had = "forward" in module.__dict__
        orig = module.forward

        @functools.wraps(orig)
        def forward(*args, **kwargs):
            dev = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if dev is None:
                p = next(module.parameters(), None)
                dev = p.device.type if p is not None else "cpu"
            if not installed or (depth[0] == 0 and not torch.is_autocast_enabled(dev)):
                return orig(*args, **kwargs)  # removed, or outside autocast: as written
            if depth[0] == 0:
                _check_region(dev)  # entered from the caller's region: the plan's dtype only
            in_fp32 = not torch.is_autocast_enabled(dev)  # called by an fp32 module
            depth[0] += 1
            try:
                if not low or CAST_LOW_INPUTS:
                    dtype = LOW_DTYPE if low else torch.float32
                    args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
                ctx = torch.autocast(dev, dtype=LOW_DTYPE) if low else torch.autocast(dev, enabled=False)
                with ctx:
                    if low and in_fp32:
                        # A pre-hook casting to the autocast dtype (the fp8 export's CPU
                        # emulation) ran before this region: again inside it.
                        for hook in module._forward_pre_hooks.values():
                            if getattr(hook, "casts_to_autocast_dtype", False):
                                args = hook(module, args) or args
                    out = orig(*args, **kwargs)
                # An fp32 module computes in fp32: a low one it calls hands its results back so.
                return _results_to(out, torch.float32) if low and in_fp32 else out
            finally:
                depth[0] -= 1

        module.forward = forward
        installed.append((module, had, orig, forward))

    for unit, dtype in PLAN.items():
        if unit in modules:
            wrap(modules[unit], dtype != "fp32")

    def remove():
        done = list(installed)
        installed.clear()
        for module, had, orig, ours in reversed(done):
            if module.__dict__.get("forward") is not ours:
                continue  # wrapped again on top (Accelerate): ours now only passes calls through
            if had:
                module.forward = orig
            else:
                module.__dict__.pop("forward", None)

    return remove
'''


_PURE_SNIPPET = """

# --- pure {dtype} training (model.to({dtype}) planned per module) ---------------------------
# The plan's low modules hold their own parameters in LOW_DTYPE; those of MASTER_UNITS keep an
# fp32 master copy that the optimizer steps (their updates would round away in {dtype}), the
# other parameters are stepped where they are. Instead of model.to(LOW_DTYPE), on the fp32 model:
#
#     masters = hold_plan_weights(model)
#     opt = masters.use_in(torch.optim.AdamW(model.parameters(), lr=...))  # your optimizer
#     remove = install_precision_plan(model)
#     for batch in batches:
#         with torch.autocast("cuda", dtype=LOW_DTYPE):
#             loss = loss_fn(model(batch), batch)
#         loss.backward()
#         masters.step(opt)  # gradients cast up onto the fp32 copies, step, copies rounded down
#         opt.zero_grad()
#
# Or, instead of the copies: an optimizer that compensates the rounding itself (torch-optimi's
# Kahan summation, torchao.optim._AdamW(bf16_stochastic_round=True) for bf16) over model.to(LOW_DTYPE).
from collections.abc import Collection, Iterable, Mapping  # noqa: E402
from typing import Any  # noqa: E402

MASTER_UNITS = {masters}
"""

_HOLD_SNIPPET = '''

def hold_plan_weights(model):
    """Cast the plan's low modules' own parameters (and floating buffers, as model.to() does)
    to LOW_DTYPE in place, with fp32 master copies (taken first) of MASTER_UNITS' parameters;
    returns the MasterWeights."""
    low = {u for u, d in PLAN.items() if d != "fp32"}
    kept, cast = [], []
    for name, p in model.named_parameters():
        unit = name.rpartition(".")[0] or "@ROOT@"
        if unit not in low or not p.is_floating_point():
            continue
        if p.dtype != torch.float32:
            raise ValueError(f"parameter {name} is {p.dtype}: apply the plan to the fp32 model")
        (kept if unit in MASTER_UNITS else cast).append(p)
    with torch.no_grad():
        for p in cast:
            p.data = p.data.to(LOW_DTYPE)
        for name, b in model.named_buffers():
            if (name.rpartition(".")[0] or "@ROOT@") in low and b.is_floating_point():
                b.data = b.data.to(LOW_DTYPE)
    return MasterWeights(kept, LOW_DTYPE)
'''.replace("@ROOT@", ROOT_UNIT)


def _pure_section(plan: Plan) -> str:
    """The pure-regime part of the python export: `MasterWeights`' own source and
    `hold_plan_weights`, as `apply_plan` holds the plan's weights."""
    masters = "[" + "".join(f"\n    {m.unit!r}," for m in plan.master_weights) + ("\n]" if plan.master_weights else "]")
    head = _PURE_SNIPPET.format(dtype=plan.dtype, masters=masters)
    return head + "\n\n" + inspect.getsource(MasterWeights) + _HOLD_SNIPPET


def render_python(plan: Plan) -> str:
    pure = _pure_section(plan) if plan.regime is Regime.PURE else ""
    return _render_overrides(plan) + pure


def _render_overrides(plan: Plan) -> str:
    torch_dtype = _torch_dtype_name(plan.dtype)
    units = "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in plan.units.items()) + "}"
    return _SNIPPET.format(
        model=plan.model,
        dtype=plan.dtype,
        torch_dtype=torch_dtype,
        units=units,
        module_count=plan.module_count,
        cast_low_inputs=plan.regime is Regime.PURE,
        ROOT_UNIT=ROOT_UNIT,
        LOSS_UNIT=LOSS_UNIT,
        UNATTRIBUTED_UNIT=UNATTRIBUTED_UNIT,
    )


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def installed_deepspeed_version() -> str | None:
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None


def safe_module_classes(plan: Plan) -> list[str]:
    """Module classes every instance of which the plan runs low (a class listed in DeepSpeed
    runs low everywhere, so a class with any fp32 instance is left out, and DeepSpeed
    communicates its parameters low: so is a class the plan labels low only because autocast
    runs it in fp32 anyway, a LayerNorm)."""
    by_class: dict[str, list[bool]] = {}
    anyway = set(plan.fp32_under_autocast)
    for unit, cls in plan.module_classes.items():
        if unit in plan.units:
            by_class.setdefault(cls, []).append(plan.units[unit] != "fp32" and unit not in anyway)
    return sorted(c for c, lows in by_class.items() if all(lows))


def deepspeed_config(plan: Plan, deepspeed_version: str | None = None) -> dict[str, object]:
    version = deepspeed_version if deepspeed_version is not None else installed_deepspeed_version()
    if version is not None and _version_tuple(version) >= DEEPSPEED_TORCH_AUTOCAST_SINCE:
        return {
            "torch_autocast": {
                "enabled": True,
                "dtype": _torch_dtype_name(plan.dtype),
                "lower_precision_safe_modules": safe_module_classes(plan),
            }
        }
    if plan.dtype is LowDtype.BF16:
        return {"bf16": {"enabled": True}}
    # This config runs every module in fp16, whatever the plan: where the plan's own low
    # units need no scaler (none run low), start where DeepSpeed does by default, not at 2^0.
    advice = plan.loss_scale
    power = advice.recommended_scale_log2 if advice is not None and advice.scaler_needed else 16
    return {
        "fp16": {
            "enabled": True,
            "loss_scale": 0,  # 0: dynamic loss scaling, starting at 2^initial_scale_power
            "initial_scale_power": power,
            "loss_scale_window": LOSS_SCALE_WINDOW,
            "hysteresis": HYSTERESIS,
            "min_loss_scale": MIN_LOSS_SCALE,
        }
    }


def carries_module_dtypes(export_format: ExportFormat | str, deepspeed_version: str | None = None) -> bool:
    """Whether an export of this format applies per-module dtypes: every format but the hf
    one (TrainingArguments, which run every module in the plan's dtype) and a DeepSpeed
    config for a DeepSpeed without torch autocast (the same); the python export carries the
    per-module part for both."""
    fmt = ExportFormat(export_format)
    if fmt is ExportFormat.HF:
        return False
    if fmt is not ExportFormat.DEEPSPEED:
        return True
    version = deepspeed_version if deepspeed_version is not None else installed_deepspeed_version()
    return version is not None and _version_tuple(version) >= DEEPSPEED_TORCH_AUTOCAST_SINCE


def export_caveats(plan: Plan, export_format: ExportFormat | str, deepspeed_version: str | None = None) -> list[str]:
    """What an export cannot carry of the plan, or what in it is unusual, one line each (the
    CLI prints them)."""
    if ExportFormat(export_format) in (ExportFormat.TORCHAO, ExportFormat.TE):
        kept32 = fp32_modules(plan.units)
        if not kept32:
            return []
        shown = ", ".join(kept32[:5]) + (f" and {len(kept32) - 5} more" if len(kept32) > 5 else "")
        return [
            f"this export converts the fp8 layers only; the plan also keeps {shown} in fp32: "
            "after converting, apply_plan(model, plan) with the plan's json (`--export plan.json`, or the "
            "report `--out` writes)"
        ]
    pure = _pure_caveat(plan, export_format)
    if carries_module_dtypes(export_format, deepspeed_version):
        return pure
    if ExportFormat(export_format) is ExportFormat.HF:
        hf_kept = fp32_modules(plan.units)
        if not hf_kept:
            return pure
        shown = ", ".join(hf_kept[:5]) + (f" and {len(hf_kept) - 5} more" if len(hf_kept) > 5 else "")
        return [
            f"these TrainingArguments run every module in {plan.dtype}; the plan keeps {shown} in fp32 "
            "(apply the python export too)",
            *pure,
        ]
    version = deepspeed_version if deepspeed_version is not None else installed_deepspeed_version()
    caveats = []
    kept = fp32_modules(plan.units)
    if kept:
        since = ".".join(map(str, DEEPSPEED_TORCH_AUTOCAST_SINCE))
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        caveats.append(
            f"DeepSpeed {version or '(not installed)'} < {since} has no per-module dtypes: this config runs "
            f"every module in {plan.dtype}; the plan keeps {shown} in fp32 (apply the python export too)"
        )
    caveats += pure
    fp16 = deepspeed_config(plan, version).get("fp16")
    power = fp16.get("initial_scale_power") if isinstance(fp16, dict) else None
    if isinstance(power, int) and power > DEEPSPEED_USUAL_MAX_SCALE_POWER:
        caveats.append(
            f"initial_scale_power {power} is above its usual range (DeepSpeed's default 16, configs up to "
            f"{DEEPSPEED_USUAL_MAX_SCALE_POWER}): the low units' gradients are that small (a tiny loss weight?); "
            f"2^{power} keeps them in fp16 and is what this config starts at; dividing the loss weight "
            "out of the loss would let the default do"
        )
    return caveats


def _pure_caveat(plan: Plan, export_format: ExportFormat | str) -> list[str]:
    """A pure plan's weights held low and master copies per unit: the mixed-precision configs
    (DeepSpeed's, Trainer's) keep fp32 master weights for every parameter instead."""
    if plan.regime is not Regime.PURE or ExportFormat(export_format) not in (ExportFormat.DEEPSPEED, ExportFormat.HF):
        return []
    b = plan.state_bytes
    if b is None:
        memory = "no update lost"
    elif b.plan < b.fp32:
        memory = f"{format_bytes(b.fp32)} of weights and optimizer state against the plan's {format_bytes(b.plan)}"
    else:  # master weights for most units: the plan saves nothing there
        memory = f"no more memory than the plan's {format_bytes(b.plan)}, which its master weights cost"
    return [
        f"this pure {plan.dtype} plan holds its low units' weights in {plan.dtype} with fp32 master weights for "
        f"{len(plan.master_weights)} unit(s); this config trains under mixed precision, fp32 master weights for "
        f"every parameter ({memory}): for the planned weights use apply_plan or the python export"
    ]


def render_deepspeed(plan: Plan, deepspeed_version: str | None = None) -> str:
    return json.dumps(deepspeed_config(plan, deepspeed_version), indent=2) + "\n"


def hf_training_args(plan: Plan) -> dict[str, object]:
    return {"bf16": True} if plan.dtype is LowDtype.BF16 else {"fp16": True}


def render_hf(plan: Plan) -> str:
    kwargs = hf_training_args(plan)
    if plan.dtype is LowDtype.BF16:
        scale_line = "INIT_SCALE_LOG2 = None  # bf16 trains without a loss scaler"
    else:
        scale = plan.loss_scale.recommended_scale_log2 if plan.loss_scale is not None else 16
        scale_line = f"INIT_SCALE_LOG2 = {scale}  # recommended initial loss scale (fp16): 2**{scale}"
    other = "bf16" if plan.dtype is LowDtype.FP16 else "fp16"
    return f'''# transformers Trainer setup for the precision-doctor plan of {plan.model} ({plan.dtype}).
PLAN_DTYPE = {str(plan.dtype)!r}
TRAINING_ARGS_KWARGS = {kwargs!r}
{scale_line}


def check_training_args(args):
    """Refuse TrainingArguments whose mixed precision is not the plan's: Trainer runs the
    model under torch.autocast in the dtype of `fp16=`/`bf16=`, and the plan's overrides
    only hold inside a region of the plan's dtype ({plan.dtype})."""
    flags = [k for k in ("fp16", "bf16") if getattr(args, k, False)]
    if flags != [PLAN_DTYPE]:
        runs = "+".join(flags) if flags else "fp32 (neither fp16 nor bf16 set)"
        # Re-planning helps only for the one other dtype the arguments run.
        replan = (
            f", or re-plan with `precision-doctor analyze model.py --dtype {other} --export ...`"
            if flags == ["{other}"]
            else ""
        )
        raise ValueError(
            f"this plan was made for {{PLAN_DTYPE}} but the TrainingArguments run {{runs}}: "
            f"pass **TRAINING_ARGS_KWARGS{{replan}}"
        )


# How to attach the per-module overrides (Trainer runs the model under torch.autocast):
#   import torch
#   from transformers import Trainer, TrainingArguments
#   import precision_doctor
#   handle = precision_doctor.apply_plan(model, "plan.json")   # or the --export-format python snippet
#   args = TrainingArguments(output_dir="out", **TRAINING_ARGS_KWARGS)
#   check_training_args(args)
#   trainer = Trainer(model=model, args=args, ...)
#   # fp16 only: start the scaler at the recommended scale instead of 2**16
#   if trainer.accelerator.scaler is not None:
#       trainer.accelerator.scaler = torch.amp.GradScaler(init_scale=2.0**INIT_SCALE_LOG2)
#   trainer.train()
#   handle.remove()
#
# What check_training_args cannot see: mixed precision set outside TrainingArguments (an
# Accelerate config's mixed_precision, a DeepSpeed config's fp16/bf16 block), and
# fp16_full_eval/bf16_full_eval (evaluation with model.half(): no autocast, the plan inert).
# A training region of another dtype is still refused when it runs: apply_plan and the python
# snippet raise on entering a planned module inside an autocast region not of {plan.dtype}.
'''


_TORCHAO = '''"""fp8 plan for {model}, exported by precision-doctor: torchao's float8 training for the
layers the plan runs in fp8, each under its recipe; every other Linear stays out of it.

    model = convert_planned(model)            # swaps the planned Linears for torchao's modules
    # the plan's fp32 units: precision_doctor.apply_plan(model, "plan.json")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model(batch), batch)

Or pass module_filter_fn yourself (one recipe per convert_to_float8_training call):
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=module_filter_fn_for("tensorwise"))
The "mxfp8" layers are not Float8Linear layers: convert_planned swaps each for torchao's
MXFP8Linear (MX block scaling, RCEIL scales: torchao's mxfp8_rceil), which runs on Blackwell.
(torchao 0.18's quantize_(model, MXFP8TrainingOpConfig) drops a Linear's bias, so the module
swap is used: the same one the plan was verified with.)
"""
import dataclasses

FP8_LAYERS = {layers}
"""Module path -> torchao recipe (Float8LinearConfig.from_recipe_name; "mxfp8": MXFP8Linear)."""
KEPT_OUT = {kept}
"""The Linears the plan keeps out of fp8 -> the dtype they run in."""
MODULE_COUNT = {module_count}  # of the planned model: another count is another model
MX = "mxfp8"


def module_filter_fn_for(recipe):
    """convert_to_float8_training's module_filter_fn for the plan's layers of one recipe."""

    def module_filter_fn(module, fqn):
        return FP8_LAYERS.get(fqn) == recipe

    return module_filter_fn


def module_filter_fn(module, fqn):
    """True for exactly the plan's Float8Linear layers (all their recipes: use
    module_filter_fn_for when the plan mixes them); the mxfp8 layers are MXFP8Linear's."""
    return fqn in FP8_LAYERS and FP8_LAYERS[fqn] != MX


def convert_mx(model, emulate=False):
    """The plan's mxfp8 layers swapped for torchao's MXFP8Linear, holding the same weight and
    bias (emulate=True: torchao's EMULATED kernels, for a CPU)."""
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    for path in [p for p, r in FP8_LAYERS.items() if r == MX]:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, child)
        new = MXFP8Linear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            device="meta",
            kernel_preference=KernelPreference.EMULATED if emulate else KernelPreference.AUTO,
            scale_calculation_mode=ScaleCalculationMode.RCEIL,
        )
        new.weight = old.weight
        new.bias = old.bias
        new.train(old.training)
        setattr(parent, child, new)
    return model


def cpu_autocast_input(module, args):
    """A Float8Linear's input cast to the CPU autocast's dtype, as torchao casts it to CUDA's
    (it checks only CUDA's autocast): a forward pre-hook, which convert_planned(emulate=True)
    adds, so that the emulated layers run under torch.autocast("cpu", dtype=torch.bfloat16)."""
    import torch

    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    if not torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return None
    return (x.to(torch.get_autocast_dtype("cpu")), *args[1:])


cpu_autocast_input.casts_to_autocast_dtype = True  # a plan's override applies it inside its region


def convert_planned(model, emulate=False):
    """`model` with the plan's fp8 layers converted, one convert_to_float8_training call per
    Float8Linear recipe, the mxfp8 layers by convert_mx (emulate=True: torchao's CPU
    emulation, its Float8Linear layers given cpu_autocast_input)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    count = sum(1 for _ in model.named_modules())
    if MODULE_COUNT is not None and count != MODULE_COUNT:
        raise ValueError(f"this plan does not match the model: {{count}} modules, the plan's had {{MODULE_COUNT}}")
    for recipe in sorted(set(FP8_LAYERS.values())):
        if recipe == MX:
            model = convert_mx(model, emulate=emulate)
            continue
        config = Float8LinearConfig.from_recipe_name(recipe)
        if emulate:
            config = dataclasses.replace(config, emulate=True)
        model = convert_to_float8_training(model, config=config, module_filter_fn=module_filter_fn_for(recipe))
    if emulate:
        for name, m in model.named_modules():
            if type(m).__name__ == "Float8Linear" and name in FP8_LAYERS:
                m.register_forward_pre_hook(cpu_autocast_input)
    return model
'''

_TE = '''"""fp8 plan for {model}, exported by precision-doctor, for NVIDIA Transformer Engine: swap
the Linears of TE_LINEAR_MODULES for te.Linear and run the forward inside te.fp8_autocast;
every other module stays as it is (bf16 under torch.autocast, the plan's fp32 units in fp32).

The plan was verified with torchao's recipes (RECIPES); TE_RECIPES names TE's recipe for each:
tensorwise ~ Float8CurrentScaling (a dynamic scale per tensor), rowwise ~ Float8BlockScaling
(TE scales 1x128 blocks, torchao whole rows: not the same numbers), mxfp8 = MXFP8BlockScaling
(an e8m0 scale per 32 values, as torchao's MXFP8Linear; Blackwell). TE runs one recipe per
fp8_autocast region: with mixed recipes, wrap each layer's forward in its own region
(te_recipe(path)).

    swap_to_te(model)  # before the optimizer is made: the te.Linear weights are new parameters
    recipe = te_recipe(next(iter(TE_LINEAR_MODULES)))  # a plan of one recipe (else a region per layer)
    with torch.autocast("cuda", dtype=torch.bfloat16), te.fp8_autocast(enabled=True, fp8_recipe=recipe):
        loss = loss_fn(model(batch), batch)
"""

TE_LINEAR_MODULES = {layers}
"""The module paths to swap for te.Linear."""
RECIPES = {recipes}
"""Module path -> the torchao recipe the plan verified it under."""
TE_RECIPES = {te_recipes}
"""Module path -> the transformer_engine.common.recipe class to run it under."""
KEPT_OUT = {kept}
"""The Linears the plan keeps out of fp8 (not swapped) -> the dtype they run in."""


def te_recipe(path):
    """The Transformer Engine recipe object for one planned module."""
    from transformer_engine.common import recipe

    return getattr(recipe, TE_RECIPES[path])()


def swap_to_te(model):
    """Replace each module of TE_LINEAR_MODULES by a te.Linear with a copy of its weights (new
    parameter objects: make the optimizer after this)."""
    import torch
    import transformer_engine.pytorch as te

    for path in TE_LINEAR_MODULES:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, child)
        new = te.Linear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            params_dtype=old.weight.dtype,
            device=old.weight.device,
        )
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, child, new)
    return model
'''

TE_RECIPE_OF = {
    Fp8Recipe.TENSORWISE: "Float8CurrentScaling",
    Fp8Recipe.ROWWISE: "Float8BlockScaling",
    Fp8Recipe.ROWWISE_WITH_GW_HP: "Float8BlockScaling",
    Fp8Recipe.MXFP8: "MXFP8BlockScaling",
}
"""torchao's recipe -> Transformer Engine's closest (`transformer_engine.common.recipe`)."""


def _kept_out(plan: Plan) -> dict[str, str]:
    return {f.unit: plan.units.get(f.unit, "bf16") for f in plan.not_fp8_units}


def render_torchao(plan: Plan) -> str:
    layers = {u: str(fp8_recipe_of(d)) for u, d in plan.units.items() if fp8_recipe_of(d) is not None}
    return _TORCHAO.format(
        model=plan.model, layers=_literal(layers), kept=_literal(_kept_out(plan)), module_count=plan.module_count
    )


def render_te(plan: Plan) -> str:
    recipes = {u: r for r, units in planned_recipes(plan.units).items() for u in units}
    order = [u for u in plan.units if u in recipes]
    return _TE.format(
        model=plan.model,
        layers="[\n" + "".join(f"    {u!r},\n" for u in order) + "]",
        recipes=_literal({u: str(recipes[u]) for u in order}),
        te_recipes=_literal({u: TE_RECIPE_OF[recipes[u]] for u in order}),
        kept=_literal(_kept_out(plan)),
    )


def _literal(d: dict[str, str]) -> str:
    return "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in d.items()) + "}"


FP8_FORMATS = (ExportFormat.JSON, ExportFormat.TORCHAO, ExportFormat.TE)


def formats_for(dtype: LowDtype) -> tuple[ExportFormat, ...]:
    """The export formats of a plan of `dtype`: fp8 plans run through torchao or Transformer
    Engine, fp16/bf16 plans through autocast overrides."""
    if dtype is LowDtype.FP8:
        return FP8_FORMATS
    return tuple(f for f in ExportFormat if f not in FP8_FORMATS or f is ExportFormat.JSON)


def render(plan: Plan, export_format: ExportFormat | str) -> str:
    f = ExportFormat(export_format)
    if f not in formats_for(plan.dtype):
        choices = ", ".join(formats_for(plan.dtype))
        raise PrecisionDoctorError(f"a {plan.dtype} plan has no {f} export; choose one of: {choices}")
    return {
        ExportFormat.JSON: render_json,
        ExportFormat.PYTHON: render_python,
        ExportFormat.DEEPSPEED: render_deepspeed,
        ExportFormat.HF: render_hf,
        ExportFormat.TORCHAO: render_torchao,
        ExportFormat.TE: render_te,
    }[f](plan)


def render_all(plan: Plan) -> dict[ExportFormat, str]:
    return {f: render(plan, f) for f in formats_for(plan.dtype)}


def plan_section(plan: Plan) -> PlanSection:
    """The report's `extras.plan`: the plan's units and costs, and every export rendered."""
    return PlanSection(
        target=plan.target,
        dtype=plan.dtype,
        units=dict(plan.units),
        fp32_units=list(plan.fp32_units),
        estimated_step_time_s=plan.estimated_step_time_s,
        activation_bytes=plan.activation_bytes,
        verified_loss_rel_error=plan.verified_loss_rel_error,
        verification_passes=plan.verification_passes,
        exports=render_all(plan),
        regime=plan.regime,
        master_units=[m.unit for m in plan.master_weights],
    )

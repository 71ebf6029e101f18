"""The model spec: what a user's model file provides, and how a batch becomes a loss.

A model file defines `build_model()` (or a module-level `model`), `make_batch()` (or
`example_inputs`: a tensor, a tuple of positional args or a dict of kwargs) and optionally
`loss_fn(output, batch)`, `build_optimizer(model)` and `make_batches()`.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from precision_doctor.errors import PrecisionDoctorError

LossFn = Callable[[Any, Any], torch.Tensor]
OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model: torch.nn.Module
    batch: Any
    loss_fn: LossFn | None
    build_optimizer: OptimizerFactory | None = None
    make_batches: Callable[[], Iterator[Any]] | None = None


def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except PrecisionDoctorError:
        raise
    except SystemExit as e:  # a model file's own sys.exit() would end the tool without a word
        raise PrecisionDoctorError(f"{what} called sys.exit({e.code!r})") from e
    except Exception as e:
        raise PrecisionDoctorError(f"{what} raised {type(e).__name__}: {e}") from e


def call_build_optimizer(build: OptimizerFactory, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The user's `build_optimizer(model)`, its failure or a non-optimizer one line."""
    opt = _call("build_optimizer(model)", build, model)
    if not isinstance(opt, torch.optim.Optimizer):
        raise PrecisionDoctorError(f"build_optimizer(model) returned a {type(opt).__name__}, not a torch optimizer")
    return opt


_SETTING_TYPES = (bool, int, float, str, type(None))


def rebuild_optimizer(template: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """An optimizer of `template`'s class over `groups` (parameter-group dicts with their
    hyperparameters), with the settings `template` keeps on itself rather than in its groups
    (`copy_optimizer_settings`). A constructor with required arguments besides the parameters
    (an optimizer of one's own that requires its lr) gets the template's defaults it takes."""
    cls: Callable[..., torch.optim.Optimizer] = type(template)
    try:
        opt = cls(groups)
    except TypeError:
        opt = cls(groups, **_accepted(cls, template.defaults))
    copy_optimizer_settings(template, opt)
    return opt


def copy_optimizer_settings(source: torch.optim.Optimizer, target: torch.optim.Optimizer) -> None:
    """The settings `source` keeps as plain attributes (torchao `_AdamW`'s
    `bf16_stochastic_round` and `block_size`) onto `target`: a rebuilt optimizer gets its
    constructor's defaults instead, and `copy.deepcopy` of an optimizer keeps only its
    defaults, state and groups (`Optimizer.__getstate__`)."""
    for key, value in vars(source).items():
        setting = not key.startswith("_") and key not in ("defaults", "state", "param_groups")
        if setting and isinstance(value, _SETTING_TYPES) and getattr(target, key, None) != value:
            setattr(target, key, value)


def _accepted(cls: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Of `kwargs`, those `cls`'s constructor takes."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    if any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def load_model_file(path: str | Path) -> ModelSpec:
    """Import a model file by path and collect what it defines."""
    p = Path(path)
    if not p.exists():
        raise PrecisionDoctorError(f"model file {p} does not exist")
    if p.is_dir():
        raise PrecisionDoctorError(f"model file {p} is a directory")
    if p.suffix != ".py":
        raise PrecisionDoctorError(f"model file {p} is not a .py file")
    # The file's own name, as the user's training code imports it: its classes appear in plan
    # exports (`my_model.MyBlock`). It is not put in sys.modules, so it shadows nothing.
    module_name = p.stem if p.stem.isidentifier() else f"_precision_doctor_model_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, p)
    if spec is None or spec.loader is None:
        raise PrecisionDoctorError(f"cannot import {p}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(p.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise PrecisionDoctorError(f"{p}:{e.lineno}: syntax error: {e.msg}") from e
    except SystemExit as e:
        raise PrecisionDoctorError(f"importing {p} called sys.exit({e.code!r})") from e
    except Exception as e:
        raise PrecisionDoctorError(f"importing {p} raised {type(e).__name__}: {e}") from e
    finally:
        sys.path.pop(0)

    ns = vars(module)
    if callable(ns.get("build_model")):
        model = _call(f"{p.name}: build_model()", ns["build_model"])
    elif "model" in ns:
        model = ns["model"]
    else:
        raise PrecisionDoctorError(f"{p} defines neither build_model() nor a module-level `model`")
    if not isinstance(model, torch.nn.Module):
        raise PrecisionDoctorError(f"{p}: the model is a {type(model).__name__}, not a torch.nn.Module")

    if callable(ns.get("make_batch")):
        batch = _call(f"{p.name}: make_batch()", ns["make_batch"])
    elif "example_inputs" in ns:
        batch = ns["example_inputs"]
    else:
        raise PrecisionDoctorError(f"{p} defines neither make_batch() nor `example_inputs`")
    loss_fn = ns.get("loss_fn")
    if loss_fn is not None and not callable(loss_fn):
        raise PrecisionDoctorError(f"{p}: loss_fn is not callable")
    return ModelSpec(
        name=p.stem,
        model=model,
        batch=batch,
        loss_fn=loss_fn,
        build_optimizer=ns.get("build_optimizer") if callable(ns.get("build_optimizer")) else None,
        make_batches=ns.get("make_batches") if callable(ns.get("make_batches")) else None,
    )


def as_tree(batch: Any) -> Any:
    """A mapping pytree does not know (transformers' `BatchEncoding`, a `UserDict`) as the
    dict `run_model` unpacks it into; anything else as it is."""
    return dict(batch) if isinstance(batch, Mapping) and not isinstance(batch, dict) else batch


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """The batch's tensors, each once, as `run_model` hands them to the model."""
    return list({id(t): t for t in pytree.tree_leaves(as_tree(batch)) if isinstance(t, torch.Tensor)}.values())


def copy_batch(batch: Any) -> Any:
    """The batch with each tensor copied (`requires_grad` kept; one copy for a tensor that
    appears twice, as `labels` may be `input_ids`): what a training step may write in place
    or give a `.grad` without touching the caller's. A mapping pytree does not know keeps
    its type where it can be built from a dict."""
    copies: dict[int, torch.Tensor] = {}

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) not in copies:
            c = x.detach().clone()
            copies[id(x)] = c.requires_grad_() if x.requires_grad else c
        return copies[id(x)]

    tree = as_tree(batch)
    copied = pytree.tree_map(one, tree)
    if tree is batch:
        return copied
    try:
        return type(batch)(copied)
    except Exception:  # a mapping type that takes no dict: the dict run_model would unpack
        return copied


def run_model(model: torch.nn.Module, batch: Any) -> Any:
    """Call the model on a batch: a tensor, a tuple/list of args or a dict of kwargs."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def device_of(model: torch.nn.Module) -> torch.device:
    """The device `model` lives on: that of its first parameter, else the CPU."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def device_type(model: torch.nn.Module, *values: Any) -> str:
    """The device type `model` runs on (for `torch.autocast` and `GradScaler`): that of the
    first tensor among `values` (a call's arguments), else `device_of(model)`'s."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device.type
    return device_of(model).type


def resolve_loss(output: Any, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """The scalar loss: `loss_fn(output, batch)`, else a scalar output, else `.loss`/`["loss"]`."""
    if loss_fn is not None:
        loss = loss_fn(output, batch)
    elif isinstance(output, torch.Tensor) and output.numel() == 1:
        loss = output
    elif getattr(output, "loss", None) is not None:
        loss = output.loss
    elif isinstance(output, Mapping) and output.get("loss") is not None:
        loss = output["loss"]
    else:
        raise PrecisionDoctorError(
            "cannot find the loss: the output is not a scalar and has no `.loss`; "
            "define loss_fn(output, batch) in the model file (or pass loss_fn=)"
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise PrecisionDoctorError("the loss must be a scalar tensor")
    if not loss.requires_grad:
        raise PrecisionDoctorError("the loss does not require grad: no parameter reaches it")
    return loss  # no reshape: every op here would run inside the capture and be counted

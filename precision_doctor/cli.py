"""The `precision-doctor` command. User errors become one line on stderr and exit code 2;
`--debug` shows the traceback instead."""

from __future__ import annotations

import functools
import importlib
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperCommand, TyperGroup

from precision_doctor.errors import PrecisionDoctorError, PrecisionDoctorInternalError
from precision_doctor.extras import Bf16CheckSection
from precision_doctor.options import (
    DEFAULT_FAIL_ON,
    AutocastPolicy,
    CostSource,
    Driver,
    ExportFormat,
    Fp8Recipe,
    Judge,
    LowDtype,
    Regime,
    StrEnum,
    Target,
    Thresholds,
    parse_enum,
)
from precision_doctor.planning.plan import DEFAULT_TOLERANCE
from precision_doctor.report import Report, check_writable, write_atomic

if TYPE_CHECKING:
    from precision_doctor.model.spec import ModelSpec
    from precision_doctor.training.preflight import PreflightResult


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """Click's UsageError: typer's vendored copy (typer >= 0.2x) and/or click's own."""
    found: list[type[BaseException]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).UsageError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


_USAGE_ERRORS = _usage_error_types()


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """A bad option, a missing argument, an unknown command: one line on stderr and exit 2,
    like every other bad input, instead of click's usage box. (`no_args_is_help` still shows
    the help.)"""
    try:
        yield
    except _USAGE_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            raise
        message = " ".join(str(e.format_message()).split())  # type: ignore[attr-defined]
        typer.echo(f"precision-doctor: error: {message}", err=True)
        raise typer.Exit(getattr(e, "exit_code", EXIT_BAD_INPUT)) from None


def _no_flag_placeholders(params: list[Any]) -> list[Any]:
    """A switch (`--quiet`, `--plan/--no-plan`, `--help`) takes no value: no `<bool>` in the help."""
    for p in params:
        if getattr(p, "is_flag", False) and getattr(p, "metavar", None) is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def get_params(self, *args: Any, **kwargs: Any) -> Any:
        return _no_flag_placeholders(super().get_params(*args, **kwargs))


class _Group(TyperGroup):
    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():  # an unknown command
            return super().invoke(*args, **kwargs)

    def get_params(self, *args: Any, **kwargs: Any) -> Any:
        return _no_flag_placeholders(super().get_params(*args, **kwargs))


PIPE_WIDTH = 10_000
"""Columns of stdout when it is not a terminal: a CI log or a file gets each line whole."""


def output_console(*, stderr: bool = False, markup: bool = True) -> Console:
    """The console for the results on stdout (or the progress on stderr): wrapped to the
    terminal's width on a terminal; piped or redirected, never wrapped (a CI log that breaks
    "on\ncpu" cannot be grepped)."""
    console = Console(stderr=stderr, highlight=False, markup=markup)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, highlight=False, markup=markup, soft_wrap=True, width=PIPE_WIDTH)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="Precision diagnostics for PyTorch mixed-precision training.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _commands() -> None:
    """Precision diagnostics for PyTorch mixed-precision training."""


def _metavar(cls: type[StrEnum]) -> str:
    return "<" + "|".join(m.value for m in cls) + ">"


# String options are typed str and parsed by `options.parse_enum` at the top of each command
# (before any work): one line naming the option and its values, and the enums' aliases
# (`--dtype float16`) on the command line as in the Python API.
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        metavar=_metavar(LowDtype),
        help="The low-precision dtype to test (torch's names work too: float16, half, bfloat16). fp8: "
        "torchao's float8 training (pip install 'precision-doctor\\[fp8]'), see --fp8-recipe.",
    ),
]
RegimeOpt = Annotated[
    str,
    typer.Option(
        "--regime",
        metavar=_metavar(Regime),
        help="What the low-precision run executes: autocast (torch.autocast's op policy, parameters "
        "fp32) or pure (model.to(dtype), inputs cast).",
    ),
]
PolicyOpt = Annotated[
    str,
    typer.Option(
        "--policy",
        metavar=_metavar(AutocastPolicy),
        help="Whose autocast op lists: cuda (where training runs) or cpu (torch.autocast('cpu'), "
        "for comparing with a real CPU run). Ignored with --regime pure.",
    ),
]
DriverOpt = Annotated[
    str,
    typer.Option(
        "--driver",
        metavar=_metavar(Driver),
        help="How the fp32 step's ops reach the capture: dispatch (a dispatch mode on the eager step), "
        "graph (the step traced once into an aten graph the capture walks; falls back to dispatch, "
        "with the reason in the report, where the graph cannot stand for the step; kept for the next "
        "analysis of the same step, e.g. the bf16 check) or auto (a kept graph, else dispatch). Same "
        "report either way.",
    ),
]
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
Fn = TypeVar("Fn", bound=Callable[..., Any])
E = TypeVar("E", bound=StrEnum)


def parse_option(cls: type[E], value: str | None, option: str) -> E:
    """A string option's enum, or one line naming the option and its accepted values."""
    return parse_enum(cls, "" if value is None else value, option)


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]


def _traceback_then_exit(code: int) -> NoReturn:
    """`--debug`: the traceback of the error being handled, and the exit code it has without
    the flag (a raised exception would exit 1, which `preflight` uses for NO-GO)."""
    traceback.print_exc()
    raise typer.Exit(code) from None


def _one_line_errors(fn: Fn) -> Fn:
    """One line per error, and under torchrun one outcome for the job: a failure on any rank
    is raised on every rank (naming it) and printed once, by rank 0; every rank exits with the
    same code (`analysis.distributed.agreed`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from precision_doctor.runtime import distributed

        def say(text: str, e: BaseException) -> None:
            # Every rank raises an agreed failure alike: one of them says it.
            agreed = isinstance(e, (distributed.RanksFailedError, distributed.RanksFailedInternalError))
            if not agreed or distributed.rank() == 0:
                launched = None if agreed else distributed.launched_rank()
                prefix = f"rank {launched}: " if launched is not None else ""
                typer.echo(f"precision-doctor: {prefix}{text}", err=True)

        try:
            ended: typer.Exit | typer.Abort | None = None
            with distributed.agreed():
                try:
                    result = fn(*args, **kwargs)
                except (typer.Exit, typer.Abort) as e:  # an exit code, not a failure
                    ended = e
            if ended is not None:
                raise ended
            return result
        except (typer.Exit, typer.Abort):
            raise
        except PrecisionDoctorError as e:
            if kwargs.get("debug"):
                _traceback_then_exit(EXIT_BAD_INPUT)
            say(f"error: {e}", e)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except PrecisionDoctorInternalError as e:
            if kwargs.get("debug"):
                _traceback_then_exit(EXIT_INTERNAL)
            say(f"internal error (please report; rerun with --debug): {e}", e)
            raise typer.Exit(EXIT_INTERNAL) from None
        except KeyboardInterrupt:
            typer.echo("precision-doctor: interrupted", err=True)
            raise typer.Exit(130) from None
        finally:
            distributed.release()

    return wrapper  # type: ignore[return-value]


def _join_job(model: Any, *consoles: Console) -> bool:
    """Under torchrun, this rank's place in the job (the process group initialized here unless
    the model file did): whether it is rank 0, the one that prints and writes. The other ranks'
    consoles go quiet."""
    from precision_doctor.runtime import distributed

    distributed.init_from_env(model)
    main_rank = distributed.rank() == 0
    for c in consoles:
        c.quiet = not main_rank
    return main_rank


ModelFileArg = Annotated[Path, typer.Argument(help="A .py file defining build_model() and make_batch().")]
ThresholdOpt = Annotated[
    list[str] | None,
    typer.Option("--threshold", metavar="NAME=VALUE", help="Override a flag threshold (repeatable)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]


def parse_thresholds(items: list[str]) -> Thresholds:
    overrides: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise PrecisionDoctorError(f"--threshold takes NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    return Thresholds.from_overrides(overrides)


@contextmanager
def _progress(console: Console, description: str, total: int, *, hidden: bool) -> Iterator[Callable[[str], None]]:
    """A transient progress bar of `total` steps on `console`, shown only on a terminal and
    unless `hidden`; yields the callback each step calls with its own description."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=hidden or not console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total)

        def step(msg: str) -> None:
            progress.update(task, description=msg)
            progress.advance(task)

        yield step


@dataclass(frozen=True)
class _Analysis:
    """What analyze's analyses share: the model file's spec and the parsed options that say
    how it runs (a second analysis, the bf16 check, differs only in its dtype)."""

    spec: ModelSpec
    regime: Regime
    policy: AutocastPolicy
    thresholds: Thresholds
    fp8_recipe: Fp8Recipe | None = None  # with --dtype fp8 only
    lr: float | None = None  # with it (or the file's build_optimizer), the optimizer step is measured
    all_fp8_recipes: bool = False  # --fp8-recipe all: one analysis per recipe, side by side
    driver: Driver = Driver.AUTO

    def run(self, low: LowDtype, progress: Callable[[str], None] | None = None) -> Report:
        from precision_doctor.analysis.engine import analyze as run_analysis
        from precision_doctor.analysis.fp8_recipes import compare_fp8_recipes
        from precision_doctor.analysis.optimizer_step import DEFAULT_LR

        # The pure regime holds the weights low, and its step is where such training fails
        # (Adam's eps is 0 in fp16, small updates round away): measured by default, at the
        # optimizer the plan's training check and the pre-flight step too.
        lr = self.lr
        if lr is None and self.regime is Regime.PURE and self.spec.build_optimizer is None:
            lr = DEFAULT_LR
        kwargs: dict[str, Any] = {
            "thresholds": self.thresholds,
            "name": self.spec.name,
            "progress": progress,
            "regime": self.regime,
            "policy": self.policy,
            "build_optimizer": self.spec.build_optimizer,
            "lr": lr,
            "driver": self.driver,
        }
        if low is LowDtype.FP8 and self.all_fp8_recipes:
            return compare_fp8_recipes(self.spec.model, self.spec.batch, self.spec.loss_fn, **kwargs)
        return run_analysis(
            self.spec.model, self.spec.batch, self.spec.loss_fn, dtype=low, fp8_recipe=self.fp8_recipe, **kwargs
        )


def _check_analyze_options(
    *,
    out: Path | None,
    export: Path | None,
    export_format: ExportFormat | None,
    html: Path | None,
    open_app: bool,
    cost: CostSource,
    target: Target | None,
    model_file: Path,
) -> None:
    """The option combinations analyze refuses, and the output files: two options naming one
    file, or a file that cannot be written, fail before the analysis rather than after it."""
    if open_app and out is None:
        raise PrecisionDoctorError("--app needs --out: the app reads the saved report")
    if export_format is not None and export is None:
        raise PrecisionDoctorError("--export-format needs --export: the file the plan is written to")
    if cost is CostSource.MEASURED and target is not None:
        raise PrecisionDoctorError("--cost measured times the model's own device; it takes no --target")
    _check_outputs({"--out": out, "--export": export, "--html": html}, reads=("the model file", model_file))


def _check_outputs(paths: dict[str, Path | None], reads: tuple[str, Path] | None = None) -> None:
    """Output files (option -> path) checked before any work: two options naming one file, one
    naming the file the command reads (`reads`: what it is, its path), or a file that cannot be
    written, fail before the run rather than after it."""
    outputs = [(opt, p.resolve()) for opt, p in paths.items() if p is not None]
    source = (reads[0], reads[1].resolve()) if reads is not None else None
    for i, (opt, p) in enumerate(outputs):
        for other, q in outputs[:i]:
            if p == q:
                raise PrecisionDoctorError(f"{other} and {opt} both name {p}: one would overwrite the other")
        if source is not None and p == source[1]:
            raise PrecisionDoctorError(f"{opt} names {source[0]} {p}: it would be overwritten")
        check_writable(p)


def _planned(
    analysis: _Analysis,
    report: Report,
    *,
    target: Target | None,
    tolerance: float | None,
    cost: CostSource,
    low: LowDtype,
    status: Console | None,
) -> Report:
    """`report` with its plan and loss-scale advice; with a `status` console, a spinner there
    while each unit is timed in fp32 and `low`."""
    from precision_doctor.planning.pipeline import plan_report

    spec = analysis.spec
    with status.status(f"timing each unit in fp32 and {low}, then planning") if status is not None else nullcontext():
        return plan_report(
            spec.model,
            spec.batch,
            spec.loss_fn,
            report,
            target=target.value if target is not None else None,
            tolerance=tolerance if tolerance is not None else DEFAULT_TOLERANCE,
            cost_source=cost,
            build_optimizer=spec.build_optimizer,
            lr=analysis.lr,
        )


def _print_plan(report: Report, console: Console, *, export: Path | None, export_format: ExportFormat | None) -> None:
    """The plan's summary and loss-scale advice, and the plan export written to `export`
    (in `export_format`, or the one its suffix says) with the caveats of that format."""
    section, advice = report.extras.plan, report.extras.loss_scale
    if section is None:
        return
    from precision_doctor.planning.export import export_caveats
    from precision_doctor.planning.plan import Plan

    plan = Plan.from_json(section.exports[ExportFormat.JSON])  # the json export is the plan itself
    console.print(plan.summary(), markup=False)
    if advice is not None:
        console.print(advice.describe(report.environment.dtype), markup=False)
    if export is not None:
        export_format = _chosen_export_format(export, export_format, plan.dtype)
        if export_format not in section.exports:
            from precision_doctor.planning.export import render

            render(plan, export_format)  # one line naming the formats this plan has
        write_atomic(export, section.exports[export_format])
        console.print(f"{export_format} plan export written to {export}")
        for caveat in export_caveats(plan, export_format):
            console.print(f"note: {caveat}", markup=False)


def _write_report(report: Report, console: Console, *, out: Path | None, html: Path | None) -> None:
    """The JSON report to `out` and the HTML report to `html`, each where asked."""
    if out is not None:
        report.save(out)
        console.print(f"report written to {out}")
    if html is not None:
        from precision_doctor.views.html_report import write_html

        write_html(report, html)
        console.print(f"HTML report written to {html}")


def bf16_check_section(bf16: Report) -> Bf16CheckSection:
    """What the report keeps of the bf16 cross-check (`extras.bf16_check`)."""
    return Bf16CheckSection(
        safe=bool(bf16),
        verdict=bf16.verdict,
        final_loss_rel_error=bf16.losses.rel_error,
        flagged_units=sorted({f.unit for f in bf16.flags()}),
        severity_counts=bf16.severity_counts(),
    )


def _bf16_check(analysis: _Analysis, err_console: Console, *, say: bool) -> Report:
    """The same model analyzed in bf16, after an fp16 analysis found it not safe; `say`: tell
    stderr why the command takes twice as long."""
    # "bf16 is clean" is said only from a bf16 analysis of the same model, never guessed:
    # one more analysis, as long as the first (the plan is not searched again).
    if say:
        err_console.print(
            "fp16 is not safe as-is: analyzing the same model in bf16 too (--no-bf16-check skips it)",
            highlight=False,
            markup=False,
        )
    return analysis.run(LowDtype.BF16)


def _rerun_command(
    model_file: Path,
    regime: Regime,
    policy: AutocastPolicy,
    *,
    lr: float | None = None,
    tolerance: float | None = None,
    target: Target | None = None,
    cost: CostSource = CostSource.ROOFLINE,
    thresholds: Sequence[str] = (),
) -> list[str]:
    """The analyze command line the next steps suggest variations of: the options that were
    not their defaults, those that shape the report and its plan included (a plan suggested
    without the user's --lr or --tolerance is another plan)."""
    command = ["precision-doctor", "analyze", str(model_file)]
    command += ["--regime", regime.value] if regime is not Regime.AUTOCAST else []
    command += ["--policy", policy.value] if policy is not AutocastPolicy.CUDA and regime is Regime.AUTOCAST else []
    # repr: the shortest text that reads back as the same float (`:g` rounds to 6 digits).
    command += ["--lr", repr(lr)] if lr is not None else []
    command += ["--tolerance", repr(tolerance)] if tolerance is not None else []
    command += ["--target", target.value] if target is not None else []
    command += ["--cost", cost.value] if cost is not CostSource.ROOFLINE else []
    for t in thresholds:
        command += ["--threshold", t]
    return command


@app.command(
    cls=_Command, short_help="Shadow fp32 and low-precision passes; flag the units that overflow, underflow or diverge."
)
@_one_line_errors
def analyze(
    model_file: ModelFileArg,
    dtype: DtypeOpt = LowDtype.FP16.value,
    regime: RegimeOpt = Regime.AUTOCAST.value,
    policy: PolicyOpt = AutocastPolicy.CUDA.value,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON report here.")] = None,
    threshold: ThresholdOpt = None,
    quiet: QuietOpt = False,
    export: Annotated[
        Path | None, typer.Option("--export", help="Plan the per-module dtypes and write the plan export here.")
    ] = None,
    export_format: Annotated[
        str | None,
        typer.Option(
            "--export-format",
            metavar=_metavar(ExportFormat),
            help="json (the plan), python (standalone snippet), deepspeed, hf; fp8 plans: torchao "
            "(a module_filter_fn per recipe), te (the Linears for Transformer Engine). Needs --export. "
            "Default: from the --export suffix (.py: python), else json.",
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", metavar=_metavar(Target), help="Device the plan's cost model targets (default h100)."),
    ] = None,
    cost: Annotated[
        str,
        typer.Option(
            "--cost",
            metavar=_metavar(CostSource),
            help="roofline: per-op rooflines on the --target profile. measured: time each unit in "
            "fp32 and the low dtype on the model's own device (meant for CUDA; excludes --target).",
        ),
    ] = CostSource.ROOFLINE.value,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            help=f"Relative final-loss error the plan may cost against fp32 (default {DEFAULT_TOLERANCE:g}).",
        ),
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a standalone HTML report here.")] = None,
    open_app: Annotated[
        bool, typer.Option("--app", help="Open the interactive app on the report afterwards (needs --out).")
    ] = False,
    bf16_check: Annotated[
        bool,
        typer.Option(
            "--bf16-check/--no-bf16-check",
            help="When an fp16 analysis finds the model not safe, analyze it in bf16 too (as long "
            "again) and say whether bf16 is clean for it.",
        ),
    ] = True,
    fp8_recipe: Annotated[
        str | None,
        typer.Option(
            "--fp8-recipe",
            metavar=_metavar(Fp8Recipe).removesuffix(">") + "|all>",
            help="With --dtype fp8: torchao's scaling recipe (default tensorwise); all: one analysis per "
            "recipe, side by side (the report is the first recipe's, with the comparison).",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Measure one optimizer step with low-precision weights (LOST_UPDATE): AdamW at this "
            "learning rate, unless the model file defines build_optimizer(model), which is used then. "
            "Under --regime pure the step is measured by default (AdamW, lr 1e-3).",
        ),
    ] = None,
    driver: DriverOpt = Driver.AUTO.value,
    debug: DebugOpt = False,
) -> None:
    """Run fp32 and low-precision shadow passes (forward and backward) and flag the units
    that overflow, underflow or diverge. With --out or any plan option (--export, --target,
    --cost measured, --tolerance) it also searches the per-module dtype plan and the initial
    loss scale and stores them in the report. Exit 0 when the analysis ran, flags or not."""
    # Long for its options, which typer reads from the signature; the body is the steps.
    from precision_doctor.analysis.engine import PROGRESS_STEPS
    from precision_doctor.model.spec import load_model_file
    from precision_doctor.views.terminal import next_steps, render_next_steps, render_report

    low = parse_option(LowDtype, dtype, "--dtype")  # every option checked before any work
    run_regime = parse_option(Regime, regime, "--regime")
    op_policy = parse_option(AutocastPolicy, policy, "--policy")
    driver_opt = parse_option(Driver, driver, "--driver")
    fmt_opt = parse_option(ExportFormat, export_format, "--export-format") if export_format is not None else None
    target_opt = parse_option(Target, target, "--target") if target is not None else None
    cost_opt = parse_option(CostSource, cost, "--cost")
    all_recipes = low is LowDtype.FP8 and fp8_recipe is not None and fp8_recipe.strip().lower() == ALL_RECIPES
    recipe_opt = _fp8_options(low, None if all_recipes else fp8_recipe, fmt_opt, target_opt, cost_opt)
    thresholds = parse_thresholds(threshold or [])
    _check_analyze_options(
        out=out,
        export=export,
        export_format=fmt_opt,
        html=html,
        open_app=open_app,
        cost=cost_opt,
        target=target_opt,
        model_file=model_file,
    )
    console = output_console()
    err_console = output_console(stderr=True)
    spec = load_model_file(model_file)
    main_rank = _join_job(spec.model, console, err_console)
    analysis = _Analysis(spec, run_regime, op_policy, thresholds, recipe_opt, lr, all_recipes, driver_opt)
    with _progress(err_console, "analyzing", len(PROGRESS_STEPS), hidden=quiet or not main_rank) as step:
        report = analysis.run(low, progress=step)
    # The plan's search is only as good as its cost model's units; keep it off the plain
    # analysis path (it adds verification passes, each a forward of the model).
    plan_wanted = (
        out is not None
        or cost_opt is CostSource.MEASURED
        or any(o is not None for o in (export, fmt_opt, target_opt, tolerance))
    )
    if plan_wanted:
        timing = cost_opt is CostSource.MEASURED and not quiet
        report = _planned(
            analysis,
            report,
            target=target_opt,
            tolerance=tolerance,
            cost=cost_opt,
            low=low,
            status=err_console if timing else None,
        )
    render_report(report, console)
    _print_plan(report, console, export=export if main_rank else None, export_format=fmt_opt)
    bf16_report = None
    if bf16_check and low is LowDtype.FP16 and not report:
        bf16_report = _bf16_check(analysis, err_console, say=not quiet and main_rank)
        report = report.with_extras(bf16_check=bf16_check_section(bf16_report))
    if main_rank:
        _write_report(report, console, out=out, html=html)
    written_export = export if export is not None and report.extras.plan is not None else None
    per_module = written_export is None or _export_carries_module_dtypes(written_export, fmt_opt, low)
    command = _rerun_command(
        model_file,
        run_regime,
        op_policy,
        lr=lr,
        tolerance=tolerance,
        target=target_opt,
        cost=cost_opt,
        thresholds=threshold or [],
    )
    render_next_steps(
        next_steps(
            report,
            command,
            bf16=bf16_report,
            bf16_skipped=not bf16_check,
            export=written_export,
            export_per_module=per_module,
        ),
        console,
    )
    if open_app and out is not None and main_rank:
        from precision_doctor.views.launcher import launch_app

        raise typer.Exit(launch_app(out))


def _chosen_export_format(export: Path, export_format: ExportFormat | None, low: LowDtype) -> ExportFormat:
    """--export-format, else what the file's suffix says (.py: the python snippet, for an fp8
    plan torchao's module_filter_fn; json otherwise)."""
    snippet = ExportFormat.TORCHAO if low is LowDtype.FP8 else ExportFormat.PYTHON
    return export_format or (snippet if export.suffix == ".py" else ExportFormat.JSON)


def _export_carries_module_dtypes(export: Path, export_format: ExportFormat | None, low: LowDtype) -> bool:
    from precision_doctor.planning.export import carries_module_dtypes

    return carries_module_dtypes(_chosen_export_format(export, export_format, low))


FP8_TARGETS = (Target.H100, Target.H200, Target.B200)


ALL_RECIPES = "all"
"""`--fp8-recipe all`: every recipe, compared (`analysis.fp8_recipes.compare_fp8_recipes`)."""


def _fp8_options(
    low: LowDtype, fp8_recipe: str | None, fmt_opt: ExportFormat | None, target_opt: Target | None, cost_opt: CostSource
) -> Fp8Recipe | None:
    """--fp8-recipe parsed (the recipe of the analysis run; the plan weighs every recipe), and
    --export-format checked against what a plan of `low` exports."""
    if fmt_opt is not None:
        from precision_doctor.planning.export import formats_for

        if fmt_opt not in formats_for(low):
            choices = ", ".join(formats_for(low))
            raise PrecisionDoctorError(f"--export-format {fmt_opt} is not for {low} plans; choose one of: {choices}")
    if low is not LowDtype.FP8:
        if fp8_recipe is not None:
            raise PrecisionDoctorError("--fp8-recipe needs --dtype fp8")
        return None
    if cost_opt is CostSource.MEASURED:
        raise PrecisionDoctorError(
            "--cost measured times each unit in fp32 and bf16 only: plan fp8 on a roofline (--target h100, h200 or b200)"
        )
    if target_opt is not None and target_opt not in FP8_TARGETS:
        raise PrecisionDoctorError(
            f"--target {target_opt} has no fp8 matmul peak: plan fp8 for {', '.join(t.value for t in FP8_TARGETS)}"
        )
    if fp8_recipe is None:
        return Fp8Recipe.TENSORWISE
    try:
        return parse_option(Fp8Recipe, fp8_recipe, "--fp8-recipe")
    except PrecisionDoctorError as e:  # analyze also takes `all`: say so among the choices
        raise PrecisionDoctorError(f"{e}; or {ALL_RECIPES} (every recipe, compared)") from None


@app.command("app", cls=_Command)
@_one_line_errors
def app_command(
    report: Annotated[Path, typer.Argument(help="A report written by `analyze --out`.")],
    port: Annotated[int | None, typer.Option("--port", help="Serve on this port (default: streamlit's 8501).")] = None,
    headless: Annotated[bool, typer.Option("--headless", help="Do not open a browser.")] = False,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            help="Instead of serving: write the report as a standalone HTML file here (a report with a "
            "pre-flight or a real run's ScalerMonitor gets its Training section), then exit.",
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Open the interactive report (Streamlit) on a saved report, or write it as HTML
    (--html). Never reruns the analysis."""
    if html is not None:
        _check_outputs({"--html": html}, reads=("the report", report))
        saved = Report.load(report)
        _write_report(saved, output_console(), out=None, html=html)
        return
    from precision_doctor.views.launcher import launch_app

    code = launch_app(report, port=port, headless=headless)
    if code:
        raise typer.Exit(code)


def _print_preflight(result: PreflightResult, *, as_json: bool) -> None:
    """The verdict on stdout: the result's JSON, or the verdict with its reasons, notes, one
    line per training run and the messages."""
    if as_json:
        typer.echo(result.to_json())
        return
    console = output_console(markup=False)
    console.print(result.verdict)
    for r in result.reasons:
        console.print(f"  - {r.line()}")
    for r in result.notes:
        console.print(f"  (note, {r.severity}) {r.line()}")
    for run in result.runs.values():
        div = "" if run.max_divergence is None else f", loss divergence {run.max_divergence:.2e}"
        # The untrained run applies no update by design: its "skips" are no GradScaler's.
        skipped = "" if run.mode == "untrained" else f"skipped {len(run.skipped_steps)}, "
        console.print(
            f"  {run.mode:9s} {run.description}: {skipped}"
            f"non-finite {len(run.nonfinite_steps)}{div}; losses " + " ".join(f"{v:.4g}" for v in run.losses)
        )
    for m in result.messages:
        console.print(f"  {m}")


@app.command("preflight", cls=_Command, short_help="Go / no-go before a long run (exit 0 go, 1 no-go, 2 bad input).")
@_one_line_errors
def preflight_command(
    model_file: ModelFileArg,
    dtype: DtypeOpt = LowDtype.FP16.value,
    regime: RegimeOpt = Regime.AUTOCAST.value,
    policy: PolicyOpt = AutocastPolicy.CUDA.value,
    steps: Annotated[int, typer.Option(help="Optimizer steps per run (fp32, low, planned).")] = 8,
    fail_on: Annotated[
        str,
        typer.Option(
            "--fail-on",
            help="Comma list of risks that make it no-go (exit 1): flag names (OVERFLOW, "
            "GRAD_UNDERFLOW, ...), DIVERGENT_LOSS, SKIPPED_STEPS, NONFINITE_STEPS; severities "
            "(error; warning: warnings and errors; info); ALL or NONE. Default: error (what "
            "breaks training or costs accuracy, a diverging loss included; warnings are printed "
            "as notes, --fail-on warning makes them fail).",
        ),
    ] = DEFAULT_FAIL_ON,
    judge: Annotated[
        str, typer.Option(help="The configuration judged: 'low' (every unit low, default GradScaler) or 'planned'.")
    ] = "low",
    plan: Annotated[bool, typer.Option("--plan/--no-plan", help="Also run the recommended plan.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON (for CI).")] = False,
    threshold: ThresholdOpt = None,
    fp8_recipe: Annotated[
        str | None,
        typer.Option(
            "--fp8-recipe",
            metavar=_metavar(Fp8Recipe),
            help="With --dtype fp8: torchao's scaling recipe the fp8 run trains with (default tensorwise).",
        ),
    ] = None,
    driver: DriverOpt = Driver.AUTO.value,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write the JSON report with the pre-flight here (the app's Training tab)."),
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write a standalone HTML report with the pre-flight here.")
    ] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Go / no-go before a long run: the analysis, then a short real training run in fp32,
    plain low precision as --regime runs it (fp16 kernels emulated on the CPU) and the
    recommended plan under autocast (on copies of the model). Pure fp16 runs without a loss
    scaler (GradScaler does not unscale fp16 gradients). --dtype fp8: torchao's converted
    copy (emulated) beside bf16 and fp32, judged against bf16 too, the fp8 plan's run (its
    layers converted, each under its recipe; --judge planned judges it), Transformer Engine's
    delayed scaling modelled over the judged run's steps. Default: 8 steps,
    the file's build_optimizer(model) or AdamW(lr=1e-4), make_batches() or the one batch.
    Exit 0 = go, 1 = a risk --fail-on selects was found, 2 = bad input."""
    from precision_doctor.model.spec import load_model_file
    from precision_doctor.training.preflight import parse_fail_on
    from precision_doctor.training.preflight import preflight as run_preflight

    low = parse_option(LowDtype, dtype, "--dtype")  # every option validated before any work
    if fp8_recipe is not None and low is not LowDtype.FP8:
        raise PrecisionDoctorError("--fp8-recipe needs --dtype fp8")
    recipe = parse_option(Fp8Recipe, fp8_recipe, "--fp8-recipe") if fp8_recipe is not None else None
    run_regime = parse_option(Regime, regime, "--regime")
    op_policy = parse_option(AutocastPolicy, policy, "--policy")
    risks = parse_fail_on(fail_on, "--fail-on")
    if steps < 1:
        raise PrecisionDoctorError(f"--steps must be at least 1, not {steps}")
    judged = parse_option(Judge, judge, "--judge")
    driver_opt = parse_option(Driver, driver, "--driver")
    thresholds = parse_thresholds(threshold or [])
    _check_outputs({"--out": out, "--html": html}, reads=("the model file", model_file))
    spec = load_model_file(model_file)
    err_console = output_console(stderr=True)
    main_rank = _join_job(spec.model, err_console)
    with _progress(err_console, "pre-flight", 5, hidden=quiet or not main_rank) as step:
        result = run_preflight(
            spec.model,
            spec.batch,
            spec.loss_fn,
            dtype=low,
            regime=run_regime,
            policy=op_policy,
            steps=steps,
            fail_on=risks,
            build_optimizer=spec.build_optimizer,
            make_batches=spec.make_batches,
            judge=judged,
            plan=plan,
            thresholds=thresholds,
            name=spec.name,
            progress=step,
            fp8_recipe=recipe,
            driver=driver_opt,
        )
    if main_rank:
        _print_preflight(result, as_json=json_out)
        if out is not None or html is not None:
            annotated = result.annotated_report()  # a fresh result always carries its report
            if annotated is None:
                raise PrecisionDoctorInternalError("the pre-flight result carries no analysis report")
            # With --json, stdout is the result alone: where the files went is said on stderr.
            _write_report(annotated, err_console if json_out else output_console(), out=out, html=html)
    raise typer.Exit(0 if result.go else 1)


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as e:  # last resort: never a raw traceback without --debug
        if "--debug" in sys.argv:
            traceback.print_exc()
        else:
            print(f"precision-doctor: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()

"""The `precision-doctor` command. User errors become one line on stderr and exit code 2;
`--debug` shows the traceback instead."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperCommand, TyperGroup

from precision_doctor.errors import PrecisionDoctorError, PrecisionDoctorInternalError
from precision_doctor.options import (
    DEFAULT_FAIL_ON,
    AutocastPolicy,
    CostSource,
    ExportFormat,
    Judge,
    LowDtype,
    Regime,
    StrEnum,
    Target,
    Thresholds,
    parse_enum,
)
from precision_doctor.planning.plan import DEFAULT_TOLERANCE
from precision_doctor.report import check_writable, write_atomic


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
        help="The low-precision dtype to test (torch's names work too: float16, half, bfloat16).",
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
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
Fn = TypeVar("Fn", bound=Callable[..., Any])
E = TypeVar("E", bound=StrEnum)


def parse_option(cls: type[E], value: str | None, option: str) -> E:
    """A string option's enum, or one line naming the option and its accepted values."""
    return parse_enum(cls, "" if value is None else value, option)


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]


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
                prefix = f"rank {distributed.rank()}: " if distributed.active() and not agreed else ""
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
                raise
            say(f"error: {e}", e)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except PrecisionDoctorInternalError as e:
            if kwargs.get("debug"):
                raise
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


def parse_thresholds(items: list[str]) -> Thresholds:
    overrides: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise PrecisionDoctorError(f"--threshold takes NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    return Thresholds.from_overrides(overrides)


@app.command(
    cls=_Command, short_help="Shadow fp32 and low-precision passes; flag the units that overflow, underflow or diverge."
)
@_one_line_errors
def analyze(
    model_file: Annotated[Path, typer.Argument(help="A .py file defining build_model() and make_batch().")],
    dtype: DtypeOpt = LowDtype.FP16.value,
    regime: RegimeOpt = Regime.AUTOCAST.value,
    policy: PolicyOpt = AutocastPolicy.CUDA.value,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON report here.")] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option("--threshold", help="Override a flag threshold, NAME=VALUE (repeatable)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    export: Annotated[
        Path | None, typer.Option("--export", help="Plan the per-module dtypes and write the plan export here.")
    ] = None,
    export_format: Annotated[
        str | None,
        typer.Option(
            "--export-format",
            metavar=_metavar(ExportFormat),
            help="json (the plan), python (standalone snippet), deepspeed, hf. Default: from the "
            "--export suffix (.py: python), else json.",
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
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Measure one optimizer step with low-precision weights (LOST_UPDATE): AdamW at this "
            "learning rate, unless the model file defines build_optimizer(model), which is used then.",
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Run fp32 and low-precision shadow passes (forward and backward) and flag the units
    that overflow, underflow or diverge. Exit 0 when the analysis ran, flags or not.

    With --out or any plan option (--export, --export-format, --target, --cost measured,
    --tolerance) it also searches the per-module dtype plan and the initial loss scale and
    stores them in the report."""
    from precision_doctor.analysis.engine import PROGRESS_STEPS
    from precision_doctor.analysis.engine import analyze as run_analysis
    from precision_doctor.model.spec import load_model_file
    from precision_doctor.views.terminal import next_steps, render_next_steps, render_report

    low = parse_option(LowDtype, dtype, "--dtype")  # every option checked before any work
    run_regime = parse_option(Regime, regime, "--regime")
    op_policy = parse_option(AutocastPolicy, policy, "--policy")
    fmt_opt = parse_option(ExportFormat, export_format, "--export-format") if export_format is not None else None
    target_opt = parse_option(Target, target, "--target") if target is not None else None
    cost_opt = parse_option(CostSource, cost, "--cost")
    thresholds = parse_thresholds(threshold or [])
    if open_app and out is None:
        raise PrecisionDoctorError("--app needs --out: the app reads the saved report")
    if cost_opt is CostSource.MEASURED and target_opt is not None:
        raise PrecisionDoctorError("--cost measured times the model's own device; it takes no --target")
    outputs = [
        (opt, p.resolve()) for opt, p in (("--out", out), ("--export", export), ("--html", html)) if p is not None
    ]
    for i, (opt, p) in enumerate(outputs):
        for other, q in outputs[:i]:
            if p == q:
                raise PrecisionDoctorError(f"{other} and {opt} both name {p}: one would overwrite the other")
        check_writable(p)
    console = output_console()
    err_console = output_console(stderr=True)
    spec = load_model_file(model_file)
    main_rank = _join_job(spec.model, console, err_console)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=quiet or not main_rank or not err_console.is_terminal,
    ) as progress:
        task = progress.add_task("analyzing", total=len(PROGRESS_STEPS))

        def step(msg: str) -> None:
            progress.update(task, description=msg)
            progress.advance(task)

        report = run_analysis(
            spec.model,
            spec.batch,
            spec.loss_fn,
            dtype=low,
            thresholds=thresholds,
            name=spec.name,
            progress=step,
            regime=run_regime,
            policy=op_policy,
            build_optimizer=spec.build_optimizer,
            lr=lr,
        )
    plan_wanted = (
        out is not None
        or cost_opt is CostSource.MEASURED
        or any(o is not None for o in (export, fmt_opt, target_opt, tolerance))
    )
    if plan_wanted:
        from precision_doctor.planning.pipeline import plan_report

        # The plan's search is only as good as its cost model's units; keep it off the plain
        # analysis path (it adds verification passes, each a forward of the model).
        timing = cost_opt is CostSource.MEASURED and not quiet
        with err_console.status(f"timing each unit in fp32 and {low}, then planning") if timing else nullcontext():
            report = plan_report(
                spec.model,
                spec.batch,
                spec.loss_fn,
                report,
                target=target_opt.value if target_opt is not None else None,
                tolerance=tolerance if tolerance is not None else DEFAULT_TOLERANCE,
                cost_source=cost_opt,
            )
    render_report(report, console)
    section, advice = report.extras.plan, report.extras.loss_scale
    if section is not None:
        from precision_doctor.planning.export import export_caveats
        from precision_doctor.planning.plan import Plan

        plan = Plan.from_json(section.exports[ExportFormat.JSON])  # the json export is the plan itself
        console.print(plan.summary(), markup=False)
        if advice is not None:
            console.print(advice.describe(report.environment.dtype), markup=False)
        if export is not None and main_rank:
            export_format = fmt_opt or (ExportFormat.PYTHON if export.suffix == ".py" else ExportFormat.JSON)
            write_atomic(export, section.exports[export_format])
            console.print(f"{export_format} plan export written to {export}")
            for caveat in export_caveats(plan, export_format):
                console.print(f"note: {caveat}", markup=False)
    if out is not None and main_rank:
        report.save(out)
        console.print(f"report written to {out}")
    if html is not None and main_rank:
        from precision_doctor.views.html_report import write_html

        write_html(report, html)
        console.print(f"HTML report written to {html}")
    bf16_report = None
    if bf16_check and low is LowDtype.FP16 and not report:
        # "bf16 is clean" is said only from a bf16 analysis of the same model, never guessed:
        # one more analysis, as long as the first (the plan is not searched again).
        if not quiet and main_rank:
            err_console.print(
                "fp16 is not safe as-is: analyzing the same model in bf16 too (--no-bf16-check skips it)",
                highlight=False,
                markup=False,
            )
        bf16_report = run_analysis(
            spec.model,
            spec.batch,
            spec.loss_fn,
            dtype=LowDtype.BF16,
            thresholds=thresholds,
            name=spec.name,
            regime=run_regime,
            policy=op_policy,
            build_optimizer=spec.build_optimizer,
            lr=lr,
        )
    command = ["precision-doctor", "analyze", str(model_file)]
    command += ["--regime", run_regime.value] if run_regime is not Regime.AUTOCAST else []
    command += (
        ["--policy", op_policy.value] if op_policy is not AutocastPolicy.CUDA and run_regime is Regime.AUTOCAST else []
    )
    written_export = export if export is not None and report.extras.plan is not None else None
    render_next_steps(
        next_steps(report, command, bf16=bf16_report, bf16_skipped=not bf16_check, export=written_export), console
    )
    if open_app and out is not None and main_rank:
        from precision_doctor.views.launcher import launch_app

        raise typer.Exit(launch_app(out))


@app.command("app", cls=_Command)
@_one_line_errors
def app_command(
    report: Annotated[Path, typer.Argument(help="A report written by `analyze --out`.")],
    port: Annotated[int | None, typer.Option("--port", help="Serve on this port (default: streamlit's 8501).")] = None,
    headless: Annotated[bool, typer.Option("--headless", help="Do not open a browser.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Open the interactive report (Streamlit) on a saved report. Never reruns the analysis."""
    from precision_doctor.views.launcher import launch_app

    code = launch_app(report, port=port, headless=headless)
    if code:
        raise typer.Exit(code)


@app.command("preflight", cls=_Command, short_help="Go / no-go before a long run (exit 0 go, 1 no-go, 2 bad input).")
@_one_line_errors
def preflight_command(
    model_file: Annotated[Path, typer.Argument(help="A .py file defining build_model() and make_batch().")],
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
    threshold: Annotated[
        list[str] | None,
        typer.Option("--threshold", help="Override a flag threshold, NAME=VALUE (repeatable)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Go / no-go before a long run: the analysis, then a short real training run in fp32,
    plain low precision as --regime runs it (fp16 kernels emulated on the CPU) and the
    recommended plan under autocast (on copies of the model). Pure fp16 runs without a loss
    scaler (GradScaler does not unscale fp16 gradients). Default: 8 steps,
    the file's build_optimizer(model) or AdamW(lr=1e-4), make_batches() or the one batch.
    Exit 0 = go, 1 = a risk --fail-on selects was found, 2 = bad input."""
    from precision_doctor.model.spec import load_model_file
    from precision_doctor.training.preflight import parse_fail_on
    from precision_doctor.training.preflight import preflight as run_preflight

    low = parse_option(LowDtype, dtype, "--dtype")  # every option validated before any work
    run_regime = parse_option(Regime, regime, "--regime")
    op_policy = parse_option(AutocastPolicy, policy, "--policy")
    risks = parse_fail_on(fail_on)
    if steps < 1:
        raise PrecisionDoctorError(f"--steps must be at least 1, not {steps}")
    judged = parse_option(Judge, judge, "--judge")
    thresholds = parse_thresholds(threshold or [])
    spec = load_model_file(model_file)
    err_console = Console(stderr=True)
    main_rank = _join_job(spec.model, err_console)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=quiet or not main_rank or not err_console.is_terminal,
    ) as progress:
        task = progress.add_task("pre-flight", total=5)

        def step(msg: str) -> None:
            progress.update(task, description=msg)
            progress.advance(task)

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
        )
    if json_out and main_rank:
        typer.echo(result.to_json())
    elif main_rank:
        console = output_console(markup=False)
        console.print(result.verdict)
        for r in result.reasons:
            console.print(f"  - {r.line()}")
        for r in result.notes:
            console.print(f"  (note, {r.severity}) {r.line()}")
        for run in result.runs.values():
            div = "" if run.max_divergence is None else f", loss divergence {run.max_divergence:.2e}"
            console.print(
                f"  {run.mode:8s} {run.description}: skipped {len(run.skipped_steps)}, "
                f"non-finite {len(run.nonfinite_steps)}{div}; losses " + " ".join(f"{v:.4g}" for v in run.losses)
            )
        for m in result.messages:
            console.print(f"  {m}")
    raise typer.Exit(0 if result.go else 1)


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as e:  # last resort: never a raw traceback without --debug
        if "--debug" in sys.argv:
            raise
        print(f"precision-doctor: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()

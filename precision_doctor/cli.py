"""The `precision-doctor` command. User errors become one line on stderr and exit code 2;
`--debug` shows the traceback instead."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import PrecisionDoctorError, PrecisionDoctorInternalError
from .options import LowDtype, Thresholds

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Precision diagnostics for PyTorch mixed-precision training.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _commands() -> None:
    """Precision diagnostics for PyTorch mixed-precision training."""


EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
F = TypeVar("F", bound=Callable[..., Any])

DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]


def _one_line_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except PrecisionDoctorError as e:
            if kwargs.get("debug"):
                raise
            typer.echo(f"precision-doctor: error: {e}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except PrecisionDoctorInternalError as e:
            if kwargs.get("debug"):
                raise
            typer.echo(f"precision-doctor: internal error (please report; rerun with --debug): {e}", err=True)
            raise typer.Exit(EXIT_INTERNAL) from None
        except KeyboardInterrupt:
            typer.echo("precision-doctor: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def parse_thresholds(items: list[str]) -> Thresholds:
    overrides: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise PrecisionDoctorError(f"--threshold takes NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    return Thresholds.from_overrides(overrides)


@app.command()
@_one_line_errors
def analyze(
    model_file: Annotated[Path, typer.Argument(help="A .py file defining build_model() and make_batch().")],
    dtype: Annotated[LowDtype, typer.Option(help="The low-precision dtype to test.")] = LowDtype.FP16,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON report here.")] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option("--threshold", help="Override a flag threshold, NAME=VALUE (repeatable)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run fp32 and low-precision shadow passes (forward and backward) and flag the units
    that overflow, underflow or diverge. Exit 0 when the analysis ran, flags or not."""
    from .analysis import analyze as run_analysis
    from .model_spec import load_model_file
    from .render import render_report

    thresholds = parse_thresholds(threshold or [])
    console = Console(stderr=False, highlight=False)
    err_console = Console(stderr=True)
    spec = load_model_file(model_file)
    steps = ["fx", "forward", "backward", "stats"]
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
        console=err_console, transient=True, disable=quiet or not err_console.is_terminal,
    ) as progress:
        task = progress.add_task("analyzing", total=len(steps))

        def step(msg: str) -> None:
            progress.update(task, description=msg)
            progress.advance(task)

        report = run_analysis(spec.model, spec.batch, spec.loss_fn, dtype, thresholds=thresholds, name=spec.name, progress=step)
    render_report(report, console)
    if out is not None:
        report.save(out)
        console.print(f"report written to {out}")


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

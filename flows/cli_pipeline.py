"""The commands that run the pipeline: one stage (what dvc.yaml's `cmd` calls), the whole pipeline or a
slice of it as a Prefect flow, a Prefect server, and the pipeline served on a schedule."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.table import Table

from flows.cli_app import FAILED_EXIT, INPUT_ERRORS, USAGE_ERROR_EXIT, app, console, errors, fail, project
from tasks.core.layout import PARAMS_FILE
from tasks.core.params import ParamsError


@app.command()
def stage(name: Annotated[str, typer.Argument(help="stage to execute, e.g. ingest")]) -> None:
    """Execute one stage now (what dvc.yaml's `cmd` runs; DVC does not check staleness here)."""
    root = project()
    from tasks.core.runner import run_stage

    try:
        metrics = run_stage(name, root)
    except KeyError as err:
        fail(err.args[0], USAGE_ERROR_EXIT)
    except INPUT_ERRORS as err:
        fail(err, label=f"error in stage {name}")
    if os.environ.get("RANK", "0") != "0":
        return  # torchrun: rank 0 reports
    table = Table(title=f"{name}: metrics", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    from tasks.core.tracking import flatten

    for key, value in flatten(metrics).items():  # nested sections print as `compare.lora.val_loss`
        if key.rsplit(".", 1)[-1].startswith(("dropped_", "quarantined_")) and not value:
            continue  # per-reason counters: show only the reasons that occurred
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


@app.command()
def run(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="run just these stages (repeat or comma-separate)")
    ] = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="first stage to run")] = None,
    to_stage: Annotated[str | None, typer.Option("--to", help="last stage to run")] = None,
    force: Annotated[bool, typer.Option("--force", help="rerun even if DVC finds it up to date")] = False,
    set_params: Annotated[
        list[str] | None,
        typer.Option("-S", "--set-param", help="section.key=value, written to params.yaml first"),
    ] = None,
    sync: Annotated[bool, typer.Option(help="dvc pull first, dvc push last (with a DVC remote)")] = False,
) -> None:
    """Run the pipeline (all stages, or a slice) as a Prefect flow; DVC skips what is up to date."""
    root = project()
    from flows.stages import declared_stages, metrics_summary, select_stages
    from tasks.core.params import apply_overrides, load_params_file
    from tasks.core.runner import validate_params

    selected = [name for item in only or [] for name in item.split(",") if name]
    try:  # fail on a bad stage name or override now, before Prefect starts and before params.yaml changes
        select_stages(declared_stages(root), selected or None, from_stage, to_stage)
        validate_params(apply_overrides(load_params_file(root / PARAMS_FILE), set_params or []), root)
    except ValueError as err:
        fail(err)
    from flows.pipeline import StageInputError, pipeline

    try:
        outcomes = pipeline(
            only=selected or None,
            from_stage=from_stage,
            to_stage=to_stage,
            force=force,
            overrides=set_params or [],
            root=str(root),
            sync=sync,
        )
    except (ParamsError, StageInputError) as err:
        fail(err)
    except Exception as err:  # a failed stage: Prefect already logged its output
        fail(err, FAILED_EXIT, label="pipeline failed")
    table = Table(title="llmpipe run")
    for column in ("stage", "status", "seconds", "metrics"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    colours = {"ran": "green", "skipped": "dim", "restored": "cyan"}
    for outcome in outcomes:
        status = outcome["status"]
        table.add_row(
            outcome["stage"],
            f"[{colours.get(status, 'white')}]{status}[/]",
            f"{outcome['seconds']:.1f}",
            metrics_summary(root, outcome["stage"]),
        )
    console.print(table)


@app.command()
def server(port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 4200) -> None:
    """Start a Prefect server on 127.0.0.1 (schedules need one), its database in .llmpipe/prefect/."""
    project()  # PREFECT_HOME and the database URL now point into the project
    errors.print(
        f"Prefect UI and API: http://127.0.0.1:{port}; in the shell that runs `llmpipe serve`:\n"
        f"  export PREFECT_API_URL=http://127.0.0.1:{port}/api"
    )
    command = ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    os.execv(sys.executable, [sys.executable, *command])


@app.command()
def serve(
    name: Annotated[str, typer.Option(help="the deployment is llmpipe/NAME")] = "nightly",
    cron: Annotated[str | None, typer.Option(help='a cron schedule, e.g. "0 3 * * *" (UTC)')] = None,
    interval: Annotated[float | None, typer.Option(help="or: every this many seconds")] = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="the stages a scheduled run runs")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="scheduled runs rerun even up-to-date stages")
    ] = False,
    set_params: Annotated[
        list[str] | None, typer.Option("-S", "--set-param", help="section.key=value for every run")
    ] = None,
    sync: Annotated[
        bool, typer.Option(help="dvc pull before and dvc push after each run (with a remote)")
    ] = False,
) -> None:
    """Serve the pipeline as a Prefect deployment on a schedule, until interrupted (needs `llmpipe server`).

    Any run of it can change its parameters, e.g. rerun one stage:
    prefect deployment run 'llmpipe/nightly' -p only=dedup -p force=true"""
    root = project()
    if not os.environ.get("PREFECT_API_URL"):
        fail(
            "schedules need a Prefect server: start `llmpipe server` (another terminal) and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
            USAGE_ERROR_EXIT,
        )
    if (cron is None) == (interval is None):
        fail("give one of --cron or --interval", USAGE_ERROR_EXIT)
    from flows.pipeline import pipeline
    from flows.stages import declared_stages, select_stages

    selected = [stage for item in only or [] for stage in item.split(",") if stage]
    try:
        select_stages(declared_stages(root), selected or None)
    except ValueError as err:
        fail(err)
    parameters = {"only": selected or None, "force": force, "overrides": set_params or [], "root": str(root)}
    parameters["sync"] = sync
    pipeline.serve(name=name, cron=cron, interval=interval, parameters=parameters, tags=["llmpipe"])

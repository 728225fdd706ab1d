"""The commands that look at the project without running it: which stages are stale, trained models
compared across runs, a training plan for a compute budget, and dvc.yaml's code deps vs the imports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli_app import FAILED_EXIT, USAGE_ERROR_EXIT, app, console, errors, fail, project
from model.flops import ACCELERATOR_NAMES
from model.planner import InvalidSetting, PlanSettings
from tasks.core.layout import PARAMS_FILE, project_root, state_dir


@app.command()
def status() -> None:
    """Each stage: up to date or stale (and why, from `dvc status`), when it last ran, its MLflow run and
    its last metrics."""
    root = project()
    from datetime import datetime

    from flows.stages import declared_stages, metrics_summary, stale_stages
    from tasks.core.tracking import latest_stage_runs

    stale = stale_stages(root)
    runs = latest_stage_runs(root)
    table = Table(title="llmpipe status")
    for column in ("stage", "state", "why", "last run", "MLflow run", "last metrics"):
        table.add_column(column)
    upstream_stale = None
    for name in declared_stages(root):
        if name in stale:
            state, why = "[yellow]stale[/]", "; ".join(stale[name]) or "never run"
            upstream_stale = upstream_stale or name
        elif upstream_stale:
            state, why = (
                "[yellow]stale[/]",
                f"upstream {upstream_stale} is stale (reruns if its output changes)",
            )
        else:
            state, why = "[green]up to date[/]", ""
        run = runs.get(name)
        when, run_id = "", ""
        if run is not None:
            when = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
            run_id = run.info.run_id[:12] + ("" if run.info.status == "FINISHED" else f" ({run.info.status})")
        table.add_row(name, state, why, when, run_id, metrics_summary(root, name))
    console.print(table)


def _number(value: float | None) -> str:
    """Counts in full (3,503,053), other values to 4 significant digits, nothing for a missing one."""
    if value is None:
        return ""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.4g}"


@app.command()
def compare(
    run_ids: Annotated[
        list[str] | None, typer.Argument(help="evaluate (or pipeline) run ids; prefixes are fine")
    ] = None,
    last: Annotated[int, typer.Option(help="without run ids: the last N evaluated runs")] = 5,
    metric: Annotated[
        str, typer.Option(help="what decides the best run: val_bpb, pretrain.val_loss, ...")
    ] = "val_bpb",
    promote: Annotated[
        bool, typer.Option(help="move the registry alias (evaluate.alias) to the best run's model")
    ] = False,
) -> None:
    """Compare trained models across runs: the params that differ, key metrics, data md5, the best run;
    writes the runs' pretraining loss curves to reports/compare/loss.png."""
    root = project()
    from datetime import datetime

    from tasks.core import compare as comparing
    from tasks.core.params import load_section

    try:
        comparison = comparing.compare_runs(root, run_ids, last, metric)
    except ValueError as err:
        fail(err)
    best = comparison.best
    direction = "lower" if comparison.lower_is_better else "higher"
    table = Table(title=f"llmpipe compare (best by {metric}, {direction} is better)")
    table.add_column("")
    for run in comparison.runs:
        table.add_column(("★ " if run is best else "") + run.run_id[:8], justify="right")
    started = [datetime.fromtimestamp(run.evaluate.info.start_time / 1000) for run in comparison.runs]
    table.add_row("evaluated", *[when.strftime("%Y-%m-%d %H:%M") for when in started])
    table.add_row(
        "git commit", *[run.evaluate.data.tags.get("git_commit", "")[:8] for run in comparison.runs]
    )
    for path in comparing.DATA_PATHS:
        md5s = [run.data_md5s().get(path, "")[:8] for run in comparison.runs]
        if any(md5s):
            table.add_row(f"{path} md5", *md5s)
    differing = comparison.differing_params()
    for key, values in differing.items():
        table.add_row(f"[cyan]{key}[/]", *values)
    for name, numbers in comparison.metric_rows().items():
        shown = [_number(number) for number in numbers]
        table.add_row(f"[bold]{name}[/]" if name.endswith(metric) else name, *shown)
    console.print(table)
    if not differing:
        console.print("[dim]the runs' logged params are identical[/]")
    plot = comparing.plot_losses(comparison, root / "reports" / "compare" / "loss.png")
    if plot is not None:
        console.print(f"loss curves: {plot.relative_to(root)}")
    if promote:
        from tasks.evaluate import EvaluateParams

        params = load_section(EvaluateParams, "evaluate", root / PARAMS_FILE)
        try:
            version = comparing.promote(comparison, params.registered_model, params.alias)
        except ValueError as err:
            fail(err)
        assert best is not None  # promote refuses a comparison without one
        console.print(f"{params.registered_model}@{params.alias} → version {version} (run {best.run_id[:8]})")


#: The options that set a plan setting, parameter → setting (`--price` sets usd_per_gpu_hour): an error
#: in one of these settings names the option, any other the params.yaml key.
PLAN_OPTIONS = {
    "flops": "flops",
    "gpu": "gpu",
    "gpus": "gpus",
    "hours": "hours",
    "mfu": "mfu",
    "price": "usd_per_gpu_hour",
    "context": "context_length",
}


def _with_options(base: PlanSettings, changes: dict[str, Any]) -> PlanSettings:
    """`base` with the options' changes, as a plain PlanSettings so that a setting it rejects is named
    as the option that set it (exit 2)."""
    try:
        return PlanSettings(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(PlanSettings)} | changes
        )
    except InvalidSetting as err:
        from tasks.plan import params_error

        option = {setting: f"--{option}" for option, setting in PLAN_OPTIONS.items()}.get(err.key)
        fail(f"{option} {err.problem}" if option else params_error(err), USAGE_ERROR_EXIT)


@app.command()
def plan(
    ctx: typer.Context,
    flops: Annotated[float | None, typer.Option(help="total training FLOPs (instead of GPU hours)")] = None,
    gpu: Annotated[
        str | None, typer.Option(help=f"{', '.join(ACCELERATOR_NAMES[:-1])} or {ACCELERATOR_NAMES[-1]}")
    ] = None,
    gpus: Annotated[int | None, typer.Option(help="number of GPUs")] = None,
    hours: Annotated[float | None, typer.Option(help="wall-clock training hours")] = None,
    mfu: Annotated[float | None, typer.Option(help="model FLOPs utilisation, 0-1")] = None,
    price: Annotated[float | None, typer.Option(help="dollars per GPU-hour")] = None,
    context: Annotated[int | None, typer.Option(help="context length in tokens")] = None,
    vocab: Annotated[
        int | None, typer.Option(help="vocabulary size (default: the trained tokenizer's)")
    ] = None,
    tokens: Annotated[int | None, typer.Option(help="training-split tokens (default: data/tokens)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print plan.json instead of a table")] = False,
) -> None:
    """Plan a training run for a compute budget: model shape, tokens, time, cost, data check.

    Starts from the project's params.yaml (plan) when run inside one, and plans continued pretraining
    when the project's `init` stage imported a pretrained base; options override."""
    from tasks.core.params import ParamsError, load_params_file, parse_section
    from tasks.plan import PlanParams, make_plan, read_base, read_token_counts, summary_rows
    from tasks.tokenizer import TokenizerParams

    try:
        root: Path | None = project_root()
    except FileNotFoundError:
        root = None
    changes = {setting: ctx.params[option] for option, setting in PLAN_OPTIONS.items()}
    changes = {setting: value for setting, value in changes.items() if value is not None}
    if flops is None and (gpu is not None or hours is not None):
        changes["flops"] = None  # a GPU budget given on the command line replaces a FLOPs one
    try:
        params = load_params_file(root / PARAMS_FILE) if root else {}
        settings = _with_options(parse_section(PlanParams, "plan", params.get("plan")), changes)
        counts = read_token_counts(root) if root else None
        if vocab is None and counts is not None:
            vocab = counts.vocab_size
        if vocab is None:  # before the tokenize stage: the size the tokenizer stage trains
            vocab = parse_section(TokenizerParams, "tokenizer", params.get("tokenizer")).vocab_size
        if tokens is None and counts is not None:
            tokens = counts.train_tokens
        base = read_base(root) if root else None  # the project's pretrained base, once imported
        result = make_plan(settings, vocab, tokens, state_dir(root) if root else None, base)
    except ParamsError as err:
        fail(err, USAGE_ERROR_EXIT)
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    table = Table(title="llmpipe plan", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in summary_rows(result):
        table.add_row(f"[red]{what}[/]" if what == "WARNING" else what, value)
    console.print(table)


@app.command()
def deps(
    write: Annotated[bool, typer.Option("--write", help="rewrite dvc.yaml's code deps to match")] = False,
) -> None:
    """Check (or with --write, fix) that each stage's code deps in dvc.yaml are the project modules its
    stage module imports, transitively; exit 1 when they disagree."""
    root = project()
    from flows import deps as code_deps

    if write:
        changed = code_deps.write(root)
        console.print(
            f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed else "dvc.yaml: up to date"
        )
        return
    found = code_deps.differences(root)
    if not found:
        console.print("dvc.yaml: every stage's code deps match its imports")
        return
    table = Table(title="dvc.yaml code deps that disagree with the imports")
    for column in ("stage", "missing (imported, not listed)", "extra (listed, not imported)"):
        table.add_column(column)
    for name, (missing, extra) in found.items():
        table.add_row(name, "\n".join(missing), "\n".join(extra))
    console.print(table)
    errors.print("run `llmpipe deps --write` to fix dvc.yaml")
    raise typer.Exit(FAILED_EXIT)

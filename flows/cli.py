"""`llmpipe` command line: run the pipeline, run one stage, see what is stale.

llmpipe run [--only dedup] [--from X] [--to Y] [--force] [-S section.key=value ...]
llmpipe stage NAME          # what dvc.yaml's `cmd` calls
llmpipe server              # a Prefect server on 127.0.0.1 (its database in .llmpipe/prefect)
llmpipe serve --cron "0 3 * * *" [--only X] [--force] [--sync]   # the pipeline as a scheduled deployment
llmpipe status              # which stages are stale (from DVC), when they last ran, their last metrics
llmpipe compare [RUN_ID ...] [--last N] [--metric val_bpb] [--promote]   # models across runs
llmpipe plan [--flops 1e18 | --gpu h100 --gpus 8 --hours 24 --mfu 0.4] [--price 2.5] [--json]
llmpipe deps [--write]       # dvc.yaml code deps vs the import graph
llmpipe export-hf CHECKPOINT OUT_DIR   # a transformers directory (GPT-2 or Llama layout)
llmpipe generate --prompt "The movie was full of" [--strategy greedy|beam|sample] [--show-probs] ...
llmpipe chat [--system "You are terse."] [--adapter models/lora]   # /reset, /quit
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flows.env import configure_environment
from tasks.core.layout import PARAMS_FILE, project_root
from tasks.core.params import ParamsError

app = typer.Typer(
    help="llmpipe: raw text corpus → trained, evaluated small GPT (Prefect + DVC + MLflow).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

#: Failures caused by the user's input or params (exit code 3: the flow does not retry them).
INPUT_ERRORS = (ParamsError, FileNotFoundError, ValueError, UnicodeError, PermissionError)


def _root() -> Path:
    try:
        root = project_root()
    except FileNotFoundError as err:
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    configure_environment(root)
    return root


@app.command()
def stage(name: Annotated[str, typer.Argument(help="stage to execute, e.g. ingest")]) -> None:
    """Execute one stage now (what dvc.yaml's `cmd` runs; DVC does not check staleness here)."""
    root = _root()
    from tasks.core.runner import run_stage

    try:
        metrics = run_stage(name, root)
    except KeyError as err:
        errors.print(f"[red]error:[/red] {err.args[0]}")
        raise typer.Exit(2) from None
    except INPUT_ERRORS as err:
        errors.print(f"[red]error in stage {name}:[/red] {err}")
        raise typer.Exit(3) from None
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
    root = _root()
    from flows.stages import declared_stages, metrics_summary, select_stages
    from tasks.core.params import apply_overrides, load_params_file
    from tasks.core.runner import validate_params

    selected = [name for item in only or [] for name in item.split(",") if name]
    try:  # fail on a bad stage name or override now, before Prefect starts and before params.yaml changes
        select_stages(declared_stages(root), selected or None, from_stage, to_stage)
        validate_params(apply_overrides(load_params_file(root / PARAMS_FILE), set_params or []))
    except ValueError as err:
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(3) from None
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
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(3) from None
    except Exception as err:  # a failed stage: Prefect already logged its output
        errors.print(f"[red]pipeline failed:[/red] {err}")
        raise typer.Exit(1) from None
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
    _root()  # PREFECT_HOME and the database URL now point into the project
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
    root = _root()
    if not os.environ.get("PREFECT_API_URL"):
        errors.print(
            "[red]error:[/red] schedules need a Prefect server: start `llmpipe server` (another "
            "terminal) and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
        raise typer.Exit(2)
    if (cron is None) == (interval is None):
        errors.print("[red]error:[/red] give one of --cron or --interval")
        raise typer.Exit(2)
    from flows.pipeline import pipeline
    from flows.stages import declared_stages, select_stages

    selected = [stage for item in only or [] for stage in item.split(",") if stage]
    try:
        select_stages(declared_stages(root), selected or None)
    except ValueError as err:
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(3) from None
    parameters = {"only": selected or None, "force": force, "overrides": set_params or [], "root": str(root)}
    parameters["sync"] = sync
    pipeline.serve(name=name, cron=cron, interval=interval, parameters=parameters, tags=["llmpipe"])


@app.command()
def status() -> None:
    """Each stage: up to date or stale (and why, from `dvc status`), when it last ran, its MLflow run and
    its last metrics."""
    root = _root()
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
    root = _root()
    from datetime import datetime

    from tasks.core import compare as comparing
    from tasks.core.params import load_section

    try:
        comparison = comparing.compare_runs(root, run_ids, last, metric)
    except ValueError as err:
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(3) from None
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
    for name, values in comparison.metric_rows().items():
        shown = [_number(value) for value in values]
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
            errors.print(f"[red]error:[/red] {err}")
            raise typer.Exit(3) from None
        console.print(f"{params.registered_model}@{params.alias} → version {version} (run {best.run_id[:8]})")


@app.command()
def plan(
    flops: Annotated[float | None, typer.Option(help="total training FLOPs (instead of GPU hours)")] = None,
    gpu: Annotated[
        str | None, typer.Option(help="h100, h100-pcie, h200, a100, l40s, l4, rtx4090 or cpu")
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

    Starts from the project's params.yaml (plan) when run inside one; options override."""
    import dataclasses
    import json

    from tasks.core.layout import state_dir
    from tasks.core.params import load_params_file, parse_section
    from tasks.plan import PlanParams, make_plan, read_token_meta, summary_rows

    try:
        root: Path | None = project_root()
    except FileNotFoundError:
        root = None
    try:
        params = load_params_file(root / PARAMS_FILE) if root else {}
        base = parse_section(PlanParams, "plan", params.get("plan"))
        changes = {"gpu": gpu, "gpus": gpus, "hours": hours, "mfu": mfu, "usd_per_gpu_hour": price}
        changes |= {"context_length": context, "flops": flops}
        changes = {key: value for key, value in changes.items() if value is not None}
        if flops is None and (gpu is not None or hours is not None):
            changes["flops"] = None  # a GPU budget given on the command line replaces a FLOPs one
        chosen = dataclasses.replace(base, **changes)
        chosen.validate(where="--")
        meta = read_token_meta(root) if root else None
        vocab_size = vocab or (
            meta["vocab_size"] if meta else (params.get("tokenizer") or {}).get("vocab_size", 8192)
        )
        train_tokens = tokens if tokens is not None else (meta["splits"]["train"]["tokens"] if meta else None)
        result = make_plan(chosen, chosen.model, vocab_size, train_tokens, state_dir(root) if root else None)
    except ParamsError as err:
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
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
    root = _root()
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
    raise typer.Exit(1)


@app.command("export-hf")
def export_hf(
    checkpoint: Annotated[
        Path, typer.Argument(help="models/base or a .llmpipe/checkpoints/pretrain/step-N dir")
    ],
    out_dir: Annotated[Path, typer.Argument(help="directory to write (replaced atomically)")],
) -> None:
    """Write a checkpoint as a transformers model directory (GPT-2 or Llama layout) with its tokenizer."""
    root = _root()
    from tasks.pretrain import export_hf as export

    try:
        layout = export(checkpoint, out_dir, root)
    except INPUT_ERRORS as err:
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(3) from None
    console.print(
        f"wrote {out_dir} ({layout} layout): AutoModelForCausalLM.from_pretrained({str(out_dir)!r})"
    )


def _load_generator(root: Path, model: str, adapter: Path | None, device: str) -> Any:
    """A directory (relative to the project), or a registered model pulled from the project's MLflow."""
    import tempfile

    import torch

    from model.textgen import load_generator
    from model.tokens import TOKENIZER_FILE
    from tasks.core.layout import TOKENIZER_DIR
    from tasks.serving.registry import download, is_mlflow_uri

    adapter = root / adapter if adapter else None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if is_mlflow_uri(model):
        from tasks.core.tracking import configure

        configure(root)
        with tempfile.TemporaryDirectory(prefix="llmpipe-model-") as tmp:
            checkpoint, registered_adapter = download(model, Path(tmp))
            return load_generator(checkpoint, adapter or registered_adapter, device=device)
    checkpoint = root / model
    holders = [d for d in (checkpoint, adapter) if d is not None and (d / TOKENIZER_FILE).is_file()]
    return load_generator(checkpoint, adapter, None if holders else root / TOKENIZER_DIR, device)


# Generation options shared by `generate` and `chat`.
Strategy = Annotated[str, typer.Option(help="greedy | beam | sample")]
MaxNewTokens = Annotated[int, typer.Option(help="at most this many new tokens")]
Temperature = Annotated[float, typer.Option(help="sample: logits / temperature")]
TopK = Annotated[int | None, typer.Option(help="sample: keep the k most likely tokens")]
TopP = Annotated[float | None, typer.Option(help="sample: nucleus probability mass")]
MinP = Annotated[float | None, typer.Option(help="sample: drop tokens below min_p × the top one")]
RepetitionPenalty = Annotated[float, typer.Option(help="> 1 discourages repeats")]
NumBeams = Annotated[int, typer.Option(help="beam: beams kept")]
LengthPenalty = Annotated[float, typer.Option(help="beam: score = sum log p / length^this")]
Stop = Annotated[list[str] | None, typer.Option(help="stop at this string (repeatable)")]
Seed = Annotated[int | None, typer.Option(help="sample: seed for reproducible draws")]
ModelOption = Annotated[
    str, typer.Option(help="models/base, a training checkpoint dir, or models:/NAME@ALIAS (MLflow)")
]
AdapterOption = Annotated[Path | None, typer.Option(help="a LoRA adapter dir, e.g. models/lora")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (auto: cuda when there is one)")]


def _generation_config(strategy: str, stop: list[str] | None, **settings: Any) -> Any:
    """A validated GenerationConfig from the command-line options (exit 2 on a bad one)."""
    from model.generate import GenerationConfig

    if strategy not in ("greedy", "beam", "sample"):
        errors.print(f"[red]error:[/red] --strategy must be greedy, beam or sample, not {strategy!r}")
        raise typer.Exit(2)
    config = GenerationConfig(strategy=strategy, stop=tuple(stop or ()), **settings)  # type: ignore[arg-type]
    try:
        config.validate()
    except ValueError as err:
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    return config


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="the text to continue")],
    strategy: Strategy = "greedy",
    max_new_tokens: MaxNewTokens = 48,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = 1.0,
    num_beams: NumBeams = 4,
    length_penalty: LengthPenalty = 1.0,
    stop: Stop = None,
    seed: Seed = None,
    show_probs: Annotated[bool, typer.Option(help="print each token with p and log p")] = False,
    model: ModelOption = "models/base",
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Generate from the trained model, streaming the text (beam search prints it when done)."""
    root = _root()
    config = _generation_config(
        strategy, stop, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, num_beams=num_beams,
        length_penalty=length_penalty, seed=seed,
    )  # fmt: skip
    try:
        generator = _load_generator(root, model, adapter, device)
        console.print(prompt, style="bold", end="")
        if strategy == "beam":
            result = generator.generate(prompt, config)
            console.print(result.text, highlight=False)
            steps = result.steps
        else:
            steps = []
            for step in generator.stream(prompt, config):
                console.print(step.text, end="", highlight=False)
                steps.append(step)
            console.print()
    except INPUT_ERRORS as err:
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(3) from None
    if show_probs:
        table = Table(title="generated tokens")
        for column in ("#", "token", "id", "p", "log p"):
            table.add_column(column, justify="left" if column == "token" else "right")
        for i, step in enumerate(steps, start=1):
            token = repr(generator.token(step.id))
            table.add_row(str(i), token, str(step.id), f"{step.prob:.4f}", f"{step.logprob:.3f}")
        console.print(table)


@app.command()
def chat(
    system: Annotated[str | None, typer.Option(help="the system prompt, kept through truncation")] = None,
    strategy: Strategy = "sample",
    max_new_tokens: MaxNewTokens = 64,
    temperature: Temperature = 0.7,
    top_k: TopK = None,
    top_p: TopP = 0.95,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = 1.1,
    num_beams: NumBeams = 4,
    length_penalty: LengthPenalty = 1.0,
    stop: Stop = None,
    seed: Seed = None,
    model: ModelOption = "models/base",
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Chat with the model in the tokenizer's chat template (best after `finetune.task: sft`).

    Type a message and Enter; /reset forgets the conversation, /quit (or Ctrl-D) ends it. The oldest turns
    are dropped when the conversation outgrows the context window; the system prompt stays."""
    root = _root()
    from model.chat import ChatSession

    config = _generation_config(
        strategy, stop, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, num_beams=num_beams,
        length_penalty=length_penalty, seed=seed,
    )  # fmt: skip
    try:
        session = ChatSession(_load_generator(root, model, adapter, device), config, system)
    except INPUT_ERRORS as err:
        errors.print(f"[red]error:[/red] {err}")
        raise typer.Exit(3) from None
    loaded = f"{model} + {adapter}" if adapter else model
    console.print(f"[dim]{loaded}: /reset clears the history, /quit ends[/]")
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ").strip()
        except EOFError:
            break
        if line == "/quit":
            break
        if line == "/reset":
            session.reset()
            console.print("[dim](conversation cleared)[/]")
            continue
        if not line:
            continue
        console.print("[bold green]model>[/] ", end="")
        try:
            for piece in session.reply(line):
                console.print(piece, end="", highlight=False)
        except ValueError as err:  # the message does not fit; the conversation is unchanged
            errors.print(f"\n[red]error:[/red] {err}")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            console.print(" [dim](interrupted)[/]", end="")
        console.print()
        if session.dropped:
            console.print(f"[dim]({session.dropped} oldest messages dropped to fit the context)[/]")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

"""MLflow tracking shared by every stage: the embedded store, parent/child runs, tags and artifacts.

One parent run per pipeline run (opened by the Prefect flow), one nested child per executed stage
(opened by `llmpipe stage` inside `dvc repro`). The child finds its parent through the environment
variable `LLMPIPE_PARENT_RUN_ID`: MLflow's active run is thread-local and a DVC subprocess cannot see
it. Without a parent (a plain `dvc repro`), each stage logs a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from tasks.core.io import dvc_md5, read_json
from tasks.core.layout import METRICS_DIR, PARAMS_FILE, PLOTS_DIR, REPORTS_DIR, state_dir
from tasks.core.params import load_params_file

PARENT_RUN_ENV = "LLMPIPE_PARENT_RUN_ID"
EXPERIMENT_ENV = "LLMPIPE_EXPERIMENT"
DEFAULT_EXPERIMENT = "llmpipe"
STAGE_TAG = "llmpipe.stage"
PIPELINE_TAG = "llmpipe.pipeline"


def default_tracking_uri(root: Path) -> str:
    """The embedded store: an absolute sqlite path inside the project's state folder."""
    return f"sqlite:///{(state_dir(root) / 'mlflow.db').resolve()}"


def configure(root: Path) -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI or the embedded store; return the experiment id."""
    embedded = default_tracking_uri(root)
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    uri = exported or embedded
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if not exported:  # set_tracking_uri exports it; a later project (or child process) must not inherit it
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # With the embedded store, artifacts live beside it (not in ./mlruns of whatever the cwd is).
    location = (state_dir(root) / "mlartifacts").as_uri() if uri == embedded else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(root: Path) -> str:
    """HEAD's commit, suffixed with `-dirty` when tracked files have uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists become their string form (MLflow params are strings)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def stage_io(root: Path, stage: str) -> tuple[list[str], list[str]]:
    """The deps and outs (metrics/plots included) dvc.yaml declares for `stage`, with `${section.key}`
    resolved from params.yaml as DVC resolves it."""
    with open(root / "dvc.yaml", encoding="utf-8") as handle:
        spec = yaml.safe_load(handle)["stages"][stage]
    params = load_params_file(root / PARAMS_FILE)

    def resolve(match: re.Match[str]) -> str:
        value: Any = params
        for key in match.group(1).split("."):
            value = value[key]
        return str(value)

    def names(entries: list[Any]) -> list[str]:
        paths = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]
        return [re.sub(r"\$\{([^}]+)\}", resolve, path) for path in paths]

    outs = names(spec.get("outs", [])) + names(spec.get("metrics", [])) + names(spec.get("plots", []))
    return names(spec.get("deps", [])), outs


def md5_tags(root: Path, stage: str) -> dict[str, str]:
    """`md5.dep.<path>` / `md5.out.<path>` tags with the same values dvc.lock records."""
    deps, outs = stage_io(root, stage)
    tags = {}
    for kind, paths in (("dep", deps), ("out", outs)):
        for path in paths:
            if (root / path).exists():
                tags[f"md5.{kind}.{path}"] = dvc_md5(root / path)
    return tags


@contextlib.contextmanager
def pipeline_run(root: Path, run_name: str, params: Mapping[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """The parent run of one pipeline run; stages see its id through $LLMPIPE_PARENT_RUN_ID."""
    experiment_id = configure(root)
    tags = {PIPELINE_TAG: "true", "git_commit": git_commit(root)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params({k: str(v) for k, v in flatten(params).items()})
        yield run


@contextlib.contextmanager
def stage_run(root: Path, stage: str, params: Mapping[str, Any]) -> Iterator[str]:
    """An MLflow run for one executing stage (nested under the pipeline run when there is one), open
    while the stage works so it can stream metrics (MetricStream). A stage that raises ends FAILED."""
    experiment_id = configure(root)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {STAGE_TAG: stage, "git_commit": git_commit(root)}
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=stage, parent_run_id=parent, tags=tags
    ) as run:
        mlflow.log_params({k: str(v) for k, v in flatten(params).items()})
        yield run.info.run_id


def finish_stage(root: Path, stage: str, metrics: Mapping[str, Any]) -> None:
    """On the active stage run: final metrics, md5 tags of inputs and outputs, metrics/reports/plots."""
    mlflow.set_tags(md5_tags(root, stage))
    mlflow.log_metrics(numeric_metrics(metrics))
    metrics_file = root / METRICS_DIR / f"{stage}.json"
    if metrics_file.exists():
        mlflow.log_artifact(str(metrics_file), artifact_path="metrics")
    reports = root / REPORTS_DIR / stage
    if reports.is_dir():
        mlflow.log_artifacts(str(reports), artifact_path="reports")
    for plot in sorted((root / PLOTS_DIR).glob(f"{stage}_*.csv")):
        mlflow.log_artifact(str(plot), artifact_path="plots")


def set_tags(tags: Mapping[str, str]) -> None:
    if mlflow.active_run() is not None:
        mlflow.set_tags(dict(tags))


def log_table(rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Rows as an MLflow table artifact (shown in the UI's artifact view and `mlflow.load_table`)."""
    if mlflow.active_run() is not None and rows:
        mlflow.log_table({key: [row.get(key) for row in rows] for key in rows[0]}, artifact_file)


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


class MetricStream:
    """Per-step metrics for the active run, sent in batches (one `log_batch` call per `every` seconds or
    1,000 values) rather than one call per step. Without an active run it only drops them."""

    def __init__(self, every: float = 10.0) -> None:
        self.run_id = active_run_id()
        self.every = every
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()

    def add(self, step: int, values: Mapping[str, float]) -> None:
        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step) for key, value in values.items()]
        if len(self.pending) >= 1000 or time.monotonic() - self.last_flush >= self.every:
            self.flush()

    def flush(self) -> None:
        while self.run_id is not None and self.pending:  # log_batch takes at most 1,000 metrics
            MlflowClient().log_batch(self.run_id, metrics=self.pending[:1000])
            self.pending = self.pending[1000:]
        self.last_flush = time.monotonic()


def log_artifacts(path: Path, artifact_path: str) -> None:
    """Copy a file or directory into the active run's artifacts (no-op without an active run)."""
    if mlflow.active_run() is None:
        return
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def find_stage_run(root: Path, parent_run_id: str, stage: str) -> str | None:
    """The id of `stage`'s child run under `parent_run_id`, if that stage logged one."""
    experiment_id = configure(root)
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{STAGE_TAG}` = '{stage}'",
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def has_store(root: Path) -> bool:
    """Whether there are runs to read (a server, or the embedded store once something logged to it)."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI")) or (state_dir(root) / "mlflow.db").is_file()


def stage_runs(root: Path, limit: int) -> list[Run]:
    """The newest `limit` stage runs, newest first (however they ran: llmpipe, dvc repro, a deployment)."""
    return mlflow.search_runs(
        experiment_ids=[configure(root)],
        filter_string=f"tags.`{STAGE_TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
        output_format="list",
    )


def latest_stage_runs(root: Path) -> dict[str, Run]:
    """The most recent MLflow run of each stage."""
    if not has_store(root):
        return {}
    latest: dict[str, Run] = {}
    for run in stage_runs(root, limit=1000):
        latest.setdefault(run.data.tags[STAGE_TAG], run)
    return latest


def log_summary(root: Path, outcomes: list[dict[str, Any]]) -> None:
    """On the active (parent) run: each stage's status and its current metrics as `<stage>.<metric>`,
    so whole pipeline runs compare side by side in MLflow even when a stage was skipped."""
    mlflow.set_tags({f"status.{outcome['stage']}": outcome["status"] for outcome in outcomes})
    mlflow.log_dict({"stages": outcomes}, "summary.json")
    for outcome in outcomes:
        metrics_file = root / METRICS_DIR / f"{outcome['stage']}.json"
        if metrics_file.exists():
            metrics = numeric_metrics(read_json(metrics_file))
            mlflow.log_metrics({f"{outcome['stage']}.{key}": value for key, value in metrics.items()})

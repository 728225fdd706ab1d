"""Compare trained models across pipeline runs, from what MLflow recorded (`llmpipe compare`).

A compared run is an `evaluate` stage run: every pipeline build ends with one, however it was started
(`llmpipe run`, `dvc repro`, `dvc exp run`, a scheduled deployment). Its **lineage** is found through
the DVC md5 tags every stage run carries: the run that wrote `models/base` with the md5 that evaluate
read is its pretrain run, and so on up to ingest. The lineage's logged params (each stage logs its own
params.yaml section) are the run's whole configuration, so two runs differ exactly where those differ.

    comparison = compare_runs(root, last=3, metric="val_bpb")
    comparison.differing_params()  # {"plan.model.pos_encoding": ["rope", "learned", "sinusoidal"]}
    comparison.best                # the run with the lowest val_bpb
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.tracking import PIPELINE_TAG, STAGE_TAG, stage_runs

#: Metrics worth a row in the comparison, per stage (when the stage logged them).
KEY_METRICS = {
    "dedup": ("docs_out",),
    "tokenize": ("train_tokens",),
    "pretrain": ("params", "steps", "val_loss", "seconds"),
    "finetune": ("val_loss",),
    "evaluate": ("val_bpb", "bigram_bpb", "domain_bpb_lora"),
}
#: Metrics where a smaller value is better; any other metric is better larger.
LOWER_IS_BETTER = ("loss", "bpb", "perplexity", "seconds")
#: The datasets shown by md5 (from the lineage's DVC tags): what each compared model was built from.
DATA_PATHS = ("data/raw", "data/dedup", "data/tokens")


@dataclass
class ComparedRun:
    evaluate: Any  # mlflow.entities.Run of the evaluate stage
    lineage: dict[str, Any] = field(default_factory=dict)  # stage → the run that produced its input

    @property
    def run_id(self) -> str:
        return self.evaluate.info.run_id

    def params(self) -> dict[str, str]:
        """`stage.param` → value over the whole lineage."""
        return {
            f"{stage}.{key}": value
            for stage, run in self.lineage.items()
            for key, value in run.data.params.items()
        }

    def metric(self, name: str) -> float | None:
        """`stage.metric` (e.g. pretrain.val_loss, finetune.compare.lora.val_loss), or a bare name: the
        evaluate run's metric, else the first stage of the lineage that logged it."""
        stage, _, key = name.partition(".")
        if stage in self.lineage:
            return self.lineage[stage].data.metrics.get(key)
        runs = [self.lineage["evaluate"], *self.lineage.values()]
        return next((run.data.metrics[name] for run in runs if name in run.data.metrics), None)

    def data_md5s(self) -> dict[str, str]:
        """path → md5 of each dataset in DATA_PATHS that some run of the lineage wrote."""
        found = {}
        for run in self.lineage.values():
            for path in DATA_PATHS:
                if md5 := run.data.tags.get(f"md5.out.{path}"):
                    found[path] = md5
        return found


@dataclass
class Comparison:
    runs: list[ComparedRun]
    metric: str

    @property
    def lower_is_better(self) -> bool:
        return any(word in self.metric for word in LOWER_IS_BETTER)

    @property
    def best(self) -> ComparedRun | None:
        values = [(run.metric(self.metric), i) for i, run in enumerate(self.runs)]
        scored = [(value, i) for value, i in values if value is not None and math.isfinite(value)]
        if not scored:
            return None
        best = (min if self.lower_is_better else max)(scored, key=lambda pair: pair[0])
        return self.runs[best[1]]

    def differing_params(self) -> dict[str, list[str]]:
        """The params whose values are not the same in every run that logged them ("—": a run whose
        lineage lacks that stage, e.g. logged to another store; it does not count as a difference)."""
        per_run = [run.params() for run in self.runs]
        keys = sorted({key for params in per_run for key in params})
        values = {key: [params.get(key, "—") for params in per_run] for key in keys}
        return {key: row for key, row in values.items() if len(set(row) - {"—"}) > 1}

    def metric_rows(self) -> dict[str, list[float | None]]:
        names = [f"{stage}.{key}" for stage, keys in KEY_METRICS.items() for key in keys]
        if self.metric not in names and f"evaluate.{self.metric}" not in names:
            names.append(self.metric)
        rows = {name: [run.metric(name) for run in self.runs] for name in names}
        return {name: row for name, row in rows.items() if any(value is not None for value in row)}


def _writer(candidates: list[Any], reader: Any) -> Any:
    """Which of the runs that wrote an input (same path, same md5) produced it for `reader`: one from the
    same pipeline run, else the newest that started before the reader, else the oldest."""
    parent = reader.data.tags.get("mlflow.parentRunId")
    same_pipeline = [
        run for run in candidates if parent and run.data.tags.get("mlflow.parentRunId") == parent
    ]
    before = [run for run in candidates if run.info.start_time <= reader.info.start_time]
    pool = same_pipeline or before or candidates[:1]
    return max(pool, key=lambda run: run.info.start_time)


def lineage(run: Any, writers: dict[tuple[str, str], list[Any]]) -> dict[str, Any]:
    """stage → run, following md5.dep tags to the run that wrote that output with that md5."""
    found = {run.data.tags[STAGE_TAG]: run}
    pending = [run]
    while pending:
        current = pending.pop()
        for tag, md5 in current.data.tags.items():
            if not tag.startswith("md5.dep."):
                continue
            candidates = writers.get((tag.removeprefix("md5.dep."), md5))
            if not candidates:
                continue
            writer = _writer(candidates, current)
            if writer.data.tags[STAGE_TAG] not in found:
                found[writer.data.tags[STAGE_TAG]] = writer
                pending.append(writer)
    return found


def compare_runs(
    root: Path, run_ids: list[str] | None = None, last: int = 5, metric: str = "val_bpb"
) -> Comparison:
    """The evaluate runs `run_ids` (or the `last` ones), each with its lineage."""
    runs = stage_runs(root, limit=5000)
    by_id = {run.info.run_id: run for run in runs}
    writers: dict[tuple[str, str], list[Any]] = {}
    for run in reversed(runs):  # oldest first
        for tag, md5 in run.data.tags.items():
            if tag.startswith("md5.out."):
                writers.setdefault((tag.removeprefix("md5.out."), md5), []).append(run)
    evaluations = [
        run for run in runs if run.data.tags[STAGE_TAG] == "evaluate" and run.info.status == "FINISHED"
    ]
    if run_ids:
        chosen = [_evaluate_run(root, run_id, by_id, evaluations) for run_id in run_ids]
    else:
        chosen = list(reversed(evaluations[:last]))  # oldest of them first
    if not chosen:
        raise ValueError("no finished evaluate runs in MLflow yet: run the pipeline (llmpipe run) first")
    comparison = Comparison([ComparedRun(run, lineage(run, writers)) for run in chosen], metric)
    if all(run.metric(metric) is None for run in comparison.runs):
        known = sorted(
            {
                f"{stage}.{key}"
                for run in comparison.runs
                for stage, r in run.lineage.items()
                for key in r.data.metrics
            }
        )
        raise ValueError(f"no compared run logged {metric!r}; for example: {', '.join(known[:12])}")
    return comparison


def _evaluate_run(root: Path, run_id: str, by_id: dict[str, Any], evaluations: list[Any]) -> Any:
    """An evaluate run given its id (or a prefix), or a pipeline run's id (its evaluate child)."""
    matches = [run for run in evaluations if run.info.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    children = [run for run in evaluations if run.data.tags.get("mlflow.parentRunId", "").startswith(run_id)]
    if len(matches) + len(children) == 1:
        return (matches or children)[0]
    if matches or children:
        raise ValueError(f"run id {run_id!r} is ambiguous: give more of it")
    if run_id in by_id:
        raise ValueError(f"run {run_id} is a {by_id[run_id].data.tags[STAGE_TAG]} run: give an evaluate run")
    import mlflow

    try:
        parent = mlflow.get_run(run_id) if len(run_id) == 32 else None
    except mlflow.exceptions.MlflowException:
        parent = None
    if parent is not None and parent.data.tags.get(PIPELINE_TAG) == "true":
        raise ValueError(f"pipeline run {run_id} has no evaluate stage run (evaluate was skipped)")
    raise ValueError(f"no evaluate run {run_id!r} in {root}'s MLflow store")


def promote(comparison: Comparison, name: str, alias: str) -> str:
    """Move `alias` of registered model `name` to the version the best run registered; returns it."""
    from mlflow import MlflowClient

    best = comparison.best
    if best is None:
        raise ValueError(f"no run has a value for {comparison.metric}: nothing to promote")
    version = best.evaluate.data.tags.get(f"llmpipe.registered.{name}")
    if version is None:
        raise ValueError(f"run {best.run_id} registered no version of {name!r} (evaluate.register was off?)")
    MlflowClient().set_registered_model_alias(name, alias, version)
    return version


def plot_losses(comparison: Comparison, path: Path) -> Path | None:
    """The pretraining loss curves of the compared runs on one chart (None without pretrain runs)."""
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    client = MlflowClient()
    figure = Figure(figsize=(8, 4.5))
    axes = figure.subplots()
    drawn = False
    for run in comparison.runs:
        pretrain = run.lineage.get("pretrain")
        if pretrain is None:
            continue
        for key, style in (("train/loss", "-"), ("val/loss", "o--")):
            history = sorted(client.get_metric_history(pretrain.info.run_id, key), key=lambda m: m.step)
            if history:
                label = f"{run.run_id[:8]} {key.split('/')[0]}"
                axes.plot([m.step for m in history], [m.value for m in history], style, label=label)
                drawn = True
    if not drawn:
        return None
    axes.set(xlabel="step", ylabel="loss (nats/token)", title="pretraining loss by run")
    axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path

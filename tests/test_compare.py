"""tasks/core/compare.py on a hand-made MLflow store: lineage through md5 tags, the params that really
differ, the best run, and clear errors."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
from conftest import restored_mlflow_uri

from tasks.core.compare import compare_runs
from tasks.core.tracking import STAGE_TAG, configure


@pytest.fixture
def store(tmp_path: Path):
    with restored_mlflow_uri():
        yield tmp_path, configure(tmp_path)  # the project's embedded store: tmp_path/.llmpipe/mlflow.db


def log_stage(experiment: str, stage: str, params: dict, tags: dict, metrics: dict | None = None) -> None:
    with mlflow.start_run(experiment_id=experiment, tags={STAGE_TAG: stage, **tags}):
        mlflow.log_params(params)
        mlflow.log_metrics(metrics or {})
    time.sleep(0.01)  # distinct start times


def test_each_run_is_traced_to_the_writer_it_read(store) -> None:
    root, experiment = store
    same = {"md5.out.data/normalized": "n1"}  # worker count never changes the bytes
    reads = {"md5.dep.data/normalized": "n1"}
    log_stage(experiment, "normalize", {"workers": "0"}, same)
    log_stage(experiment, "evaluate", {"stride": "8"}, reads, {"val_bpb": 2.0})
    log_stage(experiment, "normalize", {"workers": "4"}, same)
    log_stage(experiment, "evaluate", {"stride": "8"}, reads, {"val_bpb": 1.5})
    log_stage(experiment, "normalize", {"workers": "8"}, same)  # later: no evaluation read it yet

    comparison = compare_runs(root, last=2)
    assert comparison.differing_params() == {"normalize.workers": ["0", "4"]}
    assert comparison.best is comparison.runs[1] and comparison.lower_is_better
    assert comparison.runs[0].metric("evaluate.val_bpb") == 2.0
    with pytest.raises(ValueError, match="no compared run logged 'val_loss'"):
        compare_runs(root, last=2, metric="val_loss")
    with pytest.raises(ValueError, match="no evaluate run"):
        compare_runs(root, run_ids=["0123456789abcdef0123456789abcdef"])

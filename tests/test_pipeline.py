"""The spine end to end in a temporary copy of the project: dvc repro, llmpipe run, the Prefect flow,
MLflow parent/child runs with DVC md5 tags, and a killed stage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import BuiltProject, run_cli

from tasks.core.params import set_overrides
from tasks.core.stages import STAGES
from tasks.core.tracking import latest_stage_runs, numeric_metrics

pytestmark = pytest.mark.slow


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / '.llmpipe' / 'mlflow.db'}")


def all_runs(root: Path) -> list:
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("llmpipe")
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def lock_md5s(root: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]
    md5s = {f"md5.dep.{d['path']}": d["md5"] for d in lock.get("deps", [])}
    md5s.update({f"md5.out.{o['path']}": o["md5"] for o in lock.get("outs", [])})
    return md5s


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


PRETRAIN_CURVES = {f"train/{k}" for k in ("loss", "lr", "grad_norm", "tokens_per_second", "mfu")} | {
    "val/loss",
    "val/perplexity",
}


#: finetune streams a strategy's curves under its name (no MFU: the FLOPs of a partly frozen model differ);
#: the test projects train LoRA only (finetune.compare=false).
FINETUNE_CURVES = {f"lora/{curve}" for curve in PRETRAIN_CURVES if curve != "train/mfu"}


def assert_logged_metrics(root: Path, stage: str, run) -> None:
    """The run's final metrics are metrics/<stage>.json; training stages also streamed their curves."""
    summary = numeric_metrics(metrics(root, stage))
    assert {key: run.data.metrics[key] for key in summary} == pytest.approx(summary)
    curves = {key for key in run.data.metrics if key not in summary}
    assert curves == {"pretrain": PRETRAIN_CURVES, "finetune": FINETUNE_CURVES}.get(stage, set())


def latest_pipeline_run(root: Path):
    parents = [run for run in all_runs(root) if run.data.tags.get("llmpipe.pipeline") == "true"]
    return max(parents, key=lambda run: run.info.start_time)


def test_dvc_repro_and_llmpipe_run_build_noop_and_rerun_only_what_changed(
    built_project: BuiltProject, tmp_path: Path
) -> None:
    first = built_project.first_repro.stdout  # the whole pipeline, from nothing
    assert all(f"Running stage '{stage}'" in first for stage in STAGES)
    project = built_project.copy(tmp_path / "project")
    ingest, normalize = metrics(project, "ingest"), metrics(project, "normalize")
    assert (ingest["docs_out"], ingest["quarantined"]) == (3, 2)  # bad JSON line + binary file
    assert ingest["docs_in"] == ingest["docs_out"] + ingest["quarantined"]
    assert normalize["docs_in"] == 3 and normalize["docs_out"] == 3  # English and Japanese all kept

    # Each executed stage logged a tracked run whose md5 tags are exactly what dvc.lock recorded.
    runs = {run.data.tags["llmpipe.stage"]: run for run in all_runs(project)}
    assert set(runs) == set(STAGES)
    for stage, run in runs.items():
        expected = lock_md5s(project, stage)
        assert {k: v for k, v in run.data.tags.items() if k.startswith("md5.")} == expected
        assert_logged_metrics(project, stage, run)
        assert run.data.tags["git_commit"] not in ("", "unknown")

    started = time.perf_counter()
    second = run_cli(project, "dvc", "repro")
    assert time.perf_counter() - started < 5
    assert "Running stage" not in second.stdout
    assert len(all_runs(project)) == len(STAGES)  # a no-op logs nothing

    # `llmpipe run` (the Prefect flow) shares DVC's state: nothing to do, every stage skipped...
    quiet = run_cli(project, "llmpipe", "run")
    assert "skipped" in quiet.stdout
    tags = latest_pipeline_run(project).data.tags
    assert {tags[f"status.{stage}"] for stage in STAGES} == {"skipped"}

    # ... and a changed param reruns its stage and what depends on it, not what comes before.
    run_cli(project, "llmpipe", "run", "-S", "normalize.min_words=100")  # drops short documents
    assert yaml.safe_load((project / "params.yaml").read_text())["normalize"]["min_words"] == 100
    tags = latest_pipeline_run(project).data.tags
    statuses = (tags["status.ingest"], tags["status.normalize"], tags["status.dedup"])
    assert statuses == ("skipped", "ran", "ran")
    assert metrics(project, "dedup")["docs_in"] == metrics(project, "normalize")["docs_out"] < 3
    after = run_cli(project, "dvc", "repro")
    assert "Running stage" not in after.stdout
    assert run_cli(project, "dvc", "status").stdout.strip().endswith("Data and pipelines are up to date.")
    status = run_cli(project, "llmpipe", "status")
    assert "up to date" in status.stdout and "stale" not in status.stdout
    latest = latest_stage_runs(project)  # what status shows as each stage's last run
    assert set(latest) == set(STAGES)
    assert latest["normalize"].info.start_time > latest["ingest"].info.start_time  # normalize ran again


def test_prefect_flow_logs_one_parent_and_a_child_per_executed_stage(
    built_project: BuiltProject, tmp_path: Path, prefect_harness
) -> None:
    from flows.pipeline import pipeline

    project = built_project.copy(tmp_path / "project")
    logged_before = len(all_runs(project))
    forced = list(STAGES)[: list(STAGES).index("tokenize") + 1]  # the data stages, run again on purpose
    outcomes = pipeline(root=str(project), to_stage="tokenize", force=True)
    assert [(o["stage"], o["status"]) for o in outcomes] == [(stage, "ran") for stage in forced]
    parent = latest_pipeline_run(project)
    runs = all_runs(project)
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["llmpipe.stage"] for run in children) == sorted(forced)
    for child in children:
        stage = child.data.tags["llmpipe.stage"]
        assert {k: v for k, v in child.data.tags.items() if k.startswith("md5.")} == lock_md5s(project, stage)
        assert_logged_metrics(project, stage, child)
        assert child.data.params  # its params section
    assert parent.data.metrics["normalize.docs_out"] == 3
    assert parent.data.tags["status.ingest"] == "ran"

    again = pipeline(root=str(project))  # the same data came out: everything downstream is up to date
    assert [o["status"] for o in again] == ["skipped"] * len(STAGES)
    forced_one = pipeline(root=str(project), only=["normalize"], force=True)
    assert [(o["stage"], o["status"]) for o in forced_one] == [("normalize", "ran")]
    # parent + a child per forced stage; parent only; parent + 1 child
    assert len(all_runs(project)) == logged_before + (1 + len(forced)) + 1 + 2


def test_bad_override_or_stage_is_refused_before_anything_runs(project: Path) -> None:
    before = (project / "params.yaml").read_text()
    bad_value = run_cli(project, "llmpipe", "run", "-S", "normalize.min_words=abc", check=False)
    assert bad_value.returncode == 3 and "normalize.min_words" in bad_value.stderr
    unknown_key = run_cli(project, "llmpipe", "run", "-S", "dedup.treshold=0.5", check=False)
    assert unknown_key.returncode == 3 and "dedup.treshold" in unknown_key.stderr
    bad_stage = run_cli(project, "llmpipe", "run", "--only", "dedupe", check=False)
    assert bad_stage.returncode == 3 and "dedupe" in bad_stage.stderr
    assert (project / "params.yaml").read_text() == before  # untouched
    assert not (project / "data" / "raw").exists()  # nothing ran


def test_bad_params_and_missing_inputs_fail_clearly(project: Path) -> None:
    set_overrides(project / "params.yaml", ["ingest.paths=[corpus/nowhere]"])
    missing = run_cli(project, "llmpipe", "stage", "ingest", check=False)
    assert missing.returncode == 3
    assert "corpus/nowhere" in missing.stderr

    set_overrides(project / "params.yaml", ["ingest.paths=[corpus]", "normalize.min_wordz=3"])
    unknown = run_cli(project, "llmpipe", "stage", "normalize", check=False)
    assert unknown.returncode == 3
    assert "normalize.min_wordz" in unknown.stderr


def test_killed_ingest_leaves_previous_output_untouched(project: Path) -> None:
    run_cli(project, "llmpipe", "stage", "ingest")
    raw = project / "data" / "raw"
    before = {p.name: p.read_bytes() for p in raw.iterdir()}

    # A corpus big enough that ingest is still writing shards when we kill it.
    big = project / "corpus" / "en" / "big.jsonl"
    with open(big, "w", encoding="utf-8") as handle:
        for i in range(300_000):
            handle.write(json.dumps({"text": f"record {i} " + "words of filler text " * 5}) + "\n")
    set_overrides(project / "params.yaml", ["ingest.rows_per_shard=2000"])
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "llmpipe"), "stage", "ingest"],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((project / "data").glob(".raw.tmp-*/*.parquet")):
        time.sleep(0.02)
    assert process.poll() is None, "ingest finished before it could be killed; make the corpus bigger"
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before  # old output intact, nothing mixed in
    # DVC ignores the leftover temporary and the next run sweeps it away.
    run_cli(project, "llmpipe", "stage", "ingest")
    assert not list((project / "data").glob(".raw.tmp-*"))
    assert metrics(project, "ingest")["docs_out"] == 3 + 300_000

"""The Prefect pipeline flow: one task per stage, each running `dvc repro --single-item <stage>`.

DVC decides whether a stage is stale, so `llmpipe run`, `dvc repro` and a scheduled run share one code
path and `dvc.lock` is always current. The flow opens the MLflow parent run; every stage that really
executes logs a nested child run (see tasks/core/tracking.py). A stage DVC found up to date is reported as
`skipped`, one DVC restored from its run-cache as `restored`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.stages import declared_stages, metrics_summary, select_stages, stale_stages
from tasks.core import tracking
from tasks.core.layout import PARAMS_FILE, project_root
from tasks.core.params import load_params_file, set_overrides
from tasks.core.runner import validate_params
from tasks.core.stages import INPUT_ERROR_EXIT


class StageFailed(RuntimeError):
    """`dvc repro` of a stage failed; the message carries the tail of its output."""


class StageInputError(StageFailed):
    """The stage rejected its input or params (not transient, so never retried)."""


def _retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    return not isinstance(state.data, StageInputError)


@task(
    name="stage",
    task_run_name="{stage}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_input_error,
    cache_policy=NO_CACHE,
)
def reproduce_stage(stage: str, root: Path, parent_run_id: str, force: bool = False) -> dict[str, Any]:
    """Bring one stage up to date through DVC and report what happened."""
    logger = get_run_logger()
    reasons = stale_stages(root, [stage]).get(stage, [])
    if not reasons and not force:
        logger.info("%s: up to date, skipped", stage)
        return {"stage": stage, "status": "skipped", "seconds": 0.0, "run_id": None}
    logger.info("%s: %s", stage, "; ".join(reasons) if reasons else "forced")

    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    env = {**os.environ, tracking.PARENT_RUN_ENV: parent_run_id}
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info("%s | %s", stage, line)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        input_error = re.search(rf"exited with {INPUT_ERROR_EXIT}\b", "\n".join(tail))
        error = StageInputError if input_error else StageFailed
        raise error(f"stage {stage!r} failed (dvc exit {process.returncode}):\n" + "\n".join(tail))

    run_id = tracking.find_stage_run(root, parent_run_id, stage)
    return {
        "stage": stage,
        "status": "ran" if run_id else "restored",  # no child run: DVC restored outputs from its run-cache
        "seconds": round(seconds, 2),
        "run_id": run_id,
    }


def summary_markdown(outcomes: list[dict[str, Any]], root: Path) -> str:
    lines = ["| stage | status | seconds | metrics |", "|---|---|---|---|"]
    for outcome in outcomes:
        shown = metrics_summary(root, outcome["stage"], limit=20)
        lines.append(f"| {outcome['stage']} | {outcome['status']} | {outcome['seconds']} | {shown} |")
    return "\n".join(lines)


@task(
    name="dvc-sync", task_run_name="dvc {command}", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE
)
def dvc_sync(command: str, root: Path) -> str:
    """`dvc pull` / `dvc push` against the project's default remote; a no-op without one."""
    logger = get_run_logger()
    remotes = subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "list"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    if not remotes:
        logger.info("dvc %s: no DVC remote configured, nothing to do", command)
        return "no remote"
    # A fresh machine may not have everything dvc.lock names yet: pull what the remote has.
    extra = ["--allow-missing"] if command == "pull" else []
    done = subprocess.run(
        [sys.executable, "-m", "dvc", command, *extra], cwd=root, capture_output=True, text=True, check=False
    )
    logger.info("dvc %s:\n%s", command, (done.stdout + done.stderr).strip())
    if done.returncode != 0:
        raise StageFailed(f"dvc {command} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return "done"


@flow(name="llmpipe", log_prints=True)
def pipeline(
    only: list[str] | str | None = None,
    from_stage: str | None = None,
    to_stage: str | None = None,
    force: bool = False,
    overrides: list[str] | None = None,
    root: str | None = None,
    sync: bool = False,
) -> list[dict[str, Any]]:
    """Run the selected stages in order, after writing `overrides` (`section.key=value`) to params.yaml.

    `only` takes a list or a comma-separated string (`prefect deployment run ... -p only=dedup`); with
    `sync`, `dvc pull` runs first and `dvc push` last when the project has a DVC remote."""
    project = Path(root).resolve() if root else project_root()
    if isinstance(only, str):
        only = [name for name in only.split(",") if name]
    stages = select_stages(declared_stages(project), only, from_stage, to_stage)
    if sync:
        dvc_sync("pull", project)
    set_overrides(project / PARAMS_FILE, overrides or [], validate=lambda p: validate_params(p, project))
    params = load_params_file(project / PARAMS_FILE)
    run_params = {
        "stages": ",".join(stages),
        "force": force,
        "overrides": ";".join(overrides or []),
        **{stage: params.get(stage, {}) for stage in stages},
    }
    outcomes: list[dict[str, Any]] = []
    try:
        with tracking.pipeline_run(project, run_name="pipeline", params=run_params) as parent:
            for stage in stages:
                outcomes.append(reproduce_stage(stage, project, parent.info.run_id, force))
            summary = summary_markdown(outcomes, project)
            create_markdown_artifact(markdown=summary, key="llmpipe-summary", description="llmpipe stages")
            tracking.log_summary(project, outcomes)
    finally:
        if sync:  # what did get built is shared even when a later stage failed
            dvc_sync("push", project)
    return outcomes

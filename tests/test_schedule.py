"""Scheduled runs: `llmpipe server` (Prefect on 127.0.0.1, its database in the project), `llmpipe serve`
(the pipeline as a deployment on an interval), and a parameterised run of the deployment that reruns one
stage, all on loopback and torn down after."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BuiltProject

from tasks.core.tracking import PIPELINE_TAG

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], seconds: float, what: str, logs: list[Path]) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(1)
    shown = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}\n{shown}")


@pytest.fixture
def served(built_project: BuiltProject, tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], list[Path]]]:
    """A built project with `llmpipe server` and `llmpipe serve --interval 20` running."""
    project = built_project.copy(tmp_path / "project")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)  # the project's own (.llmpipe/prefect)
    logs = [tmp_path / "server.log", tmp_path / "serve.log"]
    processes = []

    def start(command: list[str], log: Path, extra: dict[str, str]) -> None:
        processes.append(
            subprocess.Popen(
                command,
                cwd=project,
                env={**env, **extra},
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        start([str(BIN / "llmpipe"), "server", "--port", str(port)], logs[0], {})
        health = f"http://127.0.0.1:{port}/api/health"
        wait_for(lambda: _responds(health), 120, "the Prefect server", logs)
        assert (project / ".llmpipe/prefect/prefect.db").is_file()  # its database lives in the project
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        start([str(BIN / "llmpipe"), "serve", "--name", "nightly", "--interval", "20"], logs[1], {})
        yield project, env, logs
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _responds(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def pipeline_runs(project: Path) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.llmpipe' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmpipe").experiment_id
    runs = client.search_runs([experiment], f"tags.`{PIPELINE_TAG}` = 'true'", order_by=["start_time ASC"])
    return [run for run in runs if run.info.status == "FINISHED"]


def test_a_served_deployment_runs_on_schedule_and_reruns_one_stage_on_request(served) -> None:
    project, env, logs = served
    started = time.monotonic()
    first = wait_for(lambda: pipeline_runs(project), 150, "a scheduled run to finish", logs)[0]
    scheduled_after = time.monotonic() - started
    assert {first.data.tags[f"status.{stage}"] for stage in ("ingest", "pretrain", "evaluate")} == {"skipped"}
    assert scheduled_after < 120

    # One stage of the deployment, on request, with parameters: only that stage runs (forced).
    command = [str(BIN / "prefect"), "deployment", "run", "llmpipe/nightly", "-p", "only=dedup"]
    command += ["-p", "force=true"]
    requested = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert requested.returncode == 0, requested.stdout + requested.stderr

    def dedup_rerun() -> Any:
        return next((run for run in pipeline_runs(project) if "status.dedup" in run.data.tags
                     and run.data.tags["status.dedup"] == "ran"), None)  # fmt: skip

    rerun = wait_for(dedup_rerun, 150, "the requested dedup run", logs)
    statuses = {key: value for key, value in rerun.data.tags.items() if key.startswith("status.")}
    assert statuses == {"status.dedup": "ran"}
    assert rerun.data.params["stages"] == "dedup"

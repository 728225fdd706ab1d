"""tasks/serving/registry.py + pyfunc.py: the model as an MLflow pyfunc text generator in the registry, the
champion alias following the best score, loading in a fresh process, and `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from conftest import restored_mlflow_uri, write_tiny_base

from tasks.serving import registry


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer):
    """A tiny models/base and an MLflow sqlite store of its own (restored afterwards)."""
    root = tmp_path_factory.mktemp("registry")
    base = write_tiny_base(root, chat_tokenizer[0])
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with restored_mlflow_uri():
        mlflow.set_tracking_uri(uri)
        artifacts = (root / "artifacts").as_uri()
        experiment = mlflow.create_experiment("registry-test", artifact_location=artifacts)
        yield base, uri, experiment


def test_the_alias_follows_the_best_score(store) -> None:
    base, _, experiment = store
    # (score logged, champion afterwards): a worse version leaves it, a better or equal one takes it, a
    # diverged run (NaN) never does
    for value, champion in ((2.0, "1"), (3.0, "1"), (1.5, "3"), (1.5, "4"), (float("nan"), "4")):
        with mlflow.start_run(experiment_id=experiment):
            registered = registry.register("tiny", base, None, "val_bpb", value, "champion")
        assert registered["champion"] == champion
    assert str(mlflow.MlflowClient().get_model_version_by_alias("tiny", "champion").version) == "4"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # a fresh process and `mlflow models serve`
def test_the_registered_model_loads_in_a_fresh_process_and_serves(store, tmp_path: Path) -> None:
    base, uri, experiment = store
    with mlflow.start_run(experiment_id=experiment):
        registry.register("served", base, None, "val_bpb", 1.0, "champion")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    code = (
        "import json, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/served@champion')\n"
        "out = model.predict(['What does cruft mean?', 'The movie'], params={'max_new_tokens': 5})\n"
        "print(json.dumps(out.to_dict(orient='records')))\n"
    )
    command = [sys.executable, "-c", code]
    loaded = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    rows = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert [row["prompt"] for row in rows] == ["What does cruft mean?", "The movie"]
    assert all(row["new_tokens"] == 5 and row["finish_reason"] == "length" for row in rows)

    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", "models:/served@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"), start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                log = (tmp_path / "serve.log").read_text()
                assert server.poll() is None and time.monotonic() < deadline, log
                time.sleep(0.5)
        body = {"inputs": ["The movie was full of"], "params": {"max_new_tokens": 3, "strategy": "beam"}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        assert predictions[0]["prompt"] == "The movie was full of" and predictions[0]["new_tokens"] == 3
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

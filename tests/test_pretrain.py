"""The pretrain stage through DVC: trains, exports a transformers model, and resumes a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BuiltProject, run_cli

from model.checkpoint import load_checkpoint
from tasks.core.params import ParamsError, parse_section, set_overrides
from tasks.pretrain import PretrainParams

FAST = [
    "plan.context_length=32",
    "pretrain.steps=300",
    "pretrain.batch_size=4",
    "pretrain.warmup_steps=10",
    "pretrain.checkpoint_every=5",
    "pretrain.eval_every=100",
    "pretrain.eval_batches=2",
    "pretrain.sample_tokens=8",
    "pretrain.log_model=false",
]


def checkpoint_step(project: Path) -> int:
    pointer = project / ".llmpipe/checkpoints/pretrain/latest"
    return int(pointer.read_text().strip().removeprefix("step-")) if pointer.is_file() else 0


@pytest.mark.slow  # dvc + a real (killed, resumed) training
def test_pretrain_resumes_a_killed_run_through_dvc_and_exports(
    built_project: BuiltProject, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    project = built_project.copy(tmp_path / "project")
    shutil.rmtree(project / ".llmpipe/checkpoints/pretrain")  # no earlier run to resume
    set_overrides(project / "params.yaml", FAST)
    run_cli(project, "dvc", "repro", "plan")

    # The first run of this config is killed between two checkpoints...
    killed = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-s", "pretrain"],
        cwd=project, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while checkpoint_step(project) < 10:
        assert killed.poll() is None and time.monotonic() < deadline, (
            "the run ended before it could be killed"
        )
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert 10 <= checkpoint_step(project) < 300
    assert not (project / "models/base").exists()  # nothing half-written where a later stage would look

    # ... and `dvc repro` continues it from the last checkpoint.
    run_cli(project, "dvc", "repro", "pretrain")
    metrics = json.loads((project / "metrics/pretrain.json").read_text())
    assert metrics["steps"] == 300 and metrics["resumed_from_step"] >= 10
    assert metrics["train_loss"] < metrics["unigram_val_loss"]  # it learned more than token frequencies
    base = project / "models/base"
    resumed = (base / "model.safetensors").read_bytes()

    # A deliberate fresh start (forced, run-cache bypassed) trains from step 0 to the same bits.
    run_cli(project, "dvc", "repro", "-f", "-s", "--no-run-cache", "pretrain")
    assert json.loads((project / "metrics/pretrain.json").read_text())["resumed_from_step"] == 0
    assert (base / "model.safetensors").read_bytes() == resumed

    ours = load_checkpoint(base)
    # the final training checkpoint exported by the CLI equals models/base/hf
    run_cli(project, "llmpipe", "export-hf", ".llmpipe/checkpoints/pretrain/step-0000300", "exported")
    for hf_dir in (base / "hf", project / "exported"):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
        ids = torch.tensor([tokenizer("The harbour town woke slowly")["input_ids"]])
        with torch.no_grad():
            assert (ours(ids)[0] - theirs(ids).logits).abs().max().item() < 1e-5
    for name in ("loss.png", "samples.md"):
        assert (project / "reports/pretrain" / name).stat().st_size > 0
    assert (project / "plots/pretrain_loss.csv").read_text().count("\n") == 301


@pytest.mark.slow  # torchrun with two processes
def test_nproc_2_trains_under_torchrun_and_only_rank_0_reports(
    built_project: BuiltProject, tmp_path: Path
) -> None:
    """`pretrain.nproc: 2` makes the stage relaunch itself under torchrun (two gloo processes on CPU)."""
    from mlflow.tracking import MlflowClient

    project = built_project.copy(tmp_path / "project")
    set_overrides(project / "params.yaml", ["pretrain.nproc=2", "pretrain.steps=8"])
    run_cli(project, "dvc", "repro", "pretrain")
    metrics = json.loads((project / "metrics/pretrain.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 8
    assert load_checkpoint(project / "models/base").num_params() == metrics["params"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.llmpipe' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmpipe").experiment_id
    runs = client.search_runs([experiment], "tags.`llmpipe.stage` = 'pretrain'")
    assert len(runs) == 2  # the built project's run and one for both ranks, from rank 0
    assert runs[0].data.metrics["processes"] == 2
    assert not list(project.glob("models/.*tmp*"))  # nothing half-written left behind


def test_bad_pretrain_params_name_the_key() -> None:
    with pytest.raises(ParamsError, match=r"pretrain\.warmup_steps"):
        parse_section(PretrainParams, "pretrain", {"steps": 5, "warmup_steps": -1})
    with pytest.raises(ParamsError, match=r"pretrain\.batch_size"):
        parse_section(PretrainParams, "pretrain", {"batch_size": 0})
    with pytest.raises(ParamsError, match=r"pretrain\.model is now plan\.model"):
        parse_section(PretrainParams, "pretrain", {"model": {"norm": "batchnorm"}})
    with pytest.raises(ParamsError, match=r"pretrain\.schedule"):  # a loop setting, typed in model/train.py
        parse_section(PretrainParams, "pretrain", {"schedule": "linear"})

"""Run one stage the same way from every entry point (`llmpipe stage`, `dvc repro`, the Prefect flow).

Parse the stage's params section → call its plain function → write `metrics/<stage>.json` atomically
→ log a tracked MLflow run. Stages know nothing about DVC or Prefect, and most nothing about MLflow: the
runner logs their params and metrics. The three that make a model (pretrain, finetune, evaluate) also
stream curves, log artifacts and register the model through tasks/core/tracking.py, whose helpers do
nothing when no run is active (a stage function called from a notebook or a test).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from tasks.core import tracking
from tasks.core.io import read_json, write_json
from tasks.core.layout import METRICS_DIR, PARAMS_FILE
from tasks.core.params import ParamsError, load_params_file, parse_section
from tasks.core.stages import INPUT_ERROR_EXIT, STAGES


def is_main_process() -> bool:
    """False in the other ranks of a torchrun launch (RANK > 0)."""
    return os.environ.get("RANK", "0") == "0"


def run_stage(name: str, root: Path, track: bool = True) -> dict[str, Any]:
    """Execute stage `name` in project `root` and return its metrics."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    stage = STAGES[name]
    params: Any = parse_section(
        stage.params_class, stage.params_section, stage.settings(load_params_file(root / PARAMS_FILE))
    )
    if getattr(params, "nproc", 1) > 1 and "RANK" not in os.environ:
        return launch_torchrun(name, root, params.nproc)
    if not track or not is_main_process():
        metrics = stage.run(params, root)
        if not is_main_process():
            return metrics  # under torchrun only rank 0 writes and logs
        write_json(root / METRICS_DIR / f"{name}.json", metrics)
        return metrics
    with tracking.stage_run(root, name, dataclasses.asdict(params)):
        metrics = stage.run(params, root)
        write_json(root / METRICS_DIR / f"{name}.json", metrics)
        tracking.finish_stage(root, name, metrics)
    return metrics


def launch_torchrun(name: str, root: Path, nproc: int) -> dict[str, Any]:
    """Run `llmpipe stage <name>` in `nproc` processes on this node (torchrun's launcher, standalone
    rendezvous) and return what rank 0 wrote; rank 0 also logs the MLflow run. A rank that rejected its
    input (INPUT_ERROR_EXIT) fails the launch with ValueError: callers report an input error, not a crash.
    Across nodes, start torchrun yourself."""
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"llmpipe-{name}-{os.getpid()}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
    )  # fmt: skip
    print(f"{name}: {nproc} processes (torchrun --standalone --nproc_per_node={nproc})", flush=True)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "flows.cli", "stage", name)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        if INPUT_ERROR_EXIT in codes:
            raise ValueError(f"stage {name}: a rank rejected its input or params (see its output)") from None
        raise RuntimeError(f"stage {name} under torchrun failed (rank exit codes {codes})") from None
    return read_json(root / METRICS_DIR / f"{name}.json")


def validate_params(params: dict[str, Any], root: Path | None = None) -> None:
    """Parse every implemented stage's section of a params.yaml mapping; raise ParamsError if one is bad.
    With the project `root`, also check that `pretrain.init` names a base that is there."""
    parsed: dict[str, Any] = {}
    for stage in STAGES.values():
        section = stage.settings(params)
        if section is None:
            raise ParamsError(f"params.yaml: section '{stage.params_section}' is missing")
        parsed[stage.name] = parse_section(stage.params_class, stage.params_section, section)
    if root is not None:
        from tasks.core.bases import resolve

        try:
            resolve(parsed["init"].init, root)
        except (FileNotFoundError, ValueError) as err:
            raise ParamsError(f"params.yaml: {err}") from None

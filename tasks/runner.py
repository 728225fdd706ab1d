"""Run one stage the same way from every entry point (`llmpipe stage`, `dvc repro`, the Prefect flow).

Parse the stage's params section → call its plain function → write `metrics/<stage>.json` atomically
→ log a tracked MLflow run. Stages themselves know nothing about MLflow, DVC or Prefect.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from tasks import tracking
from tasks.io import read_json, write_json
from tasks.layout import METRICS_DIR, PARAMS_FILE
from tasks.params import ParamsError, load_section, parse_section


class Stage(NamedTuple):
    """A stage is the module tasks/<module>.py: its params dataclass and its `run(params, root)`. The module
    is imported only when used, so `llmpipe stage ingest` does not pay for torch or peft."""

    module: str
    params_name: str
    summary: str

    @property
    def params_class(self) -> type:
        return getattr(importlib.import_module(f"tasks.{self.module}"), self.params_name)

    @property
    def run(self) -> Callable[[Any, Path], dict[str, Any]]:
        return importlib.import_module(f"tasks.{self.module}").run


#: The stages, in pipeline order (layout.PIPELINE_STAGES).
STAGES: dict[str, Stage] = {
    "ingest": Stage("ingest", "IngestParams", "read raw files into Parquet; quarantine bad records"),
    "normalize": Stage(
        "normalize", "NormalizeParams", "Unicode/whitespace clean-up and Gopher quality filters"
    ),
    "dedup": Stage("dedup", "DedupParams", "exact + MinHash/LSH near-duplicate removal, verified"),
    "tokenizer": Stage("tokenizer", "TokenizerParams", "train a byte-level BPE; compare tokenizer families"),
    "tokenize": Stage("tokenize", "TokenizeParams", "encode train/val splits into token shards"),
    "plan": Stage("plan", "PlanParams", "FLOPs budget → compute-optimal model shape and token budget"),
    "pretrain": Stage("pretrain", "PretrainParams", "train the planned GPT; resumable; HF export"),
    "domain": Stage("domain", "DomainParams", "the fine-tuning corpus through ingest → tokenize"),
    "finetune": Stage(
        "finetune", "FinetuneParams", "LoRA fine-tuning (domain or SFT); full / last-layer compared"
    ),
    "evaluate": Stage(
        "evaluate", "EvaluateParams", "perplexity + bits per byte vs n-gram baselines; generations"
    ),
}


def is_main_process() -> bool:
    """False in the other ranks of a torchrun launch (RANK > 0)."""
    return os.environ.get("RANK", "0") == "0"


def run_stage(name: str, root: Path, track: bool = True) -> dict[str, Any]:
    """Execute stage `name` in project `root` and return its metrics."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    stage = STAGES[name]
    params = load_section(stage.params_class, name, root / PARAMS_FILE)
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
    input (exit 3) fails the launch with ValueError, so callers report an input error, not a crash.
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
        if 3 in codes:
            raise ValueError(f"stage {name}: a rank rejected its input or params (see its output)") from None
        raise RuntimeError(f"stage {name} under torchrun failed (rank exit codes {codes})") from None
    return read_json(root / METRICS_DIR / f"{name}.json")


def validate_params(params: dict[str, Any]) -> None:
    """Parse every implemented stage's section of a params.yaml mapping; raise ParamsError if one is bad."""
    for name, stage in STAGES.items():
        section = params.get(name)
        if section is None:
            raise ParamsError(f"params.yaml: section '{name}' is missing")
        parse_section(stage.params_class, name, section)

"""The one list of stages, in pipeline order: the runner, `llmpipe`, the flow, the deps generator and the
tests all read it. Light on purpose (no torch, MLflow or DVC): a stage's module is imported only when used,
so `llmpipe stage ingest` does not pay for torch or peft."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    """Stage `name` is the module tasks/<name>.py: its params dataclass `params_name`, `run(params, root)`.
    Its settings are params.yaml's section `name`, or the keys `keys` of section `section` for a stage
    that a setting of another stage's section drives (`init` runs on `pretrain.init`)."""

    name: str
    params_name: str
    summary: str
    section: str = ""  # "": the section named like the stage
    keys: tuple[str, ...] = ()  # with `section`: the keys of it this stage reads

    @property
    def params_section(self) -> str:
        return self.section or self.name

    def settings(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """This stage's settings out of a whole params.yaml mapping (None: its section is missing)."""
        section = params.get(self.params_section)
        if section is None or not self.keys or not isinstance(section, dict):
            return section
        return {key: section[key] for key in self.keys if key in section}

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"

    @property
    def path(self) -> Path:
        """The stage module's file, relative to the project root."""
        return Path("tasks") / f"{self.name}.py"

    @property
    def params_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.params_name)

    @property
    def run(self) -> Callable[[Any, Path], dict[str, Any]]:
        return importlib.import_module(self.module).run


#: `llmpipe stage` exits with this code when the stage rejected its input or params: the Prefect flow does
#: not retry it (retrying cannot help) and a torchrun launch reports it as an input error.
INPUT_ERROR_EXIT = 3

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "init", "InitParams", "import the pretrained base (pretrain.init), or none", "pretrain", ("init",)
        ),
        Stage("ingest", "IngestParams", "read raw files into Parquet; quarantine bad records"),
        Stage("normalize", "NormalizeParams", "Unicode/whitespace clean-up and Gopher quality filters"),
        Stage("dedup", "DedupParams", "exact + MinHash/LSH near-duplicate removal, verified"),
        Stage(
            "tokenizer", "TokenizerParams", "train a byte-level BPE (or adopt the base's); compare families"
        ),
        Stage("tokenize", "TokenizeParams", "encode train/val splits into token shards"),
        Stage("plan", "PlanParams", "FLOPs budget → compute-optimal model shape and token budget"),
        Stage("pretrain", "PretrainParams", "train the planned GPT; resumable; HF export"),
        Stage("gru", "GRUParams", "train the GRU baseline on the GPT's tokens and FLOPs budget"),
        Stage("domain", "DomainParams", "the fine-tuning corpus through ingest → tokenize"),
        Stage("finetune", "FinetuneParams", "LoRA fine-tuning (domain or SFT); full / last-layer compared"),
        Stage("evaluate", "EvaluateParams", "perplexity + bits per byte vs n-gram baselines; generations"),
    )
}

"""The project's declarations agree with each other: dvc.yaml, params.yaml, the stage registry, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.stages import select_stages
from tasks.core.params import load_section
from tasks.core.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


#: Sections a stage reads besides its own: the domain corpus is
#: cleaned and encoded with the general corpus' settings.
EXTRA_PARAMS = {"domain": ["ingest", "normalize", "dedup", "tokenize"]}


def test_every_stage_is_declared_once_with_its_own_params_and_metrics() -> None:
    declared = dvc_stages()
    assert list(declared) == list(STAGES)
    for name, spec in declared.items():
        assert spec["cmd"] == f"llmpipe stage {name}"
        stage = STAGES[name]
        own = [f"{stage.params_section}.{key}" for key in stage.keys] if stage.keys else [name]
        assert spec["params"] == [*own, *EXTRA_PARAMS.get(name, [])]
        assert f"tasks/{name}.py" in spec["deps"]
        assert [next(iter(m)) for m in spec["metrics"]] == [f"metrics/{name}.json"]
        assert all(m[f"metrics/{name}.json"]["cache"] is False for m in spec["metrics"])
        if not stage.keys:
            load_section(stage.params_class, name, REPO / "params.yaml")  # defaults parse cleanly


def test_each_stage_reads_what_an_earlier_one_writes() -> None:
    declared = dvc_stages()
    names = list(declared)
    sources = ("init", "ingest")  # read only the project's inputs: the base checkpoint, the corpus
    assert names[: len(sources)] == list(sources)
    for position, downstream in enumerate(names[len(sources) :], start=len(sources)):
        outputs = [out for upstream in names[:position] for out in declared[upstream]["outs"]]
        deps = declared[downstream]["deps"]
        assert any(dep == out or dep.startswith(f"{out}/") for dep in deps for out in outputs), downstream


def test_stage_slicing() -> None:
    stages = list(STAGES)
    assert select_stages(stages, start="dedup", end="plan") == ["dedup", "tokenizer", "tokenize", "plan"]
    assert select_stages(stages, only=["evaluate", "ingest"]) == ["ingest", "evaluate"]
    with pytest.raises(ValueError, match="dedupe"):
        select_stages(stages, only=["dedupe"])
    with pytest.raises(ValueError, match="comes after"):
        select_stages(stages, start="plan", end="dedup")


def test_cli_help_lists_the_commands() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "llmpipe"), "--help"], capture_output=True, text=True, check=True
    )
    for command in ("run", "stage", "status"):
        assert command in result.stdout

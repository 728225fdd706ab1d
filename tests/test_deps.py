"""dvc.yaml's code deps follow the import graph (flows/deps.py): a code change reruns what it can affect."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import yaml

from flows import deps
from tasks.core.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_code_deps_match_the_imports() -> None:
    found = deps.differences(REPO)
    assert not found, f"dvc.yaml disagrees with the imports (run `llmpipe deps --write`): {found}"


def test_lazy_imports_count_type_checking_ones_do_not(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "model").mkdir()
    for package in ("tasks", "model"):
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "tasks" / "stage.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "from tasks.helper import thing\n"
        "if TYPE_CHECKING:\n    from model.typed import T\n"
        "def run():\n    from model import lazy\n    import model\n"
    )
    (tmp_path / "tasks" / "helper.py").write_text("from model.leaf import X\nthing = 1\n")
    for name in ("typed", "lazy", "leaf"):
        (tmp_path / "model" / f"{name}.py").write_text("X = 1\n")
    assert deps.module_deps(Path("tasks/stage.py"), tmp_path) == [
        "model/__init__.py",  # `import model` runs the package itself
        "model/lazy.py",
        "model/leaf.py",  # transitively, through tasks/helper.py
        "tasks/helper.py",
        "tasks/stage.py",
    ]


def test_write_restores_the_deps_and_keeps_data_deps(tmp_path: Path) -> None:
    project = tmp_path / "project"
    for name in ("flows", "tasks", "model"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    text = (REPO / "dvc.yaml").read_text().replace("      - model/gpt.py\n", "", 1)
    (project / "dvc.yaml").write_text(text + "\n# trailing comment kept\n")
    assert deps.differences(project), "removing a code dep must be noticed"
    assert deps.write(project)
    assert not deps.differences(project)
    rewritten = yaml.safe_load((project / "dvc.yaml").read_text())
    assert rewritten == spec
    assert "# trailing comment kept" in (project / "dvc.yaml").read_text()


def test_the_tokenizer_does_not_depend_on_the_model_code() -> None:
    """A change to the GPT must not retrain the tokenizer or re-encode the corpus."""
    code = deps.stage_code_deps(REPO)
    for stage in ("ingest", "normalize", "dedup", "tokenizer", "tokenize"):
        assert not {"model/gpt.py", "model/train.py", "model/generate.py"} & set(code[stage]), stage
    for stage in ("ingest", "normalize", "dedup"):  # text in, text out: no model code at all
        assert not [path for path in code[stage] if path.startswith("model/")], stage
    assert "model/gpt.py" in code["evaluate"] and "model/lora.py" in code["evaluate"]


def test_layers_import_one_way_and_stages_are_leaves() -> None:
    """model/ imports neither tasks/ nor flows/; tasks/ never imports flows/; a stage module imports no
    other stage module (domain excepted: it runs the data stages on the fine-tuning corpus by design)."""
    stage_files = {stage.path.as_posix() for stage in STAGES.values()}
    for path in sorted(REPO.glob("*/**/*.py")):
        module = path.relative_to(REPO)
        if module.parts[0] not in ("model", "tasks", "flows"):
            continue
        imported = {
            target.as_posix()
            for name in deps._imported_names(ast.parse(path.read_text(encoding="utf-8")))
            if (target := deps.resolve(name, REPO)) is not None and target != module
        }
        layer = module.parts[0]
        if layer == "model":
            assert not {p for p in imported if not p.startswith("model/")}, module
        if layer == "tasks":
            assert not {p for p in imported if p.startswith("flows/")}, module
        if module.as_posix() in stage_files and module.name != "domain.py":
            assert not imported & stage_files, f"{module} imports the stage(s) {imported & stage_files}"

"""Starting from a pretrained base (`pretrain.init`): the init stage imports a GGUF file or a Hugging Face
directory into models/init/, or records `scratch`; bad sources fail naming the file and leave params.yaml
as it was; a base goes through the whole pipeline (its tokenizer adopted, continued pretraining planned
and run, SFT in its own chat template, evaluation, the registry); and the real SmolLM2 does too."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import restored_mlflow_uri, run_cli
from safetensors.torch import load_file
from test_gguf import GGUF_NAME, bpe, tiny_config, write_gguf  # noqa: F401 (bpe: a fixture)
from test_hf import random_model

from model.checkpoint import load_checkpoint
from model.gguf import load_gguf
from tasks.core.io import read_json
from tasks.core.params import ParamsError
from tasks.init import InitParams, run

transformers = pytest.importorskip("transformers")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_scratch_records_that_there_is_no_base(tmp_path: Path) -> None:
    metrics = run(InitParams(), tmp_path)
    assert metrics == {"kind": "scratch", "params": 0}
    assert read_json(tmp_path / "models/init/source.json") == {"init": "scratch", "kind": "scratch"}
    assert not (tmp_path / "models/init/config.json").exists()  # nothing for pretrain to start from


def test_a_gguf_file_is_imported_with_its_tokenizer_and_lineage(bpe, tmp_path: Path) -> None:  # noqa: F811
    gguf_file = write_gguf(tmp_path / GGUF_NAME, random_model(tiny_config(len(bpe.tokens))), bpe)
    metrics = run(InitParams(init=GGUF_NAME), tmp_path)
    out = tmp_path / "models/init"
    source = read_json(out / "source.json")
    assert source["kind"] == "gguf" and source["md5"] == md5(gguf_file)  # lineage: the file's md5
    assert source["gguf"]["tensor_types"] == {"F32": 20}  # 2 layers × 9 + embedding + final norm
    assert metrics["params"] == source["params"] == load_checkpoint(out).num_params()
    idx = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        assert torch.equal(load_checkpoint(out)(idx)[0], load_gguf(gguf_file)(idx)[0])
    hf = transformers.AutoTokenizer.from_pretrained(out)  # transformers reads the same files
    assert hf.eos_token == "<|im_end|>" and "<|im_start|>" in hf.chat_template


def test_a_hugging_face_directory_is_imported(tmp_path: Path) -> None:
    from model.hf import save_hf

    model = random_model(tiny_config(400))
    save_hf(model, tmp_path / "hf")
    (tmp_path / "hf/tokenizer.json").write_text("{}")  # copied as it is, never parsed by init
    run(InitParams(init="hf"), tmp_path)
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(load_checkpoint(tmp_path / "models/init")(idx)[0], model(idx)[0], atol=1e-6)
    assert (tmp_path / "models/init/tokenizer.json").read_text() == "{}"


def test_bad_sources_fail_naming_the_file_and_keep_the_last_import(
    bpe,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run(InitParams(), tmp_path)  # what a failed import must leave alone
    good = write_gguf(tmp_path / GGUF_NAME, random_model(tiny_config(len(bpe.tokens))), bpe)
    (tmp_path / "truncated.gguf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights/config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path / "cache"))
    cases = {
        "missing.gguf": (FileNotFoundError, r"missing\.gguf does not exist"),
        "truncated.gguf": (ValueError, r"truncated\.gguf: not a readable GGUF file"),
        "notes.txt": (ValueError, r"notes\.txt is neither a \.gguf file nor a Hugging Face"),
        "empty": (FileNotFoundError, r"empty has no config\.json"),
        "no-weights": (FileNotFoundError, r"no-weights: no model\.safetensors"),
        "smollm2": (FileNotFoundError, r"run `llmpipe pull smollm2`"),
        "": (ValueError, r"pretrain\.init is empty"),
    }
    for init, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            run(InitParams(init=init), tmp_path)
        assert read_json(tmp_path / "models/init/source.json")["kind"] == "scratch", init


@pytest.mark.slow
def test_a_bad_init_on_the_command_line_leaves_params_yaml_untouched(project: Path) -> None:
    before = (project / "params.yaml").read_text()
    result = run_cli(project, "llmpipe", "run", "-S", "pretrain.init=nowhere/base.gguf", check=False)
    assert result.returncode == 3, result.stdout + result.stderr  # a bad setting, as for any other
    assert "nowhere/base.gguf does not exist" in result.stderr.replace("\n", "")  # rich wraps lines
    assert (project / "params.yaml").read_text() == before


@pytest.mark.slow
def test_a_gguf_base_goes_through_the_whole_pipeline(bpe, project: Path) -> None:  # noqa: F811
    """Tokenizer adopted, documents separated by <|endoftext|>, continued pretraining planned and run
    from the base's weights, SFT in its ChatML template, evaluation and registration; the base's md5 is
    in dvc.lock's lineage and MLflow's tags; `pretrain.steps: 0` keeps the base as it is."""
    from tasks.core.params import set_overrides

    # room for a ChatML turn in a 363-token vocabulary
    config = dataclasses.replace(tiny_config(len(bpe.tokens)), block_size=256)
    gguf_file = write_gguf(project / GGUF_NAME, random_model(config), bpe)
    set_overrides(project / "params.yaml", [f"pretrain.init={GGUF_NAME}", "finetune.task=sft"])
    run_cli(project, "dvc", "repro")

    assert read_json(project / "metrics/tokenizer.json")["adopted"] == 1
    tokenizer_json = (project / "models/tokenizer/tokenizer.json").read_text()
    assert tokenizer_json == (project / "models/init/tokenizer.json").read_text()
    assert read_json(project / "data/tokens/meta.json")["eos_token"] == "<|endoftext|>"
    plan = read_json(project / "models/plan.json")
    assert plan["training"]["continued"] and plan["model"] == config.to_dict()
    assert plan["training"]["seq_len"] == 32  # plan.context_length, below the base's 256
    pretrain = read_json(project / "metrics/pretrain.json")
    assert pretrain["continued"] == 1 and pretrain["lr"] == 5e-5 and pretrain["seq_len"] == 32
    assert (project / "models/lora/adapter_model.safetensors").is_file()
    assert "<|im_start|>" in (project / "models/lora/tokenizer_config.json").read_text()
    evaluation = read_json(project / "metrics/evaluate.json")
    assert evaluation["val_bpb"] > 0 and evaluation["scored_bytes"] > 0
    assert evaluation["base_bpb"] > 0  # the base as released, on the same bytes

    init_md5 = md5(gguf_file)
    assert read_json(project / "models/init/source.json")["md5"] == init_md5
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for stage in ("tokenizer", "plan", "pretrain"):  # models/init (source.json: the md5) is in their lineage
        assert any(dep["path"] == "models/init" for dep in lock[stage]["deps"]), stage

    import mlflow

    with restored_mlflow_uri():
        mlflow.set_tracking_uri(f"sqlite:///{project / '.llmpipe' / 'mlflow.db'}")
        query = f"tags.`llmpipe.base_md5` = '{init_md5}'"
        assert len(mlflow.search_runs(search_all_experiments=True, filter_string=query)) == 1

    # pretrain.steps: 0 — the base as it is
    set_overrides(project / "params.yaml", ["pretrain.steps=0"])
    run_cli(project, "llmpipe", "stage", "pretrain")
    base, init = (
        load_file(str(project / "models/base/model.safetensors")),
        load_file(str(project / "models/init/model.safetensors")),
    )
    assert base.keys() == init.keys() and all(torch.equal(base[k], init[k]) for k in base)
    assert read_json(project / "metrics/pretrain.json")["steps"] == 0


@pytest.mark.slow
def test_smollm2_through_the_pipeline(smollm2_gguf: Path, project: Path) -> None:
    """The real base, briefly: imported, one continued-pretraining step, two SFT steps, evaluated; it
    knows the capital of France, and scores under the bigram baseline. (Registering and logging its
    540 MB of weights is what the tiny GGUF base's pipeline test checks; here it would only cost time.)"""
    from tasks.core.params import set_overrides

    set_overrides(
        project / "params.yaml",
        [
            f"pretrain.init={smollm2_gguf}", "tokenizer.compare=false", "plan.context_length=64",
            "pretrain.steps=1", "pretrain.batch_size=1", "pretrain.eval_batches=1",
            "pretrain.sample_tokens=2",
            "finetune.task=sft", "finetune.steps=2", "finetune.batch_size=2", "finetune.seq_len=64",
            "finetune.eval_batches=1", "finetune.sample_tokens=2", "evaluate.max_bytes=3000",
            "evaluate.context=256", "evaluate.max_new_tokens=2", "evaluate.prompts=[Hello]",
            "pretrain.log_model=false", "finetune.log_model=false", "evaluate.register=false",
            "gru.steps=0",
        ],
    )  # fmt: skip
    run_cli(project, "dvc", "repro")
    evaluation = read_json(project / "metrics/evaluate.json")
    assert evaluation["val_bpb"] < evaluation["bigram_bpb"]
    assert read_json(project / "models/init/source.json")["params"] == 134_515_008
    answer = run_cli(
        project, "llmpipe", "generate", "--model", str(smollm2_gguf), "--max-new-tokens", "4",
        "--prompt", "The capital of France is",
    )  # fmt: skip
    assert "Paris" in answer.stdout


def test_params_reject_a_negative_step_count() -> None:
    from tasks.pretrain import PretrainParams

    with pytest.raises(ParamsError, match=r"pretrain\.steps must be ≥ 0"):
        PretrainParams(steps=-1)

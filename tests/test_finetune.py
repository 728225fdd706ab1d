"""The domain and finetune stages through DVC: the strategy comparison, the adapter that peft loads onto
models/base/hf, its MLflow provenance, SFT with quarantined rows, and clear errors for bad params."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import BuiltProject, run_cli

from model.checkpoint import load_checkpoint
from model.lora import load_adapter, lora_param_count, read_settings
from tasks.core.compare import compare_runs
from tasks.core.params import ParamsError, parse_section, set_overrides
from tasks.finetune import BASE_RUN_TAG, FinetuneParams

pytestmark = pytest.mark.slow


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


def short_pairs(project: Path) -> Path:
    """Instruction pairs short enough for the test model's 32-token context: the term, a few words."""
    lines = []
    for line in (project / "corpus/sft/jargon_sft.jsonl").read_text(encoding="utf-8").splitlines():
        term = re.search(r'^\{"prompt": "[^“]*“(.+?)”.*"response": "((?:\S+ ){1,4})', line)
        if term:  # the corpus' good rows (the bad ones the fixture adds do not match)
            lines.append(json.dumps({"prompt": f"{term.group(1)}?", "response": term.group(2).strip()}))
    lines.insert(3, '{"prompt": "no answer"}')
    path = project / "corpus/sft/short.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_finetune_compares_strategies_and_ships_a_peft_adapter(
    built_project: BuiltProject, tmp_path: Path
) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    project = built_project.copy(tmp_path / "project")
    set_overrides(project / "params.yaml", ["finetune.compare=true", "finetune.steps=12"])
    rerun = run_cli(project, "dvc", "repro", "finetune")
    assert "Running stage 'finetune'" in rerun.stdout and "Running stage 'domain'" not in rerun.stdout

    domain = metrics(project, "domain")
    assert domain["docs"] >= 2 and domain["val_tokens"] > 0 and domain["tokenize"]["val_docs"] >= 1
    assert (project / "data/domain/data/tokens/meta.json").is_file()

    result = metrics(project, "finetune")
    compare = result["compare"]
    assert set(compare) == {"lora", "last_layer", "full"}
    assert compare["lora"]["val_loss"] < result["base_val_loss"]  # LoRA learned the domain
    assert (
        compare["lora"]["trainable_params"]
        < compare["last_layer"]["trainable_params"]
        < compare["full"]["trainable_params"]
    )
    assert compare["full"]["trainable_percent"] == 100.0
    for row in compare.values():
        assert row["forgetting"] == pytest.approx(
            row["general_val_loss"] - result["base_general_val_loss"], abs=1e-4
        )
    table = (project / "reports/finetune/comparison.md").read_text()
    assert all(f"| {name} |" in table for name in ("base (no fine-tuning)", "lora", "last_layer", "full"))
    assert (project / "reports/finetune/comparison.png").stat().st_size > 0
    assert (project / "plots/finetune_loss.csv").read_text().splitlines()[
        0
    ] == "step,lora_loss,last_layer_loss,full_loss"

    # The adapter alone, in peft's format: peft loads it onto the HF export with llmpipe's logits.
    lora_dir = project / "models/lora"
    settings = read_settings(lora_dir)
    base = load_checkpoint(project / "models/base")
    assert (
        result["trainable_params"] == lora_param_count(base.config, settings) == result["closed_form_params"]
    )
    assert result["adapter_bytes"] < 4 * result["trainable_params"] + 16_384
    ours = load_adapter(load_checkpoint(project / "models/base"), lora_dir).eval()
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(lora_dir)
    ids = torch.tensor([tokenizer("A hacker is someone who")["input_ids"]])
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(project / "models/base/hf")
    theirs = peft.PeftModel.from_pretrained(hf_base, lora_dir).eval()
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)[0]).abs().max().item() < 1e-5
        assert (ours(ids)[0] - base(ids)[0]).abs().max().item() > 1e-4  # the adapter does something

    # MLflow: the adapter is an artifact of the finetune run, tagged with the pretrain run's id.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.llmpipe' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llmpipe").experiment_id])
    by_stage = {run.data.tags["llmpipe.stage"]: run for run in reversed(runs)}  # the newest of each
    finetune_run = by_stage["finetune"]
    assert finetune_run.data.tags[BASE_RUN_TAG] == by_stage["pretrain"].info.run_id
    artifacts = {a.path for a in client.list_artifacts(finetune_run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts

    # evaluate: bits per byte of the model and every reference (xz given the training text, the GRU of the
    # `gru` stage, the n-grams) on the same tokens, LoRA vs base on
    # the domain split, and the generation report over every strategy.
    run_cli(project, "dvc", "repro", "evaluate")
    evaluation = metrics(project, "evaluate")
    for name in ("val", "xz", "gru", "unigram", "bigram", "trigram", "domain_bpb_base", "domain_bpb_lora"):
        value = evaluation[name if name.startswith("domain") else f"{name}_bpb"]
        assert 0 < value < 20
    assert evaluation["domain_bpb_lora"] < evaluation["domain_bpb_base"]  # the adapter learned the domain
    assert evaluation["val_perplexity"] == pytest.approx(math.exp(evaluation["val_loss"]), rel=1e-3)
    generations = (project / "reports/evaluate/generations.md").read_text()
    for strategy in (
        "greedy",
        "beam 4",
        "temperature 0.1",
        "top-k 50",
        "top-p 0.95",
        "repetition penalty 1.2",
    ):
        assert f"| {strategy} |" in generations
    assert "base_bpb" not in evaluation  # from scratch: no pretrained base to compare with
    for picture in ("bpb.png", "bigram_heatmap.png", "attention.png", "masks.png"):
        assert (project / "reports/evaluate" / picture).stat().st_size > 0
    assert (
        (project / "reports/evaluate/greedy_tokens.csv").read_text().startswith("position,token,id,p,log_p")
    )
    # ...and registers both models (a second version each: the built project's evaluate registered the
    # first), with the alias on the best bits per byte, ready for `llmpipe generate`.
    for name, metric in (("llmpipe", "val_bpb"), ("llmpipe-lora", "domain_bpb_lora")):
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(int(v.version) for v in versions) == [1, 2]
        latest = next(v for v in versions if int(v.version) == 2)
        assert float(latest.tags[metric]) == evaluation[metric]
        champion = client.get_model_version_by_alias(name, "champion")
        assert float(champion.tags[metric]) == min(float(v.tags[metric]) for v in versions)
    generated = run_cli(
        project, "llmpipe", "generate", "--model", "models:/llmpipe-lora@champion", "--prompt", "A hacker",
        "--max-new-tokens", "4", "--show-probs",
    )  # fmt: skip
    assert generated.stdout.startswith("A hacker") and "generated tokens" in generated.stdout
    unknown = run_cli(
        project, "llmpipe", "generate", "--model", "models:/nosuch@champion", "--prompt", "x", check=False
    )
    assert unknown.returncode == 3 and "nosuch" in unknown.stderr

    # `llmpipe compare`: the built project's evaluation against this one. Their lineages (found through
    # the md5 tags) differ exactly in the two finetune params this test changed.
    comparison = compare_runs(project, last=2, metric="domain_bpb_lora")
    assert comparison.differing_params() == {
        "finetune.compare": ["False", "True"],
        "finetune.steps": ["6", "12"],
    }
    scores = [run.metric("domain_bpb_lora") for run in comparison.runs]
    assert comparison.best is comparison.runs[scores.index(min(scores))]
    assert (
        comparison.runs[0].lineage["pretrain"].info.run_id
        == comparison.runs[1].lineage["pretrain"].info.run_id
    )
    worst = comparison.runs[scores.index(max(scores))].evaluate.data.tags["llmpipe.registered.llmpipe"]
    client.set_registered_model_alias("llmpipe", "champion", worst)
    shown = run_cli(project, "llmpipe", "compare", "--last", "2", "--metric", "domain_bpb_lora", "--promote")
    assert "finetune.steps" in shown.stdout and "plan.model" not in shown.stdout
    promoted = comparison.best.evaluate.data.tags["llmpipe.registered.llmpipe"]
    assert client.get_model_version_by_alias("llmpipe", "champion").version == int(promoted)
    assert (project / "reports/compare/loss.png").stat().st_size > 0

    # SFT on prompt/response pairs: only finetune reruns; bad rows are quarantined with their reason.
    path = short_pairs(project)
    set_overrides(
        project / "params.yaml",
        ["finetune.task=sft", f"finetune.sft_path={path.relative_to(project)}", "finetune.compare=false"],
    )
    rerun = run_cli(project, "dvc", "repro", "finetune")
    assert "Running stage 'finetune'" in rerun.stdout and "Running stage 'domain'" not in rerun.stdout
    sft = metrics(project, "finetune")
    assert sft["task"] == "sft" and sft["train_pairs"] > 30 and set(sft["compare"]) == {"lora"}
    assert sft["val_loss"] < sft["base_val_loss"]
    quarantined = [
        json.loads(line) for line in (project / "reports/finetune/quarantine.jsonl").read_text().splitlines()
    ]
    assert quarantined[0]["line"] == 4 and "'response' is missing" in quarantined[0]["reason"]
    assert all("exceeds the context" in row["reason"] for row in quarantined[1:])  # a very long term

    # A LoRA target that matches nothing fails before training, naming the key; the adapter stays.
    before = (lora_dir / "adapter_model.safetensors").read_bytes()
    set_overrides(project / "params.yaml", ["finetune.lora.targets=[q_proj, qkv]"])
    failed = run_cli(project, "llmpipe", "stage", "finetune", check=False)
    assert failed.returncode == 3 and "finetune.lora" in failed.stderr and "qkv" in failed.stderr
    assert (lora_dir / "adapter_model.safetensors").read_bytes() == before


def test_bad_finetune_params_name_the_key() -> None:
    with pytest.raises(ParamsError, match=r"finetune\.general_fraction"):
        parse_section(FinetuneParams, "finetune", {"general_fraction": 1.5})
    with pytest.raises(ParamsError, match=r"finetune\.lora\.r"):
        parse_section(FinetuneParams, "finetune", {"lora": {"r": "eight"}})
    with pytest.raises(ParamsError, match=r"finetune\.task"):
        parse_section(FinetuneParams, "finetune", {"task": "rlhf"})
    with pytest.raises(ParamsError, match=r"finetune\.warmup_steps"):
        parse_section(FinetuneParams, "finetune", {"warmup_steps": -1})
    with pytest.raises(ParamsError, match=r"finetune\.lora: LoRA needs r ≥ 1"):
        parse_section(FinetuneParams, "finetune", {"lora": {"dropout": 1.0}})

"""The planner: FLOPs accounting against known values, the Chinchilla table, plan.json and `llmpipe plan`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import BuiltProject, run_cli
from typer.testing import CliRunner

from flows.cli import app
from model import planner
from model.config import GPTConfig
from model.flops import (
    ACCELERATORS,
    attention_flops_per_token,
    count_params,
    forward_flops_per_token,
    train_flops_per_token,
)
from model.planner import InvalidSetting, ModelSettings, PlanSettings
from model.scaling import CHINCHILLA_TABLE3, chinchilla_optimal, choose_shape, kaplan_optimal
from tasks.core.io import write_json
from tasks.core.layout import PLAN_FILE, TOKENS_DIR
from tasks.core.params import ParamsError, parse_section
from tasks.plan import PlanParams, buildable, make_plan, run

GPT2 = GPTConfig(
    vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024,
    pos_encoding="learned", norm="layernorm", mlp="gelu", bias=False, tie_embeddings=True,
)  # fmt: skip
H100_BUDGET = PlanParams(gpu="h100", gpus=8, hours=24, mfu=0.4, usd_per_gpu_hour=2.5)


def test_gpt2_124m_parameter_and_flops_counts() -> None:
    counts = count_params(GPT2)
    assert counts.compute == 123_551_232  # GPT-2 124M without its 786,432 position embeddings
    assert counts.total == 123_551_232 + 1024 * 768
    assert train_flops_per_token(GPT2) == 854_553_600  # 6N + 12·L·H·Q·T
    assert train_flops_per_token(GPT2, include_attention=False) == 6 * 123_551_232


def test_parameter_count_follows_the_architecture() -> None:
    base = dataclasses.replace(GPT2, pos_encoding="rope", norm="rmsnorm", mlp="swiglu")
    d, layers = base.n_embd, base.n_layer
    assert count_params(base).total == 123_551_232 + layers * d * (3 * base.hidden - 8 * d)
    untied = count_params(dataclasses.replace(base, tie_embeddings=False))
    assert untied.total - count_params(base).total == base.vocab_size * d
    assert untied.compute == count_params(base).compute  # the head is one matmul either way
    gqa = count_params(dataclasses.replace(base, n_kv_head=3))  # 12 query heads share 3 k/v heads
    assert count_params(base).attention - gqa.attention == layers * 2 * d * (12 - 3) * 64
    biased = count_params(dataclasses.replace(GPT2, bias=True))
    per_layer = (3 * d + d) + (4 * d + d) + 2 * d  # qkv + o, up + down, two LayerNorm biases
    assert biased.total - count_params(GPT2).total == layers * per_layer + d


def test_generation_flops_with_and_without_kv_cache() -> None:
    cached = forward_flops_per_token(GPT2, context=512, kv_cache=True)
    assert cached == 2 * 123_551_232 + 4 * 12 * 12 * 64 * 512
    assert forward_flops_per_token(GPT2, context=512, kv_cache=False) == 512 * cached
    window = dataclasses.replace(GPT2, sliding_window=128)
    assert attention_flops_per_token(window) == attention_flops_per_token(GPT2) // 8


@pytest.mark.parametrize(("params", "flops", "tokens"), CHINCHILLA_TABLE3)
def test_chinchilla_table3(params: float, flops: float, tokens: float) -> None:
    tolerance = 0.05 if params == 67e9 else 0.01  # that row's token count is rounded to 2 digits
    assert 6 * params * tokens == pytest.approx(flops, rel=tolerance)
    optimal = chinchilla_optimal(flops)
    assert optimal.params == pytest.approx(params, rel=tolerance)
    assert optimal.tokens == pytest.approx(tokens, rel=tolerance + 0.01)
    assert 6 * optimal.params * optimal.tokens == pytest.approx(flops, rel=1e-9)


def test_allocation_is_monotonic_with_20_to_22_tokens_per_param() -> None:
    budgets = np.logspace(12, 28, 65)
    allocations = [chinchilla_optimal(c) for c in budgets]
    ratios = [a.tokens / a.params for a in allocations]
    assert all(20 - 1e-9 <= r <= 22 for r in ratios)
    assert all(b.params >= a.params and b.tokens >= a.tokens for a, b in itertools.pairwise(allocations))
    template = GPTConfig(vocab_size=32000, n_layer=1, n_head=1, n_embd=64, block_size=1024)
    shapes = [choose_shape(c, template) for c in budgets]
    sizes = [count_params(s).total for s in shapes]
    assert sizes == sorted(sizes)
    kaplan = [kaplan_optimal(c) for c in budgets]
    assert all(b.params > a.params for a, b in itertools.pairwise(kaplan))
    assert kaplan_optimal(1e24).params > chinchilla_optimal(1e24).params  # Kaplan favours bigger models


def test_chosen_shape_spends_the_budget_and_follows_the_aspect_rule() -> None:
    template = GPTConfig(vocab_size=50257, n_layer=1, n_head=1, n_embd=64, block_size=2048)
    flops = 1e21
    config = choose_shape(flops, template, 20, aspect_ratio=64, head_dim=128, heads_per_kv_head=4)
    spent = 20 * count_params(config).non_embedding * train_flops_per_token(config)
    assert 0.6 < spent / flops < 1.7  # the nearest depth: one layer more or less misses by more
    assert choose_shape(8 * flops, template, 20, 64, 128, 4).n_layer > config.n_layer
    assert config.n_embd % 128 == 0 and config.head_dim == 128
    assert config.n_embd == 128 * math.ceil(64 * config.n_layer / 128)
    assert config.kv_heads * 4 <= config.n_head and config.n_head % config.kv_heads == 0


def test_gpu_budget_plan_is_consistent() -> None:
    plan = make_plan(H100_BUDGET, vocab_size=50257, train_tokens=10**9)
    budget, training = plan["budget"], plan["training"]
    assert budget["flops"] == pytest.approx(989.4e12 * 8 * 0.4 * 24 * 3600)
    assert training["hours"] == pytest.approx(24, rel=0.01)  # the token budget spends the GPU hours
    assert training["usd"] == pytest.approx(training["hours"] * 8 * 2.5)
    assert training["tokens"] == training["steps"] * training["batch_size"] * plan["model"]["block_size"]
    assert 0.5 < plan["params"]["total"] / plan["chinchilla"]["params"] < 2
    assert plan["data"]["epochs"] == pytest.approx(training["tokens"] / 10**9)
    assert not plan["data"]["enough"] and "epochs" in " ".join(plan["warnings"])
    assert GPTConfig.from_dict(plan["model"]).n_layer == plan["model"]["n_layer"]
    flops_plan = make_plan(PlanParams(flops=budget["flops"], gpu="h100", gpus=8, mfu=0.4), 50257)
    assert flops_plan["model"] == plan["model"] and flops_plan["budget"]["hours"] == pytest.approx(24)
    request = plan["inference"]
    assert request["usd_per_request"] == pytest.approx((512 * 0.05 + 128 * 0.2) / 1e6)


def test_size_overrides_are_used_and_recorded() -> None:
    planned = make_plan(H100_BUDGET, vocab_size=8192)
    forced_model = ModelSettings(n_layer=4, pos_encoding="learned")
    forced = make_plan(dataclasses.replace(H100_BUDGET, model=forced_model), vocab_size=8192)
    assert forced["model"]["n_layer"] == 4 and forced["model"]["pos_encoding"] == "learned"
    assert forced["overrides"] == {"n_layer": {"planned": planned["model"]["n_layer"], "used": 4}}
    assert forced["training"]["tokens"] > planned["training"]["tokens"]  # a smaller model reads more tokens
    with pytest.raises(ParamsError, match=re.escape("plan.model")):
        make_plan(dataclasses.replace(H100_BUDGET, model=ModelSettings(n_head=7)), vocab_size=8192)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hours": -1.0}, "hours must be > 0"),
        ({"mfu": 1.5}, r"mfu must be in \(0, 1\]"),
        ({"gpu": "tpu-v9"}, "h100, h100-pcie, h200, a100, l40s, l4, rtx4090, cpu"),
        ({"gpus": 0}, "gpus must be ≥ 1"),
        ({"flops": -1e18}, "flops must be > 0"),
    ],
)
def test_nonsense_budgets_are_clear_errors(change: dict[str, object], message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        dataclasses.replace(PlanParams(), **change).validate()
    with pytest.raises(ParamsError, match=re.escape("params.yaml: plan")):
        parse_section(PlanParams, "plan", change)


def test_nested_inference_params_are_checked() -> None:
    with pytest.raises(ParamsError, match=re.escape("plan.inference.output_tokens")):
        parse_section(PlanParams, "plan", {"inference": {"output_tokens": "many"}})
    with pytest.raises(ParamsError, match=re.escape("plan.model.pos_encoding")):
        parse_section(ModelSettings, "plan.model", {"pos_encoding": "alibi"})


def test_model_settings_are_gptconfigs_fields_and_the_planner_names_bad_ones() -> None:
    defaults = dataclasses.asdict(ModelSettings())
    assert defaults.keys() == {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    architecture = {key: value for key, value in defaults.items() if key not in planner.PLANNED_SIZES}
    shape = {"vocab_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8}
    assert GPTConfig(**shape, **architecture) == GPTConfig(**shape)  # the same defaults
    with pytest.raises(InvalidSetting, match=re.escape("mfu must be in")) as bad_budget:
        PlanSettings(mfu=0)
    assert bad_budget.value.key == "mfu"
    with pytest.raises(InvalidSetting, match=re.escape("GPTConfig.dropout")) as bad_model:
        planner.make_plan(PlanSettings(flops=1e15, gpu="a100", model=ModelSettings(dropout=1.5)), 8192)
    assert bad_model.value.key == "model"


def _fake_tokens(root: Path, train_tokens: int = 3_000_000) -> None:
    meta = {"vocab_size": 8192, "splits": {"train": {"tokens": train_tokens}, "val": {"tokens": 1000}}}
    write_json(root / TOKENS_DIR / "meta.json", meta)


def test_stage_writes_a_deterministic_plan_and_reports(tmp_path: Path) -> None:
    budget = PlanParams(flops=1e15, gpu="a100", model=ModelSettings(mlp="gelu"))
    with pytest.raises(FileNotFoundError, match="tokenize"):
        run(budget, tmp_path)
    _fake_tokens(tmp_path)
    metrics = run(budget, tmp_path)
    first = (tmp_path / PLAN_FILE).read_bytes()
    plan = json.loads(first)
    full = json.loads((tmp_path / "reports/plan/plan.json").read_text())
    assert (
        plan == buildable(full)
        and GPTConfig.from_dict(plan["model"]).mlp == "gelu"
        and plan["model"]["vocab_size"] == 8192
    )
    assert metrics["params"] == full["params"]["total"] and metrics["steps"] == plan["training"]["steps"]
    assert metrics["epochs"] == pytest.approx(plan["training"]["tokens"] / 3_000_000, abs=1e-4)
    for name in ("plan.md", "isoflops.png", "frontier.png"):
        assert (tmp_path / "reports/plan" / name).stat().st_size > 0
    rows = (tmp_path / "plots/plan_isoflops.csv").read_text().splitlines()
    assert rows[0] == "log10_params,loss" and len(rows) == 62
    run(budget, tmp_path)
    assert (tmp_path / PLAN_FILE).read_bytes() == first
    # prices and time estimates are not what pretraining consumes: changing them leaves plan.json alone
    run(dataclasses.replace(budget, usd_per_gpu_hour=3.0, mfu=0.5), tmp_path)
    assert (tmp_path / PLAN_FILE).read_bytes() == first


def test_cpu_budget_is_measured_once_per_machine(tmp_path: Path) -> None:
    _fake_tokens(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n", encoding="utf-8")
    run(PlanParams(gpu="cpu", hours=0.01), tmp_path)
    remembered = json.loads((tmp_path / ".llmpipe/cpu-peak-flops.json").read_text())
    assert remembered["peak_flops"] > 1e8
    first = (tmp_path / PLAN_FILE).read_bytes()
    run(PlanParams(gpu="cpu", hours=0.01), tmp_path)
    assert (tmp_path / PLAN_FILE).read_bytes() == first
    full = json.loads((tmp_path / "reports/plan/plan.json").read_text())
    assert full["budget"]["peak_flops_per_gpu"] == remembered["peak_flops"]


def test_cli_plan_prints_a_table_or_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # outside a project: defaults
    runner = CliRunner()
    result = runner.invoke(
        app, ["plan", "--gpu", "h100", "--gpus", "8", "--hours", "24", "--mfu", "0.4", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["budget"]["flops"] == pytest.approx(ACCELERATORS["h100"].peak_flops * 8 * 0.4 * 24 * 3600)
    assert plan["inference"]["usd_per_request"] > 0
    table = runner.invoke(app, ["plan", "--flops", "1e18", "--tokens", "1000000"])
    assert table.exit_code == 0, table.output
    assert "Chinchilla optimum" in table.output and "WARNING" in table.output  # 1e18 needs > 4 epochs
    bad = runner.invoke(app, ["plan", "--gpu", "tpu", "--hours", "-2"])
    assert bad.exit_code == 2
    assert "--gpu must be one of h100, h100-pcie, h200, a100, l40s, l4, rtx4090, cpu" in bad.output


@pytest.mark.slow  # dvc + the built test project
def test_plan_stage_in_the_pipeline_reads_the_token_split(
    built_project: BuiltProject, tmp_path: Path
) -> None:
    project = built_project.copy(tmp_path / "project")
    plan = json.loads((project / PLAN_FILE).read_text())
    meta = json.loads((project / TOKENS_DIR / "meta.json").read_text())
    full = json.loads((project / "reports/plan/plan.json").read_text())
    assert plan["model"]["vocab_size"] == meta["vocab_size"]
    assert full["data"]["train_tokens"] == meta["splits"]["train"]["tokens"]
    run_cli(project, "llmpipe", "run", "--only", "plan", "-S", "plan.model.n_layer=3")
    plan = json.loads((project / PLAN_FILE).read_text())
    assert plan["model"]["n_layer"] == 3 and plan["overrides"]["n_layer"]["used"] == 3


def test_the_default_plan_is_the_same_under_any_load_and_not_the_smallest_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """params.yaml's budget is FLOPs: two clones measuring different CPU peaks (background load moved
    it from 0.29 to 0.12 TFLOP/s) plan the same model and steps; only the wall-time estimate differs.
    And the depth dial does not collapse to 1 layer × 64 as sizing by total parameters did."""
    import yaml

    project = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    settings = parse_section(PlanParams, "plan", project["plan"])
    plans = []
    for peak in (2.9e11, 1.2e11):
        monkeypatch.setattr(planner, "cpu_peak_flops", lambda cache, peak=peak: peak)
        plans.append(make_plan(settings, project["tokenizer"]["vocab_size"], 4_300_000))
    assert plans[0]["model"] == plans[1]["model"]
    assert plans[0]["training"] == {**plans[1]["training"], "hours": plans[0]["training"]["hours"]}
    assert plans[0]["training"]["hours"] < plans[1]["training"]["hours"]
    model, params = plans[0]["model"], plans[0]["params"]
    assert model["n_layer"] >= 2 and params["embedding_share"] < 0.5
    assert plans[0]["training"]["steps"] >= settings.min_steps

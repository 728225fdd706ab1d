"""Stage `plan`: from a compute budget, decide the model shape and token budget that pretraining uses.

The maths (budget, compute-optimal split, buildable shape, token budget, cost, data and inference
checks) is model/planner.py, where each `plan` setting is defined; this stage reads them from params.yaml
and the training split's size from data/tokens/meta.json, and writes models/plan.json (what pretrain
reads: model config, token budget, batch, steps), the full plan in reports/plan/plan.json (+ plan.md,
isoflops.png, frontier.png) and plots/plan_isoflops.csv. `llmpipe plan` prints the same plan without
running the pipeline. With a pretrained base (models/init/, `pretrain.init`) the model is the base and
the budget buys continued pretraining of it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from model import planner
from model.config import GPTConfig
from model.planner import InvalidSetting, PlanSettings, buildable
from model.scaling import CHINCHILLA_TABLE3, chinchilla_optimal, isoflops_curve, kaplan_optimal
from tasks.core.io import atomic_dir, atomic_file, read_json, write_json
from tasks.core.layout import (
    CPU_RATE_FILE,
    INIT_SOURCE,
    PLAN_FILE,
    PLOTS_DIR,
    REPORTS_DIR,
    TOKENS_DIR,
    state_dir,
)
from tasks.core.params import ParamsError, StageParams

REPORT_DIR = REPORTS_DIR / "plan"
ISOFLOPS_PLOT = PLOTS_DIR / "plan_isoflops.csv"
TOKEN_META = TOKENS_DIR / "meta.json"


def params_error(err: InvalidSetting) -> ParamsError:
    """The planner's complaint about a setting, naming it as its params.yaml key."""
    return ParamsError(f"params.yaml: plan.{err.key} {err.problem}")


@dataclass
class PlanParams(StageParams, PlanSettings):
    """params.yaml's `plan`: the planner's settings (types, defaults and checks in model/planner.py).
    StageParams comes first so that building one runs `validate`, which names the params.yaml key."""

    def validate(self) -> None:
        try:
            self.check()
        except InvalidSetting as err:
            raise params_error(err) from None


def make_plan(
    settings: PlanSettings,
    vocab_size: int,
    train_tokens: int | None = None,
    state: Path | None = None,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The planner's plan; `state` keeps this machine's CPU rate; `base` is models/init/source.json of a
    pretrained base (the plan is then continued pretraining); a model GPTConfig rejects is a ParamsError
    naming plan.model."""
    base_config = GPTConfig.from_dict(base["config"]) if base else None
    try:
        plan = planner.make_plan(
            settings, vocab_size, train_tokens, state / CPU_RATE_FILE if state else None, base_config
        )
    except InvalidSetting as err:
        raise params_error(err) from None
    if base:
        plan["base"] = {key: base[key] for key in ("init", "name", "md5", "params")}
    return plan


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary_rows(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) rows for a table: the CLI prints them, plan.md holds them."""
    budget, train, model, counts = plan["budget"], plan["training"], plan["model"], plan["params"]
    optimal, kaplan, data, per_token = (
        plan["chinchilla"],
        plan["kaplan"],
        plan["data"],
        plan["flops_per_token"],
    )
    peak = f"{budget['peak_flops_per_gpu'] / 1e12:.3g} TFLOP/s peak"
    devices = f"{budget['gpus']} × {budget['gpu_description']} ({peak}) × {budget['hours']:.3g} h"
    kv_heads = f" ({model['n_kv_head']} kv heads)" if model["n_kv_head"] else ""
    tying = "tied" if model["tie_embeddings"] else "untied"
    trust = (
        "a trend for other corpora, not a promise"
        if train["expected_loss_in_fit_range"]
        else "extrapolated outside the 70M-16B parameters it was fitted on; do not trust it here"
    )
    rows = [
        ("budget", f"{budget['flops']:.3e} FLOPs = {devices} at MFU {budget['mfu']:g}"),
        (
            "Chinchilla optimum",
            f"N = {optimal['params']:,.0f} params, D = {optimal['tokens']:,.0f} tokens "
            f"({optimal['tokens_per_param']:.1f} tokens/param)",
        ),
        (
            "Kaplan (for contrast)",
            f"N = {kaplan['params']:,.0f} non-embedding params, D = {kaplan['tokens']:,.0f} tokens",
        ),
        (
            "model",
            f"{_count(model['n_layer'], 'layer')} × {model['n_embd']} wide, "
            f"{_count(model['n_head'], 'head')} of {model['n_embd'] // model['n_head']}{kv_heads}, "
            f"context {model['block_size']}, "
            f"vocab {model['vocab_size']:,}",
        ),
        (
            "architecture",
            f"{model['pos_encoding']} positions, {model['norm']}, {model['mlp']} MLP, {tying} embeddings, "
            f"bias {model['bias']}",
        ),
        (
            "parameters",
            f"{counts['total']:,} total, {counts['non_embedding']:,} non-embedding; the vocabulary "
            f"(embedding + head) holds {counts['embedding_share']:.1%}",
        ),
        (
            "FLOPs per token",
            f"train {per_token['train']:,} (6N = {per_token['train_6n']:,}); generate "
            f"{per_token['forward_kv_cache']:,} with KV cache, {per_token['forward_no_cache']:,} without",
        ),
        (
            "training",
            f"{train['tokens']:,} tokens = {train['steps']:,} steps × {train['batch_size']} sequences × "
            f"{train['seq_len']} ({train['tokens_per_param']:.1f} tokens/param, "
            f"{train['tokens_per_non_embedding_param']:.1f} per non-embedding param)",
        ),
        (
            "wall time and cost",
            f"{train['hours']:.3g} h, ${train['usd']:,.2f}; ~{train['memory_gb']:.2g} GB for weights + Adam",
        ),
        (
            "expected loss",
            f"{train['expected_loss']:.3f} nats/token (Chinchilla fit: {trust})"
            if train["expected_loss"] is not None
            else "not predicted: Chinchilla's fit is for training from scratch, not for continuing a base",
        ),
    ]
    if data["train_tokens"]:
        verdict = "enough" if data["enough"] else f"NOT enough (more than {data['max_epochs']:g} epochs)"
        rows.append(
            ("data", f"{data['train_tokens']:,} training tokens → {data['epochs']:.2f} epochs: {verdict}")
        )
    else:
        rows.append(("data", "training-split size unknown (run the tokenize stage, or pass --tokens)"))
    inference = plan["inference"]
    rows.append(
        (
            "inference per request",
            f"{inference['input_tokens']} in + {inference['output_tokens']} out tokens: "
            f"{inference['flops_per_request']:.3g} FLOPs, ${inference['usd_per_request']:.6f}",
        )
    )
    if base := plan.get("base"):
        rows.insert(
            0,
            (
                "pretrained base",
                f"{base['name']} ({base['params']:,} parameters, md5 {base['md5'][:12]}): the budget buys "
                f"continued pretraining on sequences of {train['seq_len']} tokens",
            ),
        )
    for key, change in plan["overrides"].items():
        rows.append((f"override {key}", f"{change['planned']} planned → {change['used']} (plan.model)"))
    for warning in plan["warnings"]:
        rows.append(("WARNING", warning))
    return rows


def _isoflops_figure(
    flops: float, optimum: float, used: float, sizes: list[float], losses: list[float]
) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.plot(sizes, losses, color="C0", label=f"loss at C = {flops:.2e} FLOPs (Chinchilla fit)")
    best = min(range(len(sizes)), key=losses.__getitem__)
    ax.plot(sizes[best], losses[best], "o", color="C1", label="the fit's minimum")
    ax.axvline(optimum, color="C2", linestyle="--", label=f"Approach 1 N_opt = {optimum:.3g}")
    used_loss = isoflops_curve(flops, [used])[0]
    ax.plot(used, used_loss, "*", color="C3", markersize=14, label=f"planned model {used:.3g}")
    ax.set(xscale="log", xlabel="parameters N", ylabel="predicted loss (nats/token)", title="iso-FLOPs curve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _frontier_figure(flops: float, used: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    low, high = min(flops, CHINCHILLA_TABLE3[0][1]) / 10, max(flops, CHINCHILLA_TABLE3[-1][1]) * 10
    grid = [low * (high / low) ** (k / 100) for k in range(101)]
    ax.plot(grid, [chinchilla_optimal(c).params for c in grid], color="C0", label="Chinchilla (Approach 1)")
    kaplan = [kaplan_optimal(c).params for c in grid]
    ax.plot(grid, kaplan, color="C7", linestyle=":", label="Kaplan et al. 2020")
    table_flops, table_params = [row[1] for row in CHINCHILLA_TABLE3], [row[0] for row in CHINCHILLA_TABLE3]
    ax.plot(table_flops, table_params, "o", color="C0", label="Chinchilla Table 3")
    ax.plot(flops, used, "*", color="C3", markersize=14, label="this plan")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="parameters N")
    ax.set_title("the budget on the compute-optimal frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_reports(root: Path, plan: dict[str, Any]) -> None:
    """plan.md, isoflops.png and frontier.png under reports/plan/, and plots/plan_isoflops.csv."""
    flops = plan["budget"]["flops"]
    optimum, used = plan["chinchilla"]["params"], plan["params"]["total"]
    sizes = [optimum * 10 ** (k / 20) for k in range(-30, 31)]  # N_opt / 30 to N_opt × 30
    losses = isoflops_curve(flops, sizes)
    with atomic_dir(root / REPORT_DIR) as out:
        lines = ["# Training plan", "", "| | |", "|---|---|"]
        lines += [f"| {what} | {value} |" for what, value in summary_rows(plan)]
        (out / "plan.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_json(out / "plan.json", plan)
        _isoflops_figure(flops, optimum, used, sizes, losses).savefig(out / "isoflops.png", dpi=100)
        _frontier_figure(flops, used).savefig(out / "frontier.png", dpi=100)

    with atomic_file(root / ISOFLOPS_PLOT) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["log10_params", "loss"])
        writer.writerows(
            [f"{math.log10(n):.4f}", f"{loss:.5f}"] for n, loss in zip(sizes, losses, strict=True)
        )


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


class TokenCounts(NamedTuple):
    vocab_size: int
    train_tokens: int  # in the training split


def read_token_counts(root: Path) -> TokenCounts | None:
    """What the plan needs from data/tokens/meta.json; None before the tokenize stage has run."""
    path = root / TOKEN_META
    if not path.is_file():
        return None
    meta = read_json(path)
    return TokenCounts(meta["vocab_size"], meta["splits"]["train"]["tokens"])


def read_base(root: Path) -> dict[str, Any] | None:
    """models/init/source.json when the init stage imported a pretrained base; None for scratch."""
    source = read_json(root / INIT_SOURCE) if (root / INIT_SOURCE).is_file() else {}
    return source if source.get("kind", "scratch") != "scratch" else None


def run(params: PlanParams, root: Path) -> dict[str, int | float]:
    """Read data/tokens/meta.json + params (plan, plan.model), write models/plan.json and reports."""
    root = Path(root)
    counts = read_token_counts(root)
    if counts is None:
        raise FileNotFoundError(f"{root / TOKEN_META}: no token shards (run the tokenize stage)")
    plan = make_plan(params, counts.vocab_size, counts.train_tokens, state_dir(root), read_base(root))
    for warning in plan["warnings"]:
        print(f"plan: warning: {warning}")
    write_json(root / PLAN_FILE, buildable(plan))
    write_reports(root, plan)
    return {
        "budget_flops": plan["budget"]["flops"],
        "chinchilla_params": round(plan["chinchilla"]["params"]),
        "chinchilla_tokens": round(plan["chinchilla"]["tokens"]),
        "params": plan["params"]["total"],
        "n_layer": plan["model"]["n_layer"],
        "n_embd": plan["model"]["n_embd"],
        "tokens": plan["training"]["tokens"],
        "steps": plan["training"]["steps"],
        "batch_size": plan["training"]["batch_size"],
        "epochs": round(plan["data"]["epochs"], 4),
        "hours": round(plan["training"]["hours"], 6),
        "usd": round(plan["training"]["usd"], 4),
        **(
            {"expected_loss": round(plan["training"]["expected_loss"], 4)}
            if plan["training"]["expected_loss"] is not None
            else {}
        ),
        "warnings": len(plan["warnings"]),
        "continued": int(plan["training"]["continued"]),  # 1: continued pretraining of a pretrained base
    }

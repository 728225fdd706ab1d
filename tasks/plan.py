"""Stage `plan`: from a compute budget, decide the model shape and token budget that pretraining uses.

1. The budget: total training FLOPs (`plan.flops`), or GPU type × count × hours × MFU (peak dense bf16
   FLOP/s from model.flops.ACCELERATORS; "cpu" is measured with a quick matmul on this machine).
2. The compute-optimal split of that budget (model.scaling): Chinchilla's N_opt and D_opt, with Kaplan's
   allocation beside it for contrast.
3. A buildable model: the shape nearest N_opt by the width-per-layer rule, with the architecture of
   `plan.model` (positional encoding, norm, MLP, tying... change the count, so the plan uses them);
   any size set there (n_layer, n_embd, ...) overrides the plan's and is recorded under `overrides`.
   The token budget is what the budget buys for that model at the fuller FLOPs-per-token count, split
   into a batch size (power of two, at least `min_steps` steps) and a step count.
4. Wall time, dollars, the Chinchilla fit's loss estimate, and whether the training split
   (data/tokens/meta.json) has enough tokens: epochs needed, with a warning above `max_epochs`.
5. Inference: FLOPs and dollars per request at the given token counts and prices.

Writes models/plan.json (what pretrain reads: model config, token budget, batch, steps), the full plan
in reports/plan/plan.json (+ plan.md, isoflops.png, frontier.png) and plots/plan_isoflops.csv.
`llmpipe plan` calls the same `make_plan` without running the pipeline.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.config import GPTConfig
from model.flops import (
    ACCELERATOR_NAMES,
    ACCELERATORS,
    CPU,
    count_params,
    cpu_peak_flops,
    forward_flops_per_token,
    peak_flops,
    train_flops_per_token,
)
from model.scaling import (
    CHINCHILLA_TABLE3,
    LOSS_FIT_PARAMS,
    chinchilla_loss,
    chinchilla_optimal,
    choose_shape,
    isoflops_curve,
    kaplan_optimal,
)
from tasks.core.io import atomic_dir, atomic_file, read_json, write_json
from tasks.core.layout import CPU_RATE_FILE, PLAN_FILE, PLOTS_DIR, REPORTS_DIR, TOKENS_DIR, state_dir
from tasks.core.params import ParamsError, StageParams

PLAN_FORMAT = 1
REPORT_DIR = REPORTS_DIR / "plan"
ISOFLOPS_PLOT = PLOTS_DIR / "plan_isoflops.csv"
BYTES_PER_PARAM_TRAINING = 16  # bf16 weights + grads, fp32 master weights + two Adam moments (no activations)


@dataclass
class InferenceParams(StageParams):
    input_tokens: int = 512  # prompt tokens per request
    output_tokens: int = 128  # generated tokens per request
    usd_per_million_input: float = 0.05
    usd_per_million_output: float = 0.20


@dataclass
class ModelParams(StageParams):
    """`plan.model`: the architecture to plan for; a size set here overrides the plan's choice."""

    pos_encoding: Literal["rope", "learned", "sinusoidal"] = "rope"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    n_layer: int | None = None  # sizes: null = the plan's
    n_embd: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    mlp_hidden: int | None = None
    block_size: int | None = None  # null = plan.context_length

    SIZES = ("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden", "block_size")

    def architecture(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.SIZES}

    def sizes(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.SIZES if getattr(self, k) is not None}


@dataclass
class PlanParams(StageParams):
    flops: float | None = None  # total training FLOPs; null: peak(gpu) × gpus × hours × mfu
    gpu: str = CPU  # one of model.flops.ACCELERATOR_NAMES; "cpu" is measured on this machine
    gpus: int = 1
    hours: float = 0.05  # wall-clock training hours (the budget when flops is null)
    mfu: float = 0.3  # model FLOPs utilisation the run achieves (nanoGPT reaches ~0.4 on A100s)
    usd_per_gpu_hour: float = 0.0
    context_length: int = 256
    aspect_ratio: int = 64  # model width per layer (nanochat: 64; Kaplan found 50-100 equally good)
    head_dim: int = 64
    heads_per_kv_head: int = 1  # 1: multi-head attention; > 1: grouped-query attention
    batch_tokens: int | None = None  # tokens per optimizer step; null: a power of two giving ≥ min_steps
    min_steps: int = 200
    max_batch_tokens: int = 1 << 20
    max_epochs: float = 4.0  # warn when the plan needs more passes over the training split
    inference: InferenceParams = field(default_factory=InferenceParams)
    model: ModelParams = field(default_factory=ModelParams)  # the architecture; sizes set here override

    def validate(self, where: str = "params.yaml: plan.") -> None:
        """Raise ParamsError naming the bad value; `where` prefixes the key (a CLI passes "--")."""

        def fail(key: str, message: str) -> None:
            raise ParamsError(f"{where}{key.replace('_', '-') if where == '--' else key} {message}")

        if self.gpu not in ACCELERATOR_NAMES:
            fail("gpu", f"must be one of {', '.join(ACCELERATOR_NAMES)}; got {self.gpu!r}")
        if self.flops is not None and not self.flops > 0:
            fail("flops", f"must be > 0 (or null to use gpu × gpus × hours × mfu), got {self.flops}")
        if not self.hours > 0:
            fail("hours", f"must be > 0, got {self.hours}")
        if not 0 < self.mfu <= 1:
            fail("mfu", f"must be in (0, 1] (a fraction of peak FLOP/s), got {self.mfu}")
        if self.usd_per_gpu_hour < 0:
            fail("usd_per_gpu_hour", f"must be ≥ 0, got {self.usd_per_gpu_hour}")
        for key in ("gpus", "context_length", "aspect_ratio", "head_dim", "heads_per_kv_head", "min_steps"):
            if getattr(self, key) < 1:
                fail(key, f"must be ≥ 1, got {getattr(self, key)}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            fail("batch_tokens", f"must be ≥ 1 or null, got {self.batch_tokens}")
        if self.max_batch_tokens < self.context_length:
            fail("max_batch_tokens", f"must be ≥ context_length ({self.context_length})")
        if not self.max_epochs > 0:
            fail("max_epochs", f"must be > 0, got {self.max_epochs}")
        for key, value in dataclasses.asdict(self.inference).items():
            if value < 0:
                fail(f"inference.{key}", f"must be ≥ 0, got {value}")


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    flops: float
    gpu: str
    gpus: int
    peak_flops: float  # per device
    mfu: float
    hours: float

    @property
    def sustained_flops(self) -> float:
        return self.peak_flops * self.gpus * self.mfu


def resolve_budget(p: PlanParams, state: Path | None = None) -> Budget:
    """The budget in FLOPs and in hours, from the GPU table or this CPU's rate (remembered in `state`)."""
    peak = cpu_peak_flops(state / CPU_RATE_FILE if state else None) if p.gpu == CPU else peak_flops(p.gpu)
    sustained = peak * p.gpus * p.mfu
    if p.flops is not None:
        return Budget(p.flops, p.gpu, p.gpus, peak, p.mfu, p.flops / sustained / 3600)
    return Budget(sustained * p.hours * 3600, p.gpu, p.gpus, peak, p.mfu, p.hours)


def _batch_tokens(p: PlanParams, tokens: float, context: int) -> int:
    """Tokens per step: as set, else the largest power of two leaving ≥ min_steps steps (clamped)."""
    if p.batch_tokens is not None:
        wanted = p.batch_tokens
    else:
        wanted = 2 ** math.floor(math.log2(max(tokens / p.min_steps, 1)))
        wanted = min(max(wanted, context), p.max_batch_tokens)
    return max(1, round(wanted / context)) * context


def make_plan(
    p: PlanParams,
    model: ModelParams,
    vocab_size: int,
    train_tokens: int | None = None,
    state: Path | None = None,
) -> dict[str, Any]:
    """The whole plan as a JSON-able dict (reports/plan/plan.json); `state` keeps the CPU rate."""
    budget = resolve_budget(p, state)
    optimal = chinchilla_optimal(budget.flops)
    kaplan = kaplan_optimal(budget.flops)

    try:
        template = GPTConfig(
            vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=p.head_dim, block_size=p.context_length,
            **model.architecture(),
        )  # fmt: skip
        planned = choose_shape(optimal.params, template, p.aspect_ratio, p.head_dim, p.heads_per_kv_head)
        config = dataclasses.replace(planned, **model.sizes())
    except ValueError as err:  # e.g. an odd head_dim with rope, or sizes that do not fit together
        raise ParamsError(f"params.yaml: plan / plan.model do not make a valid model: {err}") from None
    overrides = {
        key: {"planned": getattr(planned, key), "used": value}
        for key, value in model.sizes().items()
        if getattr(planned, key) != value
    }

    counts = count_params(config)
    per_token = train_flops_per_token(config)
    context = config.block_size
    batch_tokens = _batch_tokens(p, budget.flops / per_token, context)
    steps = max(1, math.ceil(budget.flops / per_token / batch_tokens))
    tokens = steps * batch_tokens
    hours = tokens * per_token / budget.sustained_flops / 3600
    usd_per_hour = p.usd_per_gpu_hour * p.gpus

    warnings: list[str] = []
    ratio = counts.total / optimal.params
    if not 0.5 <= ratio <= 2:
        smallest = config.n_layer == 1 and not model.sizes()
        why = (
            " (the smallest shape at this vocabulary: the budget is below what it needs)" if smallest else ""
        )
        warnings.append(
            f"the model has {counts.total:,} parameters, {ratio:.1f}× the compute-optimal "
            f"{optimal.params:,.0f}{why}"
        )
    data: dict[str, Any] = {"train_tokens": train_tokens, "epochs": None, "enough": None}
    if train_tokens:
        epochs = tokens / train_tokens
        data.update(epochs=epochs, enough=epochs <= p.max_epochs, max_epochs=p.max_epochs)
        if epochs > p.max_epochs:
            limited_tokens = p.max_epochs * train_tokens
            limited_params = limited_tokens / 20  # Chinchilla's rule of thumb
            warnings.append(
                f"the plan reads the training split ({train_tokens:,} tokens) {epochs:.1f} times; beyond "
                f"~{p.max_epochs:g} epochs repeated tokens are worth much less than new ones (Muennighoff et "
                f"al. 2023). Add data, or plan for the data: {p.max_epochs:g} epochs = {limited_tokens:,.0f} "
                f"tokens suit a ~{limited_params:,.0f}-parameter model (budget "
                f"{6 * limited_params * limited_tokens:.2e} FLOPs)"
            )
    memory_gb = BYTES_PER_PARAM_TRAINING * counts.total / 1e9
    if p.gpu in ACCELERATORS and memory_gb > 0.8 * ACCELERATORS[p.gpu].memory_gb:
        warnings.append(
            f"weights, gradients and Adam state need ~{memory_gb:.0f} GB per replica, more than 80% of a "
            f"{ACCELERATORS[p.gpu].description}'s {ACCELERATORS[p.gpu].memory_gb:g} GB: shard them (FSDP)"
        )

    inference = p.inference
    prompt_flops = inference.input_tokens * forward_flops_per_token(config, context, kv_cache=True)
    output_flops = inference.output_tokens * forward_flops_per_token(config, context, kv_cache=True)
    return {
        "format": PLAN_FORMAT,
        "budget": {
            "flops": budget.flops,
            "gpu": budget.gpu,
            "gpu_description": ACCELERATORS[p.gpu].description
            if p.gpu in ACCELERATORS
            else "this machine's CPU",
            "gpus": budget.gpus,
            "peak_flops_per_gpu": budget.peak_flops,
            "mfu": budget.mfu,
            "hours": budget.hours,
            "usd_per_gpu_hour": p.usd_per_gpu_hour,
        },
        "chinchilla": {
            "params": optimal.params,
            "tokens": optimal.tokens,
            "tokens_per_param": optimal.tokens / optimal.params,
            "loss": chinchilla_loss(optimal.params, optimal.tokens),
        },
        "kaplan": {"params": kaplan.params, "tokens": kaplan.tokens},
        "model": config.to_dict(),
        "overrides": overrides,
        "params": {
            "total": counts.total,
            "non_embedding": counts.non_embedding,
            "embedding": counts.token_embedding + counts.position_embedding,
            "compute": counts.compute,
        },
        "flops_per_token": {
            "train_6n": 6 * counts.compute,
            "train": per_token,
            "forward_kv_cache": forward_flops_per_token(config, kv_cache=True),
            "forward_no_cache": forward_flops_per_token(config, kv_cache=False),
        },
        "training": {
            "tokens": tokens,
            "batch_tokens": batch_tokens,
            "batch_size": batch_tokens // context,
            "steps": steps,
            "tokens_per_param": tokens / counts.total,
            "flops": tokens * per_token,
            "hours": hours,
            "usd": hours * usd_per_hour,
            "memory_gb": memory_gb,
            "expected_loss": chinchilla_loss(counts.total, tokens),
            "expected_loss_in_fit_range": LOSS_FIT_PARAMS[0] <= counts.total <= LOSS_FIT_PARAMS[1],
        },
        "data": data,
        "inference": {
            **dataclasses.asdict(inference),
            "flops_per_request": prompt_flops + output_flops,
            "usd_per_request": (
                inference.input_tokens * inference.usd_per_million_input
                + inference.output_tokens * inference.usd_per_million_output
            )
            / 1e6,
        },
        "warnings": warnings,
    }


def buildable(plan: dict[str, Any]) -> dict[str, Any]:
    """The part of a plan that pretraining consumes: models/plan.json. Prices, time estimates and the
    inference cost stay out of it (in reports/plan/plan.json), so changing them never retrains a model."""
    training = {key: plan["training"][key] for key in ("tokens", "batch_tokens", "batch_size", "steps")}
    return {
        "format": plan["format"],
        "model": plan["model"],
        "overrides": plan["overrides"],
        "training": training,
        "train_flops_per_token": plan["flops_per_token"]["train"],
    }


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
        ("parameters", f"{counts['total']:,} total, {counts['non_embedding']:,} non-embedding"),
        (
            "FLOPs per token",
            f"train {per_token['train']:,} (6N = {per_token['train_6n']:,}); generate "
            f"{per_token['forward_kv_cache']:,} with KV cache, {per_token['forward_no_cache']:,} without",
        ),
        (
            "training",
            f"{train['tokens']:,} tokens = {train['steps']:,} steps × {train['batch_size']} sequences × "
            f"{model['block_size']} ({train['tokens_per_param']:.1f} tokens/param)",
        ),
        (
            "wall time and cost",
            f"{train['hours']:.3g} h, ${train['usd']:,.2f}; ~{train['memory_gb']:.2g} GB for weights + Adam",
        ),
        (
            "expected loss",
            f"{train['expected_loss']:.3f} nats/token (Chinchilla fit: {trust})",
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


def read_token_meta(root: Path) -> dict[str, Any] | None:
    path = root / TOKENS_DIR / "meta.json"
    return read_json(path) if path.is_file() else None


def run(params: PlanParams, root: Path) -> dict[str, int | float]:
    """Read data/tokens/meta.json + params (plan, plan.model), write models/plan.json and reports."""
    root = Path(root)
    meta = read_token_meta(root)
    if meta is None:
        raise FileNotFoundError(
            f"{root / TOKENS_DIR / 'meta.json'}: no token shards (run the tokenize stage)"
        )
    train_tokens = meta["splits"]["train"]["tokens"]
    plan = make_plan(params, params.model, meta["vocab_size"], train_tokens, state_dir(root))
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
        "expected_loss": round(plan["training"]["expected_loss"], 4),
        "warnings": len(plan["warnings"]),
    }

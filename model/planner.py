"""The training plan's maths: from a compute budget, the model shape and token budget to train with.

1. The budget: total training FLOPs (`flops`), or GPU type × count × hours × MFU (peak dense bf16
   FLOP/s from model.flops.ACCELERATORS; "cpu" is measured with a quick matmul on this machine).
2. The compute-optimal split of that budget (model.scaling): Chinchilla's N_opt and D_opt, with Kaplan's
   allocation beside it for contrast.
3. A buildable model: the depth (width = aspect_ratio × depth) that spends the budget on
   `tokens_per_param` tokens per non-embedding parameter (model.scaling.choose_shape), with the
   architecture of `model` (positional encoding, norm, MLP, tying... change the count, so the plan
   uses them); any size set there (n_layer, n_embd, ...) overrides the plan's and is recorded under
   `overrides`. The token budget is what the budget buys for that model at the fuller FLOPs-per-token
   count, split into a batch size (power of two, at least `min_steps` steps) and a step count.
4. Wall time, dollars, the Chinchilla fit's loss estimate, and whether the training split has enough
   tokens: epochs needed, with a warning above `max_epochs`.
5. Inference: FLOPs and dollars per request at the given token counts and prices.

With a pretrained base (`base`), the shape is the base's and the budget buys continued pretraining:
the same token budget, batch and steps for that fixed model, on sequences of `context_length` tokens
(at most the base's own context), with the Chinchilla optimum kept for contrast.

Pure (stdlib + model.config/flops/scaling), so a notebook plans without the pipeline. The settings are
defined here once (type, default, check); the `plan` stage (tasks/plan.py) reads them from params.yaml.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from model.scaling import LOSS_FIT_PARAMS, chinchilla_loss, chinchilla_optimal, choose_shape, kaplan_optimal

PLAN_FORMAT = 1
BYTES_PER_PARAM_TRAINING = 16  # bf16 weights + grads, fp32 master weights + two Adam moments (no activations)
#: The GPTConfig sizes the plan chooses; one set in the model settings overrides the plan's choice.
PLANNED_SIZES = ("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden", "block_size")


class InvalidSetting(ValueError):
    """A setting the planner cannot use. `key` names it (`gpu`, `inference.input_tokens`, `model`) so that
    the caller can name it the way its user spelled it: a params.yaml key or a command-line option."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key = key
        self.problem = problem


def _model_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, default) of ModelSettings' fields: GPTConfig's, the planned sizes made optional."""
    hints = typing.get_type_hints(GPTConfig)
    return [
        (f.name, hints[f.name] | None, field(default=None))
        if f.name in PLANNED_SIZES
        else (f.name, hints[f.name], field(default=f.default))
        for f in dataclasses.fields(GPTConfig)
        if f.name != "vocab_size"
    ]


#: GPTConfig's fields as settings, made at run time (typed Any: mypy cannot see fields made then).
_ModelFields: Any = dataclasses.make_dataclass("_ModelFields", _model_fields())


@dataclass
class ModelSettings(_ModelFields):
    """The architecture to plan for, derived from GPTConfig rather than copied: each field of GPTConfig
    but vocab_size is a setting with GPTConfig's type, allowed values and default, sizes None meaning the
    plan's choice; GPTConfig validates the result."""


def given_sizes(model: ModelSettings) -> dict[str, Any]:
    """The sizes a ModelSettings sets (to override the plan's)."""
    return {key: getattr(model, key) for key in PLANNED_SIZES if getattr(model, key) is not None}


@dataclass
class InferenceSettings:
    """What one request to the trained model costs."""

    input_tokens: int = 512  # prompt tokens per request
    output_tokens: int = 128  # generated tokens per request
    usd_per_million_input: float = 0.05
    usd_per_million_output: float = 0.20


@dataclass
class PlanSettings:
    """The plan's numbers; checked when built (InvalidSetting). The model is checked by GPTConfig once the
    plan has shaped it (`make_plan`), since whether it builds depends on the shape."""

    flops: float | None = None  # total training FLOPs; None: peak(gpu) × gpus × hours × mfu
    gpu: str = CPU  # one of model.flops.ACCELERATOR_NAMES; "cpu" is measured on this machine
    gpus: int = 1
    hours: float = 0.05  # wall-clock training hours (the budget when flops is None)
    mfu: float = 0.3  # model FLOPs utilisation the run achieves (nanoGPT reaches ~0.4 on A100s)
    usd_per_gpu_hour: float = 0.0
    context_length: int = 256
    aspect_ratio: int = 64  # model width per layer (nanochat: 64; Kaplan found 50-100 equally good)
    tokens_per_param: float = 20.0  # training tokens per non-embedding parameter that set the depth
    head_dim: int = 64
    heads_per_kv_head: int = 1  # 1: multi-head attention; > 1: grouped-query attention
    batch_tokens: int | None = None  # tokens per optimizer step; None: a power of two giving ≥ min_steps
    min_steps: int = 200
    max_batch_tokens: int = 1 << 20
    max_epochs: float = 4.0  # warn when the plan needs more passes over the training split
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    model: ModelSettings = field(default_factory=ModelSettings)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise InvalidSetting naming the first setting out of range."""
        if self.gpu not in ACCELERATOR_NAMES:
            raise InvalidSetting("gpu", f"must be one of {', '.join(ACCELERATOR_NAMES)}; got {self.gpu!r}")
        if self.flops is not None and not self.flops > 0:
            raise InvalidSetting(
                "flops", f"must be > 0 (or null to use gpu × gpus × hours × mfu), got {self.flops}"
            )
        if not self.hours > 0:
            raise InvalidSetting("hours", f"must be > 0, got {self.hours}")
        if not 0 < self.mfu <= 1:
            raise InvalidSetting("mfu", f"must be in (0, 1] (a fraction of peak FLOP/s), got {self.mfu}")
        if self.usd_per_gpu_hour < 0:
            raise InvalidSetting("usd_per_gpu_hour", f"must be ≥ 0, got {self.usd_per_gpu_hour}")
        if not self.tokens_per_param > 0:
            raise InvalidSetting("tokens_per_param", f"must be > 0, got {self.tokens_per_param}")
        for key in ("gpus", "context_length", "aspect_ratio", "head_dim", "heads_per_kv_head", "min_steps"):
            if getattr(self, key) < 1:
                raise InvalidSetting(key, f"must be ≥ 1, got {getattr(self, key)}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise InvalidSetting("batch_tokens", f"must be ≥ 1 or null, got {self.batch_tokens}")
        if self.max_batch_tokens < self.context_length:
            raise InvalidSetting("max_batch_tokens", f"must be ≥ context_length ({self.context_length})")
        if not self.max_epochs > 0:
            raise InvalidSetting("max_epochs", f"must be > 0, got {self.max_epochs}")
        for key, value in dataclasses.asdict(self.inference).items():
            if value < 0:
                raise InvalidSetting(f"inference.{key}", f"must be ≥ 0, got {value}")


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


def resolve_budget(p: PlanSettings, cpu_rate_file: Path | None = None) -> Budget:
    """The budget in FLOPs and in hours, from the GPU table or this CPU's rate (remembered in the file)."""
    peak = cpu_peak_flops(cpu_rate_file) if p.gpu == CPU else peak_flops(p.gpu)
    sustained = peak * p.gpus * p.mfu
    if p.flops is not None:
        return Budget(p.flops, p.gpu, p.gpus, peak, p.mfu, p.flops / sustained / 3600)
    return Budget(sustained * p.hours * 3600, p.gpu, p.gpus, peak, p.mfu, p.hours)


def _batch_tokens(p: PlanSettings, tokens: float, context: int) -> int:
    """Tokens per step: as set, else the largest power of two leaving ≥ min_steps steps (clamped)."""
    if p.batch_tokens is not None:
        wanted = p.batch_tokens
    else:
        wanted = 2 ** math.floor(math.log2(max(tokens / p.min_steps, 1)))
        wanted = min(max(wanted, context), p.max_batch_tokens)
    return max(1, round(wanted / context)) * context


def shape_model(p: PlanSettings, vocab_size: int, flops: float) -> tuple[GPTConfig, GPTConfig]:
    """(planned, used): the depth whose model spends `flops` on tokens_per_param tokens per non-embedding
    parameter, with the settings' architecture (model.scaling.choose_shape), and that shape with the sizes
    the settings give. InvalidSetting("model") when GPTConfig rejects either."""
    given = dataclasses.asdict(p.model)
    architecture = {key: value for key, value in given.items() if key not in PLANNED_SIZES}
    try:
        template = GPTConfig(
            vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=p.head_dim, block_size=p.context_length,
            **architecture,
        )  # fmt: skip
        planned = choose_shape(
            flops, template, p.tokens_per_param, p.aspect_ratio, p.head_dim, p.heads_per_kv_head
        )
        return planned, dataclasses.replace(planned, **given_sizes(p.model))
    except ValueError as err:  # e.g. an odd head_dim with rope, or sizes that do not fit together
        raise InvalidSetting("model", f"does not make a valid model with this plan: {err}") from None


def make_plan(
    p: PlanSettings,
    vocab_size: int,
    train_tokens: int | None = None,
    cpu_rate_file: Path | None = None,
    base: GPTConfig | None = None,
) -> dict[str, Any]:
    """The whole plan as a JSON-able dict; `cpu_rate_file` remembers this machine's measured FLOP/s.
    With `base` (a pretrained model's config) the model is that one and the plan is continued pretraining."""
    budget = resolve_budget(p, cpu_rate_file)
    optimal = chinchilla_optimal(budget.flops)
    kaplan = kaplan_optimal(budget.flops)
    warnings: list[str] = []
    if base is None:
        planned, config = shape_model(p, vocab_size, budget.flops)
        overrides = {
            key: {"planned": getattr(planned, key), "used": value}
            for key, value in given_sizes(p.model).items()
            if getattr(planned, key) != value
        }
        context = config.block_size
    else:
        if base.vocab_size != vocab_size:
            raise InvalidSetting(
                "model", f"the base's vocabulary ({base.vocab_size}) differs from the data's ({vocab_size})"
            )
        config, overrides, context = base, {}, min(p.context_length, base.block_size)
        if given_sizes(p.model):
            warnings.append(f"plan.model sizes {given_sizes(p.model)} are ignored: the base's shape is fixed")

    counts = count_params(config)
    per_token = train_flops_per_token(config, context=context)
    batch_tokens = _batch_tokens(p, budget.flops / per_token, context)
    steps = max(1, math.ceil(budget.flops / per_token / batch_tokens))
    tokens = steps * batch_tokens
    hours = tokens * per_token / budget.sustained_flops / 3600
    usd_per_hour = p.usd_per_gpu_hour * p.gpus

    if base is None and config.n_layer == 1 and not given_sizes(p.model):
        needs = p.tokens_per_param * counts.non_embedding * per_token
        if budget.flops < needs / 2:
            warnings.append(
                f"the budget ({budget.flops:.2e} FLOPs) is below what the smallest shape needs for "
                f"{p.tokens_per_param:g} tokens per parameter ({needs:.2e}): it trains under-fed"
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
            # the vocabulary's share: its embedding and (untied) head; a small model's is most of it
            "embedding_share": (counts.token_embedding + counts.lm_head) / counts.total,
        },
        "flops_per_token": {
            "train_6n": 6 * counts.compute,
            "train": per_token,
            "forward_kv_cache": forward_flops_per_token(config, kv_cache=True),
            "forward_no_cache": forward_flops_per_token(config, kv_cache=False),
        },
        "training": {
            "continued": base is not None,  # continued pretraining of a pretrained base
            "seq_len": context,
            "tokens": tokens,
            "batch_tokens": batch_tokens,
            "batch_size": batch_tokens // context,
            "steps": steps,
            "tokens_per_param": tokens / counts.total,
            "tokens_per_non_embedding_param": tokens / counts.non_embedding,
            "flops": tokens * per_token,
            "hours": hours,
            "usd": hours * usd_per_hour,
            "memory_gb": memory_gb,
            # Chinchilla's L(N, D) describes training from scratch on D tokens: no prediction for a base
            # that has already seen far more than this budget's tokens.
            "expected_loss": None if base else chinchilla_loss(counts.total, tokens),
            "expected_loss_in_fit_range": base is None
            and LOSS_FIT_PARAMS[0] <= counts.total <= LOSS_FIT_PARAMS[1],
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
    """The part of a plan that pretraining consumes (models/plan.json). Prices, time estimates and the
    inference cost stay out of it, so changing them never retrains a model."""
    keys = ("continued", "seq_len", "tokens", "batch_tokens", "batch_size", "steps")
    training = {key: plan["training"][key] for key in keys}
    return {
        "format": plan["format"],
        "model": plan["model"],
        "overrides": plan["overrides"],
        "training": training,
        "train_flops_per_token": plan["flops_per_token"]["train"],
    }

"""Stage `finetune`: adapt the pretrained model (models/base/) with LoRA; optionally compare strategies.

Tasks (`finetune.task`):
- `domain`: continued causal-LM training on the domain corpus (data/domain/, the `domain` stage), each
  batch row drawn from the general corpus instead with probability `general_fraction` (replay).
- `sft`: prompt/response pairs from JSONL, rendered with the chat template (model/chat.py); the loss
  is taken on the response tokens (and its closing <|eos|>) only. Bad rows are quarantined with a reason.

Strategies, on the same data, steps and batches: `lora` (model/lora.py: only the adapters train), and
with `compare: true` also `last_layer` (the last block and the final norm; the tied head is the
embedding, so it stays frozen) and `full` (everything). Each reports trainable parameters, training-state
memory (weights + gradients + AdamW moments; measured peak on CUDA), time, the task's validation loss and
the general corpus' validation loss (forgetting = how much the latter rose). All train through
model/train.py (checkpoints in .llmpipe/checkpoints/finetune/<strategy>/, resumable).

Outputs: models/lora/ (the LoRA adapter in peft's format, loadable with PeftModel.from_pretrained on
models/base/hf, plus the tokenizer), reports/finetune/ (comparison.md/png, loss.png, samples.md,
quarantine.jsonl), plots/finetune_*.csv. In MLflow the adapter is the `adapter` artifact, and the run
is tagged with the MLflow run id of the pretrain run that produced the base weights.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from model import chat
from model.data import ExampleBatches, MixedBatches, TokenShards
from model.lora import LoraSettings, add_lora, lora_param_count, save_adapter
from model.tokens import TOKENIZER_FILE, load_tokenizer
from model.train import TrainResult, evaluate, load_checkpoint, setup_runtime, train
from tasks.core import tracking
from tasks.core.io import atomic_dir, atomic_file, file_md5, hash_fraction, read_json
from tasks.core.layout import BASE_DIR, DOMAIN_DIR, LORA_DIR, PLOTS_DIR, REPORTS_DIR, TOKENS_DIR, state_dir
from tasks.core.params import ParamsError, StageParams
from tasks.pretrain import LoopParams, StageCallbacks, copy_tokenizer, weight_settings

REPORT_DIR = REPORTS_DIR / "finetune"
LOSS_PLOT = PLOTS_DIR / "finetune_loss.csv"
COMPARISON_PLOT = PLOTS_DIR / "finetune_comparison.csv"
CHECKPOINTS = Path("checkpoints/finetune")  # under .llmpipe/
STRATEGIES = ("lora", "last_layer", "full")
BASE_RUN_TAG = "llmpipe.base_run_id"


@dataclass
class LoraParams(StageParams):
    r: int = 8  # rank of each adapter
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    lr: float = 0.003  # LoRA's learning rate (adapters take a larger one than full fine-tuning)

    def settings(self) -> LoraSettings:
        return LoraSettings(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=tuple(self.targets))


@dataclass
class FinetuneParams(LoopParams):
    task: Literal["domain", "sft"] = "domain"
    general_fraction: float = 0.0  # domain: share of batch rows drawn from the general corpus (replay)
    sft_path: str = "corpus/sft/jargon_sft.jsonl"  # sft: JSONL with a prompt and a response per line
    sft_prompt_field: str = "prompt"
    sft_response_field: str = "response"
    sft_system_prompt: str | None = None  # sft: a system turn before every prompt
    sft_val_fraction: float = 0.1  # sft: share of pairs held out (hash of seed:prompt)
    lora: LoraParams = field(default_factory=LoraParams)
    compare: bool = True  # also train last_layer and full on the same data and steps, and compare
    steps: int = 100
    batch_size: int = 16
    lr: float = 3e-4  # full and last_layer fine-tuning (LoRA uses lora.lr)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 10
    checkpoint_every: int = 50
    sample_prompts: list[str] = field(
        default_factory=lambda: ["What does “kludge” mean in hacker jargon?", "A hacker is"]
    )
    log_model: bool = True  # copy models/lora/ into the MLflow run's artifacts (as `adapter`)

    def validate(self) -> None:
        if not 0 <= self.general_fraction <= 1:
            raise ParamsError(
                f"params.yaml: finetune.general_fraction must be in [0, 1], got {self.general_fraction}"
            )
        if not 0 < self.sft_val_fraction < 1:
            raise ParamsError(
                f"params.yaml: finetune.sft_val_fraction must be in (0, 1), got {self.sft_val_fraction}"
            )
        if self.lora.lr <= 0:
            raise ParamsError(f"params.yaml: finetune.lora.lr must be > 0, got {self.lora.lr}")
        try:
            self.loop_config(self.steps, self.batch_size).validate()
            self.lora.settings().check_numbers()
        except ValueError as err:
            raise ParamsError(f"params.yaml: finetune.{err}") from None

    def strategies(self) -> tuple[str, ...]:
        return STRATEGIES if self.compare else ("lora",)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    train: Any  # a model.train.Batches source
    val: Any
    info: dict[str, int | float]  # what was read (counts for the metrics)
    md5: str  # of the data files: part of the checkpoint fingerprint
    quarantine: list[dict[str, Any]] = field(default_factory=list)  # rows that could not be used, why


def domain_data(root: Path, params: FinetuneParams, tokenizer_md5: str, context: int) -> TaskData:
    tokens = root / DOMAIN_DIR / TOKENS_DIR
    train_split, val_split = TokenShards(tokens, "train"), TokenShards(tokens, "val")
    for split in (train_split, val_split):
        if len(split) <= context:
            raise ValueError(
                f"{tokens}: the domain {split.split} split has {len(split)} tokens, fewer than the model's "
                f"context + 1 ({context + 1}): add domain text or raise domain.val_fraction"
            )
    if train_split.meta["tokenizer_md5"] != tokenizer_md5:
        raise ValueError(
            f"{tokens} was encoded with another tokenizer than models/base/: rerun the `domain` stage"
        )
    source: Any = train_split
    if params.general_fraction > 0:
        source = MixedBatches(train_split, TokenShards(root / TOKENS_DIR, "train"), params.general_fraction)
    info = {"train_tokens": len(train_split), "val_tokens": len(val_split)}
    return TaskData(source, val_split, info, file_md5(tokens / "meta.json"))


def sft_data(root: Path, params: FinetuneParams, tokenizer: Any, context: int, pad_id: int) -> TaskData:
    """Encode the pairs with the chat template; quarantine rows that cannot be used, with the reason."""
    path = root / params.sft_path
    if not path.is_file():
        raise FileNotFoundError(f"params.yaml: finetune.sft_path: {path} does not exist")
    splits: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "val": []}
    quarantine: list[dict[str, Any]] = []
    truncated = 0
    system = [{"role": "system", "content": params.sft_system_prompt}] if params.sft_system_prompt else []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            reason, pair = _parse_pair(raw, params)
            if pair is not None:
                messages = [
                    *system,
                    {"role": "user", "content": pair[0]},
                    {"role": "assistant", "content": pair[1]},
                ]
                ids, mask = chat.encode(tokenizer, messages)
                if int(np.argmax(mask)) >= context:  # the first learned token lies beyond the context
                    reason = f"the prompt alone exceeds the context ({context} tokens)"
            if reason:
                quarantine.append(
                    {"line": number, "reason": reason, "raw": raw[:1000].decode("utf-8", "replace")}
                )
                continue
            if pair is None:
                continue  # a blank line
            truncated += len(ids) > context + 1
            split = "val" if hash_fraction(params.seed, pair[0]) < params.sft_val_fraction else "train"
            splits[split].append((ids, mask))
    if not splits["train"] or not splits["val"]:
        examples = "; ".join(f"line {row['line']}: {row['reason']}" for row in quarantine[:3])
        raise ValueError(
            f"{path}: {len(splits['train'])} training and {len(splits['val'])} validation pairs after "
            f"skipping {len(quarantine)} unusable rows{' (' + examples + ')' if examples else ''}; need both"
        )
    info = {
        "train_pairs": len(splits["train"]),
        "val_pairs": len(splits["val"]),
        "quarantined_pairs": len(quarantine),
        "truncated_pairs": truncated,
    }
    train_batches, val_batches = (
        ExampleBatches(splits["train"], pad_id),
        ExampleBatches(splits["val"], pad_id),
    )
    return TaskData(train_batches, val_batches, info, file_md5(path), quarantine)


def _parse_pair(raw: bytes, params: FinetuneParams) -> tuple[str, tuple[str, str] | None]:
    """(reason, None) for a bad row, ("", (prompt, response)) for a good one, ("", None) for a blank line."""
    if not raw.strip():
        return "", None
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"not UTF-8: {err.reason} at byte {err.start}", None
    except json.JSONDecodeError as err:
        return f"malformed JSON: {err.msg} (column {err.colno})", None
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}", None
    values = []
    for key in (params.sft_prompt_field, params.sft_response_field):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"field {key!r} is missing, empty or not a string", None
        values.append(value)
    return "", (values[0], values[1])


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------


def prepare(model: Any, strategy: str, lora: LoraSettings) -> Any:
    """Make exactly the parameters `strategy` trains require grad (LoRA adds its adapters)."""
    if strategy == "lora":
        return add_lora(model, lora)
    for parameter in model.parameters():
        parameter.requires_grad = strategy == "full"
    if strategy == "last_layer":
        for parameter in [*model.blocks[-1].parameters(), *model.norm.parameters()]:
            parameter.requires_grad = True
    return model


def trainable_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_megabytes(model: Any) -> float:
    """Weights + gradients + AdamW's two moments of the trainable parameters (fp32), in MB."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (weights + 3 * 4 * trainable_params(model)) / 1e6


def fingerprint(strategy: str, cfg: Any, params: FinetuneParams, base_md5: str, data_md5: str) -> str:
    blob = json.dumps(
        {
            "strategy": strategy,
            "loop": weight_settings(cfg),  # eval/checkpoint frequencies change no weights: still resume
            "task": params.task,
            "lora": asdict(params.lora),
            "general_fraction": params.general_fraction,
            "base": base_md5,
            "data": data_md5,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Outcome:
    strategy: str
    model: Any
    result: TrainResult
    callbacks: StageCallbacks
    row: dict[str, Any]


def run(params: FinetuneParams, root: Path) -> dict[str, Any]:
    """Read models/base/ + the task's data, train each strategy, write models/lora/ and the reports."""
    import torch

    root = Path(root)
    base = load_checkpoint(root / BASE_DIR)
    lora = params.lora.settings()
    try:
        lora.validate(base.config)
    except ValueError as err:
        raise ParamsError(f"params.yaml: finetune.lora: {err}") from None
    tokenizer = load_tokenizer(root / BASE_DIR)
    base_md5 = file_md5(root / BASE_DIR / "model.safetensors")
    if params.task == "domain":
        data = domain_data(root, params, file_md5(root / BASE_DIR / TOKENIZER_FILE), base.config.block_size)
    else:
        pad_id = tokenizer.token_to_id("<|pad|>")
        pad_id = chat.special_ids(tokenizer)["eos"] if pad_id is None else pad_id
        data = sft_data(root, params, tokenizer, base.config.block_size, pad_id)
    general_val: TokenShards | None = TokenShards(root / TOKENS_DIR, "val")
    eos_id = general_val.eos_id
    if len(general_val) <= base.config.block_size:
        general_val = None  # too little general validation text to measure forgetting: reported absent
    prompts = [_prompt_ids(tokenizer, text, params.task) for text in params.sample_prompts]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731

    probe = params.loop_config(params.steps, params.batch_size)
    runtime = setup_runtime(probe.device)
    base.to(runtime.device)
    base_row = {"val_loss": evaluate(base, data.val, probe, runtime)}
    if general_val is not None:
        base_row["general_val_loss"] = evaluate(base, general_val, probe, runtime)
    outcomes: list[Outcome] = []
    for strategy in params.strategies():
        torch.manual_seed(params.seed)
        model = prepare(copy.deepcopy(base), strategy, lora)
        lr = params.lora.lr if strategy == "lora" else params.lr
        cfg = params.loop_config(params.steps, params.batch_size, lr=lr)
        callbacks = StageCallbacks(decode, prefix=f"{strategy}/")
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        result = train(
            model,
            data.train,
            data.val,
            cfg,
            checkpoints=state_dir(root) / CHECKPOINTS / strategy,
            fingerprint=fingerprint(strategy, cfg, params, base_md5, data.md5),
            callbacks=callbacks,
            sample_prompts=prompts if strategy == "lora" else None,
            eos_id=eos_id,
            label=f"finetune {strategy}",
        )
        callbacks.stream.flush()
        trainable = trainable_params(model)
        row = {
            "trainable_params": trainable,
            "trainable_percent": round(100 * trainable / base.num_params(), 3),
            "state_mb": round(state_megabytes(model), 3),
            "seconds": round(result.seconds, 2),
            "val_loss": round(result.val_loss, 5),  # the final evaluation: the same batches as the base's
        }
        if general_val is not None:
            row["general_val_loss"] = round(evaluate(model, general_val, cfg, runtime), 5)
            row["forgetting"] = round(row["general_val_loss"] - base_row["general_val_loss"], 5)
        if runtime.device.type == "cuda":
            row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(runtime.device) / 1e6, 1)
        if strategy == "lora":
            row["closed_form_params"] = lora_param_count(base.config, lora)
        outcomes.append(Outcome(strategy, model, result, callbacks, row))

    lora_outcome = outcomes[0]
    _save_lora(root, lora_outcome.model.cpu(), lora)
    _write_reports(root, outcomes, base_row, params, data.quarantine)
    base_run = (
        read_json(root / BASE_DIR / "run.json").get("mlflow_run_id")
        if (root / BASE_DIR / "run.json").is_file()
        else None
    )
    if base_run:
        tracking.set_tags({BASE_RUN_TAG: base_run})
    if params.log_model:
        tracking.log_artifacts(root / LORA_DIR, "adapter")
    return {
        "task": params.task,
        **data.info,
        "steps": params.steps,
        **{f"base_{key}": round(value, 5) for key, value in base_row.items()},
        **lora_outcome.row,
        "adapter_bytes": (root / LORA_DIR / "adapter_model.safetensors").stat().st_size,
        "compare": {outcome.strategy: outcome.row for outcome in outcomes},
    }


def _prompt_ids(tokenizer: Any, text: str, task: str) -> list[int]:
    """A sample prompt: plain text for `domain`, a user turn + generation prompt for `sft`."""
    if task == "sft":
        return chat.encode(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)[
            0
        ].tolist()
    return tokenizer.encode(text, add_special_tokens=False).ids


def _save_lora(root: Path, model: Any, lora: LoraSettings) -> None:
    base_model = str(BASE_DIR / "hf") if (root / BASE_DIR / "hf").is_dir() else str(BASE_DIR)
    with atomic_dir(root / LORA_DIR) as out:
        save_adapter(model, lora, out, base_model=base_model)
        copy_tokenizer(root / BASE_DIR, out)


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------

COLUMNS = (
    "strategy",
    "trainable_params",
    "trainable_percent",
    "state_mb",
    "seconds",
    "val_loss",
    "general_val_loss",
    "forgetting",
)


def comparison_table(outcomes: list[Outcome], base_row: dict[str, float]) -> list[dict[str, Any]]:
    rows = [
        {
            "strategy": "base (no fine-tuning)",
            "trainable_params": 0,
            "trainable_percent": 0.0,
            "state_mb": "",
            "seconds": "",
            "val_loss": round(base_row["val_loss"], 5),
            "general_val_loss": round(base_row["general_val_loss"], 5)
            if "general_val_loss" in base_row
            else "",
            "forgetting": 0.0 if "general_val_loss" in base_row else "",
        }
    ]
    rows += [{"strategy": o.strategy} | {key: o.row.get(key, "") for key in COLUMNS[1:]} for o in outcomes]
    return rows


def _write_reports(
    root: Path,
    outcomes: list[Outcome],
    base_row: dict[str, float],
    params: FinetuneParams,
    quarantine: list[dict[str, Any]],
) -> None:
    table = comparison_table(outcomes, base_row)
    with atomic_file(root / COMPARISON_PLOT) as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    # One column per strategy, blank where it has no value (not compared, or steps a resumed run skipped),
    # so dvc.yaml's plot always finds its fields.
    ran = {o.strategy: o for o in outcomes}
    losses = [
        {int(h["step"]): h["loss"] for h in ran[name].result.history} if name in ran else {}
        for name in STRATEGIES
    ]
    with atomic_file(root / LOSS_PLOT) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["step", *(f"{name}_loss" for name in STRATEGIES)])
        for step in sorted(set().union(*losses)):
            writer.writerow(
                [step, *(f"{by_step[step]:.5f}" if step in by_step else "" for by_step in losses)]
            )
    tracking.log_table(table, "finetune_comparison.json")
    with atomic_dir(root / REPORT_DIR) as out:
        _write_report_files(out, outcomes, table, base_row, params, quarantine)


def _write_report_files(
    out: Path,
    outcomes: list[Outcome],
    table: list[dict[str, Any]],
    base_row: dict[str, float],
    params: FinetuneParams,
    quarantine: list[dict[str, Any]],
) -> None:
    from matplotlib.figure import Figure

    with open(out / "quarantine.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in quarantine)
    lines = [
        f"# Fine-tuning strategies ({params.task}, {params.steps} steps × {params.batch_size})",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in table]
    lines += [
        "",
        "val_loss: the task's validation split; general_val_loss: the pretraining corpus' validation",
        "split; forgetting: how much the latter rose; state_mb: weights + gradients + AdamW moments.",
    ]
    (out / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    names = [o.strategy for o in outcomes]
    left.bar(names, [o.row["trainable_percent"] for o in outcomes], color="tab:blue")
    left.set(ylabel="trainable parameters (%)", yscale="log", title="what each strategy trains")
    width, x = 0.38, np.arange(len(names) + 1)
    labels = ["base", *names]
    right.bar(
        x - width / 2, [base_row["val_loss"], *(o.row["val_loss"] for o in outcomes)], width, label="task val"
    )
    if "general_val_loss" in base_row:
        right.bar(
            x + width / 2,
            [base_row["general_val_loss"], *(o.row["general_val_loss"] for o in outcomes)],
            width,
            label="general val",
        )
    right.set_xticks(x, labels)
    right.set(ylabel="loss (nats/token)", title="validation loss")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for o in outcomes:
        ax.plot(
            [h["step"] for h in o.result.history],
            [h["loss"] for h in o.result.history],
            label=o.strategy,
            alpha=0.8,
        )
    ax.axhline(base_row["val_loss"], color="grey", linestyle="--", label="base model, task val")
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title=f"fine-tuning loss ({params.task})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)

    samples = ["# Samples from the LoRA model", ""]
    for step, texts in outcomes[0].callbacks.samples:
        samples += [f"## step {step}", ""]
        samples += [f"- **{p!r}** → {t!r}" for p, t in zip(params.sample_prompts, texts, strict=True)]
        samples.append("")
    (out / "samples.md").write_text("\n".join(samples), encoding="utf-8")

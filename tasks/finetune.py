"""Stage `finetune`: adapt the pretrained model (models/base/) with LoRA; optionally compare strategies.

Tasks (`finetune.task`; the data is read by tasks/data/finetuning.py):
- `domain`: continued causal-LM training on the domain corpus (data/domain/, the `domain` stage), each
  batch row drawn from the general corpus instead with probability `general_fraction` (replay).
- `sft`: prompt/response pairs from JSONL, rendered with the base's chat template (model/chat.py); the
  loss is taken on the response tokens (and the token closing the turn) only. Bad rows are quarantined
  with a reason.

Strategies (tasks/core/strategies.py), on the same data, steps and batches: `lora` (model/lora.py: only
the adapters train), and with `compare: true` also `last_layer` (the last block and the final norm) and
`full` (everything). Each reports trainable parameters, training-state memory (weights + gradients +
AdamW moments; measured peak on CUDA), time, the task's validation loss and the general corpus'
validation loss (forgetting = how much the latter rose). All train through model/train.py (checkpoints
in .llmpipe/checkpoints/finetune/<strategy>/, resumable).

Outputs: models/lora/ (the LoRA adapter in peft's format, loadable with PeftModel.from_pretrained on
models/base/hf, plus the tokenizer), reports/finetune/ (comparison.md/png, loss.png, samples.md,
quarantine.jsonl), plots/finetune_*.csv. In MLflow the adapter is the `adapter` artifact, and the run
is tagged with the MLflow run id of the pretrain run that produced the base weights.
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from model.chat import ChatTemplate
from model.checkpoint import load_checkpoint
from model.data import TokenShards
from model.lora import LoraSettings, lora_param_count, save_adapter
from model.runtime import setup_runtime
from model.tokens import TOKENIZER_FILE, SpecialTokens, load_tokenizer, special_tokens
from model.train import LoopSettings, TrainConfig, evaluate, train
from tasks.core import tracking
from tasks.core.io import atomic_dir, atomic_file, file_md5, read_json
from tasks.core.layout import BASE_DIR, LORA_DIR, PLOTS_DIR, REPORTS_DIR, TOKENS_DIR, state_dir
from tasks.core.params import ParamsError, StageParams, setting_errors
from tasks.core.strategies import (
    COLUMNS,
    STRATEGIES,
    Outcome,
    comparison_figure,
    comparison_markdown,
    comparison_table,
    loss_figure,
    loss_rows,
    prepare,
    state_megabytes,
    trainable_params,
)
from tasks.core.training import StageCallbacks, copy_tokenizer, fingerprint
from tasks.data.finetuning import TaskData, domain_data, sft_data

REPORT_DIR = REPORTS_DIR / "finetune"
LOSS_PLOT = PLOTS_DIR / "finetune_loss.csv"
COMPARISON_PLOT = PLOTS_DIR / "finetune_comparison.csv"
CHECKPOINTS = Path("checkpoints/finetune")  # under .llmpipe/
BASE_RUN_TAG = "llmpipe.base_run_id"


@dataclass(frozen=True)
class LoraParams(StageParams, LoraSettings):
    """params.yaml `finetune.lora`: the adapter (types, defaults and checks in model/lora.py's
    LoraSettings) and its learning rate. The targets are checked against the base model in `run`."""

    lr: float = 0.003  # LoRA's learning rate (adapters take a larger one than full fine-tuning)

    def validate(self) -> None:
        with setting_errors("finetune.lora", separator=": "):
            LoraSettings.validate(self)
        if self.lr <= 0:
            raise ParamsError(f"params.yaml: finetune.lora.lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class FinetuneParams(StageParams, LoopSettings):
    """params.yaml `finetune`: the task and strategies, and the loop's settings (model/train.py's
    LoopSettings) with fine-tuning's own defaults for some (the last block below)."""

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
    sample_prompts: list[str] = field(
        default_factory=lambda: ["What does “kludge” mean in hacker jargon?", "A hacker is"]
    )
    log_model: bool = True  # copy models/lora/ into the MLflow run's artifacts (as `adapter`)
    # Fine-tuning's defaults for loop settings: a 100-step run from trained weights.
    lr: float = 3e-4  # full and last_layer fine-tuning (LoRA uses lora.lr)
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 10
    checkpoint_every: int = 50

    def validate(self) -> None:
        if not 0 <= self.general_fraction <= 1:
            raise ParamsError(
                f"params.yaml: finetune.general_fraction must be in [0, 1], got {self.general_fraction}"
            )
        if not 0 < self.sft_val_fraction < 1:
            raise ParamsError(
                f"params.yaml: finetune.sft_val_fraction must be in (0, 1), got {self.sft_val_fraction}"
            )
        with setting_errors("finetune"):
            self.for_run(self.steps, self.batch_size).validate()

    def train_config(self, strategy: str) -> TrainConfig:
        """The loop's config for `strategy`: LoRA trains at lora.lr, the others at lr."""
        cfg = self.for_run(self.steps, self.batch_size)
        return replace(cfg, lr=self.lora.lr) if strategy == "lora" else cfg

    def strategies(self) -> tuple[str, ...]:
        return STRATEGIES if self.compare else ("lora",)


def run(params: FinetuneParams, root: Path) -> dict[str, Any]:
    """Read models/base/ + the task's data, train each strategy, write models/lora/ and the reports."""
    import torch

    root = Path(root)
    base = load_checkpoint(root / BASE_DIR)
    with setting_errors("finetune.lora", separator=": "):
        params.lora.for_model(base.config)  # the targets exist in this base
    tokenizer = load_tokenizer(root / BASE_DIR)
    base_md5 = file_md5(root / BASE_DIR / "model.safetensors")
    probe = params.for_run(params.steps, params.batch_size)
    context = probe.context(base)  # tokens per training sequence: seq_len, at most the base's context
    template, special = ChatTemplate.load(root / BASE_DIR), special_tokens(root / BASE_DIR, tokenizer)
    data = _task_data(root, params, tokenizer, context, template, special)
    general = TokenShards(root / TOKENS_DIR, "val")
    # too little general validation text to measure forgetting: reported absent
    general_val = general if len(general) > context else None
    prompts = [_prompt_ids(tokenizer, template, text, params.task) for text in params.sample_prompts]
    stop_ids = special.stop_ids  # where a sample ends
    if params.task == "sft" and template is not None:
        stop_ids += (template.end_of_turn(tokenizer),)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731

    runtime = setup_runtime(probe.device)
    base.to(runtime.device)
    base_row = {"val_loss": evaluate(base, data.val, probe, runtime)}
    if general_val is not None:
        base_row["general_val_loss"] = evaluate(base, general_val, probe, runtime)
    outcomes: list[Outcome] = []
    for strategy in params.strategies():
        torch.manual_seed(params.seed)
        model = prepare(copy.deepcopy(base), strategy, params.lora)
        cfg = params.train_config(strategy)
        callbacks = StageCallbacks(decode, prefix=f"{strategy}/")
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        result = train(
            model,
            data.train,
            data.val,
            cfg,
            checkpoints=state_dir(root) / CHECKPOINTS / strategy,
            fingerprint=_fingerprint(strategy, cfg, params, base_md5, data.md5),
            callbacks=callbacks,
            sample_prompts=prompts if strategy == "lora" else None,
            eos_id=stop_ids,
            label=f"finetune {strategy}",
        )
        callbacks.stream.flush()
        assert result.val_loss is not None  # data.val is evaluated at the last step
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
            row["closed_form_params"] = lora_param_count(base.config, params.lora)
        outcomes.append(Outcome(strategy, model, result, callbacks, row))

    lora_outcome = outcomes[0]
    _save_lora(root, lora_outcome.model.cpu(), params.lora)
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


def _task_data(
    root: Path,
    params: FinetuneParams,
    tokenizer: Any,
    context: int,
    template: ChatTemplate | None,
    special: SpecialTokens,
) -> TaskData:
    if params.task == "domain":
        return domain_data(root, file_md5(root / BASE_DIR / TOKENIZER_FILE), context, params.general_fraction)
    path = root / params.sft_path
    if not path.is_file():
        raise FileNotFoundError(f"params.yaml: finetune.sft_path: {path} does not exist")
    if template is None:
        raise ValueError(
            f"finetune.task is sft but {root / BASE_DIR}'s tokenizer has no chat template "
            "(tokenizer_config.json `chat_template`)"
        )
    pad_id = next(i for i in (special.pad, special.eos, special.document_end) if i is not None)
    return sft_data(
        path,
        tokenizer,
        template,
        pad_id,
        context,
        prompt_field=params.sft_prompt_field,
        response_field=params.sft_response_field,
        system_prompt=params.sft_system_prompt,
        val_fraction=params.sft_val_fraction,
        seed=params.seed,
    )


def _fingerprint(
    strategy: str, cfg: TrainConfig, params: FinetuneParams, base_md5: str, data_md5: str
) -> str:
    """What determines a strategy's trained weights (eval/checkpoint frequencies do not: still resume)."""
    return fingerprint(
        cfg,
        strategy=strategy,
        task=params.task,
        lora=asdict(params.lora),
        general_fraction=params.general_fraction,
        base=base_md5,
        data=data_md5,
    )


def _prompt_ids(tokenizer: Any, template: ChatTemplate | None, text: str, task: str) -> list[int]:
    """A sample prompt: plain text for `domain`, a user turn + generation prompt for `sft`."""
    if task == "sft" and template is not None:
        messages = [{"role": "user", "content": text}]
        return template.encode(tokenizer, messages, add_generation_prompt=True)[0].tolist()
    return tokenizer.encode(text, add_special_tokens=False).ids


def _save_lora(root: Path, model: Any, lora: LoraSettings) -> None:
    base_model = str(BASE_DIR / "hf") if (root / BASE_DIR / "hf").is_dir() else str(BASE_DIR)
    with atomic_dir(root / LORA_DIR) as out:
        save_adapter(model, lora, out, base_model=base_model)
        copy_tokenizer(root / BASE_DIR, out)


def _write_reports(
    root: Path,
    outcomes: list[Outcome],
    base_row: dict[str, float],
    params: FinetuneParams,
    quarantine: list[dict[str, Any]],
) -> None:
    table = comparison_table(outcomes, base_row)
    with atomic_file(root / COMPARISON_PLOT) as handle:
        table_writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        table_writer.writeheader()
        table_writer.writerows(table)
    with atomic_file(root / LOSS_PLOT) as handle:
        csv.writer(handle, lineterminator="\n").writerows(loss_rows(outcomes))
    tracking.log_table(table, "finetune_comparison.json")
    title = f"Fine-tuning strategies ({params.task}, {params.steps} steps × {params.batch_size})"
    with atomic_dir(root / REPORT_DIR) as out:
        with open(out / "quarantine.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in quarantine)
        (out / "comparison.md").write_text(comparison_markdown(table, title), encoding="utf-8")
        comparison_figure(outcomes, base_row).savefig(out / "comparison.png", dpi=100)
        loss_figure(outcomes, base_row, params.task).savefig(out / "loss.png", dpi=100)
        samples = outcomes[0].callbacks.samples_markdown("Samples from the LoRA model", params.sample_prompts)
        (out / "samples.md").write_text(samples, encoding="utf-8")

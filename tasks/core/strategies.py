"""The finetune stage's strategies and their comparison: what each trains, what it costs, how it did.

- `lora` (model/lora.py: only the adapters train), `last_layer` (the last block and the final norm; the
  tied head is the embedding, so it stays frozen) and `full` (everything): `prepare` sets requires_grad.
- The comparison: one row per strategy after the untuned base's (trainable parameters, training-state
  memory, time, the task's and the general corpus' validation loss, forgetting), as the table, the
  plot CSVs' rows and the figures the stage writes into reports/finetune/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from model.lora import LoraSettings, add_lora
from model.train import TrainResult
from tasks.core.training import StageCallbacks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STRATEGIES = ("lora", "last_layer", "full")
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


@dataclass
class Outcome:
    strategy: str
    model: Any
    result: TrainResult
    callbacks: StageCallbacks
    row: dict[str, Any]  # its line of the comparison (COLUMNS but the strategy) and more


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


def loss_rows(outcomes: list[Outcome]) -> list[list[Any]]:
    """The training-loss CSV: a header, then one column per strategy, blank where it has no value (not
    compared, or steps a resumed run skipped), so that dvc.yaml's plot always finds its fields."""
    ran = {o.strategy: o for o in outcomes}
    losses = [
        {int(h["step"]): h["loss"] for h in ran[name].result.history} if name in ran else {}
        for name in STRATEGIES
    ]
    rows: list[list[Any]] = [["step", *(f"{name}_loss" for name in STRATEGIES)]]
    for step in sorted(set().union(*losses)):
        rows.append([step, *(f"{by_step[step]:.5f}" if step in by_step else "" for by_step in losses)])
    return rows


def comparison_markdown(table: list[dict[str, Any]], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in table]
    lines += [
        "",
        "val_loss: the task's validation split; general_val_loss: the pretraining corpus' validation",
        "split; forgetting: how much the latter rose; state_mb: weights + gradients + AdamW moments.",
    ]
    return "\n".join(lines) + "\n"


def comparison_figure(outcomes: list[Outcome], base_row: dict[str, float]) -> Figure:
    """What each strategy trains (share of parameters) beside the validation losses it reached."""
    from matplotlib.figure import Figure

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
    return fig


def loss_figure(outcomes: list[Outcome], base_row: dict[str, float], task: str) -> Figure:
    """Each strategy's training loss against the base model's loss on the task's validation split."""
    from matplotlib.figure import Figure

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
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title=f"fine-tuning loss ({task})")
    ax.legend()
    fig.tight_layout()
    return fig

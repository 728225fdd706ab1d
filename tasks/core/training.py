"""What the training stages (pretrain, finetune) share around model/train.py's loop.

- `fingerprint`: the key a checkpoint resumes on: the loop settings that change the weights plus the
  stage's model and data; settings that only observe (evaluation, sampling, checkpoint frequency) are
  left out, so changing them still resumes.
- `setting_errors`: a model-side settings error as the params.yaml key it names (`pretrain.lr ...`).
- `StageCallbacks`: progress to MLflow in batches; the curves and samples kept for the reports.
- `device_peak_flops` for MFU, `copy_tokenizer` beside the weights a stage writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from model.flops import ACCELERATORS, accelerator_for, cpu_peak_flops
from model.tokens import TOKENIZER_FILES
from model.train import Callbacks, TrainConfig
from tasks.core import tracking
from tasks.core.layout import CPU_RATE_FILE, state_dir

#: TrainConfig fields that do not change the trained weights (left out of the fingerprint).
OBSERVATION_ONLY = (
    "eval_every",
    "eval_batches",
    "sample_every",
    "sample_tokens",
    "checkpoint_every",
    "compile",
)


def weight_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The loop settings that change the trained weights (a checkpoint's fingerprint hashes these)."""
    return {key: value for key, value in asdict(cfg).items() if key not in OBSERVATION_ONLY}


def fingerprint(cfg: TrainConfig, **parts: Any) -> str:
    """Hash of what determines the trained weights: the loop's weight settings and the caller's `parts`
    (model config, data and tokenizer md5s, strategy...), all JSON."""
    blob = json.dumps({"loop": weight_settings(cfg), **parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def device_peak_flops(device: str, root: Path) -> float | None:
    """Peak FLOP/s of the training device for MFU: the table for known GPUs, measured for the CPU."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        ranks = int(os.environ.get("WORLD_SIZE", "1"))  # CPU ranks share the machine
        return cpu_peak_flops(state_dir(root) / CPU_RATE_FILE) / ranks
    key = accelerator_for(torch.cuda.get_device_name(torch.device(device if device != "auto" else "cuda")))
    return ACCELERATORS[key].peak_flops if key else None  # an unknown GPU: no MFU rather than a wrong one


def copy_tokenizer(source: Path, destination: Path) -> None:
    """The tokenizer files present in `source` (tokenizer.json and the transformers configs)."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)


class StageCallbacks(Callbacks):
    """Stream metrics to MLflow (batched) and keep the curves and samples for the reports. `prefix` names
    the curves of one of several trainings in a run (`lora/train/loss`)."""

    def __init__(self, decode: Callable[[list[int]], str], prefix: str = "") -> None:
        self.stream = tracking.MetricStream()
        self.decode, self.prefix = decode, prefix
        self.val: list[tuple[int, float]] = []
        self.samples: list[tuple[int, list[str]]] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.stream.add(step, {f"{self.prefix}train/{key}": value for key, value in metrics.items()})

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.val.append((step, metrics["val_loss"]))
        self.stream.add(
            step,
            {
                f"{self.prefix}val/loss": metrics["val_loss"],
                f"{self.prefix}val/perplexity": metrics["val_perplexity"],
            },
        )

    def on_sample(self, step: int, samples: list[list[int]]) -> None:
        self.samples.append((step, [self.decode(ids) for ids in samples]))

    def samples_markdown(self, title: str, prompts: list[str]) -> str:
        """samples.md: under `# title`, each sampling step's continuation of each prompt."""
        lines = [f"# {title}", ""]
        for step, texts in self.samples:
            lines += [f"## step {step}", ""]
            lines += [f"- **{prompt!r}** → {text!r}" for prompt, text in zip(prompts, texts, strict=True)]
            lines.append("")
        return "\n".join(lines)

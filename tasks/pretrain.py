"""Stage `pretrain`: build the GPT that models/plan.json describes and train it on data/tokens/.

1. The model config and token budget come from models/plan.json (sizes set in `plan.model` were
   already applied by the plan stage and are recorded there); `pretrain.steps` / `batch_size` override
   the plan's schedule and the metrics say so. With a pretrained base (`pretrain.init`, imported into
   models/init/ by the `init` stage) training continues from its weights, at a learning rate fit for
   that (`lr: null`), and `steps: 0` keeps the base as it is.
2. model/train.py runs the loop. Its checkpoints live in .llmpipe/checkpoints/pretrain/, outside DVC's
   outputs (DVC deletes those before it reruns a stage), so `dvc repro` after a killed run resumes. The
   checkpoint carries a fingerprint of the model and training config and of the data and tokenizer md5s:
   changed params or data, or a finished run being rerun on purpose (`--force`), start from step 0.
3. Progress streams to the active MLflow run in batches: curves `train/loss`, `train/lr`,
   `train/grad_norm`, `train/tokens_per_second`, `train/mfu`, `val/loss`, `val/perplexity` (the final
   summary metrics keep plain names); the curves also go to plots/pretrain_*.csv for `dvc plots`.
4. models/base/: model.safetensors + config.json (GPTConfig) + the tokenizer files, and hf/ (a
   transformers directory) when the architecture has a transformers twin. reports/pretrain/: loss.png,
   samples.md. Metrics include a unigram baseline on the same validation split, in the same unit.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoint import load_checkpoint
from model.config import GPTConfig
from model.data import TokenShards
from model.tokens import TOKENIZER_FILE, load_tokenizer, special_tokens
from model.train import LoopSettings, TrainConfig, TrainResult, evaluate, train
from tasks.core import tracking
from tasks.core.bases import InitSetting
from tasks.core.io import atomic_dir, atomic_file, file_md5, read_json, write_json
from tasks.core.layout import (
    BASE_DIR,
    INIT_DIR,
    INIT_SOURCE,
    PLAN_FILE,
    PLOTS_DIR,
    REPORTS_DIR,
    TOKENIZER_DIR,
    TOKENS_DIR,
    state_dir,
)
from tasks.core.params import ParamsError, StageParams, setting_errors
from tasks.core.training import StageCallbacks, copy_tokenizer, device_peak_flops, fingerprint

REPORT_DIR = REPORTS_DIR / "pretrain"
LOSS_PLOT = PLOTS_DIR / "pretrain_loss.csv"
VAL_PLOT = PLOTS_DIR / "pretrain_val.csv"
CHECKPOINTS = Path("checkpoints/pretrain")  # under .llmpipe/
#: Peak learning rates when `pretrain.lr` is null. From scratch, small models take a large one (nanoGPT's
#: CPU recipe: 1e-3; llmpipe's 1-4 layer models train fastest near 3e-3). Continued pretraining of a
#: released model uses ~1/30 to 1/100 of its original peak (SmolLM2's was 3e-3), so that a short run on
#: new text adapts the model rather than overwriting it (Gupta et al. 2023, "Continual Pre-Training of
#: Large Language Models: How to (re)warm your model?").
SCRATCH_LR = 3e-3
CONTINUED_LR = 5e-5
#: Muon's step for the blocks' matrices (`pretrain.matrix_lr` null): nanochat's and Muon's authors' 0.02
#: from scratch, scaled down for a base like the AdamW rate.
SCRATCH_MATRIX_LR = 0.02
CONTINUED_MATRIX_LR = SCRATCH_MATRIX_LR * CONTINUED_LR / SCRATCH_LR


@dataclass(kw_only=True)
class PretrainParams(StageParams, LoopSettings, InitSetting):
    """params.yaml `pretrain`: the loop's settings (types, defaults and checks in model/train.py's
    LoopSettings) and the stage's own below. StageParams comes first so that building one runs `validate`,
    which names the params.yaml key."""

    steps: int | None = None  # optimizer steps; null: the plan's; 0: keep the pretrained base as it is
    batch_size: int | None = None  # sequences per step; null: the plan's
    # peak learning rate; null: SCRATCH_LR from scratch, CONTINUED_LR for a base (TrainConfig gets a float)
    lr: float | None = None  # type: ignore[assignment]
    matrix_lr: float | None = None  # type: ignore[assignment]  # null: SCRATCH/CONTINUED_MATRIX_LR
    sample_prompts: list[str] = field(default_factory=lambda: ["ROMEO.", "In the beginning"])
    log_model: bool = True  # copy models/base/ into the MLflow run's artifacts
    nproc: int = 1  # processes (GPUs) on this node: > 1 relaunches the stage under torchrun (DDP)

    def train_config(self, plan: dict[str, Any]) -> TrainConfig:
        """The loop's config: the plan's steps, batch size and sequence length unless set here, the
        learning rate for the kind of run unless set, every other field as set (steps 0 runs as 1: the
        stage then trains nothing)."""
        training = plan["training"]
        steps = self.steps if self.steps is not None else training["steps"]
        batch_size = self.batch_size if self.batch_size is not None else training["batch_size"]
        continued = training.get("continued")
        lr = self.lr if self.lr is not None else CONTINUED_LR if continued else SCRATCH_LR
        matrix_lr = self.matrix_lr or (CONTINUED_MATRIX_LR if continued else SCRATCH_MATRIX_LR)
        seq_len = self.seq_len if self.seq_len is not None else training.get("seq_len")
        return replace(self.for_run(max(steps, 1), batch_size), lr=lr, matrix_lr=matrix_lr, seq_len=seq_len)

    def validate(self) -> None:
        if self.nproc < 1:
            raise ParamsError(f"params.yaml: pretrain.nproc must be ≥ 1, got {self.nproc}")
        if self.steps is not None and self.steps < 0:
            raise ParamsError(f"params.yaml: pretrain.steps must be ≥ 0 or null, got {self.steps}")
        with setting_errors("pretrain"):  # steps or batch_size null: any plan's will do
            self.train_config({"training": {"steps": 1, "batch_size": 1}}).validate()


def _fingerprint(config: GPTConfig, cfg: TrainConfig, root: Path) -> str:
    """What determines the trained weights: the model and loop config, the data and tokenizer md5s, and
    the pretrained base's (models/init/source.json records it)."""
    data = {
        "meta": file_md5(root / TOKENS_DIR / "meta.json"),
        "tokenizer": file_md5(root / TOKENIZER_DIR / TOKENIZER_FILE),
        "init": file_md5(root / INIT_SOURCE) if (root / INIT_SOURCE).is_file() else None,
    }
    return fingerprint(cfg, model=asdict(config), data=data)


def unigram_loss(train_data: TokenShards, val_data: TokenShards) -> float:
    """Cross-entropy (nats/token) of add-one unigram frequencies from train, on the val split."""
    counts = np.zeros(train_data.vocab_size, np.float64)
    for shard in train_data.shards:
        counts += np.bincount(np.asarray(shard), minlength=train_data.vocab_size)[: train_data.vocab_size]
    log_probs = np.log((counts + 1) / (counts.sum() + len(counts)))
    total, n = 0.0, 0
    for shard in val_data.shards:
        ids = np.asarray(shard)
        total -= float(log_probs[ids].sum())
        n += len(ids)
    return total / max(n, 1)


def _write_reports(
    root: Path, result: TrainResult, callbacks: StageCallbacks, prompts: list[str], baseline: float
) -> None:
    with atomic_file(root / LOSS_PLOT) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["step", "train_loss", "lr"])
        writer.writerows([int(h["step"]), f"{h['loss']:.5f}", f"{h['lr']:.6g}"] for h in result.history)
    with atomic_file(root / VAL_PLOT) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["step", "val_loss", "unigram_baseline"])
        writer.writerows([step, f"{loss:.5f}", f"{baseline:.5f}"] for step, loss in callbacks.val)

    from matplotlib.figure import Figure

    with atomic_dir(root / REPORT_DIR) as out:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        ax.plot(
            [h["step"] for h in result.history], [h["loss"] for h in result.history], label="train", alpha=0.7
        )
        if callbacks.val:
            ax.plot(*zip(*callbacks.val, strict=True), "o-", label="validation")
        ax.axhline(baseline, color="grey", linestyle="--", label=f"unigram baseline ({baseline:.2f})")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="pretraining loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        (out / "samples.md").write_text(callbacks.samples_markdown("Samples", prompts), encoding="utf-8")


def run(params: PretrainParams, root: Path) -> dict[str, int | float]:
    """Read models/plan.json + data/tokens/ + models/tokenizer/, write models/base/ and reports."""
    root = Path(root)
    if not (root / PLAN_FILE).is_file():
        raise FileNotFoundError(f"{root / PLAN_FILE}: no plan (run the `plan` stage first)")
    plan = read_json(root / PLAN_FILE)
    config = GPTConfig.from_dict(plan["model"])
    cfg = params.train_config(plan)
    train_data, val_data = TokenShards(root / TOKENS_DIR, "train"), TokenShards(root / TOKENS_DIR, "val")
    if train_data.vocab_size != config.vocab_size:
        raise ValueError(
            f"{PLAN_FILE} plans vocabulary {config.vocab_size}, data/tokens has {train_data.vocab_size}: "
            "rerun the plan stage"
        )
    tokenizer = load_tokenizer(root / TOKENIZER_DIR)
    prompts = [tokenizer.encode(text, add_special_tokens=False).ids for text in params.sample_prompts]

    import torch

    from model.gpt import GPT

    torch.manual_seed(cfg.seed)
    continued = (root / INIT_DIR / "config.json").is_file()
    model = load_checkpoint(root / INIT_DIR).train() if continued else GPT(config)
    if model.config != config:
        raise ValueError(f"{PLAN_FILE} plans another model than the base in {INIT_DIR}: rerun the plan stage")
    callbacks = StageCallbacks(lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    val = val_data if len(val_data) > cfg.context(model) else None
    if params.steps == 0:  # the base as it is: only measured
        result = _unchanged(model, val, cfg, callbacks)
    else:
        result = train(
            model, train_data, val, cfg, checkpoints=state_dir(root) / CHECKPOINTS,
            fingerprint=_fingerprint(config, cfg, root), callbacks=callbacks,
            peak_flops=device_peak_flops(cfg.device, root), sample_prompts=prompts, eos_id=train_data.eos_id,
        )  # fmt: skip
    callbacks.stream.flush()
    if os.environ.get("RANK", "0") != "0":
        return {"rank": int(os.environ["RANK"]), "train_loss": result.train_loss}  # rank 0 writes the outputs
    baseline = unigram_loss(train_data, val_data) if len(val_data) else float("nan")
    _write_reports(root, result, callbacks, params.sample_prompts, baseline)
    _save_base(root, model)
    if params.log_model:
        tracking.log_artifacts(root / BASE_DIR, "model")
    metrics: dict[str, int | float] = {
        "params": model.num_params(),
        "continued": int(continued),  # 1: continued pretraining of a pretrained base
        "steps": result.steps,
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "planned_steps": plan["training"]["steps"],
        "batch_size": cfg.batch_size,
        "seq_len": cfg.context(model),
        "lr": cfg.lr,
        "tokens": result.steps * cfg.batch_size * cfg.context(model),
        "resumed_from_step": result.resumed_from,
        "unigram_val_loss": round(baseline, 5),
        "seconds": round(result.seconds, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
    }
    if result.steps:
        metrics["train_loss"] = round(result.train_loss, 5)
    if result.val_loss is not None:
        metrics |= {
            "val_loss": round(result.val_loss, 5),
            "val_perplexity": round(math.exp(result.val_loss), 3),
        }
    if result.mfu is not None:
        metrics["mfu"] = round(result.mfu, 5)
    return metrics


def _unchanged(
    model: Any, val: TokenShards | None, cfg: TrainConfig, callbacks: StageCallbacks
) -> TrainResult:
    """`pretrain.steps: 0`: no training; the base's validation loss, as a run of 0 steps reports it."""
    from model.runtime import setup_runtime

    runtime = setup_runtime(cfg.device)
    model.to(runtime.device)
    val_loss = evaluate(model, val, cfg, runtime) if val is not None else None
    if val_loss is not None:
        callbacks.val.append((0, val_loss))
    return TrainResult(0, 0, float("nan"), val_loss, 0, 0.0, 0.0, None)


def _save_base(root: Path, model: Any) -> None:
    """models/base/: model.safetensors, config.json, the tokenizer, and hf/ when transformers can load it."""
    from safetensors.torch import save_model

    from model.hf import hf_layout

    model = model.cpu()
    with atomic_dir(root / BASE_DIR) as out:
        save_model(model, str(out / "model.safetensors"))
        write_json(out / "config.json", asdict(model.config))
        write_json(out / "run.json", {"mlflow_run_id": tracking.active_run_id()})  # provenance for adapters
        copy_tokenizer(root / TOKENIZER_DIR, out)
        try:
            hf_layout(model.config)
        except ValueError:
            return  # no transformers twin for this architecture: models/base/ is llmpipe-only
        _write_hf(model, root / TOKENIZER_DIR, out / "hf")


def _write_hf(model: Any, tokenizer_dir: Path, out: Path) -> None:
    """A transformers directory: config.json + model.safetensors + the tokenizer files."""
    from model.hf import save_hf

    special = special_tokens(tokenizer_dir)
    ids = {"bos_token_id": special.bos, "eos_token_id": special.eos, "pad_token_id": special.pad}
    save_hf(model, out, ids)
    copy_tokenizer(tokenizer_dir, out)


def export_hf(checkpoint: Path, out: Path, root: Path) -> str:
    """Write `checkpoint` as a transformers directory at `out` (atomically); returns the layout used."""
    from model.hf import hf_layout

    model = load_checkpoint(checkpoint)
    layout = hf_layout(model.config)  # ValueError naming the mismatch when there is no twin
    tokenizer_dir = (
        Path(checkpoint) if (Path(checkpoint) / TOKENIZER_FILE).is_file() else root / TOKENIZER_DIR
    )
    with atomic_dir(Path(out)) as tmp:
        _write_hf(model, tokenizer_dir, tmp)
    return layout

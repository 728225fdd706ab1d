"""The training loop: AdamW or Muon + AdamW, warmup + cosine/WSD schedule, accumulation, clipping, resume.

    result = train(model, TokenShards(dir, "train"), TokenShards(dir, "val"), TrainConfig(steps=..., ...),
                   checkpoints=Path(".llmpipe/checkpoints/pretrain"), fingerprint=..., callbacks=...)

- `LoopSettings` holds every setting of the loop, each with its one default and check; `TrainConfig` adds
  the run's length and batch. The training stages' params derive from `LoopSettings`.
- One optimizer step consumes `batch_size` sequences of `seq_len` tokens (at most the model's context,
  `block_size`: a pretrained base with an 8k context can train on short sequences): split over `world_size`
  ranks (DDP under torchrun) and, on each rank, into micro-batches of `micro_batch_size` whose gradients
  accumulate. The global batch, and so the result, does not depend on how it is split.
- Batches come from a `Batches` source (`TokenShards` for pretraining; fine-tuning passes mixed or
  prompt/response batches) asked with a `BatchCursor(seed, step)`: step N draws the same batch whether
  or not the run was interrupted. The learning rate is a pure function of the step.
- Only parameters with `requires_grad` are optimised (and checkpointed, when some are frozen): the same
  loop trains a whole model, its last block, or a LoRA adapter.
- A checkpoint (model/checkpoint.py; every `checkpoint_every` steps and at the end) holds the weights,
  the optimizer state, the step and every RNG state. Restarting with the same fingerprint (the caller's
  hash of config and data) continues from the last unfinished checkpoint; on CPU in fp32 the final
  weights are bitwise those of an uninterrupted run.
- bf16 autocast and fused AdamW on CUDA, fp32 on CPU; `compile=True` wraps the model in torch.compile.
- No MLflow, Prefect or DVC here: the caller observes progress through `Callbacks`.

`train` reads as the outline: set up and resume, then per step `_optimizer_step`, `evaluate`, `_samples`
and `save_checkpoint` as their turns come, then the `TrainResult`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model.checkpoint import TrainedModel, resume, save_checkpoint
from model.data import BatchCursor
from model.generate import sample
from model.gpt import GPT
from model.optim import Optimizer, OptimizerName, make_optimizer, set_lr
from model.runtime import Runtime, autocast, setup_runtime


class Batches(Protocol):
    """Where training and validation batches come from: (x, y) int64 arrays of shape (batch, ≤ context),
    y = the next tokens with -100 where no loss is taken; a pure function of `cursor`."""

    def sample_batch(
        self, batch_size: int, context: int, cursor: BatchCursor
    ) -> tuple[np.ndarray, np.ndarray]: ...


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says at which step and what to try."""


@dataclass(kw_only=True)
class LoopSettings:
    """How the loop trains, whatever the run's length: each setting's type, default and check, once.
    The defaults are pretraining's; fine-tuning's params set their own for some."""

    micro_batch_size: int | None = None  # sequences per forward pass per rank; None: batch_size / world
    seq_len: int | None = None  # tokens per training sequence, at most the model's context; None: all of it
    optimizer: OptimizerName = "adamw"  # adamw | muon (hidden matrices; AdamW for the rest): model/optim.py
    lr: float = 3e-3  # peak learning rate (AdamW's parameters)
    matrix_lr: float = 0.02  # muon: peak learning rate of the hidden matrices
    min_lr_ratio: float = 0.1  # the schedule ends at lr × min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20  # linear warmup; `for_run` cuts it to fit a shorter run
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to the minimum
    weight_decay: float = 0.1  # on matrices and embeddings, not on norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    eval_every: int = 100  # validation loss every N steps (and at the end)
    eval_batches: int = 20
    sample_every: int = 0  # sample generations every M steps (0: only at the end)
    sample_tokens: int = 48
    checkpoint_every: int = 100
    seed: int = 1337  # model init, batch order, dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False

    def validate(self) -> None:
        """Raise ValueError for a bad setting; the message starts with the setting's name."""
        for key in ("eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        for key in ("micro_batch_size", "seq_len"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1 or null, got {getattr(self, key)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1]; got {self.lr}, {self.min_lr_ratio}")
        if self.optimizer not in typing.get_args(OptimizerName):
            raise ValueError(f"optimizer must be one of {', '.join(typing.get_args(OptimizerName))}")
        if not self.matrix_lr > 0:
            raise ValueError(f"matrix_lr must be > 0, got {self.matrix_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")

    def for_run(self, steps: int, batch_size: int) -> TrainConfig:
        """These settings for a run of `steps` steps of `batch_size` sequences; the warmup is cut so that
        a short run still gets its last steps at the peak and after."""
        settings = {f.name: getattr(self, f.name) for f in fields(LoopSettings)}
        settings["warmup_steps"] = min(self.warmup_steps, steps - 1)
        return TrainConfig(steps=steps, batch_size=batch_size, **settings)


@dataclass(kw_only=True)
class TrainConfig(LoopSettings):
    """One run of the loop: the settings plus its length and global batch."""

    steps: int
    batch_size: int  # sequences per optimizer step, over all ranks and micro-batches

    def context(self, model: TrainedModel) -> int:
        """Tokens per training sequence for `model`: seq_len, capped at the model's context."""
        return min(self.seq_len or model.config.block_size, model.config.block_size)

    def validate(self) -> None:
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        super().validate()
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr` over warmup_steps, then
    cosine (or WSD: constant, then linear over the last decay_fraction) down to lr × min_lr_ratio at the
    last step."""
    low = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    last = cfg.steps - 1
    if cfg.schedule == "constant" or last == cfg.warmup_steps:
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / (last - cfg.warmup_steps)
        return low + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - low)
    decay_start = max(cfg.warmup_steps, last - max(1, round(cfg.decay_fraction * cfg.steps)))
    if step <= decay_start:
        return cfg.lr
    return cfg.lr + (low - cfg.lr) * min(1.0, (step - decay_start) / (last - decay_start))


class Callbacks:
    """What the trainer reports; override any of these (the task layer logs them to MLflow)."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_sample(self, step: int, samples: list[list[int]]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...


@dataclass
class TrainResult:
    steps: int
    resumed_from: int  # 0 for a fresh start
    train_loss: float
    val_loss: float | None
    tokens: int
    seconds: float
    tokens_per_second: float
    mfu: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def loop_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizer:
    """The optimizer `cfg` asks for over `model`'s trainable parameters (model/optim.py)."""
    betas = (cfg.beta1, cfg.beta2)
    return make_optimizer(model, cfg.optimizer, cfg.lr, cfg.matrix_lr, cfg.weight_decay, betas, device)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train(
    model: TrainedModel,
    train_data: Batches,
    val_data: Batches | None,
    cfg: TrainConfig,
    checkpoints: Path,
    fingerprint: str,
    callbacks: Callbacks | None = None,
    peak_flops: float | None = None,
    sample_prompts: list[list[int]] | None = None,
    eos_id: int | tuple[int, ...] | None = None,
    progress: bool = True,
    label: str = "pretrain",
) -> TrainResult:
    """Train `model` for cfg.steps optimizer steps, resuming from an unfinished checkpoint of the same
    fingerprint in `checkpoints`. `peak_flops` (per device) turns throughput into MFU."""
    cfg.validate()
    callbacks = callbacks or Callbacks()
    runtime = setup_runtime(cfg.device)
    _check_batch(cfg, runtime)
    model.to(runtime.device)
    optimizer = loop_optimizer(model, cfg, runtime.device)
    start = resume(checkpoints, fingerprint, model, optimizer, discard=runtime.is_main)
    if runtime.world > 1:
        dist.barrier()  # rank 0 may have deleted a stale checkpoint the others also found
    trained = _parallel(model, cfg, runtime)

    history: list[dict[str, float]] = []
    train_loss, val_loss = float("nan"), None
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=label,
        unit="step",
        disable=not (progress and runtime.is_main),
        mininterval=1.0 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
    )
    model.train()
    peak = peak_flops * runtime.world if peak_flops else None
    context = cfg.context(model)
    clock = _Throughput(cfg.batch_size * context, model.config.train_flops_per_token(context), peak)
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        train_loss, grad_norm = _optimizer_step(trained, model, optimizer, lr, train_data, cfg, step, runtime)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"the training loss became {train_loss} at step {step + 1} (lr {lr:.3g}); the last good "
                f"checkpoint is in {checkpoints}. Lower pretrain.lr, raise warmup_steps, or check the data"
            )
        done, tokens_per_second = step + 1, clock.step()
        metrics = {
            "loss": train_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,
        }
        if (mfu := clock.mfu(tokens_per_second)) is not None:
            metrics["mfu"] = mfu
        history.append({"step": done, **metrics})
        if runtime.is_main:
            callbacks.on_step(done, metrics)
            postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2e}", "tok_s": f"{tokens_per_second:,.0f}"}
            bar.set_postfix(postfix, refresh=False)  # drawn by update() at its interval, not every step
            bar.update(1)

        final, paused = done == cfg.steps, False  # throughput counts training steps only
        if val_data is not None and (done % cfg.eval_every == 0 or final):
            val_loss = evaluate(model, val_data, cfg, runtime)
            if runtime.is_main:
                callbacks.on_eval(done, {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))})
            paused = True
        if (
            sample_prompts
            and runtime.is_main
            and (final or (cfg.sample_every > 0 and done % cfg.sample_every == 0))
        ):
            callbacks.on_sample(done, _samples(model, sample_prompts, cfg, eos_id))
            paused = True
        if done % cfg.checkpoint_every == 0 or final:
            if runtime.is_main:
                path = save_checkpoint(checkpoints, model, optimizer, done, fingerprint, done=final)
                callbacks.on_checkpoint(done, path)
            if runtime.world > 1:
                dist.barrier()
            paused = True
        if paused:
            clock.restart_window()
    bar.close()

    seconds = time.perf_counter() - clock.began
    tokens = (cfg.steps - start) * clock.tokens_per_step
    throughput = tokens / seconds if seconds > 0 else 0.0
    return TrainResult(
        steps=cfg.steps,
        resumed_from=start,
        train_loss=train_loss,
        val_loss=val_loss,
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=throughput,
        mfu=clock.mfu(throughput),
        history=history,
    )


class _StepTimes(Callbacks):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.times.append(time.perf_counter())


def seconds_per_step(
    model: TrainedModel, data: Batches, cfg: TrainConfig, scratch: Path, probe: int = 5
) -> float:
    """Seconds one optimizer step of `cfg` takes for `model` on this machine: `probe` steps of the loop
    (checkpoints in `scratch`), the first left out as warm-up. Trains `model`: pass a throwaway copy."""
    run = replace(cfg, steps=probe + 1, warmup_steps=0, eval_every=10**9, checkpoint_every=10**9)
    clock = _StepTimes()
    train(model, data, None, run, scratch, "probe", callbacks=clock, progress=False)
    return (clock.times[-1] - clock.times[0]) / probe


def _check_batch(cfg: TrainConfig, runtime: Runtime) -> None:
    if cfg.batch_size % runtime.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {runtime.world} ranks")
    per_rank = cfg.batch_size // runtime.world
    if cfg.micro_batch_size is not None and per_rank % cfg.micro_batch_size:
        raise ValueError(
            f"micro_batch_size {cfg.micro_batch_size} does not divide the {per_rank} sequences per rank"
        )


def _parallel(model: TrainedModel, cfg: TrainConfig, runtime: Runtime) -> torch.nn.Module:
    """What the optimizer steps run: `model` in DDP over the ranks and compiled if asked. Evaluation,
    sampling and checkpoints use `model` itself, which shares the weights."""
    trained: torch.nn.Module = model
    if runtime.world > 1:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        trained = torch.compile(trained)  # type: ignore[assignment]
    return trained


def _micro_batches(
    data: Batches, cfg: TrainConfig, context: int, step: int, runtime: Runtime
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of step `step`'s global batch, in micro-batches (as int64 tensors on device)."""
    x, y = data.sample_batch(cfg.batch_size, context, BatchCursor(cfg.seed, step))
    per_rank = cfg.batch_size // runtime.world
    x = x[runtime.rank * per_rank : (runtime.rank + 1) * per_rank]
    y = y[runtime.rank * per_rank : (runtime.rank + 1) * per_rank]
    micro = cfg.micro_batch_size or per_rank
    for start in range(0, per_rank, micro):
        yield (
            torch.from_numpy(x[start : start + micro]).to(runtime.device, non_blocking=True),
            torch.from_numpy(y[start : start + micro]).to(runtime.device, non_blocking=True),
        )


def _optimizer_step(
    trained: torch.nn.Module,
    model: TrainedModel,
    optimizer: Optimizer,
    lr: float,
    data: Batches,
    cfg: TrainConfig,
    step: int,
    runtime: Runtime,
) -> tuple[float, float]:
    """Optimizer step `step` at `lr`: the global batch's gradients accumulated over micro-batches (DDP
    averages them over ranks on the last one), clipped, one optimizer update. Returns (the batch's mean loss
    over all ranks, the gradient norm before clipping)."""
    set_lr(optimizer, lr / cfg.lr)
    per_rank = cfg.batch_size // runtime.world
    accumulation = per_rank // (cfg.micro_batch_size or per_rank)
    loss_sum = torch.zeros((), device=runtime.device)
    for i, (x, y) in enumerate(_micro_batches(data, cfg, cfg.context(model), step, runtime)):
        last = i == accumulation - 1
        sync = contextlib.nullcontext() if last or runtime.world == 1 else trained.no_sync()  # type: ignore[operator]
        with sync, autocast(runtime, cfg.precision):
            _, loss, _ = trained(x, y)
            assert loss is not None
            (loss / accumulation).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if runtime.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return loss_sum.item() / accumulation, float(grad_norm)


@torch.no_grad()
def evaluate(
    model: TrainedModel, data: Batches, cfg: TrainConfig, runtime: Runtime, batches: int | None = None
) -> float:
    """Mean loss over a fixed set of validation batches (the same ones at every evaluation)."""
    model.eval()
    context, total = cfg.context(model), 0.0
    count = batches or cfg.eval_batches
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // runtime.world)
    for i in range(count):
        x, y = data.sample_batch(micro, context, BatchCursor(seed=cfg.seed + 1, step=i))
        with autocast(runtime, cfg.precision):
            _, loss, _ = model(torch.from_numpy(x).to(runtime.device), torch.from_numpy(y).to(runtime.device))
        assert loss is not None
        total += loss.item()
    model.train()
    return total / count


def _samples(
    model: TrainedModel, prompts: list[list[int]], cfg: TrainConfig, eos_id: int | tuple[int, ...] | None
) -> list[list[int]]:
    """Continuations of the prompts, drawn with the same seed each time so that steps compare."""
    if not isinstance(model, GPT):
        raise TypeError(f"sample_prompts: {type(model).__name__} has no KV-cache decoding (pass none)")
    generator = torch.Generator().manual_seed(cfg.seed)
    return [
        sample(model, prompt, cfg.sample_tokens, eos_id=eos_id, generator=generator) for prompt in prompts
    ]


class _Throughput:
    """Tokens per second of training steps (evaluating, sampling and saving restart the window), and the
    MFU that makes: training FLOP/s over the peak of all devices (None when the peak is unknown)."""

    def __init__(self, tokens_per_step: int, flops_per_token: int, peak_flops: float | None) -> None:
        self.tokens_per_step, self.flops_per_token, self.peak_flops = (
            tokens_per_step,
            flops_per_token,
            peak_flops,
        )
        self.began = time.perf_counter()
        self.restart_window()

    def restart_window(self) -> None:
        self.window_tokens, self.window_began = 0, time.perf_counter()

    def step(self) -> float:
        """Count one step; the throughput of the window so far."""
        self.window_tokens += self.tokens_per_step
        elapsed = time.perf_counter() - self.window_began
        return self.window_tokens / elapsed if elapsed > 0 else 0.0

    def mfu(self, tokens_per_second: float) -> float | None:
        return tokens_per_second * self.flops_per_token / self.peak_flops if self.peak_flops else None

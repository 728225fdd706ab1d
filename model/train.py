"""The pretraining loop: AdamW, warmup + cosine/WSD schedule, accumulation, clipping, exact resume.

    result = train(model, TokenShards(dir, "train"), TokenShards(dir, "val"), TrainConfig(...),
                   checkpoints=Path(".llmpipe/checkpoints/pretrain"), fingerprint=..., callbacks=...)

- One optimizer step consumes `batch_size` sequences of `block_size` tokens: split over `world_size`
  ranks (DDP under torchrun) and, on each rank, into micro-batches of `micro_batch_size` whose gradients
  accumulate. The global batch, and so the result, does not depend on how it is split.
- Batches come from a `Batches` source (`TokenShards` for pretraining; fine-tuning passes mixed or
  prompt/response batches) asked with a `BatchCursor(seed, step)`: step N draws the same batch whether
  or not the run was interrupted. The learning rate is a pure function of the step.
- Only parameters with `requires_grad` are optimised (and checkpointed, when some are frozen): the same
  loop trains a whole model, its last block, or a LoRA adapter.
- A checkpoint (every `checkpoint_every` steps and at the end) holds the weights (safetensors), the
  optimizer state, the step and every RNG state (python, numpy, torch, cuda), written to a temporary
  directory and renamed into place. Restarting with the same fingerprint (the caller's hash of config
  and data) continues from the last unfinished checkpoint; on CPU in fp32 the final weights are bitwise
  those of an uninterrupted run. Loading uses safetensors and `torch.load(weights_only=True)` only.
- bf16 autocast and fused AdamW on CUDA, fp32 on CPU; `compile=True` wraps the model in torch.compile.
- No MLflow, Prefect or DVC here: the caller observes progress through `Callbacks`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm import tqdm

from model.config import GPTConfig
from model.data import BatchCursor
from model.flops import train_flops_per_token
from model.generate import sample
from model.gpt import GPT

CHECKPOINT_FORMAT = 1
LATEST = "latest"


class Batches(Protocol):
    """Where training and validation batches come from: (x, y) int64 arrays of shape (batch, ≤ context),
    y = the next tokens with -100 where no loss is taken; a pure function of `cursor`."""

    def sample_batch(
        self, batch_size: int, context: int, cursor: BatchCursor
    ) -> tuple[np.ndarray, np.ndarray]: ...


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says at which step and what to try."""


@dataclass
class TrainConfig:
    steps: int
    batch_size: int  # sequences per optimizer step, over all ranks and micro-batches
    micro_batch_size: int | None = None  # sequences per forward pass per rank; None: batch_size / world
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr × min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to the minimum
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    eval_every: int = 100  # validation loss every N steps (and at the end)
    eval_batches: int = 20
    sample_every: int = 0  # sample generations every M steps (0: only at the end)
    sample_tokens: int = 64
    checkpoint_every: int = 100
    seed: int = 1337  # model init, batch order, dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False

    def validate(self) -> None:
        for key in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be ≥ 1 or null, got {self.micro_batch_size}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1]; got {self.lr}, {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")


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


# --------------------------------------------------------------------------------------------------
# Devices, ranks, optimizer
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str) -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Runtime(torch.device(device), rank, world)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and embeddings) only, not on norms and biases; fused on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **fused)


def autocast(runtime: Runtime, precision: str) -> contextlib.AbstractContextManager[Any]:
    use_bf16 = precision == "bf16" or (precision == "auto" and runtime.device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=runtime.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path, model: GPT, optimizer: torch.optim.Optimizer, step: int, fingerprint: str, done: bool
) -> Path:
    """Write `step-NNNNNNN/` (model.safetensors + state.pt) via a temporary directory, point `latest` at
    it (atomic rename), then delete older checkpoints. Returns the checkpoint's path."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:07d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    frozen = any(not p.requires_grad for p in model.parameters())
    if frozen:  # fine-tuning part of a model: the rest is the caller's base weights, not saved again
        trainable = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "model.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
    state = {
        "trainable_only": frozen,
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "done": done,
        "fingerprint": fingerprint,
        "config": asdict(model.config),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
    }
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = directory / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n", encoding="utf-8")
    os.replace(pointer, directory / LATEST)
    for old in [*directory.glob("step-*"), *directory.glob(".*.tmp-*")]:  # older ones, a killed run's temps
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "state.pt").is_file() and (path / "model.safetensors").is_file() else None


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


def load_weights(model: GPT, path: Path, trainable_only: bool = False) -> None:
    """Weights from a checkpoint (or any directory with model.safetensors written by save_model); with
    `trainable_only`, the checkpoint holds exactly the parameters that require grad."""
    device = str(next(model.parameters()).device)
    if not trainable_only:
        load_model(model, str(path / "model.safetensors"), device=device)
        return
    tensors = load_file(str(path / "model.safetensors"), device=device)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        raise ValueError(
            f"{path}: checkpoint holds {sorted(set(tensors) ^ expected)[:5]}... unlike the model"
        )
    model.load_state_dict(tensors, strict=False)


def load_checkpoint(path: Path) -> GPT:
    """The GPT in models/base/ (config.json + model.safetensors) or in a training checkpoint directory
    (.llmpipe/checkpoints/pretrain/step-NNNNNNN: state.pt + model.safetensors), in eval mode."""
    path = Path(path)
    if (path / "config.json").is_file():
        config = GPTConfig.from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
    elif (path / "state.pt").is_file():
        config = GPTConfig.from_dict(read_checkpoint_state(path)["config"])
    else:
        raise FileNotFoundError(
            f"{path}: not a checkpoint (no config.json or state.pt beside model.safetensors)"
        )
    model = GPT(config)
    load_weights(model, path)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


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


@torch.no_grad()
def evaluate(
    model: GPT, data: Batches, cfg: TrainConfig, runtime: Runtime, batches: int | None = None
) -> float:
    """Mean loss over a fixed set of validation batches (the same ones at every evaluation)."""
    model.eval()
    context, total = model.config.block_size, 0.0
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


def _check_batch(cfg: TrainConfig, runtime: Runtime) -> None:
    if cfg.batch_size % runtime.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {runtime.world} ranks")
    per_rank = cfg.batch_size // runtime.world
    if cfg.micro_batch_size is not None and per_rank % cfg.micro_batch_size:
        raise ValueError(
            f"micro_batch_size {cfg.micro_batch_size} does not divide the {per_rank} sequences per rank"
        )


def train(
    model: GPT,
    train_data: Batches,
    val_data: Batches | None,
    cfg: TrainConfig,
    checkpoints: Path,
    fingerprint: str,
    callbacks: Callbacks | None = None,
    peak_flops: float | None = None,
    sample_prompts: list[list[int]] | None = None,
    eos_id: int | None = None,
    progress: bool = True,
    label: str = "pretrain",
) -> TrainResult:
    """Train `model` for cfg.steps optimizer steps, resuming from an unfinished checkpoint of the same
    fingerprint in `checkpoints`. `peak_flops` (per device) turns throughput into MFU."""
    cfg.validate()
    callbacks = callbacks or Callbacks()
    runtime = setup_runtime(cfg.device)
    context = model.config.block_size
    _check_batch(cfg, runtime)
    model.to(runtime.device)

    optimizer = make_optimizer(model, cfg, runtime.device)
    start = 0
    found = latest_checkpoint(checkpoints)
    if found is not None:
        state = read_checkpoint_state(found)
        if state["fingerprint"] == fingerprint and not state["done"] and state["format"] == CHECKPOINT_FORMAT:
            load_weights(model, found, state.get("trainable_only", False))
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"])
            start = state["step"]
        elif runtime.is_main:  # another config or data, or a finished run: a deliberate fresh start
            shutil.rmtree(checkpoints, ignore_errors=True)
    if runtime.world > 1:
        dist.barrier()

    trained: torch.nn.Module = model
    if runtime.world > 1:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        trained = torch.compile(trained)  # type: ignore[assignment]

    flops_per_token = train_flops_per_token(model.config)
    tokens_per_step = cfg.batch_size * context
    micro = cfg.micro_batch_size or cfg.batch_size // runtime.world
    accumulation = cfg.batch_size // runtime.world // micro
    history: list[dict[str, float]] = []
    val_loss: float | None = None
    train_loss = float("nan")
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=label,
        unit="step",
        disable=not (progress and runtime.is_main),
        mininterval=1.0 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
    )
    model.train()
    began, window_tokens, window_began = time.perf_counter(), 0, time.perf_counter()
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=runtime.device)
        for i, (x, y) in enumerate(_micro_batches(train_data, cfg, context, step, runtime)):
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
        train_loss = loss_sum.item() / accumulation
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"the training loss became {train_loss} at step {step + 1} (lr {lr:.3g}); the last good "
                f"checkpoint is in {checkpoints}. Lower pretrain.lr, raise warmup_steps, or check the data"
            )
        done_steps = step + 1
        window_tokens += tokens_per_step
        elapsed = time.perf_counter() - window_began
        tokens_per_second = window_tokens / elapsed if elapsed > 0 else 0.0
        metrics = {
            "loss": train_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_second": tokens_per_second,
        }
        if peak_flops:
            metrics["mfu"] = tokens_per_second * flops_per_token / (peak_flops * runtime.world)
        history.append({"step": done_steps, **metrics})
        if runtime.is_main:
            callbacks.on_step(done_steps, metrics)
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
            bar.update(1)
        final = done_steps == cfg.steps
        evaluating = val_data is not None and (done_steps % cfg.eval_every == 0 or final)
        sampling = (
            bool(sample_prompts)
            and runtime.is_main
            and ((cfg.sample_every > 0 and done_steps % cfg.sample_every == 0) or final)
        )
        saving = done_steps % cfg.checkpoint_every == 0 or final
        if evaluating:
            val_loss = evaluate(model, val_data, cfg, runtime)
            if runtime.is_main:
                callbacks.on_eval(
                    done_steps, {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}
                )
        if sampling:
            generator = torch.Generator().manual_seed(cfg.seed)
            samples = [
                sample(model, prompt, cfg.sample_tokens, eos_id=eos_id, generator=generator)
                for prompt in sample_prompts or []
            ]
            callbacks.on_sample(done_steps, samples)
        if saving:
            if runtime.is_main:
                path = save_checkpoint(checkpoints, model, optimizer, done_steps, fingerprint, done=final)
                callbacks.on_checkpoint(done_steps, path)
            if runtime.world > 1:
                dist.barrier()
        if evaluating or sampling or saving:  # throughput counts training steps only
            window_tokens, window_began = 0, time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - began
    tokens = (cfg.steps - start) * tokens_per_step
    throughput = tokens / seconds if seconds > 0 else 0.0
    return TrainResult(
        steps=cfg.steps,
        resumed_from=start,
        train_loss=train_loss,
        val_loss=val_loss,
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=throughput,
        mfu=throughput * flops_per_token / (peak_flops * runtime.world) if peak_flops else None,
        history=history,
    )

"""Training checkpoints on disk: what model/train.py writes to resume exactly, and how a GPT is read back.

    save_checkpoint(Path(".llmpipe/checkpoints/pretrain"), model, optimizer, step, fingerprint, done=False)
    step = resume(Path(".llmpipe/checkpoints/pretrain"), fingerprint, model, optimizer, discard=True)
    model = load_checkpoint(Path("models/base"))                       # or a step-NNNNNNN/ directory

- A checkpoint directory `step-NNNNNNN/` holds model.safetensors (every weight, or only the trainable
  ones when some are frozen: a LoRA run saves its adapter, not the base again) and state.pt: the step,
  whether the run finished, the caller's fingerprint, the model config, the optimizer state and every
  RNG state (python, numpy, torch, cuda).
- It is written to a temporary directory and renamed into place; the `latest` file names it, and older
  checkpoints are deleted after. A killed run leaves the previous checkpoint intact.
- Reading uses safetensors and `torch.load(weights_only=True)` only: no pickled code runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from model.config import GPTConfig
from model.gpt import GPT
from model.optim import Optimizer
from model.rnn import GRULM

#: What the training loop trains and checkpoints: the GPT, or the GRU baseline.
TrainedModel = GPT | GRULM

CHECKPOINT_FORMAT = 1
LATEST = "latest"


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # legacy: the Mersenne Twister's (kind, keys, pos, ...) tuple
    kind, keys, pos, has_gauss, cached = numpy_state
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
    directory: Path, model: TrainedModel, optimizer: Optimizer, step: int, fingerprint: str, done: bool
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


def load_weights(model: TrainedModel, path: Path, trainable_only: bool = False) -> None:
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


def resume(
    directory: Path, fingerprint: str, model: TrainedModel, optimizer: Optimizer, discard: bool
) -> int:
    """The step to continue from: the last checkpoint's when it is an unfinished run of this fingerprint
    (weights, optimizer and RNG states restored), else 0. With `discard`, a checkpoint of other settings
    or data, or of a finished run, is deleted: rerunning is then a deliberate fresh start."""
    found = latest_checkpoint(directory)
    if found is None:
        return 0
    state = read_checkpoint_state(found)
    if state["fingerprint"] != fingerprint or state["done"] or state["format"] != CHECKPOINT_FORMAT:
        if discard:
            shutil.rmtree(directory, ignore_errors=True)
        return 0
    load_weights(model, found, state.get("trainable_only", False))
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(state["step"])

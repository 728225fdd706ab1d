"""Where a training or evaluation runs: the device, this process' rank among torchrun's, bf16 autocast.

    runtime = setup_runtime("auto")      # cuda if there is one; joins the process group under torchrun
    with autocast(runtime, "auto"):      # bf16 on CUDA, fp32 on CPU
        logits, loss, _ = model(x, y)

model/train.py runs its loop here; the finetune stage evaluates the base model on the same device.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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


def autocast(runtime: Runtime, precision: str) -> contextlib.AbstractContextManager[Any]:
    use_bf16 = precision == "bf16" or (precision == "auto" and runtime.device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=runtime.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

"""The optimizers the training loop can use: AdamW alone, or Muon for the hidden matrices with AdamW for
the rest (nanochat's MuonAdamW, modded-nanogpt's split).

- AdamW: weight decay on matrices and embeddings only, not on norms and biases; fused on CUDA.
- Muon (Jordan et al. 2024): SGD-momentum whose update of each 2-D weight is orthogonalised by a
  Newton-Schulz iteration, so every direction of the matrix moves at the same rate. `Muon` below is
  `torch.optim.Muon`'s algorithm step for step (a test checks it equals torch's), except that torch runs
  the iteration in bf16, which CPUs without bf16 units multiply ~35× slower than fp32 (measured on this
  project's 2-core CI machine); here it runs in bf16 on CUDA and in fp32 elsewhere.
  It is meant for the hidden matrices only: the blocks' q/k/v/o and MLP projections. Embeddings, the
  output head, norms and biases stay on AdamW (Muon's authors: "embedding and head should be optimized
  by AdamW"). Muon's step size is its own (`matrix_lr`, ~0.02: the update's RMS is ~lr·√(rows/cols)
  whatever the gradient's scale), and it takes no weight decay here (modded-nanogpt, nanochat's default).
- Each parameter group remembers its peak learning rate (`peak_lr`); the loop multiplies every group's
  by the schedule's factor of the step, so warmup and decay apply to both optimizers alike.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

OptimizerName = Literal["adamw", "muon"]


def is_hidden_matrix(name: str, parameter: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (what Muon optimises); not embeddings, head or norms."""
    return parameter.dim() == 2 and name.startswith("blocks.")


def orthogonalize(update: torch.Tensor, steps: int, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz's quintic iteration towards U·Vᵀ of `update` = U·S·Vᵀ (Keller Jordan's coefficients,
    which trade exactness, singular values in ~[0.5, 1.5], for speed), as torch.optim.Muon computes it."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm ≤ Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov), orthogonalised, scaled by √max(1, rows/cols); 2-D parameters only."""

    def __init__(
        self, params: list[dict[str, Any]], lr: float, momentum: float = 0.95, ns_steps: int = 5
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "ns_steps": ns_steps, "ns_dtype": None})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                nesterov = param.grad.lerp(buffer, group["momentum"])
                dtype = group["ns_dtype"] or (torch.bfloat16 if param.is_cuda else torch.float32)
                update = orthogonalize(nesterov, group["ns_steps"], dtype)
                scale = max(1.0, param.size(0) / param.size(1)) ** 0.5
                param.add_(update, alpha=-group["lr"] * scale)


class MuonAdamW:
    """Muon for the hidden matrices and AdamW for everything else, stepped together; the interface the loop
    and the checkpoints use (param_groups, step, zero_grad, state_dict, load_state_dict)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.optimizers[0].state_dict(), "adamw": self.optimizers[1].state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizers[0].load_state_dict(state["muon"])
        self.optimizers[1].load_state_dict(state["adamw"])


Optimizer = torch.optim.Optimizer | MuonAdamW


def _adamw(
    groups: list[dict[str, Any]], betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, betas=betas, eps=1e-8, **fused)


def make_optimizer(
    model: torch.nn.Module,
    name: OptimizerName,
    lr: float,
    matrix_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
) -> Optimizer:
    """The optimizer over `model`'s trainable parameters; each group's `peak_lr` is set."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if name == "muon" and is_hidden_matrix(n, p)]
    hidden_ids = {id(p) for p in hidden}
    rest = [(n, p) for n, p in named if id(p) not in hidden_ids]
    groups = [
        {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": weight_decay, "peak_lr": lr},
        {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0, "peak_lr": lr},
    ]
    adamw = _adamw([g for g in groups if g["params"]], betas, device)
    if not hidden:
        return adamw
    muon = Muon([{"params": hidden, "peak_lr": matrix_lr}], lr=matrix_lr)
    return MuonAdamW(muon, adamw)


def set_lr(optimizer: Optimizer, factor: float) -> None:
    """Every group's learning rate: its peak × `factor` (the schedule's value at this step, peak = 1)."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor

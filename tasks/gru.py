"""Stage `gru`: train the recurrent baseline (model/rnn.py) that the GPT is judged against in `evaluate`.

Fair by construction: the same token shards (data/tokens), the same training loop (model/train.py: the
same batches, schedule and checkpoints), the plan's batch and sequence length, and the same wall time as
the GPT's pretraining took (metrics/pretrain.json `seconds`). Wall time, not FLOPs: a GRU's recurrence
is sequential, and torch's GRU turns fewer FLOP/s into training than the transformer (~18 vs ~46
GFLOP/s in the bundled run on 2 cores), so the GPT's FLOPs would take it ~2.5× as long; the fair
question on a laptop is what each learns in the same minutes. A few timed steps turn the
seconds into a step count (`gru.steps` sets one instead), so the GRU is the baseline a user could have
trained in the same time on the same machine. Its width is the GPT's unless `gru.n_embd` sets one.
It writes models/gru/ (config.json + model.safetensors); `evaluate` scores it on the GPT's validation
bytes as `gru_bpb`. `gru.steps: 0` skips it (with a large pretrained base, say): no GRU row then.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from model.data import TokenShards
from model.rnn import GRUConfig
from model.train import LoopSettings, seconds_per_step, train
from tasks.core.io import atomic_dir, file_md5, read_json
from tasks.core.layout import GRU_DIR, METRICS_DIR, PLAN_FILE, TOKENS_DIR, state_dir
from tasks.core.params import ParamsError, StageParams
from tasks.core.training import StageCallbacks, fingerprint

CHECKPOINTS = Path("checkpoints/gru")  # under .llmpipe/


@dataclass
class GRUParams(StageParams):
    n_embd: int | None = None  # embedding and hidden width; null: the planned GPT's
    n_layer: int = 2  # stacked GRU layers
    lr: float = 3e-3  # peak AdamW learning rate (warmup and cosine decay as pretraining's defaults)
    seconds: float | None = None  # training wall time; null: what the GPT's pretraining took
    steps: int | None = None  # null: as many as `seconds` allow on this machine; 0: no GRU baseline
    seed: int = 1337
    device: str = "auto"

    def validate(self) -> None:
        if self.n_embd is not None and self.n_embd < 1:
            raise ParamsError(f"params.yaml: gru.n_embd must be ≥ 1 or null, got {self.n_embd}")
        if self.n_layer < 1 or not self.lr > 0:
            raise ParamsError(
                f"params.yaml: gru.n_layer ≥ 1 and gru.lr > 0 needed, got {self.n_layer}, {self.lr}"
            )
        if self.seconds is not None and not self.seconds > 0:
            raise ParamsError(f"params.yaml: gru.seconds must be > 0 or null, got {self.seconds}")
        if self.steps is not None and self.steps < 0:
            raise ParamsError(f"params.yaml: gru.steps must be ≥ 0 or null, got {self.steps}")


def run(params: GRUParams, root: Path) -> dict[str, int | float]:
    """Read models/plan.json, metrics/pretrain.json and data/tokens/; write models/gru/."""
    import torch

    from model.rnn import GRULM, save_gru

    root = Path(root)
    plan = read_json(root / PLAN_FILE)
    training = plan["training"]
    train_data, val_data = TokenShards(root / TOKENS_DIR, "train"), TokenShards(root / TOKENS_DIR, "val")
    config = GRUConfig(
        vocab_size=train_data.vocab_size,
        n_embd=params.n_embd or plan["model"]["n_embd"],
        n_layer=params.n_layer,
        block_size=training["seq_len"],
    )
    loop = LoopSettings(lr=params.lr, seed=params.seed, device=params.device, eval_every=10**9)
    steps, seconds = params.steps, params.seconds
    if steps is None:
        seconds = seconds or read_json(root / METRICS_DIR / "pretrain.json")["seconds"]
        with tempfile.TemporaryDirectory() as scratch:
            probe = seconds_per_step(
                GRULM(config), train_data, loop.for_run(2, training["batch_size"]), Path(scratch)
            )
        steps = max(1, int(seconds / probe))
    with atomic_dir(root / GRU_DIR) as out:  # replaced whole: steps 0 leaves none behind
        if steps == 0:
            return {"steps": 0}
        cfg = loop.for_run(steps, training["batch_size"])
        torch.manual_seed(cfg.seed)
        model = GRULM(config)
        data = {"meta": file_md5(root / TOKENS_DIR / "meta.json")}
        val = val_data if len(val_data) > config.block_size else None
        result = train(
            model, train_data, val, cfg, checkpoints=state_dir(root) / CHECKPOINTS,
            fingerprint=fingerprint(cfg, model=asdict(config), data=data),
            callbacks=StageCallbacks(lambda ids: "", prefix="gru/"), label="gru",
        )  # fmt: skip
        save_gru(model.cpu(), out)
    metrics: dict[str, int | float] = {
        "params": model.num_params(),
        "steps": steps,
        "tokens": steps * cfg.batch_size * config.block_size,
        "flops": steps * cfg.batch_size * config.block_size * config.train_flops_per_token(),
        "seconds": round(result.seconds, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_loss": round(result.train_loss, 5),
    }
    if seconds is not None:
        metrics["budget_seconds"] = round(seconds, 2)
    if result.val_loss is not None:
        metrics["val_loss"] = round(result.val_loss, 5)
    return metrics

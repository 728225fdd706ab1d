"""Training throughput of model/train.py against a minimal plain-PyTorch loop, same model and batches.

    python benchmarks/pretrain.py [--steps 30] [--device cpu|cuda] [--compile]

For each config: `train()` (memory-mapped shards, seeded cursor, LR schedule, clipping, callbacks) vs
the loop nanoGPT-style tutorials write (forward, backward, clip, AdamW step on batches already in
memory), for the same steps on the same model and batch size, both timed after their first step (the
trainer's final checkpoint is not in the timing); each is the median of --repeat interleaved runs.
Prints ms/step, tokens/s, the ratio (≥ 1.0: the trainer costs nothing over the bare loop) and MFU from
the fuller FLOPs count (6N + 12·L·H·Q·T) and the device's peak (measured matmul rate on CPU, the
data-sheet bf16 peak on a known GPU). Ends with PASS/FAIL for the ratio target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.config import GPTConfig  # noqa: E402
from model.data import BatchCursor, TokenShards  # noqa: E402
from model.flops import ACCELERATORS, accelerator_for, measure_cpu_flops, train_flops_per_token  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.runtime import autocast, setup_runtime  # noqa: E402
from model.train import TrainConfig, seconds_per_step  # noqa: E402

console = Console(width=140)

GPT2_STYLE = {"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu"}
CONFIGS = {
    "bundled default (1×64)": GPTConfig(8192, n_layer=1, n_head=1, n_embd=64, block_size=256),
    "small (4×256)": GPTConfig(8192, n_layer=4, n_head=4, n_embd=256, block_size=256),
    "gpt2-mini (6×384, gelu)": GPTConfig(8192, n_layer=6, n_head=6, n_embd=384, block_size=256, **GPT2_STYLE),
    "gpt2-124M": GPTConfig(50304, n_layer=12, n_head=12, n_embd=768, block_size=1024, **GPT2_STYLE),
}


def write_tokens(directory: Path, vocab: int, tokens: int = 2_000_000) -> TokenShards:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, tokens).astype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "train-00000.npy", ids)
    split = {"tokens": tokens, "docs": 1, "bytes": tokens, "shards": ["train-00000.npy"]}
    meta = {
        "format": 1,
        "dtype": ids.dtype.name,
        "vocab_size": vocab,
        "eos_id": 0,
        "splits": {"train": split},
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    return TokenShards(directory, "train")


def reference_loop(config: GPTConfig, data: TokenShards, cfg: TrainConfig, device: torch.device) -> float:
    """Seconds for cfg.steps steps of the plain loop after its first step (batches prepared beforehand)."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model = torch.compile(model) if cfg.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    runtime = setup_runtime(str(device))
    batches = []
    for step in range(cfg.steps + 1):
        x, y = data.sample_batch(cfg.batch_size, config.block_size, BatchCursor(0, step))
        batches.append((torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)))
    started = 0.0
    for step, (x, y) in enumerate(batches):
        if step == 1:  # after one warm-up step
            synchronize(device)
            started = time.perf_counter()
        with autocast(runtime, cfg.precision):
            _, loss, _ = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # nanoGPT's loop clips too
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trainer_seconds(config: GPTConfig, data: TokenShards, cfg: TrainConfig, scratch: Path) -> float:
    """Seconds for cfg.steps steps of model/train.py after its first (warm-up) step, like the plain loop."""
    torch.manual_seed(0)
    return seconds_per_step(GPT(config), data, cfg, scratch / "run", probe=cfg.steps) * cfg.steps


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--repeat", type=int, default=3, help="median of N, trainer and plain loop interleaved"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--configs", nargs="*", default=None, help=f"subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--target-ratio", type=float, default=1.0)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        key = accelerator_for(torch.cuda.get_device_name(device))
        peak = ACCELERATORS[key].peak_flops if key else None
    else:
        peak = measure_cpu_flops()
    shown_peak = f"{peak / 1e12:.3g} TFLOP/s" if peak else "unknown"
    console.print(f"[bold]{device}, peak {shown_peak}, torch {torch.__version__}[/bold]")

    names = args.configs or [n for n in CONFIGS if device.type == "cuda" or "124M" not in n]
    table = Table(
        title=f"pretraining throughput: {args.steps} steps after a warm-up step, best of {args.repeat}"
    )
    columns = ("config", "params", "tokens/step", "trainer ms/step", "plain ms/step", "trainer tok/s")
    for column in (*columns, "plain tok/s", "ratio", "trainer MFU"):
        table.add_column(column, justify="right")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            config = CONFIGS[name]
            batch = 16 if config.block_size <= 256 else 8
            cfg = TrainConfig(
                steps=args.steps,
                batch_size=batch,
                warmup_steps=0,  # the plain loop has no schedule either
                eval_every=args.steps,
                checkpoint_every=args.steps,
                device=str(device),
                compile=args.compile,
            )
            scratch = Path(tmp) / name.split()[0]
            data = write_tokens(scratch, config.vocab_size)
            ours_runs, plain_runs = [], []
            for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits both alike
                plain_runs.append(reference_loop(config, data, cfg, device))
                ours_runs.append(trainer_seconds(config, data, cfg, scratch))
            ours, plain = statistics.median(ours_runs), statistics.median(plain_runs)
            tokens = batch * config.block_size * args.steps
            mfu = tokens / ours * train_flops_per_token(config) / peak if peak else float("nan")
            ratios.append(plain / ours)
            params = sum(p.numel() for p in GPT(config).parameters())
            table.add_row(
                name,
                f"{params:,}",
                f"{tokens // args.steps:,}",
                f"{ours / args.steps * 1e3:.1f}",
                f"{plain / args.steps * 1e3:.1f}",
                f"{tokens / ours:,.0f}",
                f"{tokens / plain:,.0f}",
                f"{plain / ours:.2f}",
                f"{mfu:.1%}",
            )
    console.print(table)
    ok = all(r >= args.target_ratio for r in ratios)
    mark = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
    worst = min(ratios)
    console.print(
        f"{mark} trainer / plain-loop throughput ≥ {args.target_ratio} in every config (worst {worst:.2f})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

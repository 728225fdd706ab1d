"""Decoding speed: the KV cache vs recomputing the prefix, batch scaling, and llmpipe vs transformers.

    python benchmarks/generate.py [--new-tokens 64] [--device cpu|cuda] [--repeat 3]

1. Greedy decoding of `--new-tokens` tokens after a prompt that fills the context to 128 and to 512
   tokens: `model.generate.generate` (prefill once, then one position per step through the KV cache)
   against the loop that reruns the whole sequence for every new token. Both produce the same tokens.
   Target: ≥ 5× at 512.
2. Batch scaling: `generate_batch` on 1, 4 and 16 prompts of mixed lengths (32–96 tokens, left-padded)
   against generating the same prompts one after another.
3. The same greedy generation with transformers' `generate` on llmpipe's HF export of the model (ratio
   ≥ 1: llmpipe is at least as fast).
Each number is the median of --repeat runs; the model is random (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.config import GPTConfig  # noqa: E402
from model.generate import GenerationConfig, generate, generate_batch  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.hf import save_hf  # noqa: E402

console = Console(width=140)
CONFIG = GPTConfig(vocab_size=8192, n_layer=4, n_head=4, n_embd=256, block_size=1024)


def timed(run: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Median seconds of `repeat` runs after one warm-up run."""
    run()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def recompute(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence goes through the model for every token."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    for _ in range(new_tokens):
        token = model(ids)[0][0, -1].argmax()
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(CONFIG).to(device).eval()
    n = args.new_tokens
    greedy = GenerationConfig(max_new_tokens=n)

    table = Table(title=f"greedy decoding of {n} tokens ({CONFIG.n_layer} × {CONFIG.n_embd}, {device})")
    for column in ("context", "KV cache tok/s", "recompute tok/s", "speed-up"):
        table.add_column(column, justify="right")
    speedups = {}
    for context in (128, 512):
        prompt = torch.randint(0, CONFIG.vocab_size, (context - n,)).tolist()
        assert generate(model, prompt, greedy).ids == recompute(model, prompt, n)  # the same tokens
        cached = timed(lambda p=prompt: generate(model, p, greedy), args.repeat, device)
        full = timed(lambda p=prompt: recompute(model, p, n), args.repeat, device)
        speedups[context] = full / cached
        table.add_row(str(context), f"{n / cached:,.0f}", f"{n / full:,.0f}", f"{full / cached:.1f}×")
    console.print(table)

    table = Table(title="generate_batch: prompts of 32–96 tokens, left-padded, decoded together")
    for column in ("prompts", "batched tok/s", "one by one tok/s", "speed-up"):
        table.add_column(column, justify="right")
    lengths = torch.randint(32, 97, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [torch.randint(0, CONFIG.vocab_size, (length,)).tolist() for length in lengths]
    for batch in (1, 4, 16):
        chosen = prompts[:batch]
        together = timed(lambda c=chosen: generate_batch(model, c, greedy), args.repeat, device)
        alone = timed(lambda c=chosen: [generate(model, p, greedy) for p in c], args.repeat, device)
        rates = f"{batch * n / together:,.0f}", f"{batch * n / alone:,.0f}"
        table.add_row(str(batch), *rates, f"{alone / together:.1f}×")
    console.print(table)

    import transformers

    with tempfile.TemporaryDirectory() as directory:
        save_hf(model.cpu(), Path(directory), {"pad_token_id": 0})
        model.to(device)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).to(device).eval()
    table = Table(title="llmpipe vs transformers generate (greedy, the same exported model)")
    for column in ("context", "llmpipe tok/s", "transformers tok/s", "ratio"):
        table.add_column(column, justify="right")
    ratios = []
    for context in (128, 512):
        prompt = torch.randint(0, CONFIG.vocab_size, (context - n,)).tolist()
        ids = torch.tensor([prompt], device=device)

        def hf(ids: torch.Tensor = ids) -> object:
            return theirs.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip

        ours = timed(lambda p=prompt: generate(model, p, greedy), args.repeat, device)
        reference = timed(hf, args.repeat, device)
        ratios.append(reference / ours)
        table.add_row(str(context), f"{n / ours:,.0f}", f"{n / reference:,.0f}", f"{reference / ours:.2f}")
    console.print(table)
    verdict = "PASS" if speedups[512] >= 5 else "FAIL"
    console.print(f"KV cache speed-up at 512: {speedups[512]:.1f}× (target ≥ 5×): {verdict}")


if __name__ == "__main__":
    main()

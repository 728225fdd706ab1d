"""A real pretrained base on a CPU: GGUF load time, and KV-cache decoding speed against transformers.

    llmpipe pull smollm2 && python benchmarks/pretrained.py [--gguf PATH] [--new-tokens 64] [--repeat 3]

1. Load: `model.gguf.read_gguf` (parse + dequantize with the gguf package + build the GPT) against
   transformers' `from_pretrained(dir, gguf_file=...)` on the same file (it dequantizes with the same
   package), wall seconds.
2. Decode: greedy decoding of `--new-tokens` tokens after prompts of 16 and 256 tokens, llmpipe's
   `model.generate.generate` (KV cache) against transformers' `generate(do_sample=False)` on the same
   fp32 weights (both loaded from the GGUF), same threads; tokens/s (new tokens over the whole call,
   prefill included) and the ratio (target ≥ 1.0: llmpipe at least as fast). The two must produce the
   same tokens: the table says whether they did.
3. Forward throughput on 1 × 1024 tokens (what evaluate's bits per byte and a LoRA step cost), both.
Each number is the median of --repeat runs after a warm-up, llmpipe and transformers measured alternately.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.generate import GenerationConfig, generate  # noqa: E402
from model.gguf import read_gguf  # noqa: E402
from tasks.core.bases import KNOWN_BASES, cached_path  # noqa: E402

console = Console(width=140)


def timed_pair(
    ours: Callable[[], object], theirs: Callable[[], object], repeat: int
) -> tuple[float, float, object, object]:
    """Median seconds of each of two runs, measured alternately (ours, theirs, ours, ...) after one warm-up
    each, so that a slow spell of a shared machine hits both; and the last results."""
    results = [ours(), theirs()]
    times: list[list[float]] = [[], []]
    for _ in range(repeat):
        for side, run in enumerate((ours, theirs)):
            start = time.perf_counter()
            results[side] = run()
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1]), results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", type=Path, default=cached_path(KNOWN_BASES["smollm2"]))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf}: not found (run `llmpipe pull smollm2` first)")
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    start = time.perf_counter()
    checkpoint = read_gguf(args.gguf)
    ours = checkpoint.model()
    ours_load = time.perf_counter() - start
    start = time.perf_counter()
    theirs = AutoModelForCausalLM.from_pretrained(
        str(args.gguf.parent), gguf_file=args.gguf.name, dtype=torch.float32
    ).eval()
    theirs_load = time.perf_counter() - start

    loads = Table(
        title=f"loading {args.gguf.name} ({args.gguf.stat().st_size / 1e6:.0f} MB), {threads} threads"
    )
    for column in ("loader", "seconds"):
        loads.add_column(column, justify="right" if column == "seconds" else "left")
    loads.add_row("llmpipe read_gguf + GPT", f"{ours_load:.1f}")
    loads.add_row("transformers from_pretrained(gguf_file=...)", f"{theirs_load:.1f}")
    console.print(loads)

    text = (REPO / "corpus" / "en").rglob("*.txt")
    sample = next(text).read_text(encoding="utf-8")[:20000]
    ids = checkpoint.tokenizer.encode(sample, add_special_tokens=False).ids
    decode = Table(title=f"greedy decoding, {args.new_tokens} new tokens (median of {args.repeat})")
    for column in ("prompt tokens", "llmpipe tok/s", "transformers tok/s", "ratio", "same tokens"):
        decode.add_column(column, justify="right")
    config = GenerationConfig(max_new_tokens=args.new_tokens, strategy="greedy")
    for length in (16, 256):
        prompt = ids[:length]
        tensor = torch.tensor([prompt])

        def hf(t: torch.Tensor = tensor) -> list[int]:
            with torch.no_grad():
                out = theirs.generate(
                    t,
                    attention_mask=torch.ones_like(t),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )
            return out[0, t.shape[1] :].tolist()

        ours_s, theirs_s, ours_ids, theirs_ids = timed_pair(
            lambda p=prompt: generate(ours, p, config).ids, hf, args.repeat
        )
        same = ours_ids == theirs_ids[: len(ours_ids)] if isinstance(ours_ids, list) else False
        decode.add_row(
            str(length),
            f"{args.new_tokens / ours_s:.1f}",
            f"{args.new_tokens / theirs_s:.1f}",
            f"{theirs_s / ours_s:.2f}",
            "yes" if same else "no",
        )
    console.print(decode)

    forward = Table(title="forward pass, 1 × 1024 tokens (median)")
    for column in ("model", "seconds", "tokens/s"):
        forward.add_column(column, justify="right" if column != "model" else "left")
    batch = torch.tensor([ids[:1024]])
    with torch.no_grad():
        ours_f, theirs_f, _, _ = timed_pair(lambda: ours(batch), lambda: theirs(batch), args.repeat)
    forward.add_row("llmpipe", f"{ours_f:.2f}", f"{1024 / ours_f:,.0f}")
    forward.add_row("transformers", f"{theirs_f:.2f}", f"{1024 / theirs_f:,.0f}")
    console.print(forward)


if __name__ == "__main__":
    main()

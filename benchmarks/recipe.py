"""Which pretraining recipe wins at a fixed wall-clock budget: candidates trained for equal time.

    python benchmarks/recipe.py [--seconds 120] [--recipes NAME ...] [--root .] [--device cpu|cuda]

Every recipe trains through the pipeline's own loop (model/train.py) on the pipeline's own tokens: the
data/dedup/ of a finished run under --root, encoded with a BPE of the recipe's vocabulary (trained and
cached under .llmpipe/recipe-tokens/vocab-N/ by the tokenizer and tokenize stages' code). Each recipe
first times a few steps, then gets the number of steps that fills --seconds, with the full warmup and
decay schedule. It is scored on the whole validation split in bits per byte (strided windows, as the
evaluate stage), so recipes with different vocabularies compare. Prints one table:

    recipe | params | embedding share | steps | tokens/s | val bpb

Each recipe changes one lever of the default (params.yaml) so that the table says what each is worth.
Re-run it on your own machine to check the default is still the best choice there; on a GPU, raise
--seconds (a larger budget favours larger shapes and vocabularies).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.config import GPTConfig  # noqa: E402
from model.data import TokenShards  # noqa: E402
from model.flops import count_params  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.perplexity import strided_nll  # noqa: E402
from model.train import LoopSettings, TrainConfig, seconds_per_step, train  # noqa: E402
from tasks.pretrain import SCRATCH_LR, SCRATCH_MATRIX_LR  # noqa: E402

console = Console(width=150)


@dataclass(frozen=True)
class Recipe:
    """One candidate: a model shape and architecture, a vocabulary, and the loop's settings."""

    vocab: int
    n_layer: int
    n_embd: int
    head_dim: int = 64
    block_size: int = 256
    batch_size: int = 32  # sequences per step
    architecture: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields
    loop: dict[str, Any] = field(default_factory=dict)  # LoopSettings fields

    def config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=self.vocab, n_layer=self.n_layer, n_embd=self.n_embd,
            n_head=max(1, self.n_embd // self.head_dim), block_size=self.block_size, **self.architecture,
        )  # fmt: skip


MUON = {"optimizer": "muon", "lr": SCRATCH_LR, "matrix_lr": SCRATCH_MATRIX_LR}  # pretraining's defaults
#: The candidates: the old default, then one lever at a time changed from the default (2×128, vocabulary
#: 2,048, batches of 8 × 256 tokens, Muon).
RECIPES: dict[str, Recipe] = {
    "old default: 1×64 adamw v8k b32": Recipe(8192, 1, 64),
    "default: 2×128 muon v2k": Recipe(2048, 2, 128, batch_size=8, loop=MUON),
    "adamw instead of muon": Recipe(2048, 2, 128, batch_size=8),
    "vocab 4096": Recipe(4096, 2, 128, batch_size=8, loop=MUON),
    "vocab 8192": Recipe(8192, 2, 128, batch_size=8, loop=MUON),
    "untied head": Recipe(2048, 2, 128, batch_size=8, architecture={"tie_embeddings": False}, loop=MUON),
    "qk-norm + relu²": Recipe(
        2048, 2, 128, batch_size=8, architecture={"qk_norm": True, "mlp": "relu2"}, loop=MUON
    ),
    "deeper: 4×128": Recipe(2048, 4, 128, batch_size=8, loop=MUON),
    "wider: 3×192": Recipe(2048, 3, 192, batch_size=8, loop=MUON),
    "batch 16": Recipe(2048, 2, 128, batch_size=16, loop=MUON),
    "matrix_lr 0.04": Recipe(2048, 2, 128, batch_size=8, loop={**MUON, "matrix_lr": 0.04}),
    "embedding lr 1e-2": Recipe(2048, 2, 128, batch_size=8, loop={**MUON, "lr": 1e-2}),
}


def tokens_for(vocab: int, root: Path, cache: Path) -> Path:
    """data/tokens/ of `root`'s corpus under a BPE of `vocab` tokens, built once by the stages' code."""
    from tasks.core.layout import DEDUP_DIR, TOKENS_DIR
    from tasks.tokenize import TokenizeParams
    from tasks.tokenize import run as tokenize
    from tasks.tokenizer import TokenizerParams
    from tasks.tokenizer import run as train_tokenizer

    work = cache / f"vocab-{vocab}"
    if (work / TOKENS_DIR / "meta.json").is_file():
        return work / TOKENS_DIR
    if not (root / DEDUP_DIR).is_dir():
        raise SystemExit(
            f"{root / DEDUP_DIR}: no deduplicated corpus; run `llmpipe run` (or up to dedup) first"
        )
    (work / DEDUP_DIR).parent.mkdir(parents=True, exist_ok=True)
    if not (work / DEDUP_DIR).exists():
        shutil.copytree(root / DEDUP_DIR, work / DEDUP_DIR)
    console.print(f"training a {vocab}-token BPE and encoding the corpus (once) in {work}")
    train_tokenizer(TokenizerParams(vocab_size=vocab, compare=False), work)
    tokenize(TokenizeParams(), work)
    return work / TOKENS_DIR


def run_recipe(name: str, recipe: Recipe, tokens: Path, seconds: float, device: str) -> dict[str, Any]:
    """Train `recipe` for about `seconds` of training steps; its row of the table."""
    train_data, val_data = TokenShards(tokens, "train"), TokenShards(tokens, "val")
    config = recipe.config()
    settings = LoopSettings(device=device, seed=1337, **recipe.loop)
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        probe = settings.for_run(2, recipe.batch_size)
        step_seconds = seconds_per_step(GPT(config), train_data, probe, Path(scratch) / "probe", probe=10)
        steps = max(10, int(seconds / step_seconds))
        cfg: TrainConfig = dataclasses.replace(
            settings.for_run(steps, recipe.batch_size),
            eval_every=steps,
            eval_batches=1,
            checkpoint_every=steps,
        )
        torch.manual_seed(cfg.seed)
        model = GPT(config)
        result = train(model, train_data, None, cfg, Path(scratch) / "run", name, label=name[:24])
    val_tokens = np.concatenate([np.asarray(shard) for shard in val_data.shards])
    scored = strided_nll(model, val_tokens.astype(np.int64), context=recipe.block_size)
    bits = float(scored.nll.sum()) / math.log(2)
    counts = count_params(config)
    return {
        "recipe": name,
        "params": counts.total,
        "embedding share": (counts.token_embedding + counts.lm_head) / counts.total,
        "steps": steps,
        "seconds": result.seconds,
        "tokens/s": result.tokens_per_second,
        "val bpb": bits / val_data.info["bytes"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="training wall time per recipe")
    parser.add_argument("--recipes", nargs="*", default=None, help=f"subset of: {'; '.join(RECIPES)}")
    parser.add_argument("--root", type=Path, default=REPO, help="a project whose data/dedup/ exists")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    names = args.recipes or list(RECIPES)
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s): {unknown}; known: {list(RECIPES)}")
    cache = args.root / ".llmpipe" / "recipe-tokens"
    rows = []
    for name in names:
        recipe = RECIPES[name]
        rows.append(
            run_recipe(name, recipe, tokens_for(recipe.vocab, args.root, cache), args.seconds, args.device)
        )
        console.print(rows[-1])
    table = Table(title=f"recipes, {args.seconds:g} s of training each on {args.device} (val: whole split)")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for row in sorted(rows, key=lambda r: r["val bpb"]):
        table.add_row(
            row["recipe"], f"{row['params']:,}", f"{row['embedding share']:.0%}", str(row["steps"]),
            f"{row['seconds']:.0f}", f"{row['tokens/s']:,.0f}", f"{row['val bpb']:.3f}",
        )  # fmt: skip
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stage `evaluate`: how good the model is, on one scale, and what it writes.

1. Perplexity and bits per byte on the validation split (data/tokens val), scored with strided sliding
   windows (model/perplexity.py); bits per byte is tokenizer-independent (special tokens count 0 bytes).
   The start of the split is scored up to `max_bytes` of text, so models with different tokenizers (a
   from-scratch run, a pretrained base) are scored on the same bytes.
2. References on exactly the same bytes, in bits per byte: unigram, bigram and trigram models with add-k
   smoothing (model/ngram.py) trained on the training split and scored on the same tokens; xz given the
   training text (model/compress.py); the GRU baseline of the `gru` stage (models/gru, the same token
   shards and wall time); and, when the run starts from a pretrained base, that base as released
   (models/init). The course's bigram transition heatmap is drawn for the most frequent tokens.
3. With a LoRA adapter (models/lora) and the domain corpus (data/domain), the domain validation split
   scored by the base model and by base + adapter.
4. A generation report: each prompt in params × greedy, beam 4, temperatures 0.1/0.5/0.7/1.0, top-k 50,
   top-p 0.95 and repetition penalty 1.2 → the text, mean token probability, distinct-1/-2, repetition
   rate and length; and a per-token table (token, p, log p) of greedy decoding for the first prompt.
5. Pictures: bits per byte against the references, the bigram heatmap, one attention head's weights on a
   prompt, and the attention mask pattern (causal, and with the model's sliding window when it has one).
Outputs: reports/evaluate/ (summary.md, generations.md, greedy_tokens.csv, *.png), plots/evaluate_bpb.csv,
metrics/evaluate.json; the generation table also goes to MLflow as a table artifact.
"""

from __future__ import annotations

import copy
import csv
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from model.checkpoint import load_checkpoint
from model.compress import conditional_xz_bits
from model.generate import GenerationConfig
from model.lora import load_adapter
from model.ngram import NgramModel
from model.perplexity import Scored, strided_nll
from model.rnn import load_gru
from model.textgen import Generator, load_generator
from model.tokens import token_bytes
from tasks.core import tracking
from tasks.core.io import atomic_dir, atomic_file
from tasks.core.layout import (
    BASE_DIR,
    DOMAIN_DIR,
    GRU_DIR,
    INIT_DIR,
    LORA_DIR,
    PLOTS_DIR,
    REPORTS_DIR,
    TOKENS_DIR,
)
from tasks.core.params import ParamsError, StageParams
from tasks.serving import registry

REPORT_DIR = REPORTS_DIR / "evaluate"
BPB_PLOT = PLOTS_DIR / "evaluate_bpb.csv"
#: The bars of bpb.png: (label, metric prefix); the GPT first, then the references it is judged against.
BPB_ROWS = (
    ("gpt", "val"),
    ("base as released", "base"),
    ("xz (LZMA 9e)", "xz"),
    ("gru", "gru"),
    ("unigram", "unigram"),
    ("bigram", "bigram"),
    ("trigram", "trigram"),
)
HEATMAP_TOKENS = 12  # the bigram heatmap's most frequent tokens
#: The decoding strategies of the generation report: (name, settings).
STRATEGIES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("greedy", {"strategy": "greedy"}),
    ("beam 4", {"strategy": "beam", "num_beams": 4}),
    ("temperature 0.1", {"strategy": "sample", "temperature": 0.1}),
    ("temperature 0.5", {"strategy": "sample", "temperature": 0.5}),
    ("temperature 0.7", {"strategy": "sample", "temperature": 0.7}),
    ("temperature 1.0", {"strategy": "sample", "temperature": 1.0}),
    ("top-k 50", {"strategy": "sample", "top_k": 50}),
    ("top-p 0.95", {"strategy": "sample", "top_p": 0.95}),
    ("repetition penalty 1.2", {"strategy": "greedy", "repetition_penalty": 1.2}),
)


@dataclass
class EvaluateParams(StageParams):
    context: int | None = 1024  # scoring window in tokens, at most the model's context; null: the model's
    stride: int | None = None  # sliding-window stride in tokens; null: half the window
    max_bytes: int | None = None  # score the start of the validation split, this many bytes; null: all
    ngram_k: float = 0.01  # add-k smoothing of the n-gram baselines
    prompts: list[str] = field(
        default_factory=lambda: ["The movie was full of", "ROMEO.", "In the beginning"]
    )
    max_new_tokens: int = 32
    seed: int = 0  # the sampled strategies' seed
    attention_prompt: str = "In the beginning God created the heaven and the earth."
    attention_layer: int = -1  # which layer's attention to draw (-1: the last)
    attention_head: int = 0
    register: bool = True  # log + register the model in MLflow (tasks/serving/registry.py)
    registered_model: str = "llmpipe"  # the adapted model registers as <name>-lora
    alias: str = "champion"  # on the version with the lowest bits per byte

    def validate(self) -> None:
        for key in ("stride", "context"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ParamsError(
                    f"params.yaml: evaluate.{key} must be ≥ 1 or null, got {getattr(self, key)}"
                )
        if (
            (self.max_bytes is not None and self.max_bytes < 1)
            or self.max_new_tokens < 1
            or self.ngram_k <= 0
        ):
            raise ParamsError(
                "params.yaml: evaluate.max_bytes ≥ 1 (or null), max_new_tokens ≥ 1 and ngram_k > 0 needed"
            )
        if not self.prompts:
            raise ParamsError("params.yaml: evaluate.prompts is empty")
        for key in ("registered_model", "alias"):
            value = getattr(self, key)
            if self.register and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
                raise ParamsError(
                    f"params.yaml: evaluate.{key} must be letters, digits, '_', '.' or '-', got {value!r}"
                )


def _split_tokens(directory: Path, split: str, max_bytes: int | None, sizes: np.ndarray) -> np.ndarray:
    """The split's tokens from the start, as many as hold at most `max_bytes` bytes of text (all: None).
    Read shard by shard, so memory follows what is kept, not the split."""
    from model.data import TokenShards

    shards = TokenShards(directory, split)
    kept, total = [], 0
    for start in range(0, len(shards), 1 << 20):
        chunk = shards.tokens(start, min(1 << 20, len(shards) - start)).astype(np.int64)
        if max_bytes is not None:
            ends = total + np.cumsum(sizes[chunk])
            count = int(np.searchsorted(ends, max_bytes, side="right"))
            if count < len(chunk):
                kept.append(chunk[:count])
                break
            total = int(ends[-1]) if len(ends) else total
        kept.append(chunk)
    return np.concatenate(kept) if kept else np.empty(0, np.int64)


def distinct(ids: list[int], n: int) -> float:
    """Share of the text's n-grams that are different (1.0: no n-gram repeats)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return round(len(set(grams)) / len(grams), 4) if grams else 0.0


def generation_rows(generator: Generator, params: EvaluateParams) -> tuple[list[dict[str, Any]], list[Any]]:
    """The report's rows (prompt × strategy) and the greedy steps of the first prompt."""
    rows, greedy_steps = [], []
    keep = generator.model.config.block_size // 2  # a long prompt keeps its end: room is left to write
    for prompt in params.prompts:
        prompt_ids = generator.encode(prompt)[-keep:]
        for name, settings in STRATEGIES:
            config = GenerationConfig(max_new_tokens=params.max_new_tokens, seed=params.seed, **settings)
            result = generator.generate(prompt_ids, config)
            probs = [step.prob for step in result.steps]
            if name == "greedy" and prompt == params.prompts[0]:
                greedy_steps = result.steps
            ids = [i for i in result.ids if i not in generator.stop_ids]
            rows.append(
                {
                    "prompt": prompt,
                    "strategy": name,
                    "text": result.text,
                    "mean_token_p": round(float(np.mean(probs)), 4) if probs else None,
                    "distinct_1": distinct(ids, 1),
                    "distinct_2": distinct(ids, 2),
                    "repetition_rate": round(1 - distinct(ids, 1), 4) if ids else 0.0,
                    "tokens": len(result.ids),
                }
            )
    return rows, greedy_steps


def split_text(directory: Path, split: str, tokenizer: Tokenizer, boundary: int) -> Iterator[bytes]:
    """The split's text as UTF-8, decoded from its tokens about a million at a time, each piece cut after
    a document end (so no character is split between pieces)."""
    from model.data import TokenShards

    shards, carry = TokenShards(directory, split), np.empty(0, np.int64)
    for start in range(0, len(shards), 1 << 20):
        chunk = np.concatenate([carry, shards.tokens(start, min(1 << 20, len(shards) - start))])
        ends = np.flatnonzero(chunk == boundary)
        cut = int(ends[-1]) + 1 if len(ends) else 0
        carry = chunk[cut:]
        if cut:
            yield tokenizer.decode(chunk[:cut].tolist()).encode("utf-8")
    if len(carry):
        yield tokenizer.decode(carry.tolist()).encode("utf-8")


def validation_metrics(
    generator: Generator,
    root: Path,
    params: EvaluateParams,
    sizes: np.ndarray,
    ngrams: dict[str, NgramModel],
) -> dict[str, Any]:
    """The model and every reference on the validation split ({} when it has under 2 tokens); `ngrams`
    are the count models by name, counted on the training split."""
    val = _split_tokens(root / TOKENS_DIR, "val", params.max_bytes, sizes)
    if len(val) < 2:
        return {}
    scored = strided_nll(generator.model, val, params.stride, params.context)
    metrics: dict[str, Any] = {
        "val_loss": round(scored.mean, 5),
        "val_perplexity": round(math.exp(min(scored.mean, 50)), 3),
        "val_bpb": round(scored.bits_per_byte(sizes, val), 5),
        "scored_tokens": len(scored.index),
        "scored_bytes": int(sizes[val[scored.index]].sum()),
    }
    for name, directory in (("base", root / INIT_DIR), ("gru", root / GRU_DIR)):
        if (directory / "model.safetensors").is_file():  # a pretrained base; the GRU baseline when it ran
            reference = load_gru(directory) if name == "gru" else load_checkpoint(directory)
            nll = strided_nll(reference, val, params.stride, params.context)
            metrics[f"{name}_bpb"] = round(nll.bits_per_byte(sizes, val), 5)
    boundary = generator.special.document_end
    text = generator.tokenizer.decode(val.tolist()).encode("utf-8")
    bits = conditional_xz_bits(
        lambda: split_text(root / TOKENS_DIR, "train", generator.tokenizer, boundary), text
    )
    metrics["xz_bpb"] = round(bits / max(len(text), 1), 5)
    for name, baseline in ngrams.items():
        counted = Scored(scored.index, -baseline.log_prob(val, scored.index))  # the same tokens, scored
        metrics[f"{name}_bpb"] = round(counted.bits_per_byte(sizes, val), 5)
    return metrics


def bigram_heatmap(generator: Generator, train: np.ndarray, bigram: NgramModel, path: Path) -> None:
    """P(next | previous) of the bigram baseline among the training split's most frequent tokens."""
    from matplotlib.figure import Figure

    if len(train) < 2:
        return
    counts = np.bincount(train, minlength=bigram.vocab_size)
    counts[list(generator.stop_ids)] = 0  # document ends are not words
    top = [int(i) for i in np.argsort(-counts, kind="stable")[:HEATMAP_TOKENS] if counts[i] > 0]
    table = np.stack([bigram.distribution([row])[top] for row in top])
    labels = [generator.token(i).replace(" ", "␣").replace("\n", "⏎") for i in top]  # spaces visible
    fig = Figure(figsize=(8, 7))
    ax = fig.subplots()
    image = ax.imshow(table, cmap="Blues")
    for (row, column), value in np.ndenumerate(table):
        color = "white" if value > table.max() / 2 else "black"
        ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(len(top)), labels, rotation=60, fontsize=8)
    ax.set_yticks(range(len(top)), labels, fontsize=8)
    ax.set(xlabel="next token", ylabel="previous token",
           title=f"bigram P(next | previous), the {len(top)} most frequent training tokens")  # fmt: skip
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(params: EvaluateParams, root: Path) -> dict[str, Any]:
    """Read models/base (+ models/lora, data/domain) and data/tokens; write reports/evaluate and plots."""
    root = Path(root)
    generator = load_generator(root / BASE_DIR)
    sizes = token_bytes(generator.tokenizer)
    train = _split_tokens(root / TOKENS_DIR, "train", None, sizes)
    ngrams = {  # counted once: scored in validation_metrics, the bigram drawn in the heatmap
        name: NgramModel(train, n, len(sizes), params.ngram_k, boundary=generator.special.document_end)
        for n, name in ((1, "unigram"), (2, "bigram"), (3, "trigram"))
    }
    metrics = validation_metrics(generator, root, params, sizes, ngrams)  # empty: no validation text
    domain_tokens = root / DOMAIN_DIR / TOKENS_DIR
    if (root / LORA_DIR / "adapter_config.json").is_file() and (domain_tokens / "meta.json").is_file():
        domain = _split_tokens(domain_tokens, "val", params.max_bytes, sizes)
        if len(domain) >= 2:
            adapted = load_adapter(copy.deepcopy(generator.model), root / LORA_DIR).eval()
            for name, model in (("base", generator.model), ("lora", adapted)):
                domain_bpb = strided_nll(model, domain, params.stride, params.context).bits_per_byte(
                    sizes, domain
                )
                metrics[f"domain_bpb_{name}"] = round(domain_bpb, 5)

    rows, greedy_steps = generation_rows(generator, params)
    metrics["generations"] = len(rows)
    tracking.log_table(rows, "generations.json")
    bpb = {name: metrics[f"{key}_bpb"] for name, key in BPB_ROWS if f"{key}_bpb" in metrics}
    with atomic_file(root / BPB_PLOT) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["model", "bpb"])
        writer.writerows(bpb.items())
    with atomic_dir(root / REPORT_DIR) as out:
        _write_reports(out, generator, params, metrics, bpb, rows, greedy_steps)
        bigram_heatmap(generator, train, ngrams["bigram"], out / "bigram_heatmap.png")
    if params.register and tracking.active_run_id() is not None:
        register_models(root, params, metrics)
    return metrics


def register_models(root: Path, params: EvaluateParams, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """models/base (and base + models/lora) as new registry versions; the alias follows the best bpb."""
    name = params.registered_model
    versions = [
        registry.register(name, root / BASE_DIR, None, "val_bpb", metrics.get("val_bpb"), params.alias)
    ]
    if "domain_bpb_lora" in metrics:
        adapted = root / BASE_DIR, root / LORA_DIR, "domain_bpb_lora", metrics["domain_bpb_lora"]
        versions.append(registry.register(f"{name}-lora", *adapted, params.alias))
    tracking.set_tags({f"llmpipe.registered.{v['name']}": v["version"] for v in versions})
    for v in versions:
        print(f"registered {v['uri']}; @{params.alias} → version {v['champion']}")
    return versions


def _write_reports(
    out: Path,
    generator: Generator,
    params: EvaluateParams,
    metrics: dict[str, Any],
    bpb: dict[str, float],
    rows: list[dict[str, Any]],
    greedy_steps: list[Any],
) -> None:
    from matplotlib.figure import Figure

    from model.gpt import causal_mask

    lines = ["# Evaluation", ""]
    if bpb:
        lines += [
            "| model | bits per byte |",
            "|---|---|",
            *(f"| {name} | {value} |" for name, value in bpb.items()),
        ]
        lines += ["", f"val loss {metrics['val_loss']} nats/token, perplexity {metrics['val_perplexity']}, "
                  f"{metrics['scored_tokens']:,} tokens scored."]  # fmt: skip
    else:
        lines.append("The validation split is empty: nothing was scored (see tokenize.val_fraction).")
    if "domain_bpb_lora" in metrics:
        lines += [
            "",
            f"Domain validation: base {metrics['domain_bpb_base']} bpb, "
            f"with the LoRA adapter {metrics['domain_bpb_lora']}.",
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    columns = [
        "prompt",
        "strategy",
        "mean_token_p",
        "distinct_1",
        "distinct_2",
        "repetition_rate",
        "tokens",
        "text",
    ]
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(row[c]).replace("|", "\\|").replace("\n", "⏎") for c in columns]
        table.append("| " + " | ".join(cells) + " |")
    (out / "generations.md").write_text("# Generations\n\n" + "\n".join(table) + "\n", encoding="utf-8")
    with open(out / "greedy_tokens.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["position", "token", "id", "p", "log_p"])
        for i, step in enumerate(greedy_steps, start=1):
            writer.writerow([i, generator.token(step.id), step.id, f"{step.prob:.5f}", f"{step.logprob:.4f}"])

    if bpb:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        colors = ["tab:blue" if name == "gpt" else "tab:grey" for name in bpb]
        bars = ax.barh(list(bpb), list(bpb.values()), color=colors)
        ax.bar_label(bars, fmt="%.3f", padding=2)  # the values, not only their lengths
        ax.margins(x=0.15)  # room right of the longest bar for its label
        ax.invert_yaxis()  # the GPT on top
        ax.set(xlabel="bits per byte (lower is better)", title="validation bits per byte, same bytes")
        fig.tight_layout()
        fig.savefig(out / "bpb.png", dpi=100)

    import torch

    model = generator.model
    ids = generator.encode(params.attention_prompt)[: model.config.block_size]
    with torch.no_grad():
        weights = model(torch.tensor([ids]), return_attention=True)[2][params.attention_layer][
            0, params.attention_head
        ]
    labels = [generator.token(i) for i in ids]
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    image = ax.imshow(weights.numpy(), cmap="viridis")
    ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ids)), labels, fontsize=7)
    layer = params.attention_layer % model.config.n_layer
    ax.set(title=f"attention, layer {layer}, head {params.attention_head}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=100)

    size = 16
    window = model.config.sliding_window or size // 4
    fig = Figure(figsize=(8, 4))
    for ax, (title, mask) in zip(
        fig.subplots(1, 2),
        (("causal", causal_mask(size, 0, None, torch.device("cpu"))),
         (f"sliding window {window}", causal_mask(size, 0, window, torch.device("cpu")))),
        strict=True,
    ):  # fmt: skip
        ax.imshow(mask.numpy(), cmap="Greys")
        ax.set(
            title=f"{title} mask (row: query, column: key)", xlabel="key position", ylabel="query position"
        )
    fig.tight_layout()
    fig.savefig(out / "masks.png", dpi=100)

"""Stage `tokenizer`: train a byte-level BPE tokenizer on data/dedup/ and compare tokenizer families.

0. With a pretrained base (models/init/ from `pretrain.init`), its tokenizer is adopted instead: the
   model's embeddings are indexed by its ids, so the corpus must be encoded with it. Nothing is trained;
   its files are copied to models/tokenizer/ and measured on the holdout like a trained one (and the
   family comparison still runs when enabled, to show what a tokenizer trained on this corpus would do).
1. Train: HF `tokenizers` byte-level BPE (GPT-4 style pre-tokenization regex, then bytes → printable
   symbols), no unknown token, no normalizer: every Unicode string round-trips exactly,
   `decode(encode(x)) == x`. The corpus is streamed batch by batch (each document cut to
   `max_doc_chars`), so memory is bounded by the pair counts, not the corpus.
2. Save models/tokenizer/ atomically: tokenizer.json plus tokenizer_config.json and
   special_tokens_map.json, so `transformers.PreTrainedTokenizerFast.from_pretrained(dir)` loads it with
   bos/eos/pad set and the chat template of model/chat.py.
3. Compare (optional): on a deterministic document-level split (hash of id + seed), train byte-level
   BPE, WordPiece, Unigram and a character baseline on the training part and measure them on the
   holdout: chars/bytes per token, unk rate, exact round-trips, training time, encoding speed
   (tasks/data/tokenizer_families.py: reports/tokenizer/comparison.{csv,png}, examples.md,
   plots/tokenizer_comparison.csv).

How to encode ordinary text (important): special tokens (`<|eos|>`, ...) are added as *special*
tokens, and by default `tokenizers` matches their spelling inside raw text. Ordinary text must never
produce a special id, so callers must load the tokenizer with `model.tokens.load_tokenizer()` (or pass
it through `model.tokens.for_ordinary_text`: the flag is not stored in tokenizer.json) and append
special ids explicitly:

    tok = load_tokenizer(root / TOKENIZER_DIR)
    ids = tok.encode(text, add_special_tokens=False).ids + [tok.token_to_id("<|eos|>")]

With transformers, tokenizer_config.json sets `split_special_tokens: true`, which does the same.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from model import chat
from model.tokens import (
    BOS_TOKEN,
    DEFAULT_SPECIAL_TOKENS,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLES,
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    for_ordinary_text,
    load_tokenizer,
)
from tasks.core.io import atomic_dir, hash_fraction, iter_batches, write_json
from tasks.core.layout import DEDUP_DIR, INIT_DIR, PLOTS_DIR, REPORTS_DIR, TOKENIZER_DIR
from tasks.core.params import ParamsError, StageParams
from tasks.data.tokenizer_families import (
    COMPARISON_COLUMNS,
    compare_families,
    measure_tokenizer,
    write_comparison,
)

REPORT_DIR = REPORTS_DIR / "tokenizer"
COMPARISON_PLOT = PLOTS_DIR / "tokenizer_comparison.csv"

#: The GPT-4 (cl100k_base) pre-tokenization regex: contractions, letter runs with one leading
#: non-letter, numbers in groups of ≤ 3 digits, punctuation runs, newlines, other whitespace.
GPT4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BYTE_ALPHABET_SIZE = 256


@dataclass
class TokenizerParams(StageParams):
    vocab_size: int = 8192  # target vocabulary size, special tokens and the 256 byte symbols included
    min_frequency: int = 2  # a pair must occur at least this often to be merged
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    pattern: str = GPT4_PATTERN  # pre-tokenization regex (merges never cross its pieces)
    max_doc_chars: int = 100_000  # each document is cut to this many characters for training (bounded memory)
    batch_size: int = 1000  # documents per batch fed to the trainer
    compare: bool = True  # also train BPE / WordPiece / Unigram / char on a split and report
    compare_holdout_fraction: float = 0.1  # fraction of documents held out (hash of id + seed)
    compare_max_holdout_chars: int = 5_000_000  # cap on holdout text kept in memory for evaluation
    compare_max_train_chars: int = 3_000_000  # the comparison tokenizers train on at most this much text
    seed: int = 0  # holdout split seed

    def validate(self) -> None:
        def fail(key: str, message: str) -> None:
            raise ParamsError(f"params.yaml: tokenizer.{key} {message}")

        specials = self.special_tokens
        if len(set(specials)) != len(specials) or any(not s for s in specials):
            fail("special_tokens", f"must be distinct non-empty strings, got {specials!r}")
        for required in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN):
            if required not in specials:
                fail("special_tokens", f"must include {required!r}, got {specials!r}")
        minimum = BYTE_ALPHABET_SIZE + len(specials)
        if self.vocab_size < minimum:
            fail(
                "vocab_size",
                f"must be ≥ {minimum} (256 byte symbols + {len(specials)} special tokens), "
                f"got {self.vocab_size}",
            )
        for key in (
            "min_frequency",
            "max_doc_chars",
            "batch_size",
            "compare_max_holdout_chars",
            "compare_max_train_chars",
        ):
            if getattr(self, key) < 1:
                fail(key, f"must be ≥ 1, got {getattr(self, key)}")
        if not 0.0 < self.compare_holdout_fraction < 1.0:
            fail("compare_holdout_fraction", f"must be in (0, 1), got {self.compare_holdout_fraction}")
        try:
            Regex(self.pattern)
        except Exception as err:
            fail("pattern", f"is not a valid regex: {err}")


# --------------------------------------------------------------------------------------------------
# Building and loading tokenizers
# --------------------------------------------------------------------------------------------------


def byte_level_bpe(pattern: str) -> Tokenizer:
    """An untrained byte-level BPE: regex split, then bytes → 256 printable symbols; no unk, no normalizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def bpe_trainer(p: TokenizerParams) -> trainers.BpeTrainer:
    return trainers.BpeTrainer(
        vocab_size=p.vocab_size,
        min_frequency=p.min_frequency,
        special_tokens=list(p.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )


# --------------------------------------------------------------------------------------------------
# Corpus streaming and the holdout split
# --------------------------------------------------------------------------------------------------


@dataclass
class CorpusStats:
    docs: int = 0
    chars: int = 0
    bytes: int = 0


def text_batches(
    directory: Path,
    p: TokenizerParams,
    keep: Callable[[str], bool] | None = None,
    stats: CorpusStats | None = None,
) -> Iterator[list[str]]:
    """Stream document texts in batches, each cut to `max_doc_chars`; `keep(id)` filters documents."""
    for batch in iter_batches(directory, columns=["id", "text"], batch_size=p.batch_size):
        ids = batch.column("id").to_pylist()
        texts = batch.column("text").to_pylist()
        out = []
        for doc_id, text in zip(ids, texts, strict=True):
            if text is None or (keep is not None and not keep(doc_id)):
                continue
            text = text[: p.max_doc_chars]
            out.append(text)
            if stats is not None:
                stats.docs += 1
                stats.chars += len(text)
                stats.bytes += len(text.encode("utf-8", "surrogatepass"))
        if out:
            yield out


def collect_holdout(directory: Path, p: TokenizerParams) -> list[str]:
    """The holdout documents' texts (cut to max_doc_chars), at most `compare_max_holdout_chars` in all."""
    kept: list[str] = []
    total = 0
    holdout = _holdout_filter(p)
    for texts in text_batches(directory, p, keep=holdout):
        for text in texts:
            if total + len(text) > p.compare_max_holdout_chars:
                return kept
            kept.append(text)
            total += len(text)
    return kept


def _holdout_filter(p: TokenizerParams) -> Callable[[str], bool]:
    return lambda doc_id: hash_fraction(p.seed, doc_id) < p.compare_holdout_fraction


def _train_filter(p: TokenizerParams, total_chars: int) -> Callable[[str], bool]:
    """Non-holdout documents, sampled (by an independent hash) down to about `compare_max_train_chars`,
    evenly across the whole corpus rather than its first files."""
    sample = min(1.0, p.compare_max_train_chars / max(total_chars, 1))
    holdout = _holdout_filter(p)
    return lambda doc_id: not holdout(doc_id) and hash_fraction(p.seed + 1, doc_id) < sample


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_tokenizer(tokenizer: Tokenizer, directory: Path, p: TokenizerParams) -> None:
    """tokenizer.json + the two transformers config files, written into `directory` (already atomic)."""
    tokenizer.save(str(directory / TOKENIZER_FILE), pretty=True)
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [
            t for t in p.special_tokens if t not in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
        ],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "split_special_tokens": True,  # special spellings in text are text (encode_special_tokens)
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
    }
    if all(f"<|{role}|>" in p.special_tokens for role in ROLES):
        config["chat_template"] = chat.CHAT_TEMPLATE  # apply_chat_template renders model/chat.py's text
    write_json(directory / "tokenizer_config.json", config)
    write_json(directory / "special_tokens_map.json", special_map)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def train(directory: Path, p: TokenizerParams, stats: CorpusStats | None = None) -> Tokenizer:
    """Train the byte-level BPE on every document of `directory` (streamed)."""
    tokenizer = byte_level_bpe(p.pattern)
    tokenizer.train_from_iterator(text_batches(directory, p, stats=stats), trainer=bpe_trainer(p))
    return for_ordinary_text(tokenizer)


def adopt(base: Path, corpus: Path, directory: Path, p: TokenizerParams, stats: CorpusStats) -> Tokenizer:
    """The pretrained base's tokenizer files copied to `directory`; the corpus is only counted."""
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, directory / name)
    for _ in text_batches(corpus, p, stats=stats):
        pass
    return load_tokenizer(directory)


def run(params: TokenizerParams, root: Path) -> dict[str, int | float]:
    """Read data/dedup/ (and models/init/), write models/tokenizer/ (+ comparison reports), return metrics."""
    source = root / DEDUP_DIR
    base = root / INIT_DIR
    adopted = (base / TOKENIZER_FILE).is_file()
    stats = CorpusStats()
    start = time.perf_counter()
    with atomic_dir(root / TOKENIZER_DIR) as tmp:
        if adopted:
            tokenizer = adopt(base, source, tmp, params, stats)
        else:
            tokenizer = train(source, params, stats)
            save_tokenizer(tokenizer, tmp, params)
        if stats.docs == 0 or stats.chars == 0:
            raise ValueError(f"{source}: no text to train a tokenizer on (0 non-empty documents)")
    train_seconds = time.perf_counter() - start
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if adopted:
        print(f"tokenizer: adopted the pretrained base's tokenizer ({actual:,} tokens) from {base}")
    elif actual < params.vocab_size:
        print(
            f"tokenizer: warning: the corpus ({stats.docs} documents, {stats.chars} characters) only "
            f"supports {actual} tokens at min_frequency={params.min_frequency}, fewer than "
            f"tokenizer.vocab_size={params.vocab_size}; using {actual}"
        )

    holdout = collect_holdout(source, params)
    if not holdout:  # tiny corpus: no document fell in the holdout; evaluate on a few training docs
        holdout = next(text_batches(source, params), [])[:10]
    main = measure_tokenizer(tokenizer, None, holdout)
    metrics: dict[str, int | float] = {
        "adopted": int(adopted),  # 1: the pretrained base's tokenizer, not trained here
        "vocab_size": actual,
        "vocab_size_requested": params.vocab_size,
        "docs": stats.docs,
        "chars": stats.chars,
        "bytes": stats.bytes,
        "train_seconds": round(train_seconds, 3),
        "holdout_docs": len(holdout),
        "holdout_chars_per_token": main["chars_per_token"],
        "holdout_bytes_per_token": main["bytes_per_token"],
    }
    if not params.compare:  # the plot and report hold this tokenizer alone
        alone = {
            "family": "adopted" if adopted else "bpe",
            "vocab_size": actual,
            "train_seconds": train_seconds,
            **main,
        }
        write_comparison(root / REPORT_DIR, root / COMPARISON_PLOT, [alone], {})
    else:
        rows, examples = compare_families(
            params,
            bpe=lambda: (byte_level_bpe(params.pattern), bpe_trainer(params)),
            training_texts=lambda: text_batches(source, params, keep=_train_filter(params, stats.chars)),
            holdout=holdout,
        )
        write_comparison(root / REPORT_DIR, root / COMPARISON_PLOT, rows, examples)
        for row in rows:
            for key in COMPARISON_COLUMNS[1:]:
                metrics[f"compare.{row['family']}.{key}"] = row[key]
    return metrics

"""Stage `tokenizer`: train a byte-level BPE tokenizer on data/dedup/ and compare tokenizer families.

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
   (reports/tokenizer/comparison.{csv,png}, examples.md, plots/tokenizer_comparison.csv).

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

import csv
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from model import chat
from model.tokens import (
    BOS_TOKEN,
    DEFAULT_SPECIAL_TOKENS,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLES,
    TOKENIZER_FILE,
    byte_decoder,
    for_ordinary_text,
)
from tasks.core.io import atomic_dir, atomic_file, hash_fraction, iter_batches, write_json
from tasks.core.layout import DEDUP_DIR, PLOTS_DIR, REPORTS_DIR, TOKENIZER_DIR
from tasks.core.params import ParamsError, StageParams

REPORT_DIR = REPORTS_DIR / "tokenizer"
COMPARISON_PLOT = PLOTS_DIR / "tokenizer_comparison.csv"

#: The GPT-4 (cl100k_base) pre-tokenization regex: contractions, letter runs with one leading
#: non-letter, numbers in groups of ≤ 3 digits, punctuation runs, newlines, other whitespace.
GPT4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BYTE_ALPHABET_SIZE = 256

#: Unknown-token spellings of the comparison families that have one.
WORDPIECE_UNK = "[UNK]"
UNIGRAM_UNK = "<unk>"
CHAR_UNK = "<unk>"
FAMILIES = ("bpe", "wordpiece", "unigram", "char")
COMPARISON_COLUMNS = (
    "family",
    "vocab_size",
    "chars_per_token",
    "bytes_per_token",
    "unk_rate",
    "roundtrip_exact",
    "train_seconds",
    "encode_mb_per_s",
)

#: Sentences segmented by every family in reports/tokenizer/examples.md.
EXAMPLE_SENTENCES = (
    "To be, or not to be, that is the question.",
    "The tokenizer's vocabulary has 8192 entries; unseen words still round-trip.",
    "吾輩は猫である。名前はまだ無い。",
    "パッケージ管理システムを使ってソフトウェアをインストールします。",
)


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
# Comparison
# --------------------------------------------------------------------------------------------------


class CharTokenizer:
    """Character-level baseline: one id per distinct training character, unk for anything unseen."""

    def __init__(self, specials: list[str]) -> None:
        self.vocab: dict[str, int] = {}
        for token in [*specials, CHAR_UNK]:
            self.vocab.setdefault(token, len(self.vocab))
        self.unk_id = self.vocab[CHAR_UNK]
        self.inverse: list[str] = []

    def train(self, batches: Iterator[list[str]]) -> None:
        chars: set[str] = set()
        for texts in batches:
            for text in texts:
                chars.update(text)
        for ch in sorted(chars):
            self.vocab.setdefault(ch, len(self.vocab))
        self.inverse = [""] * len(self.vocab)
        for token, i in self.vocab.items():
            self.inverse[i] = token

    def encode(self, text: str) -> list[int]:
        get, unk = self.vocab.get, self.unk_id
        return [get(ch, unk) for ch in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.inverse[i] for i in ids)

    def tokens(self, text: str) -> list[str]:
        return [ch if ch in self.vocab else CHAR_UNK for ch in text]

    def get_vocab_size(self) -> int:
        return len(self.vocab)


def _family_tokenizer(family: str, p: TokenizerParams) -> tuple[Tokenizer, Any, str | None]:
    specials = list(p.special_tokens)
    if family == "bpe":
        return byte_level_bpe(p.pattern), bpe_trainer(p), None
    if family == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=WORDPIECE_UNK))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=p.vocab_size,
            min_frequency=p.min_frequency,
            special_tokens=[*specials, WORDPIECE_UNK],
            show_progress=False,
        )
        return tok, trainer, WORDPIECE_UNK
    if family == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        unigram = trainers.UnigramTrainer(
            vocab_size=p.vocab_size,
            special_tokens=[*specials, UNIGRAM_UNK],
            unk_token=UNIGRAM_UNK,
            show_progress=False,
        )
        return tok, unigram, UNIGRAM_UNK
    raise ValueError(f"unknown tokenizer family {family!r}")


def measure(
    encode_batch: Callable[[list[str]], list[list[int]]],
    decode: Callable[[list[int]], str],
    unk_id: int | None,
    holdout: list[str],
) -> dict[str, float]:
    """chars/bytes per token, unk rate, exact round-trip fraction and encoding speed on `holdout`."""
    n_chars = sum(len(t) for t in holdout)
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in holdout)
    start = time.perf_counter()
    encoded = encode_batch(holdout)
    seconds = max(time.perf_counter() - start, 1e-9)
    n_tokens = sum(len(ids) for ids in encoded)
    n_unk = 0 if unk_id is None else sum(ids.count(unk_id) for ids in encoded)
    exact = sum(decode(ids) == text for ids, text in zip(encoded, holdout, strict=True))
    return {
        "chars_per_token": n_chars / n_tokens if n_tokens else math.nan,
        "bytes_per_token": n_bytes / n_tokens if n_tokens else math.nan,
        "unk_rate": n_unk / n_tokens if n_tokens else 0.0,
        "roundtrip_exact": exact / len(holdout) if holdout else math.nan,
        "encode_mb_per_s": n_bytes / 1e6 / seconds,
    }


def _hf_measure(tok: Tokenizer, unk: str | None, holdout: list[str]) -> dict[str, float]:
    # encode_batch_fast (tokenizers ≥ 0.21) skips offsets: the speed a training-data encoder sees
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    return measure(encode_batch, decode, None if unk is None else tok.token_to_id(unk), holdout)


def compare_families(
    directory: Path, p: TokenizerParams, holdout: list[str], total_chars: int
) -> tuple[list[dict[str, Any]], dict[str, list[list[str]]]]:
    """Train every family on (a sample of) the non-holdout documents; rows of the comparison table +
    example tokens."""
    rows: list[dict[str, Any]] = []
    examples: dict[str, list[list[str]]] = {}
    for family in FAMILIES:
        start = time.perf_counter()
        if family == "char":
            char = CharTokenizer(list(p.special_tokens))
            char.train(text_batches(directory, p, keep=_train_filter(p, total_chars)))
            seconds = time.perf_counter() - start
            metrics = measure(char.encode_batch, char.decode, char.unk_id, holdout)
            vocab = char.get_vocab_size()
            examples[family] = [char.tokens(s) for s in EXAMPLE_SENTENCES]
        else:
            tok, trainer, unk = _family_tokenizer(family, p)
            tok.train_from_iterator(
                text_batches(directory, p, keep=_train_filter(p, total_chars)), trainer=trainer
            )
            seconds = time.perf_counter() - start
            for_ordinary_text(tok)
            metrics = _hf_measure(tok, unk, holdout)
            vocab = tok.get_vocab_size(with_added_tokens=True)
            examples[family] = [_display_tokens(tok, s) for s in EXAMPLE_SENTENCES]
        rows.append({"family": family, "vocab_size": vocab, **metrics, "train_seconds": seconds})
    return rows, examples


def _token(tok: Tokenizer, token_id: int) -> str:
    token = tok.id_to_token(token_id)
    if token is None:
        raise ValueError(f"id {token_id} is not in the vocabulary")
    return token


def _display_tokens(tok: Tokenizer, text: str) -> list[str]:
    """Readable pieces of `text`: a byte-level token that is not whole UTF-8 shows as its hex bytes
    (`⟨e5 90⟩`), since a multi-byte character can be split across tokens."""
    ids = tok.encode(text, add_special_tokens=False).ids
    if not isinstance(tok.decoder, decoders.ByteLevel):
        return [_token(tok, i) for i in ids]
    table = byte_decoder()
    pieces = []
    for i in ids:
        raw = bytes(table[ch] for ch in _token(tok, i))
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append("⟨" + raw.hex(" ") + "⟩")
    return pieces


def _write_comparison(root: Path, rows: list[dict[str, Any]], examples: dict[str, list[list[str]]]) -> None:
    with atomic_file(root / REPORT_DIR / "comparison.csv") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COMPARISON_COLUMNS)
        for row in rows:
            writer.writerow([_fmt(row[c]) for c in COMPARISON_COLUMNS])
    with atomic_file(root / COMPARISON_PLOT) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["family", "chars_per_token", "bytes_per_token"])
        for row in rows:
            writer.writerow([row["family"], _fmt(row["chars_per_token"]), _fmt(row["bytes_per_token"])])

    lines = [
        "# Tokenizer segmentations",
        "",
        "Tokens separated by │; a byte-level token that is not whole UTF-8 shows as ⟨hex bytes⟩.",
        "",
    ]
    for i, sentence in enumerate(EXAMPLE_SENTENCES):
        lines += [f"## {sentence}", ""]
        for family in FAMILIES:
            pieces = examples[family][i]
            shown = "│".join(piece.replace("\n", "\\n") for piece in pieces)
            lines.append(f"- **{family}** ({len(pieces)} tokens): `{shown}`")
        lines.append("")
    with atomic_file(root / REPORT_DIR / "examples.md") as handle:
        handle.write("\n".join(lines))

    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 3)
    names = [row["family"] for row in rows]
    for ax, (key, title) in zip(
        axes,
        (
            ("chars_per_token", "characters / token (↑)"),
            ("unk_rate", "unk rate (↓)"),
            ("encode_mb_per_s", "encode MB/s (↑)"),
        ),
        strict=True,
    ):
        ax.bar(names, [row[key] for row in rows], color=["C0", "C1", "C2", "C3"][: len(rows)])
        ax.set_title(title)
    fig.suptitle("tokenizer families on the holdout")
    fig.tight_layout()
    with atomic_file(root / REPORT_DIR / "comparison.png", "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def train(directory: Path, p: TokenizerParams, stats: CorpusStats | None = None) -> Tokenizer:
    """Train the byte-level BPE on every document of `directory` (streamed)."""
    tokenizer = byte_level_bpe(p.pattern)
    tokenizer.train_from_iterator(text_batches(directory, p, stats=stats), trainer=bpe_trainer(p))
    return for_ordinary_text(tokenizer)


def run(params: TokenizerParams, root: Path) -> dict[str, int | float]:
    """Read data/dedup/, write models/tokenizer/ (+ comparison reports), return metrics."""
    source = root / DEDUP_DIR
    stats = CorpusStats()
    start = time.perf_counter()
    tokenizer = train(source, params, stats)
    train_seconds = time.perf_counter() - start
    if stats.docs == 0 or stats.chars == 0:
        raise ValueError(f"{source}: no text to train a tokenizer on (0 non-empty documents)")
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual < params.vocab_size:
        print(
            f"tokenizer: warning: the corpus ({stats.docs} documents, {stats.chars} characters) only "
            f"supports {actual} tokens at min_frequency={params.min_frequency}, fewer than "
            f"tokenizer.vocab_size={params.vocab_size}; using {actual}"
        )

    with atomic_dir(root / TOKENIZER_DIR) as tmp:
        save_tokenizer(tokenizer, tmp, params)

    holdout = collect_holdout(source, params)
    if not holdout:  # tiny corpus: no document fell in the holdout; evaluate on a few training docs
        holdout = next(text_batches(source, params), [])[:10]
    main = _hf_measure(tokenizer, None, holdout)
    metrics: dict[str, int | float] = {
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
    if params.compare:
        rows, examples = compare_families(source, params, holdout, stats.chars)
        _write_comparison(root, rows, examples)
        for row in rows:
            for key in COMPARISON_COLUMNS[1:]:
                metrics[f"compare.{row['family']}.{key}"] = row[key]
    return metrics

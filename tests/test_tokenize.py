"""The tokenize stage (tasks/tokenize.py) and its reader (model/data.py) on a tiny real tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import BatchCursor, TokenShards
from model.tokens import EOS_TOKEN, TOKENIZER_FILE
from tasks.core.io import content_id, hash_fraction
from tasks.core.layout import TOKENIZER_DIR, TOKENS_DIR
from tasks.core.params import ParamsError
from tasks.normalize import NORMALIZED_SCHEMA as SCHEMA
from tasks.tokenize import TokenizeParams, run

WORDS = [
    "the",
    "harbour",
    "town",
    "woke",
    "slowly",
    "under",
    "a",
    "grey",
    "sky",
    "fishermen",
    "carried",
    "nets",
    "down",
    "to",
    "boats",
    "while",
    "baker",
    "opened",
    "shutters",
    "and",
    "set",
    "warm",
    "loaves",
    "on",
    "counter",
    "children",
    "ran",
    "along",
    "sea",
    "wall",
    "calling",
    "gulls",
    "old",
    "woman",
    "swept",
    "steps",
    "of",
    "chapel",
    "as",
    "she",
    "had",
    "done",
    "every",
    "morning",
    "for",
    "forty",
    "years",
    "nobody",
    "expected",
]
JAPANESE = [
    "春になると、川沿いの桜並木には多くの人が集まります。",
    "夜になると提灯に明かりがともり、昼とは違う静かな美しさが広がります。",
    "この時期だけは、忙しい毎日を忘れてゆっくり過ごす人が多いようです。",
]
TRAP = f"A document that talks about the {EOS_TOKEN} marker and <|bos|> too, mid-sentence {EOS_TOKEN}."

TOKENIZER_JSON = TOKENIZER_DIR / TOKENIZER_FILE


def _documents() -> list[dict]:
    rng = random.Random(7)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(5, 60))).capitalize() + "." for _ in range(44)]
    texts += [f"{a} {b}" for a, b in zip(JAPANESE, reversed(JAPANESE), strict=True)] + JAPANESE
    texts.append(TRAP)
    return [
        {
            "id": content_id(text),
            "text": text,
            "source": f"test/{i}",
            "bytes": len(text.encode()),
            "script": "cjk" if any(ord(c) > 0x3000 for c in text) else "latin",
        }
        for i, text in enumerate(texts)
    ]


def _write_corpus(root: Path, docs: list[dict], shards: int = 1) -> None:
    directory = root / "data" / "dedup"
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.parquet"):
        old.unlink()
    for s in range(shards):
        part = docs[s::shards]
        pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), directory / f"part-{s:05d}.parquet")


def _train_tokenizer(path: Path, docs: list[dict]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|bos|>", EOS_TOKEN, "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([d["text"] for d in docs], trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("tokenize")
    docs = _documents()
    _write_corpus(root, docs)
    _train_tokenizer(root / TOKENIZER_JSON, docs)
    return root, docs


def _expected(root: Path, docs: list[dict], params: TokenizeParams) -> dict[str, list[list[int]]]:
    """Per split, each document's ids (+eos) in input order, encoded one by one as plain text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(root / TOKENIZER_JSON))
    tokenizer.encode_special_tokens = True
    eos = tokenizer.token_to_id(EOS_TOKEN)
    out: dict[str, list[list[int]]] = {"train": [], "val": []}
    for doc in docs:
        split = "val" if hash_fraction(params.seed, doc["id"]) < params.val_fraction else "train"
        out[split].append([*tokenizer.encode(doc["text"], add_special_tokens=False).ids, eos])
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / TOKENS_DIR).iterdir())}


def test_shards_hold_each_document_then_eos(corpus: tuple[Path, list[dict]]) -> None:
    root, docs = corpus
    params = TokenizeParams(val_fraction=0.2, seed=3)
    metrics = run(params, root)
    expected = _expected(root, docs, params)
    assert expected["val"] and expected["train"], "fixture should put documents in both splits"
    meta = json.loads((root / TOKENS_DIR / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    for split in ("train", "val"):
        shards = TokenShards(root / TOKENS_DIR, split)
        assert shards.dtype == np.uint16 and all(s.dtype == np.uint16 for s in shards.shards)
        flat = [t for doc in expected[split] for t in doc]
        assert shards.tokens(0, len(shards)).tolist() == flat
        assert [d.tolist() for d in shards.iter_documents()] == [doc[:-1] for doc in expected[split]]
        assert metrics[f"{split}_tokens"] == len(flat) == meta["splits"][split]["tokens"]
        assert metrics[f"{split}_docs"] == len(expected[split]) == shards.num_docs
        # Boundaries fall exactly on eos: one eos per document, each the last token of its document.
        eos_positions = np.flatnonzero(shards.tokens(0, len(shards)) == shards.eos_id)
        assert eos_positions.tolist() == (np.cumsum([len(d) for d in expected[split]]) - 1).tolist()
    assert metrics["encode_mb_per_s"] > 0 and metrics["train_bytes_per_token"] > 1


def test_splits_disjoint_and_independent_of_shard_layout(
    corpus: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    root, docs = corpus
    params = TokenizeParams(val_fraction=0.3, seed=11)
    ids = {}
    for layout, order in (("one", docs), ("shuffled", random.Random(1).sample(docs, len(docs)))):
        other = tmp_path / layout
        _write_corpus(other, order, shards=1 if layout == "one" else 4)
        (other / TOKENIZER_JSON).parent.mkdir(parents=True)
        (other / TOKENIZER_JSON).write_bytes((root / TOKENIZER_JSON).read_bytes())
        run(params, other)
        shards = {s: TokenShards(other / TOKENS_DIR, s) for s in ("train", "val")}
        by_tokens = {
            tuple(_expected(other, [d], TokenizeParams(0.0))["train"][0][:-1]): d["id"] for d in docs
        }
        ids[layout] = {
            s: sorted(by_tokens[tuple(d.tolist())] for d in sh.iter_documents()) for s, sh in shards.items()
        }
        assert not set(ids[layout]["train"]) & set(ids[layout]["val"])
        assert len(ids[layout]["train"]) + len(ids[layout]["val"]) == len(docs)
    assert ids["one"] == ids["shuffled"]


def test_rerun_is_byte_identical(corpus: tuple[Path, list[dict]]) -> None:
    root, _ = corpus
    params = TokenizeParams(val_fraction=0.1, tokens_per_shard=500)
    run(params, root)
    first = _snapshot(root)
    run(params, root)
    assert _snapshot(root) == first


def test_special_token_spelling_in_text_is_plain_text(corpus: tuple[Path, list[dict]]) -> None:
    root, docs = corpus
    run(TokenizeParams(val_fraction=0.0), root)
    shards = TokenShards(root / TOKENS_DIR, "train")
    trap = next(d for d in shards.iter_documents() if len(d) and d.tolist() == _trap_ids(root))
    assert shards.eos_id not in trap.tolist()
    assert shards.num_docs == len(docs)  # as many eos as documents: none came from the text
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(root / TOKENIZER_JSON)).decode(trap.tolist()) == TRAP


def _trap_ids(root: Path) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(root / TOKENIZER_JSON))
    plain = tokenizer.encode(TRAP, add_special_tokens=False).ids
    assert tokenizer.token_to_id(EOS_TOKEN) in plain  # without the setting the marker WOULD be special
    tokenizer.encode_special_tokens = True
    return tokenizer.encode(TRAP, add_special_tokens=False).ids


def test_small_shards_and_reads_across_boundaries(corpus: tuple[Path, list[dict]]) -> None:
    root, docs = corpus
    run(TokenizeParams(val_fraction=0.0, tokens_per_shard=100), root)
    shards = TokenShards(root / TOKENS_DIR, "train")
    assert len(shards.shards) == -(-len(shards) // 100) > 3
    assert all(len(s) == 100 for s in shards.shards[:-1])
    flat = np.concatenate([np.asarray(s) for s in shards.shards])
    for start, length in ((95, 10), (0, 250), (199, 2), (100, 100), (len(flat) - 7, 7), (42, 0)):
        assert shards.tokens(start, length).tolist() == flat[start : start + length].tolist()
    with pytest.raises(IndexError):
        shards.tokens(len(flat) - 1, 2)
    assert len(list(shards.iter_documents())) == len(docs)
    assert [t for d in shards.iter_documents() for t in (*d.tolist(), shards.eos_id)] == flat.tolist()


def test_batches_deterministic_and_shifted(corpus: tuple[Path, list[dict]]) -> None:
    root, _ = corpus
    run(TokenizeParams(val_fraction=0.0, tokens_per_shard=100), root)
    shards = TokenShards(root / TOKENS_DIR, "train")
    cursor = BatchCursor(seed=5, step=17)
    x, y = shards.sample_batch(8, 32, cursor)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    again = TokenShards(root / TOKENS_DIR, "train").sample_batch(8, 32, BatchCursor(5, 17))
    np.testing.assert_array_equal(again[0], x)
    np.testing.assert_array_equal(again[1], y)
    assert not np.array_equal(shards.sample_batch(8, 32, cursor.advance())[0], x)
    flat = shards.tokens(0, len(shards)).astype(np.int64)
    for row_x, row_y in zip(x, y, strict=True):  # every row is a real window of the split
        starts = [s for s in range(len(flat) - 32) if np.array_equal(flat[s : s + 32], row_x)]
        assert any(np.array_equal(flat[s + 1 : s + 33], row_y) for s in starts)


def test_tiny_corpus_still_gets_a_val_document(tmp_path: Path, corpus: tuple[Path, list[dict]]) -> None:
    root, docs = corpus
    two = docs[:2]
    params = TokenizeParams(val_fraction=1e-9)
    assert all(hash_fraction(params.seed, d["id"]) >= params.val_fraction for d in two)
    _write_corpus(tmp_path, two)
    (tmp_path / TOKENIZER_JSON).parent.mkdir(parents=True)
    (tmp_path / TOKENIZER_JSON).write_bytes((root / TOKENIZER_JSON).read_bytes())
    metrics = run(params, tmp_path)
    assert (metrics["train_docs"], metrics["val_docs"]) == (1, 1)


def test_bad_params_and_missing_tokenizer(tmp_path: Path, corpus: tuple[Path, list[dict]]) -> None:
    with pytest.raises(ParamsError, match=r"params.yaml: tokenize.val_fraction"):
        run(TokenizeParams(val_fraction=1.5), tmp_path)
    with pytest.raises(ParamsError, match=r"tokenize.tokens_per_shard"):
        TokenizeParams(tokens_per_shard=0).validate()
    _write_corpus(tmp_path, corpus[1])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / TOKENIZER_JSON)):
        run(TokenizeParams(), tmp_path)
    bad = tmp_path / TOKENIZER_JSON
    from tokenizers import Tokenizer, models

    bad.parent.mkdir(parents=True)
    Tokenizer(models.BPE()).save(str(bad))
    with pytest.raises(ValueError, match=r"models/tokenizer: no eos token.*<\|eos\|>"):
        run(TokenizeParams(), tmp_path)
    assert not (tmp_path / TOKENS_DIR).exists()  # nothing half-written

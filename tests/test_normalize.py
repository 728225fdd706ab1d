"""Stage `normalize`: text cleaning, Gopher filters (Latin and CJK), outputs, params and atomicity."""

from __future__ import annotations

import csv
import random
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tasks.normalize as normalize
from tasks.core.io import DOC_SCHEMA, ShardWriter, content_id
from tasks.core.layout import NORMALIZED_DIR, PLOTS_DIR, QUARANTINE_DIR, RAW_DIR, REPORTS_DIR
from tasks.core.params import ParamsError, parse_section
from tasks.data.cleanup import normalize_text
from tasks.data.words import detect_script
from tasks.normalize import NORMALIZED_SCHEMA, REASONS, NormalizeParams, classify

ENGLISH = (
    "The old harbour town wakes slowly in winter. Before the sun has cleared the hills, the fishing "
    "boats are already returning with their catch, and the gulls follow them in long, noisy circles. "
    "Along the quay, shopkeepers roll up their shutters and sweep the night's sand from their doorsteps. "
    "By nine o'clock the market square is crowded with people buying bread, vegetables and fresh fish, "
    "while children on their way to school stop to watch the men mending nets by the water. In the "
    "afternoon the wind usually rises, and most visitors retreat to the small cafés that line the "
    "narrow streets behind the harbour, where they sit for hours reading newspapers and drinking coffee."
)

JAPANESE = (
    "今日は朝から雨が降っていたので、私は近くの図書館へ行くことにした。図書館の中はとても静かで、"
    "窓の外から聞こえる雨の音が心地よかった。私は歴史の本を何冊か選び、奥の席に座ってゆっくりと"
    "読み始めた。昔の人々がどのように暮らし、何を考えていたのかを知るのはとても面白い。気がつくと"
    "外はすっかり暗くなっていて、雨もいつの間にか止んでいた。帰り道では、読んだばかりの話を思い出し"
    "ながら、少し遠回りをして歩いた。"
)

JAPANESE_SPAM = "激安セール開催中今すぐクリックして購入してください。" * 12

# Ordinary words for crafted documents (distinct enough that no repetition filter fires by accident).
VOCAB_TEXT = """
    river mountain garden window kitchen morning evening teacher student village market bridge
    station library summer autumn winter spring forest valley harbour island castle letter story
    picture painter farmer baker doctor lawyer soldier sailor captain engine wheel hammer candle
    blanket pillow mirror ladder basket bottle button carpet curtain feather flower helmet jacket
"""
VOCAB = VOCAB_TEXT.split()


def words(count: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(count))


def sentences(count: int, seed: int = 0) -> list[str]:
    """`count` distinct plain sentences of 8 words."""
    rng = random.Random(seed)
    return [" ".join(rng.sample(VOCAB, 8)).capitalize() + "." for _ in range(count)]


def write_raw(root: Path, texts: list[str], rows_per_shard: int = 50_000) -> None:
    with ShardWriter(root / RAW_DIR, DOC_SCHEMA, rows_per_shard=rows_per_shard) as writer:
        for i, text in enumerate(texts):
            writer.write(
                {
                    "id": content_id(text),
                    "text": text,
                    "source": f"doc{i}",
                    "bytes": len(text.encode("utf-8")),
                }
            )


def read_dir(directory: Path) -> list[dict]:
    rows: list[dict] = []
    for path in sorted(directory.glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def reason_of(text: str, params: NormalizeParams | None = None) -> str | None:
    params = params or NormalizeParams()
    cleaned = normalize_text(text, params.unicode_form, params.fix_encoding)
    _, reason = classify(cleaned, params)
    return None if reason is None else reason.split(":", 1)[0]


# --------------------------------------------------------------------------------------------------
# Text normalization
# --------------------------------------------------------------------------------------------------


def test_composed_and_decomposed_forms_normalize_identically() -> None:
    composed = unicodedata.normalize("NFC", "Un café à Paris")
    decomposed = unicodedata.normalize("NFD", "Un café à Paris")
    assert composed != decomposed
    for form in ("NFKC", "NFC"):
        assert normalize_text(composed, form) == normalize_text(decomposed, form) == composed
    assert normalize_text(composed, "NFD") == decomposed
    assert normalize_text(decomposed, "none") == decomposed
    assert normalize_text("ﬁne ＡＢＣ", "NFKC") == "fine ABC"


def test_invisible_and_control_characters_are_removed() -> None:
    text = "zero\u200bwidth\u200c\u200d join\u2060er \ufeffbom soft\u00adhyphen \u202ebidi\u202c "
    text += "\x00\x07bell\x7f"
    assert normalize_text(text) == "zerowidth joiner bom softhyphen bidi bell"
    assert normalize_text("tab\there\nline") == "tab here\nline"


def test_whitespace_is_collapsed() -> None:
    text = "  a   b\t\tc  \r\nd\re\r\n\r\n\r\n\n f \u00a0 g  \n\n\n\n\nh   "
    assert normalize_text(text) == "a b c\nd\ne\n\n f g\n\nh"
    assert normalize_text("line one\x0cline two\u2028three") == "line one\nline two\nthree"


def test_mojibake_is_repaired_only_when_enabled() -> None:
    assert normalize_text("Un cafÃ© trÃ¨s Ã©lÃ©gant") == "Un café très élégant"
    assert normalize_text("Un cafÃ©", fix_encoding=False) == "Un cafÃ©"
    assert normalize_text("naÃ¯ve â€œquotesâ€\x9d") == "naïve \u201cquotes\u201d"


def test_script_detection() -> None:
    assert detect_script(ENGLISH) == "latin"
    assert detect_script(JAPANESE) == "cjk"
    assert detect_script("Привет, как дела? Всё хорошо.") == "other"
    assert detect_script("1234 5678") == "other"
    # Japanese with some English terms is still CJK.
    assert detect_script("Debian のパッケージ管理システムは apt と dpkg です。") == "cjk"


# --------------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------------


def test_normal_english_and_japanese_paragraphs_pass() -> None:
    assert len(ENGLISH.split()) >= 60
    assert len(JAPANESE) >= 150 and " " not in JAPANESE
    assert reason_of(ENGLISH) is None
    assert reason_of(JAPANESE) is None
    assert reason_of("\n\n".join([ENGLISH, JAPANESE, ENGLISH.upper()])) is None


def test_repetitive_japanese_spam_is_dropped() -> None:
    assert reason_of(JAPANESE_SPAM) in ("top_ngram", "duplicate_ngram")
    assert reason_of("お得な情報はこちら！" * 30) in ("top_ngram", "duplicate_ngram")
    assert reason_of("\n".join(["今すぐ登録して豪華賞品を当てよう"] * 5 + [JAPANESE])) == "duplicate_lines"


PROSE = " ".join(sentences(12))  # 96 words of distinct sentences

CRAFTED = {
    "empty_after_normalization": "\u200b \t\u00ad\n\n\ufeff ",
    "too_short": "Hello there, world.",
    "too_long": " ".join(sentences(200, seed=1)),
    "too_few_words": "This sentence is certainly long enough in characters, yet it still has far too few "
    "words in it to count as a real document.",
    "too_many_words": " ".join(f"{VOCAB[i % len(VOCAB)]}{i}" for i in range(450)),
    "mean_word_length": " ".join(
        random.Random(2).choice(["a", "an", "of", "to", "in", "I"]) for _ in range(80)
    ),
    "symbol_ratio": PROSE + " " + " ".join(f"#tag{i}" for i in range(15)),
    "bullet_lines": "\n".join(f"- {sentence}" for sentence in sentences(10, seed=3)),
    "ellipsis_lines": "\n".join(
        s[:-1] + ("..." if i % 2 else ".") for i, s in enumerate(sentences(10, seed=4))
    ),
    "alpha_ratio": PROSE + " " + " ".join(str(1000 + 37 * i) for i in range(40)),
    "duplicate_paragraphs": "\n\n".join([words(20, 5), words(20, 6), words(20, 5), words(20, 5)]),
    "duplicate_lines": "\n".join([*sentences(7, seed=7), *["Click here to subscribe to our newsletter"] * 5]),
    "top_ngram": " ".join(f"buy now {VOCAB[i % len(VOCAB)]}" for i in range(60)),
    "duplicate_ngram": " ".join(sentences(6, seed=8)) * 1 + " " + " ".join(sentences(6, seed=8)),
}


CRAFTED_PARAMS = NormalizeParams(max_chars=5000, max_words=400)


@pytest.mark.parametrize("reason", list(CRAFTED))
def test_each_filter_drops_its_crafted_document(reason: str) -> None:
    assert reason_of(CRAFTED[reason], CRAFTED_PARAMS) == reason


def test_a_disabled_filter_lets_its_document_pass() -> None:
    assert reason_of(CRAFTED["bullet_lines"], NormalizeParams(max_bullet_line_fraction=None)) is None
    assert reason_of(CRAFTED["too_few_words"], NormalizeParams(min_words=0)) is None


def test_cjk_skips_mean_word_length_and_scales_word_counts() -> None:
    # 200 CJK characters = 100 words at cjk_chars_per_word 2: passes min_words 50, fails min_words 150.
    assert reason_of(JAPANESE, NormalizeParams(min_mean_word_length=5)) is None
    assert reason_of(JAPANESE, NormalizeParams(min_words=150)) == "too_few_words"


def test_reasons_cover_every_check() -> None:
    assert set(CRAFTED) == set(REASONS)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

NFC_DOC = unicodedata.normalize("NFC", ENGLISH)
NFD_DOC = unicodedata.normalize("NFD", ENGLISH)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    texts = [
        NFC_DOC,
        NFD_DOC,
        JAPANESE,
        JAPANESE_SPAM,
        "Mojibake: " + ENGLISH.replace("é", "Ã©"),
        "\u200b" + ENGLISH.replace(" ", "  \t") + "\r\n",
        *CRAFTED.values(),
    ]
    write_raw(tmp_path, texts, rows_per_shard=7)
    return tmp_path, texts


def test_run_writes_normalized_quarantine_plots_and_metrics(corpus: tuple[Path, list[str]]) -> None:
    root, texts = corpus
    params = NormalizeParams(max_chars=5000, max_words=400, batch_size=4)
    metrics = normalize.run(params, root)

    assert metrics["docs_in"] == len(texts) == metrics["docs_out"] + metrics["dropped"]
    assert metrics["dropped"] == sum(metrics[f"dropped_{reason}"] for reason in REASONS)
    assert all(f"dropped_{reason}" in metrics for reason in REASONS)
    assert metrics["chars_in"] == sum(len(t) for t in texts)
    assert metrics["docs_encoding_fixed"] >= 1
    assert metrics["seconds"] >= 0

    kept = read_dir(root / NORMALIZED_DIR)
    assert pq.read_schema(next((root / NORMALIZED_DIR).glob("*.parquet"))).equals(NORMALIZED_SCHEMA)
    assert len(kept) == metrics["docs_out"] == 5
    assert metrics["chars_out"] == sum(len(row["text"]) for row in kept)
    for row in kept:
        assert row["id"] == content_id(row["text"])
        assert row["bytes"] == len(row["text"].encode("utf-8"))
    by_source = {row["source"]: row for row in kept}
    # NFC and NFD inputs become the same document; the mojibake and whitespace are repaired.
    assert by_source["doc0"]["text"] == by_source["doc1"]["text"] == NFC_DOC
    assert by_source["doc0"]["id"] == by_source["doc1"]["id"]
    assert by_source["doc2"]["script"] == "cjk" and by_source["doc0"]["script"] == "latin"
    assert by_source["doc4"]["text"] == "Mojibake: " + NFC_DOC
    assert by_source["doc5"]["text"] == NFC_DOC
    assert metrics["docs_out_cjk"] == 1 and metrics["docs_out_latin"] == 4

    dropped = read_dir(root / QUARANTINE_DIR / "normalize")
    assert len(dropped) == metrics["dropped"]
    raw_by_source = {f"doc{i}": text for i, text in enumerate(texts)}
    for row in dropped:
        assert row["text"] == raw_by_source[row["source"]]  # the raw text: nothing is lost
        assert row["id"] == content_id(row["text"])
        assert row["reason"].split(":", 1)[0] in REASONS
    reasons = {row["source"]: row["reason"].split(":", 1)[0] for row in dropped}
    assert reasons["doc3"] in ("top_ngram", "duplicate_ngram")
    assert "<" in next(r["reason"] for r in dropped if r["reason"].startswith("too_few_words"))
    # One crafted document per reason, plus the Japanese spam.
    expected = {reason: 1 + (reason == reasons["doc3"]) for reason in REASONS}
    assert {reason: metrics[f"dropped_{reason}"] for reason in REASONS} == expected

    with open(root / PLOTS_DIR / "normalize_lengths.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["log10_chars", "before", "after"]
    assert sum(int(r["before"]) for r in rows) == metrics["docs_in"]
    assert sum(int(r["after"]) for r in rows) == metrics["docs_out"]
    png = root / REPORTS_DIR / "normalize" / "length_hist.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(root / REPORTS_DIR / "normalize" / "drops.csv", encoding="utf-8") as handle:
        drops = {row["reason"]: row for row in csv.DictReader(handle)}
    assert set(drops) == set(REASONS)
    assert drops["bullet_lines"]["count"] == "1" and drops["bullet_lines"]["example_source"].startswith("doc")


def test_all_dropped_still_writes_schema_shards(tmp_path: Path) -> None:
    write_raw(tmp_path, ["too short", ""])
    metrics = normalize.run(NormalizeParams(), tmp_path)
    assert metrics["docs_out"] == 0 and metrics["dropped"] == 2
    assert metrics["dropped_empty_after_normalization"] == 1 and metrics["dropped_too_short"] == 1
    shards = list((tmp_path / NORMALIZED_DIR).glob("*.parquet"))
    assert len(shards) == 1 and pq.read_table(shards[0]).schema.equals(NORMALIZED_SCHEMA)


def test_output_does_not_depend_on_batch_size_or_workers(corpus: tuple[Path, list[str]]) -> None:
    root, _ = corpus
    normalize.run(NormalizeParams(batch_size=1000), root)
    expected = read_dir(root / NORMALIZED_DIR), read_dir(root / QUARANTINE_DIR / "normalize")
    normalize.run(NormalizeParams(batch_size=3, workers=2), root)
    assert (read_dir(root / NORMALIZED_DIR), read_dir(root / QUARANTINE_DIR / "normalize")) == expected


def test_a_dask_local_cluster_gives_the_same_output(corpus: tuple[Path, list[str]]) -> None:
    pytest.importorskip("distributed")
    root, _ = corpus
    normalize.run(NormalizeParams(workers=1), root)
    expected = read_dir(root / NORMALIZED_DIR), read_dir(root / QUARANTINE_DIR / "normalize")
    normalize.run(NormalizeParams(batch_size=5, workers=2, dask_address="local"), root)
    assert (read_dir(root / NORMALIZED_DIR), read_dir(root / QUARANTINE_DIR / "normalize")) == expected


def test_failure_mid_run_keeps_previous_output(
    corpus: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = corpus
    normalize.run(NormalizeParams(workers=1), root)
    before = {p.name: p.read_bytes() for p in (root / NORMALIZED_DIR).iterdir()}

    real = normalize.process_texts
    calls = []

    def flaky(texts: list[str | None], params: NormalizeParams) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(texts, params)

    monkeypatch.setattr(normalize, "process_texts", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        normalize.run(NormalizeParams(batch_size=2, workers=1), root)
    assert {p.name: p.read_bytes() for p in (root / NORMALIZED_DIR).iterdir()} == before
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Parquet shards"):
        normalize.run(NormalizeParams(), tmp_path)
    assert not (tmp_path / NORMALIZED_DIR).exists()


# --------------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------------


def test_params_section_parses() -> None:
    params = parse_section(
        NormalizeParams,
        "normalize",
        {"unicode_form": "NFC", "min_words": 20, "max_words": None, "max_top_2gram_char_fraction": 0.25},
    )
    assert params.unicode_form == "NFC" and params.min_words == 20 and params.max_words is None
    assert params.top_ngram_limits() == [(2, 0.25), (3, 0.18), (4, 0.16)]
    assert parse_section(NormalizeParams, "normalize", None) == NormalizeParams()
    params = parse_section(NormalizeParams, "normalize", {"max_duplicate_5gram_char_fraction": 0})
    assert [n for n, _ in params.duplicate_ngram_limits()] == [6, 7, 8, 9, 10]


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"min_words": -1}, "min_words"),
        ({"unicode_form": "NFX"}, "unicode_form"),
        ({"max_duplicate_line_fraction": 1.5}, "max_duplicate_line_fraction"),
        ({"min_chars": 500, "max_chars": 100}, "min_chars"),
        ({"fix_encoding": "yes"}, "fix_encoding"),
        ({"batch_size": 0}, "batch_size"),
        ({"min_words": 2.5}, "min_words"),
        ({"mystery": 1}, "mystery"),
    ],
)
def test_bad_params_name_the_key(values: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=f"normalize.{key}"):
        parse_section(NormalizeParams, "normalize", values)

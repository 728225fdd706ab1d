"""The tokenizer stage (tasks/tokenizer.py) on a small English + Japanese corpus."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.tokens import EOS_TOKEN, TOKENIZER_FILE, load_tokenizer
from tasks.core.io import content_id
from tasks.core.layout import TOKENIZER_DIR
from tasks.core.params import ParamsError
from tasks.data.tokenizer_families import FAMILIES
from tasks.normalize import NORMALIZED_SCHEMA as SCHEMA
from tasks.tokenizer import TokenizerParams, run

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "corpus" / "en" / "shakespeare"

TOKENIZER_JSON = TOKENIZER_DIR / TOKENIZER_FILE


JAPANESE = [
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "パッケージ管理システムを使ってソフトウェアをインストールします。",
    "このコマンドはシステムの設定を変更します。注意して実行してください。",
    "東京は日本の首都であり、多くの人々が暮らしています。",
    "デビアンのリファレンスは、システム管理者とユーザーのための文書です。",
    "ファイルを削除する前に、必ずバックアップを取ってください。",
]

ADVERSARIAL = [
    "",
    "Hello, world! 123456789 don't we'll",
    "日本語とEnglishとРусскийと العربية mixed",
    "family 👨\u200d👩\u200d👧\u200d👦 flag 🏳️\u200d🌈 skin 👍🏽 keycap 1️⃣",
    "nul\x00bell\x07esc\x1b[0mdel\x7f c1\x85\u2028\u2029 bom\ufeff",
    "windows\r\nline\r\n\r\nendings\r",
    "x" * 10_000,
    "   leading and trailing spaces   \t\t\n",
    "combining e\u0301 vs é, Hangul 한국어, Devanagari हिन्दी, math 𝔘𝔫𝔦",
    "<|eos|> special spellings <|bos|><|pad|> as text",
    "\U0010ffff private \ue000 noncharacter \ufffe",
]


def english_docs(limit_chars: int = 120_000) -> list[str]:
    """Paragraphs of real Shakespeare text (or a synthetic fallback when the corpus is absent)."""
    docs: list[str] = []
    total = 0
    for path in sorted(SHAKESPEARE.glob("*.txt"))[:2]:
        text = path.read_text(encoding="utf-8", errors="replace")
        for para in text.split("\n\n"):
            para = para.strip()
            if len(para) < 40:
                continue
            docs.append(para)
            total += len(para)
            if total >= limit_chars:
                return docs
    if not docs:
        docs = [f"The quick brown fox {i} jumps over the lazy dog number {i}." for i in range(300)]
    return docs


def write_shard(root: Path, texts: list[str]) -> None:
    directory = root / "data" / "dedup"
    directory.mkdir(parents=True, exist_ok=True)
    rows = {
        "id": [content_id(t) for t in texts],
        "text": texts,
        "source": ["test"] * len(texts),
        "bytes": [len(t.encode()) for t in texts],
        "script": ["cjk" if any("\u3040" <= c <= "\u9fff" for c in t) else "latin" for t in texts],
    }
    pq.write_table(pa.table(rows, schema=SCHEMA), directory / "part-00000.parquet")


def corpus_texts() -> list[str]:
    return english_docs() + JAPANESE * 5 + [f"{s} ({i})" for i, s in enumerate(JAPANESE * 5)]


def small_params(**overrides: object) -> TokenizerParams:
    values: dict[str, object] = {"vocab_size": 600, "batch_size": 64}
    values.update(overrides)
    return TokenizerParams(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int | float]]:
    root = tmp_path_factory.mktemp("tok")
    write_shard(root, corpus_texts())
    metrics = run(small_params(compare=True, compare_holdout_fraction=0.2), root)
    return root, metrics


def test_roundtrip_adversarial_and_no_unk(trained: tuple[Path, dict[str, int | float]]) -> None:
    root, _ = trained
    tok = load_tokenizer(root / TOKENIZER_JSON)
    assert tok.get_vocab()  # trained
    for text in ADVERSARIAL:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.decode(enc.ids, skip_special_tokens=False) == text, repr(text[:60])
        assert "<unk>" not in enc.tokens and "[UNK]" not in enc.tokens
    assert tok.encode("", add_special_tokens=False).ids == []


def test_special_spelling_in_text_is_not_special(trained: tuple[Path, dict[str, int | float]]) -> None:
    root, _ = trained
    tok = load_tokenizer(root / TOKENIZER_DIR)
    eos_id = tok.token_to_id(EOS_TOKEN)
    assert eos_id is not None
    special_ids = {tok.token_to_id(t) for t in TokenizerParams().special_tokens}
    for text in ("<|eos|>", "end of text <|eos|> and more", "<|bos|><|user|>hi<|assistant|>"):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert not special_ids & set(ids), text
        assert tok.decode(ids) == text


def test_metrics_and_files(trained: tuple[Path, dict[str, int | float]]) -> None:
    root, metrics = trained
    assert metrics["vocab_size"] == 600 == metrics["vocab_size_requested"]
    assert metrics["docs"] == len(corpus_texts())
    assert metrics["holdout_chars_per_token"] > 1.0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (root / TOKENIZER_DIR / name).is_file()
    assert not list((root / TOKENIZER_DIR).parent.glob(".tokenizer.*"))  # no temporaries left


def test_comparison_report(trained: tuple[Path, dict[str, int | float]]) -> None:
    root, metrics = trained
    with open(root / "reports" / "tokenizer" / "comparison.csv", encoding="utf-8") as handle:
        rows = {row["family"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(FAMILIES)
    assert float(rows["bpe"]["unk_rate"]) == 0.0
    assert float(rows["bpe"]["roundtrip_exact"]) == 1.0
    assert metrics["compare.bpe.unk_rate"] == 0.0
    assert metrics["compare.bpe.roundtrip_exact"] == 1.0
    for family in FAMILIES:
        for key in ("chars_per_token", "bytes_per_token", "unk_rate", "roundtrip_exact", "encode_mb_per_s"):
            assert f"compare.{family}.{key}" in metrics
    assert (root / "reports" / "tokenizer" / "comparison.png").stat().st_size > 1000
    examples = (root / "reports" / "tokenizer" / "examples.md").read_text(encoding="utf-8")
    assert "│" in examples and "吾輩" in examples
    with open(root / "plots" / "tokenizer_comparison.csv", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header == ["family", "chars_per_token", "bytes_per_token"]


def test_transformers_loads_same_ids(trained: tuple[Path, dict[str, int | float]]) -> None:
    transformers = pytest.importorskip("transformers")
    root, _ = trained
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(root / TOKENIZER_DIR))
    tok = load_tokenizer(root / TOKENIZER_DIR)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert hf.eos_token_id == tok.token_to_id("<|eos|>")
    assert hf.pad_token_id == tok.token_to_id("<|pad|>")
    for text in [*ADVERSARIAL[1:6], "plain <|eos|> text"]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False).ids, repr(text[:40])
        assert hf.decode(ids) == text


DETERMINISM_SCRIPT = """
import sys
from pathlib import Path
from tasks.tokenizer import TokenizerParams, run
run(TokenizerParams(vocab_size=600, batch_size=64, compare=False), Path(sys.argv[1]))
"""


def test_deterministic_across_processes(tmp_path: Path) -> None:
    """Same corpus + params → byte-identical tokenizer.json, also across processes (fresh hash seeds)
    and thread counts."""
    outputs = []
    for threads in ("1", "4"):
        root = tmp_path / f"run{threads}"
        write_shard(root, corpus_texts())
        env = {"RAYON_NUM_THREADS": threads, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, str(root)], check=True, env=env, cwd=REPO)
        outputs.append((root / TOKENIZER_JSON).read_bytes())
    root = tmp_path / "inproc"
    write_shard(root, corpus_texts())
    run(small_params(compare=False), root)
    outputs.append((root / TOKENIZER_JSON).read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_tiny_corpus_reports_actual_vocab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shard(tmp_path, ["hello world", "日本語のテキスト", "a third short doc"])
    metrics = run(TokenizerParams(vocab_size=8192), tmp_path)
    assert 256 + 6 <= metrics["vocab_size"] < 8192
    assert metrics["vocab_size_requested"] == 8192
    assert "only supports" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / TOKENIZER_DIR)
    for text in ADVERSARIAL:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_empty_corpus_is_a_clear_error(tmp_path: Path) -> None:
    write_shard(tmp_path, [])
    with pytest.raises(ValueError, match="no text"):
        run(TokenizerParams(), tmp_path)


def test_params_validation() -> None:
    TokenizerParams().validate()
    with pytest.raises(ParamsError, match=r"tokenizer\.vocab_size"):
        TokenizerParams(vocab_size=256).validate()
    with pytest.raises(ParamsError, match=r"tokenizer\.special_tokens"):
        TokenizerParams(special_tokens=["<|bos|>", "<|pad|>"]).validate()
    with pytest.raises(ParamsError, match=r"tokenizer\.compare_holdout_fraction"):
        TokenizerParams(compare_holdout_fraction=1.0).validate()
    with pytest.raises(ParamsError, match=r"tokenizer\.pattern"):
        TokenizerParams(pattern="(unclosed").validate()

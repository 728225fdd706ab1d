"""Stage `dedup` (tasks/dedup.py, tasks/data/minhash.py): planted duplicates from real Shakespeare text at
measured exact Jaccard, the removal policy (best-first, verified links to kept documents only),
determinism across workers/shards/engines, CJK, edge cases, params and the DVC wiring."""

from __future__ import annotations

import functools
import random
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from tasks.core.io import content_id
from tasks.core.params import ParamsError, parse_section, set_overrides
from tasks.data import minhash
from tasks.dedup import DedupParams, run
from tasks.normalize import NORMALIZED_SCHEMA

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "corpus" / "en" / "shakespeare"


# --------------------------------------------------------------------------------------------------
# Helpers: real paragraphs, measured Jaccard, planted variants, input writer, stage runner
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def play_words() -> tuple[tuple[str, ...], ...]:
    """Word lists of the Gutenberg (non-folio) plays: the `_gut_f` editions are near-copies of these."""
    plays = []
    for path in sorted(SHAKESPEARE.glob("*_gut.txt")):
        words = path.read_text(encoding="utf-8", errors="replace").split()
        if len(words) > 12_000:  # the plays, not the short poems
            plays.append(tuple(words[2000:]))  # skip titles and the dramatis personae
    return tuple(plays)


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    return tuple(sorted({w for play in play_words() for w in play if w.isalpha()}))


def paragraphs(count: int, seed: int = 0, low: int = 150, high: int = 300) -> list[list[str]]:
    """`count` non-overlapping real word windows (low..high words), round-robin over the plays."""
    rng = random.Random(seed)
    plays = play_words()
    cursors = [rng.randrange(0, 5000) for _ in plays]
    out = []
    for i in range(count):
        p = i % len(plays)
        n = rng.randint(low, high)
        out.append(list(plays[p][cursors[p] : cursors[p] + n]))
        cursors[p] += n + rng.randint(50, 500)
    return out


def wrap(words: list[str], width: int = 72) -> str:
    return textwrap.fill(" ".join(words), width=width)


def shingle_set(text: str, mode: str = "word") -> np.ndarray:
    return np.unique(minhash.shingle_hashes(minhash.hashing_normalize(text), mode))


def exact_jaccard(first: str, second: str, mode: str = "word") -> float:
    return minhash.jaccard(shingle_set(first, mode), shingle_set(second, mode))


def edit_to(words: list[str], target: float, rng: random.Random) -> list[str]:
    """Random substitutions/insertions/deletions (at least one) until one more would push J below
    `target`; callers measure the resulting J, which is the ground truth."""
    base = wrap(words)
    current = list(words)
    vocab = vocabulary()
    for _ in range(2000):
        trial = list(current)
        op, at = rng.random(), rng.randrange(len(trial))
        if op < 0.5:
            trial[at] = rng.choice(vocab)
        elif op < 0.75:
            trial.insert(at, rng.choice(vocab))
        elif len(trial) > 10:
            del trial[at]
        if current != words and exact_jaccard(base, wrap(trial)) < target:
            break  # (the first edit is always kept: a near copy is never an exact one)
        current = trial
    return current


def cosmetic(words: list[str], rng: random.Random) -> str:
    """Re-wrapped lines, case and punctuation changes: invisible after hashing normalization."""
    out = []
    for word in words:
        r = rng.random()
        if r < 0.08:
            word = word.upper()
        elif r < 0.16:
            word = word.capitalize()
        elif r < 0.22:
            word = word + rng.choice([",", ";", "!", " --", "?"])
        out.append(word)
    return wrap(out, width=rng.randint(40, 95))


@dataclass
class Doc:
    text: str
    script: str = "latin"
    source: str = "test"

    @property
    def id(self) -> str:
        return content_id(self.text)


def write_normalized(root: Path, docs: list[Doc], shards: int = 1, shuffle_seed: int | None = None) -> None:
    rows = [
        {"id": d.id, "text": d.text, "source": d.source, "bytes": len(d.text.encode()), "script": d.script}
        for d in docs
    ]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    out = root / "data" / "normalized"
    out.mkdir(parents=True, exist_ok=True)
    for index, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        table = pa.Table.from_pylist([rows[i] for i in part], schema=NORMALIZED_SCHEMA)
        pq.write_table(table, out / f"part-{index:05d}.parquet")


@dataclass
class Result:
    metrics: dict
    kept: set[str]
    removed: dict[str, dict]  # removed id → its report row

    def decisions(self) -> dict[str, str]:
        return {doc: row["survivor_id"] for doc, row in self.removed.items()}


def dedup(root: Path, docs: list[Doc], shards: int = 1, shuffle_seed: int | None = None, **params) -> Result:
    write_normalized(root, docs, shards, shuffle_seed)
    params.setdefault("workers", 1)
    metrics = run(DedupParams(**params), root)
    kept = pq.read_table(root / "data" / "dedup").column("id").to_pylist()
    removed = pq.read_table(root / "reports" / "dedup" / "removed").to_pylist()
    assert len(kept) == len(set(kept)) == metrics["docs_out"]
    return Result(metrics, set(kept), {row["id"]: row for row in removed})


def planted_pairs(
    count: int, seed: int, low: float, high: float, offset: int = 0
) -> list[tuple[Doc, Doc, float]]:
    """(original, near copy, exact Jaccard) with targets uniform in [low, high) and cosmetic noise."""
    rng = random.Random(seed)
    out = []
    for words in paragraphs(count, seed=seed + offset):
        edited = edit_to(words, rng.uniform(low, high), rng)
        original, copy = Doc(wrap(words)), Doc(cosmetic(edited, rng))
        out.append((original, copy, exact_jaccard(original.text, copy.text)))
    return out


def pair_removed(result: Result, a: Doc, b: Doc) -> bool:
    """One of the pair was removed as a duplicate of the other."""
    return result.removed.get(a.id, {}).get("survivor_id") == b.id or (
        result.removed.get(b.id, {}).get("survivor_id") == a.id
    )


# --------------------------------------------------------------------------------------------------
# MinHash compatibility
# --------------------------------------------------------------------------------------------------


def test_minhasher_is_bit_identical_to_datasketch() -> None:
    from datasketch import MinHash

    text = wrap(paragraphs(1, seed=3)[0])
    for num_perm, seed in ((112, 1), (64, 7)):
        shingles = minhash.shingle_hashes(minhash.hashing_normalize(text), "word")
        ours = minhash.MinHasher(num_perm, seed).signature(shingles)
        theirs = MinHash(num_perm=num_perm, seed=seed, hashfunc=lambda b: int.from_bytes(b, "little"))
        theirs.update_batch([int(h & 0xFFFFFFFF).to_bytes(4, "little") for h in shingles.tolist()])
        assert ours.dtype == np.uint32
        np.testing.assert_array_equal(ours, theirs.hashvalues.astype(np.uint32))
    empty = MinHash(num_perm=112, seed=1)
    np.testing.assert_array_equal(
        minhash.MinHasher(112, 1).signature(np.empty(0, np.uint64)), empty.hashvalues.astype(np.uint32)
    )


# --------------------------------------------------------------------------------------------------
# Planted near-duplicates
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    pairs = planted_pairs(50, seed=11, low=0.8, high=0.98) + planted_pairs(25, seed=12, low=0.45, high=0.78)
    docs = [doc for a, b, _ in pairs for doc in (a, b)]
    return pairs, dedup(tmp_path_factory.mktemp("planted"), docs, batch_size=64)


def test_planted_pairs_cover_the_jaccard_range(planted) -> None:
    pairs, _ = planted
    js = np.array([j for _, _, j in pairs])
    assert (js >= 0.8).sum() >= 45 and (js < 0.8).sum() >= 20
    assert js.min() > 0.3 and js.max() < 1.0  # never an exact duplicate: these are near ones


def test_planted_near_duplicates_are_found_with_high_recall(planted) -> None:
    pairs, result = planted
    high = [(a, b) for a, b, j in pairs if j >= 0.8]
    recall = np.mean([pair_removed(result, a, b) for a, b in high])
    assert recall >= 0.92, recall
    assert result.metrics["exact_duplicates"] == 0
    assert result.metrics["near_duplicates"] == len(result.removed)


def test_no_pair_below_threshold_is_removed(planted) -> None:
    pairs, result = planted
    for a, b, j in pairs:
        if j < 0.8:
            assert a.id in result.kept and b.id in result.kept, j


def test_recorded_jaccard_is_the_exact_jaccard_with_the_survivor(planted) -> None:
    pairs, result = planted
    texts = {d.id: d.text for a, b, _ in pairs for d in (a, b)}
    assert result.removed
    for doc, row in result.removed.items():
        assert row["kind"] == "near"
        assert row["survivor_id"] in result.kept
        assert row["jaccard"] >= 0.8
        assert row["jaccard"] == pytest.approx(
            exact_jaccard(texts[doc], texts[row["survivor_id"]]), abs=1e-12
        )
        assert row["text"] == texts[doc]
        # the survivor is the better document: longer text, or same length and smaller id
        survivor = row["survivor_id"]
        assert (-len(texts[survivor]), survivor) < (-len(texts[doc]), doc)


# --------------------------------------------------------------------------------------------------
# Exact copies
# --------------------------------------------------------------------------------------------------


def test_normalization_identical_copies_are_exact_not_near(tmp_path: Path) -> None:
    words = paragraphs(1, seed=5)[0]
    base = wrap(words) + "\nAct 3, scene 2 (1603)."
    copies = [
        base.upper(),
        re.sub(r"[^\w\s]", " ", base),  # punctuation → spaces
        base.replace("e", "é").replace("a", "à"),  # accents
        base.replace("1603", "1623").replace("3", "4"),  # digits
        textwrap.fill(base.replace("\n", " "), width=33) + " !!",  # re-wrapped
    ]
    others = [Doc(wrap(w)) for w in paragraphs(4, seed=6)]
    docs = [Doc(base), *map(Doc, copies), *others]
    result = dedup(tmp_path, docs)
    group = {d.id for d in docs[:6]}
    assert len(group & result.kept) == 1
    (survivor,) = group & result.kept
    assert set(result.removed) == group - {survivor}
    for row in result.removed.values():
        assert (row["kind"], row["jaccard"], row["survivor_id"]) == ("exact", 1.0, survivor)
    # the survivor is the longest text of the group
    assert len(next(d.text for d in docs if d.id == survivor)) == max(len(d.text) for d in docs[:6])
    m = result.metrics
    assert (m["exact_duplicates"], m["near_duplicates"], m["docs_out"]) == (5, 0, 5)
    assert m["clusters"] == 0  # exact copies never reach the fuzzy step


# --------------------------------------------------------------------------------------------------
# Chaining: A~B, B~C, A≁C
# --------------------------------------------------------------------------------------------------


def chain(seed: int = 21) -> tuple[list[str], list[str], list[str]]:
    """B is a real paragraph; A edits its first half, C its second half (disjoint edits), so that
    J(A,B) ≈ J(B,C) ≈ 0.86 and J(A,C) ≈ 0.74. (J(A,C) ≈ 0.5 is impossible here: Jaccard distance is a
    metric, so J(A,C) ≥ J(A,B) + J(B,C) - 1 ≈ 0.72.)"""
    rng = random.Random(seed)
    b = paragraphs(1, seed=seed, low=260, high=260)[0]
    vocab = vocabulary()
    a, c = list(b), list(b)
    for k in range(4):  # 4 substitutions 25 words apart in each half: ≤ 20 of ~256 shingles each
        a[10 + 25 * k] = rng.choice(vocab)
        c[140 + 25 * k] = rng.choice(vocab)
    return a, b, c


def padded(words: list[str], pad: int) -> Doc:
    """Trailing punctuation changes the length (the survivor order), never the shingles."""
    return Doc(wrap(words) + " " + "." * pad)


@pytest.mark.parametrize("best", ["B", "A"])
def test_chain_removes_only_documents_linked_to_a_kept_one(tmp_path: Path, best: str) -> None:
    a_words, b_words, c_words = chain()
    pads = {"B": (10, 40, 0), "A": (40, 20, 0)}[best]
    a, b, c = (padded(w, p) for w, p in zip((a_words, b_words, c_words), pads, strict=True))
    j_ab, j_bc, j_ac = (
        exact_jaccard(a.text, b.text),
        exact_jaccard(b.text, c.text),
        exact_jaccard(a.text, c.text),
    )
    assert 0.82 <= j_ab <= 0.9 and 0.82 <= j_bc <= 0.9, (j_ab, j_bc)
    assert 0.65 <= j_ac < 0.8, j_ac
    others = [Doc(wrap(w)) for w in paragraphs(5, seed=22)]
    result = dedup(tmp_path, [a, b, c, *others], threshold=0.8)
    if best == "B":
        assert result.decisions() == {a.id: b.id, c.id: b.id}
        assert result.removed[a.id]["jaccard"] == pytest.approx(j_ab)
        assert result.removed[c.id]["jaccard"] == pytest.approx(j_bc)
    else:
        assert result.decisions() == {b.id: a.id}
        assert c.id in result.kept  # C is close only to B, which was removed; C≁A
        assert result.removed[b.id]["jaccard"] == pytest.approx(j_ab)
    assert result.metrics["clusters"] == 1
    assert result.metrics["largest_cluster"] == 3
    assert result.metrics["verified_pairs"] == 2


# --------------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_corpus() -> list[Doc]:
    pairs = planted_pairs(20, seed=31, low=0.75, high=0.97)
    a, b, c = chain()
    words = paragraphs(1, seed=32)[0]
    exact = [Doc(wrap(words)), Doc(wrap(words).upper()), Doc(cosmetic(words, random.Random(1)))]
    triple = paragraphs(1, seed=33)[0]  # one original and two near copies of it
    rng = random.Random(2)
    near3 = [
        Doc(wrap(triple)),
        Doc(cosmetic(edit_to(triple, 0.9, rng), rng)),
        Doc(wrap(edit_to(triple, 0.88, rng))),
    ]
    singles = [Doc(wrap(w)) for w in paragraphs(20, seed=34)]
    return [
        *(d for x, y, _ in pairs for d in (x, y)),
        padded(a, 10),
        padded(b, 40),
        Doc(wrap(c)),
        *exact,
        *near3,
        *singles,
    ]


@pytest.fixture(scope="module")
def reference(mixed_corpus: list[Doc], tmp_path_factory: pytest.TempPathFactory) -> Result:
    return dedup(tmp_path_factory.mktemp("reference"), mixed_corpus, batch_size=8)


def test_same_decisions_with_two_workers_and_shuffled_shards(
    mixed_corpus: list[Doc], reference: Result, tmp_path: Path
) -> None:
    assert reference.metrics["exact_duplicates"] == 2 and reference.metrics["near_duplicates"] >= 15
    two = dedup(tmp_path / "two", mixed_corpus, batch_size=8, workers=2)
    shuffled = dedup(tmp_path / "shuffled", mixed_corpus, shards=3, shuffle_seed=7, batch_size=8)
    for other in (two, shuffled):
        assert other.kept == reference.kept
        assert other.decisions() == reference.decisions()
        assert {k: v["jaccard"] for k, v in other.removed.items()} == {
            k: v["jaccard"] for k, v in reference.removed.items()
        }
        for key in ("docs_out", "candidate_pairs", "verified_pairs", "clusters", "largest_cluster"):
            assert other.metrics[key] == reference.metrics[key], key


def test_dask_local_cluster_gives_identical_survivors(
    mixed_corpus: list[Doc], reference: Result, tmp_path: Path
) -> None:
    distributed = pytest.importorskip("distributed")
    result = dedup(tmp_path, mixed_corpus, batch_size=8, workers=2, dask_address="local")
    assert result.kept == reference.kept
    assert result.decisions() == reference.decisions()
    # A running cluster, by its scheduler address (what `-S dedup.dask_address=tcp://...` connects to).
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        remote = dedup(
            tmp_path / "remote", mixed_corpus, batch_size=8, dask_address=cluster.scheduler_address
        )
    assert remote.decisions() == reference.decisions()


# --------------------------------------------------------------------------------------------------
# CJK and boilerplate
# --------------------------------------------------------------------------------------------------

JAPANESE = (
    "春になると、川沿いの桜並木には多くの人が集まります。朝早くから場所を取る家族もいれば、"
    "仕事帰りに少しだけ立ち寄る人もいます。花びらが風に舞う様子を眺めながら、友人と弁当を食べたり、"
    "写真を撮ったりして、短い季節を楽しみます。夜になると提灯に明かりがともり、昼とは違う静かな"
    "美しさが広がります。この時期だけは、忙しい毎日を忘れてゆっくり過ごす人が多いようです。"
    "桜が散り始めると、川面は薄い桃色の花びらで覆われ、まるで絨毯のように見えます。子どもたちは"
    "橋の上からその景色を眺め、大人たちは来年もまた同じ場所で会おうと約束します。季節は巡り、"
    "やがて新緑の頃になると、並木道は青々とした葉に包まれ、また違った表情を見せてくれます。"
)
JAPANESE_OTHER = (
    "秋の山道を歩くと、足元で落ち葉が乾いた音を立てます。紅葉した木々の間から差し込む光は柔らかく、"
    "遠くの谷からは川のせせらぎが聞こえてきます。途中の茶屋で温かいお茶を飲み、団子を食べながら"
    "地図を広げて次の目的地を相談しました。山頂に着く頃には日が傾き始め、空が橙色に染まっていきます。"
)


def test_japanese_near_duplicates_are_found_with_char_shingles(tmp_path: Path) -> None:
    edited = (
        JAPANESE.replace("多くの人", "大勢の人").replace("提灯", "灯籠").replace("約束します", "誓います")
    )
    original, copy = Doc(JAPANESE, "cjk"), Doc(edited, "cjk")
    j = exact_jaccard(original.text, copy.text, "char")
    assert 0.8 <= j < 1.0, j
    assert exact_jaccard(original.text, copy.text, "word") < 0.5  # words would miss it
    result = dedup(tmp_path, [original, copy, Doc(JAPANESE_OTHER, "cjk")])
    assert pair_removed(result, original, copy)
    assert next(iter(result.removed.values()))["jaccard"] == pytest.approx(j)
    assert Doc(JAPANESE_OTHER).id in result.kept


def test_shared_boilerplate_lines_do_not_merge_documents(tmp_path: Path) -> None:
    header = "The Project Gutenberg EBook of the Complete Works\nRelease date and credits follow below\n" + (
        "This file was produced from images generously made available"
    )
    footer = "End of the Project Gutenberg EBook\nUpdated editions will replace the previous one\n" + (
        "Please read the license before you distribute this file"
    )
    docs = [Doc(f"{header}\n{wrap(words)}\n{footer}") for words in paragraphs(8, seed=41, low=200, high=200)]
    result = dedup(tmp_path, docs)
    assert result.metrics["docs_out"] == len(docs)
    assert result.metrics["verified_pairs"] == 0


# --------------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------------


def test_empty_one_word_and_very_long_documents(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vocab = np.array(vocabulary())
    long_words = vocab[rng.integers(0, len(vocab), 200_000)].tolist()
    long_copy = list(long_words)
    for at in range(1000, 200_000, 10_000):  # 20 substitutions: J ≈ 0.999
        long_copy[at] = "zzzz"
    docs = [
        Doc(""),
        Doc("Hello"),
        Doc("world"),
        Doc(" ".join(long_words)),
        Doc(" ".join(long_copy)),
        *(Doc(wrap(w)) for w in paragraphs(3, seed=51)),
    ]
    result = dedup(tmp_path, docs)
    assert result.metrics["docs_in"] == 8
    assert result.metrics["docs_without_shingles"] == 1
    assert {docs[0].id, docs[1].id, docs[2].id} <= result.kept  # never matched with anything
    assert pair_removed(result, docs[3], docs[4])
    assert result.metrics["docs_out"] == 7


def test_two_empty_documents_are_exact_duplicates(tmp_path: Path) -> None:
    result = dedup(tmp_path, [Doc(""), Doc("  ...  "), Doc(wrap(paragraphs(1, seed=52)[0]))])
    assert result.metrics["exact_duplicates"] == 1 and result.metrics["docs_out"] == 2


def test_corpus_without_duplicates_is_unchanged(tmp_path: Path) -> None:
    docs = [Doc(wrap(w)) for w in paragraphs(40, seed=61)]
    result = dedup(tmp_path, docs)
    assert result.metrics["docs_out"] == result.metrics["docs_in"] == 40
    assert result.kept == {d.id for d in docs} and not result.removed
    written = pq.read_table(tmp_path / "data" / "dedup").to_pylist()
    assert {row["id"]: row["text"] for row in written} == {d.id: d.text for d in docs}


def test_corpus_of_all_duplicates_keeps_one(tmp_path: Path) -> None:
    words = paragraphs(1, seed=71)[0]
    rng = random.Random(3)
    docs = [Doc(wrap(words))] + [Doc(cosmetic(words, rng)) for _ in range(4)]
    docs += [Doc(cosmetic(edit_to(words, 0.93, rng), rng)) for _ in range(3)]
    assert len({d.id for d in docs}) == len(docs)
    result = dedup(tmp_path, docs)
    assert result.metrics["docs_out"] == 1
    assert result.metrics["exact_duplicates"] == 4 and result.metrics["near_duplicates"] == 3


def test_empty_corpus(tmp_path: Path) -> None:
    result = dedup(tmp_path, [])
    assert result.metrics["docs_in"] == result.metrics["docs_out"] == 0


# --------------------------------------------------------------------------------------------------
# Params and verify: false
# --------------------------------------------------------------------------------------------------


def test_bands_times_rows_must_equal_num_perm() -> None:
    with pytest.raises(ParamsError, match=r"dedup\.bands.*dedup\.num_perm"):
        parse_section(DedupParams, "dedup", {"bands": 10, "rows": 8, "num_perm": 112})
    params = parse_section(DedupParams, "dedup", {"bands": 16, "rows": 7, "num_perm": 112})
    assert (params.bands, params.rows) == (16, 7)


def test_verify_false_still_removes_close_pairs(tmp_path: Path) -> None:
    pairs = planted_pairs(20, seed=81, low=0.9, high=0.98)
    assert all(j >= 0.9 for _, _, j in pairs)
    result = dedup(tmp_path, [d for a, b, _ in pairs for d in (a, b)], verify=False)
    assert all(pair_removed(result, a, b) for a, b, _ in pairs)
    for row in result.removed.values():  # the MinHash estimate, a multiple of 1/num_perm
        assert row["jaccard"] >= 0.8
        assert row["jaccard"] * 112 == pytest.approx(round(row["jaccard"] * 112))


# --------------------------------------------------------------------------------------------------
# DVC wiring
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dvc_reruns_only_dedup_when_its_params_change(project: Path) -> None:
    # in-process stages: spawning worker pools for a handful of documents only costs time
    set_overrides(project / "params.yaml", ["normalize.workers=1", "dedup.workers=1"])
    run_cli(project, "dvc", "repro", "dedup")
    assert (project / "data" / "dedup").is_dir() and (project / "metrics" / "dedup.json").is_file()
    set_overrides(project / "params.yaml", ["dedup.threshold=0.7"])
    second = run_cli(project, "dvc", "repro", "dedup")
    assert "Running stage 'dedup'" in second.stdout
    assert "Running stage 'ingest'" not in second.stdout
    assert "Running stage 'normalize'" not in second.stdout

"""Shared I/O and params: atomic outputs, shards, DVC-compatible md5s, params parsing and -S overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import pytest
import yaml

from tasks.core.io import DOC_SCHEMA, ShardWriter, atomic_dir, atomic_file, count_rows, dvc_md5, iter_batches
from tasks.core.params import ParamsError, parse_section, set_overrides


def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "data" / "raw"
    with atomic_dir(final) as tmp:
        (tmp / "a.parquet").write_text("one")
    assert (final / "a.parquet").read_text() == "one"

    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "b.parquet").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in final.iterdir()) == ["a.parquet"]
    assert [p.name for p in final.parent.iterdir()] == ["raw"]  # no temporary left behind

    with atomic_dir(final) as tmp:
        (tmp / "c.parquet").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["c.parquet"]


def test_atomic_dir_sweeps_temporaries_of_a_killed_run(tmp_path: Path) -> None:
    stale = tmp_path / ".raw.tmp-99999"
    stale.mkdir()
    (stale / "part-00000.parquet").write_text("partial")
    with atomic_dir(tmp_path / "raw") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists()


def test_atomic_file_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(ValueError), atomic_file(target) as handle:
        handle.write("new but broken")
        raise ValueError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_shard_writer_splits_and_streams_back(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, DOC_SCHEMA, rows_per_shard=3) as writer:
        for i in range(7):
            writer.write({"id": str(i), "text": f"doc {i}", "source": "s", "bytes": 5})
    assert [p.name for p in sorted(tmp_path.glob("*.parquet"))] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert count_rows(tmp_path) == 7
    ids = [
        i for batch in iter_batches(tmp_path, ["id"], batch_size=2) for i in batch.column("id").to_pylist()
    ]
    assert ids == [str(i) for i in range(7)]
    assert pq.read_schema(tmp_path / "part-00000.parquet").names == DOC_SCHEMA.names


def test_dvc_md5_matches_dvc_for_files_and_directories(tmp_path: Path) -> None:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "sub" / "b.bin").write_bytes(bytes(range(256)))
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "odb"))
    for path in (data, data / "a.txt"):
        _, _, obj = build(odb, str(path), fs, "md5")
        assert dvc_md5(path) == obj.hash_info.value


@dataclasses.dataclass
class Example:
    paths: list[str] = dataclasses.field(default_factory=lambda: ["corpus"])
    ratio: float = 0.5
    form: Literal["NFC", "NFKC"] = "NFKC"
    limit: int | None = None


def test_parse_section_accepts_valid_and_names_bad_keys() -> None:
    parsed = parse_section(Example, "demo", {"ratio": 1, "form": "NFC", "limit": None})
    assert parsed == Example(ratio=1.0, form="NFC")
    with pytest.raises(ParamsError, match=r"demo\.ratoi"):
        parse_section(Example, "demo", {"ratoi": 0.1})
    with pytest.raises(ParamsError, match=r"demo\.form"):
        parse_section(Example, "demo", {"form": "NFX"})
    with pytest.raises(ParamsError, match=r"demo\.paths"):
        parse_section(Example, "demo", {"paths": "corpus"})
    with pytest.raises(ParamsError, match=r"demo\.limit"):
        parse_section(Example, "demo", {"limit": "ten"})
    # YAML 1.1 (PyYAML, DVC) reads `2e13` as a string; a float setting takes it as the number it is
    assert parse_section(Example, "demo", {"ratio": yaml.safe_load("r: 2e13")["r"]}).ratio == 2e13
    with pytest.raises(ParamsError, match=r"demo\.ratio"):
        parse_section(Example, "demo", {"ratio": "2e13 FLOPs"})


def test_overrides_write_typed_values_and_keep_comments(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    untouched = "ingest:\n  paths:\n    - corpus/en  # first\n    - corpus/ja\n  encoding: null\n"
    params.write_text(
        "# top comment\n" + untouched + "normalize:\n  min_words: 50  # Gopher default\n  form: NFKC\n"
    )
    set_overrides(params, ["normalize.min_words=20", "normalize.form=NFC"])
    text = params.read_text()
    assert "# top comment" in text and "# Gopher default" in text
    assert "min_words: 20" in text and "form: NFC" in text
    assert untouched in text  # other sections keep their exact formatting

    def refuse(values: dict) -> None:
        raise ParamsError(f"normalize.min_words: {values['normalize']['min_words']!r} is not an int")

    with pytest.raises(ParamsError, match="abc"):
        set_overrides(params, ["normalize.min_words=abc"], validate=refuse)
    assert params.read_text() == text  # a refused override leaves the file as it was
    with pytest.raises(ParamsError, match="nosuch"):
        set_overrides(params, ["nosuch.key=1"])
    with pytest.raises(ParamsError, match=r"section\.key=value"):
        set_overrides(params, ["min_words"])


def test_temporaries_of_a_live_run_are_not_swept(tmp_path: Path) -> None:
    import subprocess

    alive = subprocess.Popen(["sleep", "30"])
    try:
        live = tmp_path / f".raw.tmp-{alive.pid}"
        live.mkdir()
        dead = tmp_path / ".raw.tmp-999999"  # no such process
        dead.mkdir()
        with atomic_dir(tmp_path / "raw") as tmp:
            (tmp / "x").write_text("x")
        assert live.exists() and not dead.exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_moved_setting_names_its_new_key(tmp_path: Path) -> None:
    """pretrain.model moved to plan.model: an old params.yaml or -S override says where it went."""
    from tasks.pretrain import PretrainParams

    with pytest.raises(ParamsError, match=r"pretrain\.model is now plan\.model"):
        parse_section(PretrainParams, "pretrain", {"model": {"n_layer": 2}})
    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  lr: 0.1\nplan:\n  model:\n    n_layer: null\n")
    with pytest.raises(ParamsError, match=r"rename pretrain\.model\.pos_encoding to plan\.model\."):
        set_overrides(params, ["pretrain.model.pos_encoding=learned"])

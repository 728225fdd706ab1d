"""Shared I/O for every stage: Parquet shards, atomic write-then-rename, content hashes, DVC-style md5s.

The one rule this module enforces: a stage never leaves a half-written output that a later stage would
trust. Outputs are built under a hidden temporary sibling (`data/.raw.tmp-<pid>`) and renamed into place
only once complete, so a killed run leaves either the previous complete output or nothing at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

#: Schema of a document dataset (data/raw, data/normalized, ...): later stages may add columns.
DOC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.large_string()),
        ("source", pa.string()),
        ("bytes", pa.int64()),
    ]
)

#: Schema of a quarantine dataset: what was rejected, where it came from, why, and its raw bytes.
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.large_binary()),
    ]
)


def content_id(text: str) -> str:
    """Stable 128-bit content hash of a document's text (hex), identical on every machine and run."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def hash_fraction(seed: int, doc_id: str) -> float:
    """A document's seeded position in [0, 1), from a 64-bit hash of seed and id. Splits and samples
    compare it with a fraction, so they depend only on the seed and the id, never on order or sharding."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# --------------------------------------------------------------------------------------------------
# Atomic outputs
# --------------------------------------------------------------------------------------------------


def _temp_sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(final: Path) -> None:
    """Remove temporaries that a killed run left beside `final` (never trusted, only swept); those of a
    run still in progress (its pid is alive) are left alone."""
    if not final.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for stale in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
                continue
            _remove(stale)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final`, on error it is deleted.

    The swap is two renames on one filesystem: old → `.old-<pid>`, temp → final. In between `final` is
    absent, never partial.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    tmp = _temp_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = _temp_sibling(final, "old")
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists() or old.is_symlink():
        _remove(old)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling for writing; it replaces `final` only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --------------------------------------------------------------------------------------------------
# Parquet shards
# --------------------------------------------------------------------------------------------------


class ShardWriter:
    """Write rows as numbered Parquet shards (`part-00000.parquet`, ...) with bounded memory.

    Rows are buffered column-wise and flushed as one shard once `rows_per_shard` rows or
    `bytes_per_shard` bytes of text have accumulated. Use inside `atomic_dir` so shards only become
    visible together. Closing an empty writer leaves one empty shard, never an empty directory.
    """

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        rows_per_shard: int = 50_000,
        bytes_per_shard: int = 128 * 2**20,
        prefix: str = "part",
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.bytes_per_shard = bytes_per_shard
        self.prefix = prefix
        self.rows_written = 0
        self.shards_written = 0
        self._buffer: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._tables: list[pa.Table] = []
        self._buffered_rows = 0
        self._buffered_bytes = 0

    def write(self, row: Mapping[str, Any]) -> None:
        for name in self.schema.names:
            value = row[name]
            self._buffer[name].append(value)
            if isinstance(value, (str, bytes)):
                self._buffered_bytes += len(value)
        self._buffered_rows += 1
        self._flush_if_full()

    def write_table(self, table: pa.Table) -> None:
        """Append a whole Arrow table at once (columns selected and cast to the schema)."""
        self._stage_rows()
        self._tables.append(table.select(self.schema.names).cast(self.schema))
        self._buffered_rows += table.num_rows
        self._buffered_bytes += table.nbytes
        self._flush_if_full()

    def _flush_if_full(self) -> None:
        if self._buffered_rows >= self.rows_per_shard or self._buffered_bytes >= self.bytes_per_shard:
            self.flush()

    def _stage_rows(self) -> None:
        """Move rows given one by one into the list of tables waiting for the next shard."""
        if self._buffer[self.schema.names[0]]:
            self._tables.append(pa.table(self._buffer, schema=self.schema))
            self._buffer = {name: [] for name in self.schema.names}

    def flush(self) -> None:
        self._stage_rows()
        if not self._tables:
            return
        table = pa.concat_tables(self._tables)
        path = self.directory / f"{self.prefix}-{self.shards_written:05d}.parquet"
        pq.write_table(table, path, compression="zstd")
        self.rows_written += table.num_rows
        self.shards_written += 1
        self._tables = []
        self._buffered_rows = 0
        self._buffered_bytes = 0

    def close(self) -> None:
        """Flush; a dataset with no rows still gets one empty shard so readers (and DVC) see its schema."""
        self.flush()
        if not self.shards_written:
            pq.write_table(self.schema.empty_table(), self.directory / f"{self.prefix}-00000.parquet")
            self.shards_written = 1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()


def shard_paths(directory: Path) -> list[Path]:
    """The Parquet shards of a dataset directory in a stable order (hidden files excluded)."""
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith("."))


def iter_batches(
    directory: Path, columns: Sequence[str] | None = None, batch_size: int = 4096
) -> Iterator[pa.RecordBatch]:
    """Stream a dataset directory as record batches, shard by shard (constant memory)."""
    paths = shard_paths(directory)
    if not paths:
        raise FileNotFoundError(f"{directory}: no Parquet shards (did the upstream stage run?)")
    for path in paths:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def count_rows(directory: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(directory))


# --------------------------------------------------------------------------------------------------
# DVC-compatible md5s (the values dvc.lock records), for tagging tracked runs
# --------------------------------------------------------------------------------------------------


def file_md5(path: Path, chunk_size: int = 2**20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_md5(path: Path) -> str:
    """The md5 DVC 3 records in dvc.lock: the file's md5, or for a directory the md5 of its sorted
    JSON listing of `{"md5", "relpath"}` entries plus the `.dir` suffix."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    entries = [
        {"md5": file_md5(child), "relpath": child.relative_to(path).as_posix()}
        for child in path.rglob("*")
        if child.is_file()
    ]
    entries.sort(key=lambda entry: entry["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"

"""Stage `ingest`: read every input file of the raw corpus into one Parquet document dataset.

Inputs are the files, directories (recursive, hidden entries skipped) and globs of `ingest.paths`.
How each file is read (format by extension, compression, encoding, one reader per format) is
`tasks.data.readers`; this module resolves the inputs, drives the readers and writes the outputs.

Outputs, all replaced atomically (a killed run leaves the previous output or nothing):

* `data/raw/part-NNNNN.parquet`: DOC_SCHEMA rows (`id`, `text`, `source`, `bytes`).
* `data/quarantine/ingest/part-NNNNN.parquet`: QUARANTINE_SCHEMA rows for every record (or whole file)
  that could not be ingested; `reason` is a short code, then `: ` and the human detail.
* `reports/ingest/files.csv`: one row per input file, with `docs_in == docs_out + quarantined`.

Nothing is dropped silently: every record read either becomes a document or a quarantine row, and a
file-level problem (unreadable, binary, unsupported, empty...) counts as one quarantined record.
"""

from __future__ import annotations

import codecs
import csv
import glob
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tasks.core.io import DOC_SCHEMA, QUARANTINE_SCHEMA, ShardWriter, atomic_dir, atomic_file, content_id
from tasks.core.layout import QUARANTINE_DIR, RAW_DIR, REPORTS_DIR
from tasks.core.params import ParamsError, StageParams
from tasks.data.readers import REASONS, Bad, Doc, ReadOptions, SourceFile, read_records

QUARANTINE_INGEST_DIR = QUARANTINE_DIR / "ingest"
REPORT_FILE = REPORTS_DIR / "ingest" / "files.csv"
REPORT_COLUMNS = ("path", "format", "encoding", "docs_in", "docs_out", "quarantined", "bytes", "bytes_out")


@dataclass
class IngestParams(StageParams):
    paths: list[str]  # files, directories (recursive, hidden entries skipped) and globs, relative to the root
    text_field: str = "text"  # field/column holding the text in jsonl/json/csv/parquet
    txt_doc_chars: int = 20000  # .txt/.md cut into ~this many chars at blank lines; 0 = one doc per file
    rows_per_shard: int = 20000  # documents per data/raw Parquet shard
    encoding: str | None = None  # force this encoding for every text file; null = sniff each file
    csv_delimiter: str = ","  # field delimiter of .csv files
    quarantine_raw_bytes: int = 1048576  # raw bytes kept per quarantined record

    def validate(self) -> None:
        if not self.paths:
            raise ParamsError("params.yaml: ingest.paths: list at least one file, directory or glob")
        for i, entry in enumerate(self.paths):
            if not entry.strip():
                raise ParamsError(f"params.yaml: ingest.paths[{i}]: empty path")
        if not self.text_field:
            raise ParamsError("params.yaml: ingest.text_field: must be a non-empty field name")
        if self.txt_doc_chars < 0:
            raise ParamsError(f"params.yaml: ingest.txt_doc_chars: must be >= 0, got {self.txt_doc_chars}")
        if self.rows_per_shard < 1:
            raise ParamsError(f"params.yaml: ingest.rows_per_shard: must be >= 1, got {self.rows_per_shard}")
        if self.quarantine_raw_bytes < 0:
            raise ParamsError(
                f"params.yaml: ingest.quarantine_raw_bytes: must be >= 0, got {self.quarantine_raw_bytes}"
            )
        if len(self.csv_delimiter) != 1:
            raise ParamsError(
                f"params.yaml: ingest.csv_delimiter: must be one character, got {self.csv_delimiter!r}"
            )
        if self.encoding is not None:
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ParamsError(
                    f"params.yaml: ingest.encoding: unknown encoding {self.encoding!r}"
                ) from None

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            text_field=self.text_field,
            txt_doc_chars=self.txt_doc_chars,
            encoding=self.encoding,
            csv_delimiter=self.csv_delimiter,
            quarantine_raw_bytes=self.quarantine_raw_bytes,
        )


@dataclass
class _FileReport:
    """One input file and its row of reports/ingest/files.csv."""

    source: SourceFile
    docs_in: int = 0
    docs_out: int = 0
    quarantined: int = 0
    bytes_out: int = 0

    def row(self) -> dict[str, object]:
        s = self.source
        return {
            "path": s.rel,
            "format": f"{s.format}+{s.compression}" if s.compression else s.format,
            "encoding": s.encoding,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "quarantined": self.quarantined,
            "bytes": s.size,
            "bytes_out": self.bytes_out,
        }


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _walk(directory: Path, excluded: set[str]) -> Iterator[Path]:
    """Files below `directory`, following symlinked folders (each real folder once, so a link loop
    ends). A folder that cannot be listed is yielded itself, so the reader quarantines it: nothing is
    skipped silently."""
    unlistable: list[OSError] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory, onerror=unlistable.append, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) not in excluded
        )
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath, name)
    for error in unlistable:
        yield Path(error.filename)


def resolve_inputs(paths: list[str], root: Path) -> list[tuple[Path, str]]:
    """The input files as (path, display path), sorted by display path (relative to root when inside it).

    Raises FileNotFoundError naming the params entry that matches nothing.
    """
    root_abs = os.path.abspath(root)
    excluded = {os.path.join(root_abs, str(p)) for p in (RAW_DIR, QUARANTINE_INGEST_DIR, REPORT_FILE.parent)}
    found: dict[str, Path] = {}
    for entry in paths:
        if glob.has_magic(entry):
            pattern = entry if os.path.isabs(entry) else os.path.join(glob.escape(root_abs), entry)
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
            if not matches:
                raise FileNotFoundError(f"params.yaml: ingest.paths: {entry!r} matches no files")
        else:
            target = Path(root_abs, entry)
            if not target.exists():
                raise FileNotFoundError(f"params.yaml: ingest.paths: {entry!r} does not exist")
            matches = [target]
        files: list[Path] = []
        for match in matches:
            if match.is_dir():
                files.extend(_walk(match, excluded))
            elif match.is_file():
                files.append(match)
        if not files:
            raise FileNotFoundError(f"params.yaml: ingest.paths: {entry!r} contains no (non-hidden) files")
        for path in files:
            absolute = os.path.abspath(path)
            rel = os.path.relpath(absolute, root_abs)
            outside = rel == os.pardir or rel.startswith(os.pardir + os.sep)
            display = Path(absolute if outside else rel).as_posix()
            found[display] = Path(absolute)
    return [(found[display], display) for display in sorted(found)]


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------


def _no_documents_error(files: list[_FileReport], reasons: Counter[str], examples: list[Bad]) -> ValueError:
    more = f" and {len(files) - 10} more" if len(files) > 10 else ""
    names = ", ".join(f.source.rel for f in files[:10]) + more
    counts = ", ".join(f"{code}={n}" for code, n in sorted(reasons.items()))
    shown = "; ".join(f"{bad.source}: {bad.reason}" for bad in examples)
    return ValueError(
        f"ingest: no usable documents in {len(files)} input file(s) ({names}); "
        f"every record was quarantined ({counts}); e.g. {shown}. "
        "Check params.yaml ingest.paths and ingest.text_field."
    )


def run(params: IngestParams, root: Path) -> dict[str, int | float]:
    """Read every input, write data/raw/ (+ data/quarantine/ingest/), return a small metrics dict."""
    started = time.perf_counter()
    root = Path(root)
    inputs = resolve_inputs(params.paths, root)
    files: list[_FileReport] = []
    reasons: Counter[str] = Counter()
    examples: list[Bad] = []
    options = params.read_options()

    with atomic_dir(root / RAW_DIR) as raw_tmp, atomic_dir(root / QUARANTINE_INGEST_DIR) as quarantine_tmp:
        docs = ShardWriter(raw_tmp, DOC_SCHEMA, rows_per_shard=params.rows_per_shard)
        quarantine = ShardWriter(quarantine_tmp, QUARANTINE_SCHEMA, rows_per_shard=params.rows_per_shard)

        def emit(f: _FileReport, record: Doc | Bad) -> None:
            f.docs_in += 1
            if isinstance(record, Doc):
                docs.write(
                    {
                        "id": content_id(record.text),
                        "text": record.text,
                        "source": record.source,
                        "bytes": record.nbytes,
                    }
                )
                f.docs_out += 1
                f.bytes_out += record.nbytes
            else:
                quarantine.write({"source": record.source, "reason": record.reason, "raw": record.raw})
                f.quarantined += 1
                reasons[record.reason.split(":", 1)[0]] += 1
                if len(examples) < 5:
                    examples.append(record)

        progress = tqdm(inputs, desc="ingest", unit="file", disable=None, file=sys.stderr)
        for path, display in progress:
            f = _FileReport(SourceFile(path, display, options))
            files.append(f)
            for record in read_records(f.source):
                emit(f, record)
            progress.set_postfix(docs=sum(x.docs_out for x in files), quarantined=sum(reasons.values()))
        progress.close()

        if not any(f.docs_out for f in files):
            raise _no_documents_error(files, reasons, examples)
        docs.close()
        quarantine.close()

    with atomic_file(root / REPORT_FILE) as handle:
        writer = csv.DictWriter(handle, fieldnames=REPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(f.row() for f in files)

    metrics: dict[str, int | float] = {
        "files": len(files),
        "docs_in": sum(f.docs_in for f in files),
        "docs_out": sum(f.docs_out for f in files),
        "quarantined": sum(f.quarantined for f in files),
        "bytes_out": sum(f.bytes_out for f in files),
        "shards": docs.shards_written,
        "seconds": round(time.perf_counter() - started, 3),
    }
    for code in sorted(set(REASONS) | set(reasons)):
        metrics[f"quarantined_{code}"] = reasons.get(code, 0)
    return metrics

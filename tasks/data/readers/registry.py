"""Which reader reads which format, and `read_records`, the one way to read a file: the checks every
format needs (unsupported, empty, binary, undecodable, unreadable) are made here once, so each format
module only turns a readable text stream (or Parquet table) into records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tasks.data.readers.base import READ_ERRORS, Bad, Doc, SourceFile
from tasks.data.readers.csv import read_csv
from tasks.data.readers.html import read_html
from tasks.data.readers.json import read_json
from tasks.data.readers.jsonl import read_jsonl
from tasks.data.readers.opening import FORMATS, SNIFF_BYTES, detect_format, read_head, sniff_encoding
from tasks.data.readers.parquet import read_parquet
from tasks.data.readers.txt import read_txt

#: The reader of each format (the values of FORMATS).
READERS: dict[str, Callable[[SourceFile], Iterator[Doc | Bad]]] = {
    "txt": read_txt,
    "html": read_html,
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "parquet": read_parquet,
}


def read_records(f: SourceFile) -> Iterator[Doc | Bad]:
    """Every record of the file, as Doc or Bad; at least one, even for an empty or unreadable file."""
    count = 0
    records = _read(f)
    while True:
        try:
            record = next(records)
        except StopIteration:
            break
        except READ_ERRORS as err:
            after = f" after {count} record(s); rest of file skipped" if count else ""
            detail = f"{type(err).__name__}: {err}".strip()
            yield Bad(f.rel, f"unreadable_file: {detail}{after}", f.head())
            return
        count += 1
        yield record
    if count == 0:
        yield Bad(f.rel, "empty_file: no records in the file", f.head())


def _read(f: SourceFile) -> Iterator[Doc | Bad]:
    """Detect the format and encoding, then hand the file to its format's reader."""
    if f.path.is_dir():  # a folder the directory walk could not list
        yield Bad(f.rel, "unreadable_file: directory could not be listed (permissions?)", b"")
        return
    f.compression, fmt, ext = detect_format(f.path)
    f.size = f.path.stat().st_size
    if fmt is None:
        f.compression = None
        supported = ", ".join(sorted(FORMATS))
        yield Bad(f.rel, f"unsupported_format: {ext or 'no extension'!r} (supported: {supported})", f.head())
        return
    f.format = fmt
    if f.size == 0:
        yield Bad(f.rel, "empty_file: 0 bytes", b"")
        return
    if fmt != "parquet":
        sample = read_head(f.path, f.compression, SNIFF_BYTES)
        if not sample:
            yield Bad(f.rel, "empty_file: 0 bytes after decompression", f.head())
            return
        encoding: str | None
        if f.options.encoding:
            encoding, problem = f.options.encoding, ""
        else:
            encoding, problem = sniff_encoding(sample, complete=len(sample) < SNIFF_BYTES)
        if encoding is None:
            yield Bad(f.rel, problem, f.head())
            return
        f.encoding = encoding
    yield from READERS[fmt](f)

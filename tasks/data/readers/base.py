"""What every reader shares: the records it yields, the options it reads with, and `SourceFile`.

The reader contract: every record read from a file becomes exactly one `Doc` or one `Bad` (with a
reason code from `REASONS`), so nothing is dropped silently. `SourceFile` carries one file through its
reader and turns what the reader finds into those records, so every format quarantines alike.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import zstandard

#: Every reason code a `Bad` record can carry.
REASONS = (
    "unsupported_format",
    "unreadable_file",
    "binary_file",
    "undecodable_file",
    "empty_file",
    "undecodable_record",
    "malformed_json",
    "malformed_csv_row",
    "missing_text_field",
    "empty_text",
)

#: Errors that mean "this file cannot be read (any further)": one unreadable_file record, not a crash.
READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException, UnicodeError)

_FILE_HEAD_BYTES = 4096  # raw bytes kept in quarantine for a whole bad file


@dataclass(frozen=True)
class ReadOptions:
    """The settings that change how files are read (the ingest stage builds them from its params)."""

    text_field: str  # field/column holding the text in jsonl/json/csv/parquet
    txt_doc_chars: int  # .txt/.md cut into ~this many chars at blank lines; 0 = one doc per file
    encoding: str | None  # force this encoding for every text file; None = sniff each file
    csv_delimiter: str
    quarantine_raw_bytes: int  # cap on `Bad.raw`


class Doc(NamedTuple):
    text: str
    source: str
    nbytes: int  # UTF-8 length of text


class Bad(NamedTuple):
    source: str
    reason: str  # "code: detail"
    raw: bytes  # as in the (decompressed) file, at most quarantine_raw_bytes


@dataclass
class SourceFile:
    """One input file being read; `read_records` fills in what it finds out (for the per-file report)."""

    path: Path
    rel: str  # display path: the prefix of every record's `source`
    options: ReadOptions
    compression: str | None = None
    format: str = "unknown"
    encoding: str = "-"
    size: int = 0  # bytes of the file on disk

    def raw_bytes(self, text: str | bytes) -> bytes:
        """The raw bytes of a record, as they were in the (decompressed) file, capped."""
        cap = self.options.quarantine_raw_bytes
        if isinstance(text, bytes):
            return text[:cap]
        text = text[:cap]
        encoding = "utf-8" if self.encoding in ("-", "utf-8-sig") else self.encoding
        try:
            data = text.encode(encoding, "surrogateescape")
        except UnicodeError:
            data = text.encode("utf-8", "surrogatepass")
        return data[:cap]

    def head(self) -> bytes:
        """The first bytes of the file on disk, capped (for quarantining a whole file); b"" if unreadable."""
        try:
            with open(self.path, "rb") as handle:
                return handle.read(min(_FILE_HEAD_BYTES, self.options.quarantine_raw_bytes))
        except OSError:
            return b""

    def doc(self, text: str, source: str, raw: str | bytes) -> Doc | Bad:
        """A document, unless its text is blank or not valid Unicode."""
        if not text.strip():
            return Bad(source, "empty_text: text is empty or whitespace only", self.raw_bytes(raw))
        try:
            nbytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as err:
            return Bad(
                source, f"undecodable_record: text is not valid Unicode ({err.reason})", self.raw_bytes(raw)
            )
        return Doc(text, source, nbytes)

    def undecodable(self, source: str, raw: str) -> Bad:
        """A record with bytes the file's encoding cannot map."""
        return Bad(
            source, f"undecodable_record: bytes that are not valid {self.encoding}", self.raw_bytes(raw)
        )

    def from_object(self, obj: object, source: str, raw: str) -> Doc | Bad:
        """The document in a JSON record: its `text_field`, which must be a string."""
        name = self.options.text_field
        if not isinstance(obj, dict):
            kind = type(obj).__name__ if obj is not None else "null"
            return Bad(
                source, f"missing_text_field: record is a JSON {kind}, not an object", self.raw_bytes(raw)
            )
        if name not in obj:
            keys = ", ".join(list(obj)[:10]) or "none"
            return Bad(source, f"missing_text_field: no {name!r} field (fields: {keys})", self.raw_bytes(raw))
        text = obj[name]
        if not isinstance(text, str):
            kind = type(text).__name__ if text is not None else "null"
            return Bad(source, f"missing_text_field: {name!r} is {kind}, not a string", self.raw_bytes(raw))
        return self.doc(text, source, raw)

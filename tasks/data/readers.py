"""How to read one input file: format and encoding detection, then one reader per format.

The reader contract: every record read from a file becomes exactly one `Doc` or one `Bad` (with a
reason code from `REASONS`), so nothing is dropped silently. A file-level problem (unsupported,
unreadable, binary, undecodable, empty...) is itself one `Bad`. Files are streamed, so memory stays
constant whatever their size (a compressed Parquet file is spooled to a temporary file).

Entry point: `SourceFile(path, rel, options).records()`.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from charset_normalizer import from_bytes
from selectolax.lexbor import LexborHTMLParser

__all__ = [
    "COMPRESSIONS",
    "FORMATS",
    "JSON_READ_CHARS",
    "REASONS",
    "SNIFF_BYTES",
    "Bad",
    "Doc",
    "ReadOptions",
    "SourceFile",
    "html_to_text",
    "sniff_encoding",
]

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

COMPRESSIONS = {".gz": "gz", ".bz2": "bz2", ".zst": "zst"}
FORMATS = {
    ".txt": "txt",
    ".md": "txt",
    ".html": "html",
    ".htm": "html",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}

SNIFF_BYTES = 64 * 1024  # how much of each (decompressed) file the encoding sniffer looks at
JSON_READ_CHARS = 1 << 20  # characters a .json file is read by (the buffer grows only for a larger value)
_FILE_HEAD_BYTES = 4096  # raw bytes kept in quarantine for a whole bad file
_BINARY_CONTROL_SHARE = 0.02  # share of control bytes (other than \t \n \v \f \r ESC) that marks binary
_CP1252_CHAOS_SLACK = 0.05  # prefer cp1252 among charset_normalizer candidates this close to the best
_CONTROL_BYTES = bytes([*range(0, 9), *range(14, 27), *range(28, 32)])
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes the decoder could not map (errors="surrogateescape")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_JSON = json.JSONDecoder()

#: Errors that mean "this file cannot be read (any further)": one unreadable_file record, not a crash.
_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException, UnicodeError)


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
    """One input file being read; `records()` fills in what it finds out (for the per-file report)."""

    path: Path
    rel: str  # display path: the prefix of every record's `source`
    options: ReadOptions
    compression: str | None = None
    format: str = "unknown"
    encoding: str = "-"
    size: int = 0  # bytes of the file on disk

    def records(self) -> Iterator[Doc | Bad]:
        """Every record of the file, as Doc or Bad; at least one, even for an empty or unreadable file."""
        count = 0
        records = self._read()
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except _READ_ERRORS as err:
                after = f" after {count} record(s); rest of file skipped" if count else ""
                detail = f"{type(err).__name__}: {err}".strip()
                yield Bad(self.rel, f"unreadable_file: {detail}{after}", self._head())
                return
            count += 1
            yield record
        if count == 0:
            yield Bad(self.rel, "empty_file: no records in the file", self._head())

    def _read(self) -> Iterator[Doc | Bad]:
        """Detect the format and encoding, then hand the file to its format's reader."""
        if self.path.is_dir():  # a folder the directory walk could not list
            yield Bad(self.rel, "unreadable_file: directory could not be listed (permissions?)", b"")
            return
        self.compression, fmt, ext = _detect_format(self.path)
        self.size = self.path.stat().st_size
        if fmt is None:
            self.compression = None
            supported = ", ".join(sorted(FORMATS))
            yield Bad(
                self.rel,
                f"unsupported_format: {ext or 'no extension'!r} (supported: {supported})",
                self._head(),
            )
            return
        self.format = fmt
        if self.size == 0:
            yield Bad(self.rel, "empty_file: 0 bytes", b"")
            return
        if fmt != "parquet":
            sample = _read_head(self.path, self.compression, SNIFF_BYTES)
            if not sample:
                yield Bad(self.rel, "empty_file: 0 bytes after decompression", self._head())
                return
            if self.options.encoding:
                encoding, problem = self.options.encoding, ""
            else:
                encoding, problem = sniff_encoding(sample, complete=len(sample) < SNIFF_BYTES)
            if encoding is None:
                yield Bad(self.rel, problem, self._head())
                return
            self.encoding = encoding
        yield from _READERS[fmt](self)

    # Helpers for the readers below.

    def _raw(self, text: str | bytes) -> bytes:
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

    def _head(self) -> bytes:
        """The first bytes of the file on disk, capped (for quarantining a whole file); b"" if unreadable."""
        try:
            with open(self.path, "rb") as handle:
                return handle.read(min(_FILE_HEAD_BYTES, self.options.quarantine_raw_bytes))
        except OSError:
            return b""

    def _doc(self, text: str, source: str, raw: str | bytes) -> Doc | Bad:
        """A document, unless its text is blank or not valid Unicode."""
        if not text.strip():
            return Bad(source, "empty_text: text is empty or whitespace only", self._raw(raw))
        try:
            nbytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as err:
            return Bad(
                source, f"undecodable_record: text is not valid Unicode ({err.reason})", self._raw(raw)
            )
        return Doc(text, source, nbytes)

    def _undecodable(self, source: str, raw: str) -> Bad:
        return Bad(source, f"undecodable_record: bytes that are not valid {self.encoding}", self._raw(raw))

    def _from_object(self, obj: object, source: str, raw: str) -> Doc | Bad:
        name = self.options.text_field
        if not isinstance(obj, dict):
            kind = type(obj).__name__ if obj is not None else "null"
            return Bad(source, f"missing_text_field: record is a JSON {kind}, not an object", self._raw(raw))
        if name not in obj:
            keys = ", ".join(list(obj)[:10]) or "none"
            return Bad(source, f"missing_text_field: no {name!r} field (fields: {keys})", self._raw(raw))
        text = obj[name]
        if not isinstance(text, str):
            kind = type(text).__name__ if text is not None else "null"
            return Bad(source, f"missing_text_field: {name!r} is {kind}, not a string", self._raw(raw))
        return self._doc(text, source, raw)


# --------------------------------------------------------------------------------------------------
# Detecting and opening a file
# --------------------------------------------------------------------------------------------------


def _detect_format(path: Path) -> tuple[str | None, str | None, str]:
    """(compression, format, extension); format None when unsupported."""
    name = path.name.lower()
    stem, ext = os.path.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression:
        ext = os.path.splitext(stem)[1]
    return compression, FORMATS.get(ext), ext


def _open_binary(path: Path, compression: str | None) -> IO[bytes]:
    if compression == "gz":
        return gzip.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "zst":
        handle = open(path, "rb")  # noqa: SIM115 - closed by the reader (closefd)
        reader = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]
    return open(path, "rb")  # the caller closes it


def _read_head(path: Path, compression: str | None, size: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    with _open_binary(path, compression) as handle:
        while got < size:
            chunk = handle.read(size - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    return b"".join(chunks)


def sniff_encoding(sample: bytes, complete: bool) -> tuple[str | None, str]:
    """(encoding, "") for a text sample, or (None, "reason_code: detail") for a binary/undecodable one.

    `complete` says whether the sample is the whole file; if not, a multi-byte character cut at its end
    is not held against UTF-8.
    """
    for bom, name in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32")):
        if sample.startswith(bom):
            return name, ""
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", ""
    if b"\x00" in sample:
        return None, "binary_file: NUL bytes in the first 64 KiB"
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    if controls > _BINARY_CONTROL_SHARE * len(sample):
        return None, f"binary_file: {controls} control bytes in the first {len(sample)} bytes"
    utf8 = "utf-8-sig" if sample.startswith(codecs.BOM_UTF8) else "utf-8"
    try:
        codecs.getincrementaldecoder(utf8)("strict").decode(sample, final=complete)
        return utf8, ""
    except UnicodeDecodeError:
        pass
    results = from_bytes(sample)
    best = results.best()
    if best is None:
        return None, "undecodable_file: no known encoding fits the first 64 KiB"
    # charset_normalizer often ranks an exotic code page first for short Western text; cp1252 (a
    # superset of printable Latin-1) is the likely truth when it decodes the sample about as cleanly.
    for match in results:
        if match.chaos <= best.chaos + _CP1252_CHAOS_SLACK and "cp1252" in match.could_be_from_charset:
            return "cp1252", ""
    return best.encoding, ""


@contextlib.contextmanager
def _text_stream(f: SourceFile) -> Iterator[io.TextIOWrapper]:
    """The decoded file; bytes the encoding cannot map come through as U+DC80..U+DCFF (surrogateescape),
    so each record can be checked on its own and quarantined without stopping the file."""
    binary = _open_binary(f.path, f.compression)
    with io.TextIOWrapper(binary, encoding=f.encoding, errors="surrogateescape", newline="") as stream:
        yield stream


# --------------------------------------------------------------------------------------------------
# Readers: one per format, each yields the Doc/Bad records of one file
# --------------------------------------------------------------------------------------------------


def _read_txt(f: SourceFile) -> Iterator[Doc | Bad]:
    """Documents of about `txt_doc_chars` characters, cut at blank lines (a verbatim slice of the file).

    A paragraph longer than the limit is itself cut at a line boundary, so memory stays bounded.
    """
    limit = f.options.txt_doc_chars
    chunk: list[str] = []
    chunk_chars = chunk_start = chunk_end = 0
    para: list[str] = []
    para_chars = para_start = para_end = 0
    gap: list[str] = []  # blank lines since the last paragraph

    def emit() -> Doc | Bad | None:
        nonlocal chunk, chunk_chars
        if not chunk:
            return None
        text = "".join(chunk).rstrip("\r\n")
        chunk, chunk_chars = [], 0
        return f._doc(text, f"{f.rel}:lines {chunk_start}-{chunk_end}", text)

    def end_paragraph() -> Iterator[Doc | Bad]:
        nonlocal chunk, chunk_chars, chunk_start, chunk_end, para, para_chars, gap
        if not para:
            return
        gap_chars = sum(map(len, gap))
        full = chunk and limit and chunk_chars + gap_chars + para_chars > limit
        if full and (record := emit()) is not None:
            yield record
        if chunk:
            chunk.extend(gap)
            chunk.extend(para)
            chunk_chars += gap_chars + para_chars
        else:
            chunk, chunk_chars, chunk_start = list(para), para_chars, para_start
        chunk_end = para_end
        para, para_chars, gap = [], 0, []

    with _text_stream(f) as stream:
        try:
            for number, line in enumerate(stream, 1):
                if _ESCAPED.search(line):
                    # A line that does not decode ends the document: the text on each side stays intact.
                    yield from end_paragraph()
                    if (record := emit()) is not None:
                        yield record
                    gap = []
                    yield f._undecodable(f"{f.rel}:line {number}", line)
                elif not line.strip():
                    yield from end_paragraph()
                    if chunk:
                        gap.append(line)
                else:
                    if not para:
                        para_start = number
                    para.append(line)
                    para_chars += len(line)
                    para_end = number
                    if limit and para_chars >= limit:
                        yield from end_paragraph()
                        if (record := emit()) is not None:
                            yield record
        except _READ_ERRORS:
            # Damaged past this point (e.g. a truncated .gz): keep the text read so far, then let the
            # caller quarantine the rest of the file.
            yield from end_paragraph()
            if (record := emit()) is not None:
                yield record
            raise
    yield from end_paragraph()
    if (record := emit()) is not None:
        yield record


#: Elements whose content is not visible text.
_HTML_DROP = ["script", "style", "noscript", "template", "head", "svg", "iframe", "object"]
#: Elements that start a new paragraph.
_HTML_BLOCKS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "body", "caption", "center", "dd", "details"),
        *("dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header"),
        *("h1", "h2", "h3", "h4", "h5", "h6", "hr", "html", "legend", "li", "main", "menu", "nav", "ol"),
        *("p", "pre", "section", "summary", "table", "tbody", "tfoot", "thead", "title", "tr", "ul"),
    }
)


def html_to_text(html: str) -> str:
    """Visible text of an HTML document: paragraphs (block elements) separated by blank lines, `<br>` as a
    newline, whitespace collapsed except inside `<pre>`."""
    tree = LexborHTMLParser(html)
    tree.strip_tags(_HTML_DROP)
    if tree.root is None:
        return ""
    paragraphs: list[str] = []
    pieces: list[str] = []
    verbatim = False
    pre_depth = 0

    def end_paragraph() -> None:
        nonlocal verbatim
        text = "".join(pieces)
        if verbatim:
            text = text.strip("\r\n")
        else:
            text = "\n".join(" ".join(line.split()) for line in text.split("\n")).strip("\n")
        if text.strip():
            paragraphs.append(text)
        pieces.clear()
        verbatim = False

    stack: list[tuple[object, bool]] = [(tree.root, False)]
    while stack:
        node, closing = stack.pop()
        tag = node.tag  # type: ignore[attr-defined]
        if closing:
            end_paragraph()
            if tag == "pre":
                pre_depth -= 1
            continue
        if tag == "-text":
            text = node.text_content or ""  # type: ignore[attr-defined]
            if pre_depth:
                verbatim = True
                pieces.append(text)
            else:
                pieces.append(" ".join(text.split("\n")))
            continue
        if tag.startswith(("-", "_", "!")):  # comments, doctype
            continue
        if tag == "br":
            pieces.append("\n")
            continue
        if tag in _HTML_BLOCKS:
            end_paragraph()
            stack.append((node, True))
            if tag == "pre":
                pre_depth += 1
        elif tag in ("td", "th"):
            pieces.append(" ")
        children = list(node.iter(include_text=True))  # type: ignore[attr-defined]
        stack.extend((child, False) for child in reversed(children))
    end_paragraph()
    return "\n\n".join(paragraphs)


def _read_html(f: SourceFile) -> Iterator[Doc | Bad]:
    with _text_stream(f) as stream:
        html = stream.read()
    if _ESCAPED.search(html):
        yield f._undecodable(f.rel, html)
        return
    yield f._doc(html_to_text(html), f.rel, html)


def _read_jsonl(f: SourceFile) -> Iterator[Doc | Bad]:
    with _text_stream(f) as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            source = f"{f.rel}:line {number}"
            if _ESCAPED.search(line):
                yield f._undecodable(source, line)
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # so an unterminated string says so
            except (json.JSONDecodeError, RecursionError) as err:
                yield Bad(source, f"malformed_json: {err}", f._raw(line))
                continue
            yield f._from_object(obj, source, line)


class _JsonBuffer:
    """A window over a decoded text stream for incremental `raw_decode` of one JSON value at a time."""

    def __init__(self, stream: io.TextIOWrapper) -> None:
        self.stream = stream
        self.chunk_chars = JSON_READ_CHARS
        self.buf = ""
        self.pos = 0
        self.eof = False

    def more(self) -> bool:
        if self.eof:
            return False
        if self.pos:
            self.buf, self.pos = self.buf[self.pos :], 0
        # Read at least as much as is buffered, so re-parsing a value that spans many chunks stays linear.
        data = self.stream.read(max(self.chunk_chars, len(self.buf)))
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end of the file), skipping whitespace."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def decode(self) -> tuple[object, str]:
        """The next value and its raw text; JSONDecodeError only for a real error, not a chunk boundary."""
        while True:
            try:
                value, end = _JSON.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a number at the very end might continue
                    raw, self.pos = self.buf[self.pos : end], end
                    return value, raw
            except json.JSONDecodeError as err:
                truncated = err.pos >= len(self.buf) - 16 or err.msg.startswith("Unterminated string")
                if self.eof or not truncated:
                    raise
            self.more()

    def rest(self, cap: int) -> str:
        """Up to `cap` characters from the current position (reading no further than that)."""
        while len(self.buf) - self.pos < cap and self.more():
            pass
        return self.buf[self.pos : self.pos + cap]


def _read_json(f: SourceFile) -> Iterator[Doc | Bad]:
    """A top-level array of objects, streamed item by item; or one object (or several concatenated).

    After a malformed item the rest of the file cannot be resynchronised: it is quarantined as one record.
    """
    cap = f.options.quarantine_raw_bytes
    with _text_stream(f) as stream:
        buffer = _JsonBuffer(stream)
        first = buffer.peek()
        in_array = first == "["
        if in_array:
            buffer.pos += 1
        index = 0
        while True:
            char = buffer.peek()
            if not char:
                if in_array:
                    yield Bad(f"{f.rel}:end", "malformed_json: unterminated top-level array", b"")
                return
            if in_array and char == "]" and index == 0:
                buffer.pos += 1
                break
            index += 1
            source = f"{f.rel}:item {index}"
            try:
                obj, raw = buffer.decode()
            except (json.JSONDecodeError, RecursionError) as err:
                detail = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
                yield Bad(source, f"malformed_json: {detail}; rest of file skipped", f._raw(buffer.rest(cap)))
                return
            yield f._undecodable(source, raw) if _ESCAPED.search(raw) else f._from_object(obj, source, raw)
            if not in_array:
                continue
            char = buffer.peek()
            if char == ",":
                buffer.pos += 1
            elif char == "]":
                buffer.pos += 1
                break
            else:
                found = repr(char) if char else "end of file"
                yield Bad(
                    f"{f.rel}:item {index + 1}",
                    f"malformed_json: expected ',' or ']' after item {index}, found {found}; rest skipped",
                    f._raw(buffer.rest(cap)),
                )
                return
        if buffer.peek():
            yield Bad(
                f"{f.rel}:end",
                "malformed_json: extra data after the top-level array",
                f._raw(buffer.rest(cap)),
            )


def _read_csv(f: SourceFile) -> Iterator[Doc | Bad]:
    name = f.options.text_field
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a text field can be a whole book (default: 128 KiB)
    with _text_stream(f) as stream:
        consumed: list[str] = []  # the lines of the current row, for its raw bytes

        def lines() -> Iterator[str]:
            for line in stream:
                consumed.append(line)
                yield line

        reader = csv.reader(lines(), delimiter=f.options.csv_delimiter)
        header: list[str] | None = None
        column = 0
        number = 0
        while True:
            consumed.clear()
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                number += 1
                yield Bad(f"{f.rel}:row {number}", f"malformed_csv_row: {err}", f._raw("".join(consumed)))
                continue
            raw = "".join(consumed)
            if not row:  # blank line
                continue
            if header is None:
                if _ESCAPED.search(raw):
                    yield Bad(
                        f"{f.rel}:header",
                        f"undecodable_file: header row is not valid {f.encoding}",
                        f._head(),
                    )
                    return
                if name not in row:
                    columns = ", ".join(row[:20])
                    yield Bad(
                        f"{f.rel}:header",
                        f"missing_text_field: no {name!r} column in the header (columns: {columns}); "
                        "file skipped",
                        f._head(),
                    )
                    return
                header, column = row, row.index(name)
                continue
            number += 1
            source = f"{f.rel}:row {number}"
            if _ESCAPED.search(raw):
                yield f._undecodable(source, raw)
            elif len(row) != len(header):
                yield Bad(
                    source,
                    f"malformed_csv_row: {len(row)} fields, the header has {len(header)}",
                    f._raw(raw),
                )
            else:
                yield f._doc(row[column], source, raw)


def _read_parquet(f: SourceFile) -> Iterator[Doc | Bad]:
    name = f.options.text_field
    with contextlib.ExitStack() as stack:
        if f.compression:  # Parquet needs random access: decompress to a temporary file (streamed)
            handle: IO[bytes] = stack.enter_context(tempfile.TemporaryFile())
            with _open_binary(f.path, f.compression) as source:
                shutil.copyfileobj(source, handle, 1 << 20)
            handle.seek(0)
        else:
            handle = stack.enter_context(open(f.path, "rb"))
        parquet = pq.ParquetFile(handle)
        columns = parquet.schema_arrow.names
        if name not in columns:
            yield Bad(
                f.rel,
                f"missing_text_field: no {name!r} column (columns: {', '.join(columns[:20])}); file skipped",
                f._head(),
            )
            return
        number = 0
        for batch in parquet.iter_batches(columns=[name], batch_size=1024):
            for value in batch.column(0).to_pylist():
                number += 1
                source = f"{f.rel}:row {number}"
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        yield Bad(
                            source, "undecodable_record: binary value is not valid UTF-8", f._raw(value)
                        )
                        continue
                if not isinstance(value, str):
                    kind = type(value).__name__ if value is not None else "null"
                    yield Bad(
                        source, f"missing_text_field: {name!r} is {kind}, not a string", f._raw(repr(value))
                    )
                    continue
                yield f._doc(value, source, value)


_READERS = {
    "txt": _read_txt,
    "html": _read_html,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
}

"""Stage `ingest`: read every input file of the raw corpus into one Parquet document dataset.

Inputs are the files, directories (recursive, hidden entries skipped) and globs of `ingest.paths`.
Each file is read as a stream (constant memory) in its format, chosen by extension after stripping a
`.gz`/`.bz2`/`.zst` suffix: `.txt`/`.md` (cut into documents at blank lines), `.html`/`.htm` (visible
text), `.jsonl`, `.json`, `.csv`, `.parquet` (the `ingest.text_field` of each record).

Outputs, all replaced atomically (a killed run leaves the previous output or nothing):

* `data/raw/part-NNNNN.parquet`: DOC_SCHEMA rows (`id`, `text`, `source`, `bytes`).
* `data/quarantine/ingest/part-NNNNN.parquet`: QUARANTINE_SCHEMA rows for every record (or whole file)
  that could not be ingested; `reason` is a short code, then `: ` and the human detail.
* `reports/ingest/files.csv`: one row per input file, with `docs_in == docs_out + quarantined`.

Nothing is dropped silently: every record read either becomes a document or a quarantine row, and a
file-level problem (unreadable, binary, unsupported, empty...) counts as one quarantined record.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import glob
import gzip
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from charset_normalizer import from_bytes
from selectolax.lexbor import LexborHTMLParser
from tqdm import tqdm

from tasks.io import DOC_SCHEMA, QUARANTINE_SCHEMA, ShardWriter, atomic_dir, atomic_file, content_id
from tasks.layout import QUARANTINE_DIR, RAW_DIR, REPORTS_DIR
from tasks.params import ParamsError

QUARANTINE_INGEST_DIR = QUARANTINE_DIR / "ingest"
REPORT_FILE = REPORTS_DIR / "ingest" / "files.csv"
REPORT_COLUMNS = ("path", "format", "encoding", "docs_in", "docs_out", "quarantined", "bytes", "bytes_out")

#: Every quarantine reason code this stage emits (each gets a `quarantined_<code>` metric, 0 included).
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
FILE_HEAD_BYTES = 4096  # raw bytes kept in quarantine for a whole bad file
BINARY_CONTROL_SHARE = 0.02  # share of control bytes (other than \t \n \v \f \r ESC) that marks binary
CP1252_CHAOS_SLACK = 0.05  # prefer cp1252 among charset_normalizer candidates this close to the best
_CONTROL_BYTES = bytes([*range(0, 9), *range(14, 27), *range(28, 32)])
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes the decoder could not map (errors="surrogateescape")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_JSON = json.JSONDecoder()


@dataclass
class IngestParams:
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


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


class Doc(NamedTuple):
    text: str
    source: str
    nbytes: int  # UTF-8 length of text


class Bad(NamedTuple):
    source: str
    reason: str  # "code: detail"
    raw: bytes


@dataclass
class _File:
    """One input file being read, and its row of reports/ingest/files.csv."""

    path: Path
    rel: str
    params: IngestParams
    compression: str | None = None
    format: str = "unknown"
    encoding: str = "-"
    docs_in: int = 0
    docs_out: int = 0
    quarantined: int = 0
    size: int = 0  # bytes of the file on disk
    bytes_out: int = 0

    def report_row(self) -> dict[str, object]:
        fmt = f"{self.format}+{self.compression}" if self.compression else self.format
        return {
            "path": self.rel,
            "format": fmt,
            "encoding": self.encoding,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "quarantined": self.quarantined,
            "bytes": self.size,
            "bytes_out": self.bytes_out,
        }

    def raw(self, text: str | bytes) -> bytes:
        """The raw bytes of a record, as they were in the (decompressed) file, capped."""
        cap = self.params.quarantine_raw_bytes
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
        """The first bytes of the file on disk (for quarantining a whole file); b"" if unreadable."""
        try:
            with open(self.path, "rb") as handle:
                return handle.read(FILE_HEAD_BYTES)
        except OSError:
            return b""

    def doc(self, text: str, source: str, raw: str | bytes) -> Doc | Bad:
        """A document, unless its text is blank or not valid Unicode."""
        if not text.strip():
            return Bad(source, "empty_text: text is empty or whitespace only", self.raw(raw))
        try:
            nbytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as err:
            return Bad(source, f"undecodable_record: text is not valid Unicode ({err.reason})", self.raw(raw))
        return Doc(text, source, nbytes)

    def undecodable(self, source: str, raw: str) -> Bad:
        return Bad(source, f"undecodable_record: bytes that are not valid {self.encoding}", self.raw(raw))

    def from_object(self, obj: object, source: str, raw: str) -> Doc | Bad:
        name = self.params.text_field
        if not isinstance(obj, dict):
            kind = type(obj).__name__ if obj is not None else "null"
            return Bad(source, f"missing_text_field: record is a JSON {kind}, not an object", self.raw(raw))
        if name not in obj:
            keys = ", ".join(list(obj)[:10]) or "none"
            return Bad(source, f"missing_text_field: no {name!r} field (fields: {keys})", self.raw(raw))
        text = obj[name]
        if not isinstance(text, str):
            kind = type(text).__name__ if text is not None else "null"
            return Bad(source, f"missing_text_field: {name!r} is {kind}, not a string", self.raw(raw))
        return self.doc(text, source, raw)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _walk(directory: Path, excluded: set[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) not in excluded
        )
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath, name)


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
    if controls > BINARY_CONTROL_SHARE * len(sample):
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
        if match.chaos <= best.chaos + CP1252_CHAOS_SLACK and "cp1252" in match.could_be_from_charset:
            return "cp1252", ""
    return best.encoding, ""


@contextlib.contextmanager
def _text_stream(f: _File) -> Iterator[io.TextIOWrapper]:
    """The decoded file; bytes the encoding cannot map come through as U+DC80..U+DCFF (surrogateescape),
    so each record can be checked on its own and quarantined without stopping the file."""
    binary = _open_binary(f.path, f.compression)
    with io.TextIOWrapper(binary, encoding=f.encoding, errors="surrogateescape", newline="") as stream:
        yield stream


# --------------------------------------------------------------------------------------------------
# Readers: each yields Doc/Bad records for one file
# --------------------------------------------------------------------------------------------------


def _read_txt(f: _File) -> Iterator[Doc | Bad]:
    """Documents of about `txt_doc_chars` characters, cut at blank lines (a verbatim slice of the file).

    A paragraph longer than the limit is itself cut at a line boundary, so memory stays bounded.
    """
    limit = f.params.txt_doc_chars
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
        return f.doc(text, f"{f.rel}:lines {chunk_start}-{chunk_end}", text)

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
        for number, line in enumerate(stream, 1):
            if _ESCAPED.search(line):
                # A line that does not decode ends the document: the text on each side stays intact.
                yield from end_paragraph()
                if (record := emit()) is not None:
                    yield record
                gap = []
                yield f.undecodable(f"{f.rel}:line {number}", line)
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


def _read_html(f: _File) -> Iterator[Doc | Bad]:
    with _text_stream(f) as stream:
        html = stream.read()
    if _ESCAPED.search(html):
        yield f.undecodable(f.rel, html)
        return
    yield f.doc(html_to_text(html), f.rel, html)


def _read_jsonl(f: _File) -> Iterator[Doc | Bad]:
    with _text_stream(f) as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            source = f"{f.rel}:line {number}"
            if _ESCAPED.search(line):
                yield f.undecodable(source, line)
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # so an unterminated string says so
            except (json.JSONDecodeError, RecursionError) as err:
                yield Bad(source, f"malformed_json: {err}", f.raw(line))
                continue
            yield f.from_object(obj, source, line)


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


def _read_json(f: _File) -> Iterator[Doc | Bad]:
    """A top-level array of objects, streamed item by item; or one object (or several concatenated).

    After a malformed item the rest of the file cannot be resynchronised: it is quarantined as one record.
    """
    cap = f.params.quarantine_raw_bytes
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
                yield Bad(source, f"malformed_json: {detail}; rest of file skipped", f.raw(buffer.rest(cap)))
                return
            yield f.undecodable(source, raw) if _ESCAPED.search(raw) else f.from_object(obj, source, raw)
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
                    f.raw(buffer.rest(cap)),
                )
                return
        if buffer.peek():
            yield Bad(
                f"{f.rel}:end",
                "malformed_json: extra data after the top-level array",
                f.raw(buffer.rest(cap)),
            )


def _read_csv(f: _File) -> Iterator[Doc | Bad]:
    name = f.params.text_field
    with _text_stream(f) as stream:
        consumed: list[str] = []  # the lines of the current row, for its raw bytes

        def lines() -> Iterator[str]:
            for line in stream:
                consumed.append(line)
                yield line

        reader = csv.reader(lines(), delimiter=f.params.csv_delimiter)
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
                yield Bad(f"{f.rel}:row {number}", f"malformed_csv_row: {err}", f.raw("".join(consumed)))
                continue
            raw = "".join(consumed)
            if not row:  # blank line
                continue
            if header is None:
                if _ESCAPED.search(raw):
                    yield Bad(
                        f"{f.rel}:header", f"undecodable_file: header row is not valid {f.encoding}", f.head()
                    )
                    return
                if name not in row:
                    columns = ", ".join(row[:20])
                    yield Bad(
                        f"{f.rel}:header",
                        f"missing_text_field: no {name!r} column in the header (columns: {columns}); "
                        "file skipped",
                        f.head(),
                    )
                    return
                header, column = row, row.index(name)
                continue
            number += 1
            source = f"{f.rel}:row {number}"
            if _ESCAPED.search(raw):
                yield f.undecodable(source, raw)
            elif len(row) != len(header):
                yield Bad(
                    source,
                    f"malformed_csv_row: {len(row)} fields, the header has {len(header)}",
                    f.raw(raw),
                )
            else:
                yield f.doc(row[column], source, raw)


def _read_parquet(f: _File) -> Iterator[Doc | Bad]:
    name = f.params.text_field
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
                f.head(),
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
                        yield Bad(source, "undecodable_record: binary value is not valid UTF-8", f.raw(value))
                        continue
                if not isinstance(value, str):
                    kind = type(value).__name__ if value is not None else "null"
                    yield Bad(
                        source, f"missing_text_field: {name!r} is {kind}, not a string", f.raw(repr(value))
                    )
                    continue
                yield f.doc(value, source, value)


_READERS = {
    "txt": _read_txt,
    "html": _read_html,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
}

#: Errors that mean "this file cannot be read (any further)": quarantined, the run goes on.
_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException, UnicodeError)


def _records(f: _File) -> Iterator[Doc | Bad]:
    f.compression, fmt, ext = _detect_format(f.path)
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
        sample = _read_head(f.path, f.compression, SNIFF_BYTES)
        if not sample:
            yield Bad(f.rel, "empty_file: 0 bytes after decompression", f.head())
            return
        if f.params.encoding:
            encoding, problem = f.params.encoding, ""
        else:
            encoding, problem = sniff_encoding(sample, complete=len(sample) < SNIFF_BYTES)
        if encoding is None:
            yield Bad(f.rel, problem, f.head())
            return
        f.encoding = encoding
    yield from _READERS[fmt](f)


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------


def _no_documents_error(files: list[_File], reasons: Counter[str], examples: list[Bad]) -> ValueError:
    names = ", ".join(f.rel for f in files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
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
    params.validate()
    root = Path(root)
    inputs = resolve_inputs(params.paths, root)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    files: list[_File] = []
    reasons: Counter[str] = Counter()
    examples: list[Bad] = []
    cap = params.quarantine_raw_bytes

    with atomic_dir(root / RAW_DIR) as raw_tmp, atomic_dir(root / QUARANTINE_INGEST_DIR) as quarantine_tmp:
        docs = ShardWriter(raw_tmp, DOC_SCHEMA, rows_per_shard=params.rows_per_shard)
        quarantine = ShardWriter(quarantine_tmp, QUARANTINE_SCHEMA, rows_per_shard=params.rows_per_shard)

        def emit(f: _File, record: Doc | Bad) -> None:
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
                quarantine.write({"source": record.source, "reason": record.reason, "raw": record.raw[:cap]})
                f.quarantined += 1
                reasons[record.reason.split(":", 1)[0]] += 1
                if len(examples) < 5:
                    examples.append(record)

        progress = tqdm(inputs, desc="ingest", unit="file", disable=None, file=sys.stderr)
        for path, display in progress:
            f = _File(path=path, rel=display, params=params)
            files.append(f)
            records = _records(f)
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    break
                except _READ_ERRORS as err:
                    after = f" after {f.docs_in} record(s); rest of file skipped" if f.docs_in else ""
                    detail = f"{type(err).__name__}: {err}".strip()
                    emit(f, Bad(f.rel, f"unreadable_file: {detail}{after}", f.head()))
                    break
                emit(f, record)
            if f.docs_in == 0:
                emit(f, Bad(f.rel, "empty_file: no records in the file", f.head()))
            progress.set_postfix(docs=sum(x.docs_out for x in files), quarantined=sum(reasons.values()))
        progress.close()

        if not any(f.docs_out for f in files):
            raise _no_documents_error(files, reasons, examples)
        docs.close()
        quarantine.close()
        if quarantine.rows_written == 0:  # an empty dataset, not an empty directory (DVC tracks files)
            pq.write_table(
                QUARANTINE_SCHEMA.empty_table(), quarantine_tmp / "part-00000.parquet", compression="zstd"
            )

    with atomic_file(root / REPORT_FILE) as handle:
        writer = csv.DictWriter(handle, fieldnames=REPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(f.report_row() for f in files)

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

"""Getting at a file's text: its format and compression from the name, the decompressed bytes, the
sniffed encoding and the decoded stream. Every text reader goes through here, so every format accepts
the same compressions and encodings, and an undecodable byte is caught per record, not per file.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import zstandard
from charset_normalizer import from_bytes

from tasks.data.readers.base import SourceFile

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
_BINARY_CONTROL_SHARE = 0.02  # share of control bytes (other than \t \n \v \f \r ESC) that marks binary
_CP1252_CHAOS_SLACK = 0.05  # prefer cp1252 among charset_normalizer candidates this close to the best
_CONTROL_BYTES = bytes([*range(0, 9), *range(14, 27), *range(28, 32)])

#: Bytes the decoder could not map (`text_stream` decodes with errors="surrogateescape").
ESCAPED = re.compile("[\udc80-\udcff]")


def detect_format(path: Path) -> tuple[str | None, str | None, str]:
    """(compression, format, extension); format None when unsupported."""
    name = path.name.lower()
    stem, ext = os.path.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression:
        ext = os.path.splitext(stem)[1]
    return compression, FORMATS.get(ext), ext


def open_binary(path: Path, compression: str | None) -> IO[bytes]:
    """The file's decompressed bytes, streamed; the caller closes the handle."""
    if compression == "gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "zst":
        handle = open(path, "rb")  # noqa: SIM115 - closed by the reader (closefd)
        reader = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")  # the caller closes it


def read_head(path: Path, compression: str | None, size: int) -> bytes:
    """The first `size` decompressed bytes (fewer for a shorter file)."""
    chunks: list[bytes] = []
    got = 0
    with open_binary(path, compression) as handle:
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
def text_stream(f: SourceFile) -> Iterator[io.TextIOWrapper]:
    """The decoded file; bytes the encoding cannot map come through as U+DC80..U+DCFF (surrogateescape),
    so each record can be checked on its own and quarantined without stopping the file."""
    binary = open_binary(f.path, f.compression)
    with io.TextIOWrapper(binary, encoding=f.encoding, errors="surrogateescape", newline="") as stream:
        yield stream

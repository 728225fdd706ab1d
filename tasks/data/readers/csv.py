"""CSV tables (.csv): one document per row, taken from the header's `text_field` column; a malformed
row is quarantined alone, a header without that column skips the file."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator

from tasks.data.readers.base import Bad, Doc, SourceFile
from tasks.data.readers.opening import ESCAPED, text_stream


def read_csv(f: SourceFile) -> Iterator[Doc | Bad]:
    """The `text_field` column of every row (rows may span lines: quoted newlines)."""
    name = f.options.text_field
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a text field can be a whole book (default: 128 KiB)
    with text_stream(f) as stream:
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
                yield Bad(
                    f"{f.rel}:row {number}", f"malformed_csv_row: {err}", f.raw_bytes("".join(consumed))
                )
                continue
            raw = "".join(consumed)
            if not row:  # blank line
                continue
            if header is None:
                if ESCAPED.search(raw):
                    yield Bad(
                        f"{f.rel}:header",
                        f"undecodable_file: header row is not valid {f.encoding}",
                        f.head(),
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
            if ESCAPED.search(raw):
                yield f.undecodable(source, raw)
            elif len(row) != len(header):
                yield Bad(
                    source,
                    f"malformed_csv_row: {len(row)} fields, the header has {len(header)}",
                    f.raw_bytes(raw),
                )
            else:
                yield f.doc(row[column], source, raw)

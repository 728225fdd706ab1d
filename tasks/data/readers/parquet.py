"""Parquet tables (.parquet): one document per row of the `text_field` column, read in batches so
memory stays constant; a compressed file is first spooled to a temporary file (Parquet needs seeks)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

import pyarrow.parquet as pq

from tasks.data.readers.base import Bad, Doc, SourceFile
from tasks.data.readers.opening import open_binary


def read_parquet(f: SourceFile) -> Iterator[Doc | Bad]:
    """The `text_field` column of every row: strings, or binary values that are valid UTF-8."""
    name = f.options.text_field
    with contextlib.ExitStack() as stack:
        if f.compression:  # Parquet needs random access: decompress to a temporary file (streamed)
            handle: IO[bytes] = stack.enter_context(tempfile.TemporaryFile())
            with open_binary(f.path, f.compression) as compressed:
                shutil.copyfileobj(compressed, handle, 1 << 20)
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
                        yield Bad(
                            source, "undecodable_record: binary value is not valid UTF-8", f.raw_bytes(value)
                        )
                        continue
                if not isinstance(value, str):
                    kind = type(value).__name__ if value is not None else "null"
                    yield Bad(
                        source,
                        f"missing_text_field: {name!r} is {kind}, not a string",
                        f.raw_bytes(repr(value)),
                    )
                    continue
                yield f.doc(value, source, value)

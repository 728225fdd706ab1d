"""JSON Lines (.jsonl, .ndjson): one document per line, so a bad line is quarantined alone and the
rest of the file still reads."""

from __future__ import annotations

import json
from collections.abc import Iterator

from tasks.data.readers.base import Bad, Doc, SourceFile
from tasks.data.readers.opening import ESCAPED, text_stream


def read_jsonl(f: SourceFile) -> Iterator[Doc | Bad]:
    """The `text_field` of every object, one per non-blank line."""
    with text_stream(f) as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            source = f"{f.rel}:line {number}"
            if ESCAPED.search(line):
                yield f.undecodable(source, line)
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # so an unterminated string says so
            except (json.JSONDecodeError, RecursionError) as err:
                yield Bad(source, f"malformed_json: {err}", f.raw_bytes(line))
                continue
            yield f.from_object(obj, source, line)

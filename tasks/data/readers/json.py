"""JSON documents (.json): a top-level array of objects is streamed item by item, so a file larger than
memory reads like a .jsonl file; one object, or several concatenated, works too."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

from tasks.data.readers.base import Bad, Doc, SourceFile
from tasks.data.readers.opening import ESCAPED, text_stream

JSON_READ_CHARS = 1 << 20  # characters a .json file is read by (the buffer grows only for a larger value)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_JSON = json.JSONDecoder()


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


def read_json(f: SourceFile) -> Iterator[Doc | Bad]:
    """A top-level array of objects, streamed item by item; or one object (or several concatenated).

    After a malformed item the rest of the file cannot be resynchronised: it is quarantined as one record.
    """
    cap = f.options.quarantine_raw_bytes
    with text_stream(f) as stream:
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
                yield Bad(
                    source, f"malformed_json: {detail}; rest of file skipped", f.raw_bytes(buffer.rest(cap))
                )
                return
            yield f.undecodable(source, raw) if ESCAPED.search(raw) else f.from_object(obj, source, raw)
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
                    f.raw_bytes(buffer.rest(cap)),
                )
                return
        if buffer.peek():
            yield Bad(
                f"{f.rel}:end",
                "malformed_json: extra data after the top-level array",
                f.raw_bytes(buffer.rest(cap)),
            )

"""Plain text and Markdown (.txt, .md): a file is cut into documents at blank lines, so a book becomes
many documents of a useful size while each stays a verbatim slice of the file."""

from __future__ import annotations

from collections.abc import Iterator

from tasks.data.readers.base import READ_ERRORS, Bad, Doc, SourceFile
from tasks.data.readers.opening import ESCAPED, text_stream


def read_txt(f: SourceFile) -> Iterator[Doc | Bad]:
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

    with text_stream(f) as stream:
        try:
            for number, line in enumerate(stream, 1):
                if ESCAPED.search(line):
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
        except READ_ERRORS:
            # Damaged past this point (e.g. a truncated .gz): keep the text read so far, then let the
            # caller quarantine the rest of the file.
            yield from end_paragraph()
            if (record := emit()) is not None:
                yield record
            raise
    yield from end_paragraph()
    if (record := emit()) is not None:
        yield record

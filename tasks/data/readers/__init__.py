"""How to read one input file: format and encoding detection, then one reader per format.

Entry point: `read_records(SourceFile(path, rel, options))`. Files are streamed, so memory stays
constant whatever their size. The modules, in reading order:

* `base`: the records (`Doc`, `Bad` and its `REASONS`), `ReadOptions` and `SourceFile`.
* `opening`: format and compression from the file name, decompression, encoding sniffing, text streams.
* `txt`, `html`, `jsonl`, `json`, `csv`, `parquet`: one reader per format.
* `registry`: which reader reads which format, and `read_records`, which runs it on a file.
"""

from tasks.data.readers.base import REASONS, Bad, Doc, ReadOptions, SourceFile
from tasks.data.readers.opening import SNIFF_BYTES
from tasks.data.readers.registry import read_records

__all__ = ["REASONS", "SNIFF_BYTES", "Bad", "Doc", "ReadOptions", "SourceFile", "read_records"]

"""A language model is a compressor: the bits xz needs for the validation text, the bar a model should clear.

    bits = conditional_xz_bits(lambda: iter(train_chunks), val_bytes)     # then bits / len(val_bytes)

xz (LZMA, preset 9 extreme: a 64 MiB dictionary) given the training text first: the cost of the
validation bytes is size(xz(train + val)) − size(xz(train)), so repeats of training text are cheap as
they are for a model that learned them. Both streams are compressed chunk by chunk (memory stays at
xz's own ~700 MB, whatever the corpus size); the training text is read twice.
"""

from __future__ import annotations

import lzma
from collections.abc import Callable, Iterable

PRESET = 9 | lzma.PRESET_EXTREME


def xz_size(chunks: Iterable[bytes]) -> int:
    """Bytes of the .xz stream of the concatenated chunks."""
    compressor = lzma.LZMACompressor(preset=PRESET)
    size = sum(len(compressor.compress(chunk)) for chunk in chunks)
    return size + len(compressor.flush())


def conditional_xz_bits(context: Callable[[], Iterable[bytes]], text: bytes) -> int:
    """Bits xz spends on `text` after the chunks `context()` yields (called twice)."""

    def with_text() -> Iterable[bytes]:
        yield from context()
        yield text

    return 8 * (xz_size(with_text()) - xz_size(context()))

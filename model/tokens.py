"""The tokenizer conventions every stage shares: special tokens, file names, loading, byte counts.

A leaf module (tokenizers and numpy only, no torch), so the tokenizer and tokenize stages depend on it
and not on the model code: a change to the GPT does not retrain the tokenizer.

Special-token spellings typed in ordinary text encode as text (`for_ordinary_text`): only llmpipe itself
puts special ids into a sequence (the `<|eos|>` between documents, the chat template's role tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"  # ends every document and every chat turn
PAD_TOKEN = "<|pad|>"
ROLES = ("system", "user", "assistant")  # the chat template's role tokens are <|system|>, ...
DEFAULT_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *(f"<|{role}|>" for role in ROLES))

TOKENIZER_FILE = "tokenizer.json"
#: What a model directory holds of its tokenizer: tokenizer.json and transformers' configs.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")


def for_ordinary_text(tokenizer: Tokenizer) -> Tokenizer:
    """Make special-token spellings in input text encode as text (the flag is not stored in the file)."""
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """tokenizer.json (or the directory holding it), safe for ordinary text (`for_ordinary_text`)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer (run the `tokenizer` stage first)")
    return for_ordinary_text(Tokenizer.from_file(str(path)))


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (byte-level BPE: one symbol per byte); special tokens count 0.
    Bits per byte divide a model's summed loss by these counts."""
    symbols = byte_decoder()
    special = {added.content for added in tokenizer.get_added_tokens_decoder().values() if added.special}
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), np.int64)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        lengths[index] = 0 if token in special else sum(ch in symbols for ch in token)
    return lengths


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-symbol table (what the ByteLevel pre-tokenizer emits), inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return {chr(s): b for b, s in zip(printable, symbols, strict=True)}

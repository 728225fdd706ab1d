"""The tokenizer conventions every stage shares: special tokens, file names, loading, byte counts.

A leaf module (tokenizers and numpy only, no torch), so the tokenizer and tokenize stages depend on it
and not on the model code: a change to the GPT does not retrain the tokenizer.

Special-token spellings typed in ordinary text encode as text (`for_ordinary_text`): only llmpipe itself
puts special ids into a sequence (the token between documents, the chat template's role tokens).

A tokenizer directory is tokenizer.json plus transformers' tokenizer_config.json, which names the special
tokens (`SpecialTokens`) and holds the chat template. llmpipe's own tokenizer uses `<|bos|>`, `<|eos|>`,
`<|pad|>`; a pretrained base brings its own (SmolLM2: `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`), and
every stage reads them from the directory rather than assuming llmpipe's spellings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"  # ends every document and every chat turn
PAD_TOKEN = "<|pad|>"
ROLES = ("system", "user", "assistant")  # the chat template's role tokens are <|system|>, ...
DEFAULT_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *(f"<|{role}|>" for role in ROLES))

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers ≥ 4.47 saves a chat template
#: What a model directory holds of its tokenizer: tokenizer.json and transformers' configs.
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json", CHAT_TEMPLATE_FILE)
#: The document separator of GPT-2-style vocabularies (GPT-2, SmolLM, Qwen, Phi, ...): their pretraining
#: documents end with it, while their `eos_token` may end a chat turn instead (SmolLM2's `<|im_end|>`).
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens a tokenizer directory names, as ids of its vocabulary."""

    bos: int | None  # transformers' bos_token
    eos: int | None  # transformers' eos_token: generation stops at it
    pad: int | None
    document_end: int  # appended after every document of the training data (END_OF_TEXT, else eos)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """What ends a generated text: the eos token, and the end of a document."""
        return tuple(dict.fromkeys(i for i in (self.eos, self.document_end) if i is not None))


def tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json of a tokenizer directory, its chat template read from chat_template.jinja
    when it is stored there; {} when the directory has none."""
    directory = Path(directory)
    path = directory / TOKENIZER_CONFIG_FILE
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        config["chat_template"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return config


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def special_tokens(directory: Path, tokenizer: Tokenizer | None = None) -> SpecialTokens:
    """The special tokens named in `directory`'s tokenizer_config.json (`named_specials`)."""
    directory = Path(directory)
    tokenizer = tokenizer or load_tokenizer(directory)
    try:
        return named_specials(tokenizer, tokenizer_config(directory))
    except ValueError as err:
        raise ValueError(f"{directory}: {err}") from None


def named_specials(tokenizer: Tokenizer, config: dict[str, Any]) -> SpecialTokens:
    """The special tokens a tokenizer_config.json mapping names, as ids of `tokenizer` (a key it lacks:
    llmpipe's spelling, `<|eos|>`, when the vocabulary has it); ValueError when there is nothing to end a
    document with."""
    llmpipe = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}

    def token_id(key: str) -> int | None:
        text = token_text(config.get(key, llmpipe[key]))
        return None if text is None else tokenizer.token_to_id(text)

    bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    end_of_text = tokenizer.token_to_id(END_OF_TEXT) if END_OF_TEXT in specials else None
    document_end = end_of_text if end_of_text is not None else eos
    if document_end is None:
        raise ValueError(
            f"no eos token: {TOKENIZER_CONFIG_FILE} names none and the vocabulary has neither {EOS_TOKEN} "
            f"nor {END_OF_TEXT}, so nothing can separate documents"
        )
    return SpecialTokens(bos=bos, eos=eos, pad=pad, document_end=document_end)


def for_ordinary_text(tokenizer: Tokenizer) -> Tokenizer:
    """Make special-token spellings in input text encode as text (the flag is not stored in the file)."""
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """tokenizer.json (or the directory holding it), safe for ordinary text (`for_ordinary_text`)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
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

"""The chat template: how a conversation becomes tokens, for fine-tuning (SFT) and for chatting.

    <|bos|><|system|>\\nYou are terse.<|eos|><|user|>\\nWhat is cruft?<|eos|><|assistant|>\\nJunk.<|eos|>

Each turn is the role's special token, a newline, the text, and `<|eos|>`; a generation prompt ends
with `<|assistant|>\\n`, and the model ends its turn by emitting `<|eos|>`. The same template is written
to tokenizer_config.json as Jinja (`CHAT_TEMPLATE`), so transformers' `apply_chat_template` renders the
identical text. Here the ids are assembled from the special ids and the encoded texts, so text that
spells a special token ("<|user|>") stays text; SFT learns the assistant's text and its `<|eos|>` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)


def render(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The template as text (what `apply_chat_template(..., tokenize=False)` returns)."""
    text = "<|bos|>" + "".join(f"<|{m['role']}|>\n{m['content']}<|eos|>" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def special_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of <|bos|>, <|eos|> and the role tokens; a clear error when the tokenizer lacks one."""
    names = ["bos", "eos", *ROLES]
    ids = {name: tokenizer.token_to_id(f"<|{name}|>") for name in names}
    missing = [f"<|{name}|>" for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(
            f"the tokenizer has no {', '.join(missing)}: add them to params.yaml tokenizer.special_tokens "
            "(the chat template needs them) and rerun the tokenizer stage"
        )
    return ids  # type: ignore[return-value]


def encode(
    tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask): the rendered conversation's token ids, and 1 on each assistant turn's text + <|eos|>."""
    special = special_ids(tokenizer)
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    ids, mask = [special["bos"]], [0]
    for message in messages:
        if message["role"] not in ROLES:
            raise ValueError(f"chat role {message['role']!r} is not one of {', '.join(ROLES)}")
        text = tokenizer.encode(message["content"], add_special_tokens=False).ids
        learn = int(message["role"] == "assistant")
        ids += [special[message["role"]], *newline, *text, special["eos"]]
        mask += [0] * (1 + len(newline)) + [learn] * (len(text) + 1)
    if add_generation_prompt:
        ids += [special["assistant"], *newline]
        mask += [0] * (1 + len(newline))
    return np.asarray(ids, np.int64), np.asarray(mask, np.int8)

"""The chat template: how a conversation becomes tokens, for fine-tuning (SFT) and for chatting.

    <|bos|><|system|>\\nYou are terse.<|eos|><|user|>\\nWhat is cruft?<|eos|><|assistant|>\\nJunk.<|eos|>

Each turn is the role's special token, a newline, the text, and `<|eos|>`; a generation prompt ends
with `<|assistant|>\\n`, and the model ends its turn by emitting `<|eos|>`. The same template is written
to tokenizer_config.json as Jinja (`CHAT_TEMPLATE`), so transformers' `apply_chat_template` renders the
identical text. Here the ids are assembled from the special ids and the encoded texts, so text that
spells a special token ("<|user|>") stays text; SFT learns the assistant's text and its `<|eos|>` only.

`ChatSession` is `llmpipe chat`: it keeps the conversation, and before each reply drops the oldest turns
(never the system prompt, never the newest message) until the conversation fits the context window.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from model.tokens import ROLES

if TYPE_CHECKING:
    from model.generate import GenerationConfig
    from model.textgen import Generator

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
    ids: dict[str, int] = {name: tokenizer.token_to_id(f"<|{name}|>") for name in names}
    missing = [f"<|{name}|>" for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(
            f"the tokenizer has no {', '.join(missing)}: add them to params.yaml tokenizer.special_tokens "
            "(the chat template needs them) and rerun the tokenizer stage"
        )
    return ids


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


def fit_history(
    tokenizer: Any, messages: Sequence[dict[str, str]], budget: int
) -> tuple[list[dict[str, str]], int]:
    """(the messages that fit, how many were dropped): the oldest turns go first, a kept history starts
    with a user turn, and the system prompt and the newest message always stay. `budget` counts the
    rendered conversation plus the generation prompt, in tokens."""
    system = [dict(m) for m in messages[:1] if m["role"] == "system"]
    turns = [dict(m) for m in messages[len(system) :]]
    dropped = 0
    while len(encode(tokenizer, system + turns, add_generation_prompt=True)[0]) > budget:
        if len(turns) <= 1:
            raise ValueError(
                f"the system prompt and the last message alone take more than {budget} tokens "
                "(the context window less the room kept for the reply): shorten them"
            )
        turns.pop(0)
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns.pop(0)
            dropped += 1
    return system + turns, dropped


@dataclass
class ChatSession:
    """A conversation with the model: `reply()` streams the assistant's next turn and remembers it."""

    generator: Generator
    config: GenerationConfig
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    dropped: int = 0  # messages left out of the last prompt to fit the context
    turns: int = 0  # replies so far (a seeded session draws each turn from seed + turn)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages, self.dropped, self.turns = [], 0, 0

    def budget(self) -> int:
        """Tokens the conversation may take: the context less the room kept for the reply (at most half)."""
        context = self.generator.context
        return context - min(self.config.max_new_tokens, context // 2)

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's message, then yield the reply's text as it is generated. A message that cannot
        fit raises ValueError and leaves the conversation as it was; a reply cut short (the caller stops
        iterating, Ctrl-C) is remembered as far as it got."""
        tokenizer = self.generator.tokenizer
        special = special_ids(tokenizer)
        system = [{"role": "system", "content": self.system}] if self.system else []
        asked = [*system, *self.messages, {"role": "user", "content": text}]
        kept, self.dropped = fit_history(tokenizer, asked, self.budget())
        self.messages = kept[len(system) :]  # what was dropped would never fit again
        ids = encode(tokenizer, kept, add_generation_prompt=True)[0].tolist()
        # The reply ends with <|eos|>; it may not open another turn or a new conversation.
        banned = (special["bos"], *(special[role] for role in ROLES))
        seed = None if self.config.seed is None else self.config.seed + self.turns
        self.turns += 1
        config = replace(
            self.config, eos_id=special["eos"], banned_ids=self.config.banned_ids + banned, seed=seed
        )
        pieces: list[str] = []
        try:
            if config.strategy == "beam":  # beam search does not stream: the whole reply at once
                pieces.append(self.generator.generate(ids, config).text or "")
                yield pieces[0]
            else:
                for step in self.generator.stream(ids, config):
                    pieces.append(step.text)
                    yield step.text
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

"""Chat templates: how a conversation becomes tokens, for fine-tuning (SFT) and for chatting.

A tokenizer directory carries its chat template as Jinja in tokenizer_config.json (transformers' format),
and `ChatTemplate` renders it exactly as transformers' `apply_chat_template` does (it calls transformers'
own renderer). llmpipe's own tokenizer gets `CHAT_TEMPLATE`:

    <|bos|><|system|>\nYou are terse.<|eos|><|user|>\nWhat is cruft?<|eos|><|assistant|>\nJunk.<|eos|>

a pretrained base brings its own (SmolLM2's ChatML: `<|im_start|>user\n...<|im_end|>\n`).

`encode` turns a conversation into ids and a loss mask without trusting the text: the template is
rendered with a placeholder for each message, its own text (role markers, special tokens) is encoded
with special tokens recognised, each message's content with them spelled out as text, so a user who
types "<|im_start|>" cannot forge a turn. SFT learns each assistant message and the token that ends
its turn (the special token the template writes right after it: `<|eos|>`, `<|im_end|>`), nothing else.

`ChatSession` is `llmpipe chat`: it keeps the conversation, and before each reply drops the oldest turns
(never the system prompt, never the newest message) until the conversation fits the context window.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from model.tokens import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, token_text, tokenizer_config

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

#: Where message i sits in a rendering (private-use characters: no real text contains them).
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
#: The tokenizer_config.json entries transformers passes to a template (`{{ bos_token }}`, ...).
_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja template
    tokens: dict[str, str] = field(
        default_factory=dict
    )  # bos_token, eos_token, ... as the template sees them

    @classmethod
    def load(cls, directory: Path) -> ChatTemplate | None:
        """The chat template of a tokenizer directory (tokenizer_config.json), None when it has none."""
        return cls.of(tokenizer_config(directory))

    @classmethod
    def of(cls, config: dict[str, Any]) -> ChatTemplate | None:
        """The chat template in a tokenizer_config.json mapping, None when it has none."""
        source = config.get("chat_template")
        if isinstance(source, list):  # transformers' named templates: [{"name": "default", "template": ...}]
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        tokens = {key: text for key in _TEMPLATE_TOKENS if (text := token_text(config.get(key)))}
        return cls(source, tokens)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text: what `apply_chat_template(..., tokenize=False)` returns."""
        from transformers.utils import chat_template_utils

        # transformers' own renderer (its sandbox, filters and globals); it returns (texts, indices)
        render: Any = chat_template_utils.render_jinja_template
        rendered, _ = render(
            conversations=[[dict(m) for m in messages]],
            chat_template=self.source,
            add_generation_prompt=add_generation_prompt,
            **self.tokens,
        )
        return str(rendered[0])

    def _pieces(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool
    ) -> tuple[list[str], list[int]]:
        """(the template's text between messages, the message index at each gap), from one rendering with
        a placeholder for each message's content."""
        marked = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        parts = _PLACEHOLDER_RE.split(self.render(marked, add_generation_prompt))
        order = [int(i) for i in parts[1::2]]
        if sorted(order) != order or len(set(order)) != len(order):
            raise ValueError(
                "the chat template repeats, reorders or rewrites message contents: llmpipe cannot tell "
                "which tokens are whose"
            )
        return parts[0::2], order

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask): the rendered conversation's token ids, and 1 on each assistant message's tokens and
        on the special token that ends its turn."""
        for message in messages:
            if not isinstance(message.get("content"), str) or not message.get("role"):
                raise ValueError(f"a chat message needs a role and a text content, got {message!r}")
        texts, order = self._pieces(messages, add_generation_prompt)
        specials = _special_ids(tokenizer)
        ids: list[int] = []
        mask: list[int] = []
        learn_next_special = False
        for index, text in enumerate(texts):
            template_ids = _encode(tokenizer, text, specials_as_text=False)
            if learn_next_special and template_ids and template_ids[0] in specials:
                ids.append(template_ids.pop(0))
                mask.append(1)
            ids += template_ids
            mask += [0] * len(template_ids)
            if index < len(order):
                message = messages[order[index]]
                content = _encode(tokenizer, message["content"], specials_as_text=True)
                learn_next_special = message["role"] == "assistant"
                ids += content
                mask += [int(learn_next_special)] * len(content)
        return np.asarray(ids, np.int64), np.asarray(mask, np.int8)

    def end_of_turn(self, tokenizer: Tokenizer) -> int:
        """The special token the template writes after an assistant message: a reply stops there."""
        texts, _ = self._pieces(
            [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], False
        )
        after = _encode(tokenizer, texts[2], specials_as_text=False)
        if not after or after[0] not in _special_ids(tokenizer):
            raise ValueError("the chat template writes no special token after an assistant message")
        return after[0]


#: llmpipe's own template, for the tokenizers the tokenizer stage trains.
LLMPIPE_TEMPLATE = ChatTemplate(
    CHAT_TEMPLATE, {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
)


def _special_ids(tokenizer: Tokenizer) -> set[int]:
    return {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}


def _encode(tokenizer: Tokenizer, text: str, specials_as_text: bool) -> list[int]:
    """`text`'s ids with special-token spellings recognised (the template's own text) or not (content)."""
    saved = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = specials_as_text
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = saved


def fit_history(
    template: ChatTemplate, tokenizer: Tokenizer, messages: Sequence[dict[str, str]], budget: int
) -> tuple[list[dict[str, str]], int]:
    """(the messages that fit, how many were dropped): the oldest turns go first, a kept history starts
    with a user turn, and the system prompt and the newest message always stay. `budget` counts the
    rendered conversation plus the generation prompt, in tokens."""
    system = [dict(m) for m in messages[:1] if m["role"] == "system"]
    turns = [dict(m) for m in messages[len(system) :]]
    dropped = 0
    while len(template.encode(tokenizer, system + turns, add_generation_prompt=True)[0]) > budget:
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
        generator = self.generator
        template, tokenizer = generator.chat_template(), generator.tokenizer
        system = [{"role": "system", "content": self.system}] if self.system else []
        asked = [*system, *self.messages, {"role": "user", "content": text}]
        kept, self.dropped = fit_history(template, tokenizer, asked, self.budget())
        self.messages = kept[len(system) :]  # what was dropped would never fit again
        ids = template.encode(tokenizer, kept, add_generation_prompt=True)[0].tolist()
        # The reply ends at the end of its turn; it may not open another turn (no other special token).
        end = template.end_of_turn(tokenizer)
        banned = tuple(sorted(_special_ids(tokenizer) - {end}))
        seed = None if self.config.seed is None else self.config.seed + self.turns
        self.turns += 1
        config = replace(self.config, eos_id=end, banned_ids=self.config.banned_ids + banned, seed=seed)
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

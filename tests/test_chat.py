"""model/chat.py: the chat template (as transformers renders it), history truncation to the context
window, a streaming chat session, and `llmpipe chat`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHAT_MESSAGES, write_tiny_base

from model import chat
from model.config import GPTConfig
from model.generate import GenerationConfig
from model.gpt import GPT
from model.textgen import Generator

transformers = pytest.importorskip("transformers")


def test_the_chat_template_matches_transformers(chat_tokenizer) -> None:
    directory, tokenizer = chat_tokenizer
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    for messages, prompt in ((CHAT_MESSAGES, False), (CHAT_MESSAGES[:2], True)):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text == chat.render(messages, add_generation_prompt=prompt)
    ids, mask = chat.encode(tokenizer, CHAT_MESSAGES)
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=False) == chat.render(CHAT_MESSAGES)
    assert ids.tolist().count(tokenizer.token_to_id("<|assistant|>")) == 1  # the user's spelling is text
    learned = tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert learned == "Excess junk.<|eos|>"  # the assistant's words and the end of its turn, nothing else


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You explain hacker jargon."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what does cruft mean?"})
        messages.append({"role": "assistant", "content": f"Answer {turn}: excess, superfluous junk."})
    return [*messages, {"role": "user", "content": "And the newest question?"}]


def test_truncation_keeps_the_system_prompt_and_the_newest_turns(chat_tokenizer) -> None:
    _, tokenizer = chat_tokenizer
    messages = conversation(6)
    full = len(chat.encode(tokenizer, messages, add_generation_prompt=True)[0])
    kept, dropped = chat.fit_history(tokenizer, messages, full)
    assert kept == messages and dropped == 0  # it fits: nothing changes

    kept, dropped = chat.fit_history(tokenizer, messages, full - 1)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1]["role"] == "user"  # a kept history starts with a question, not an orphaned answer
    assert kept[1:] == messages[1 + dropped :]  # the oldest turns went, in order
    assert len(chat.encode(tokenizer, kept, add_generation_prompt=True)[0]) <= full - 1

    budget = len(chat.encode(tokenizer, [messages[0], messages[-1]], add_generation_prompt=True)[0])
    kept, dropped = chat.fit_history(tokenizer, messages, budget)
    assert kept == [messages[0], messages[-1]] and dropped == len(messages) - 2
    with pytest.raises(ValueError, match="system prompt and the last message"):
        chat.fit_history(tokenizer, messages, budget - 1)


def test_a_session_streams_replies_and_keeps_within_the_context(chat_tokenizer) -> None:
    _, tokenizer = chat_tokenizer
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_embd=16, block_size=96)
    generator = Generator(GPT(config).eval(), tokenizer)
    session = chat.ChatSession(generator, GenerationConfig(max_new_tokens=12), system="Be brief.")
    special = chat.special_ids(tokenizer)
    for turn in range(8):
        text = "".join(session.reply(f"Question {turn}: what does cruft mean?"))
        assert session.messages[-1] == {"role": "assistant", "content": text}
        assert session.messages[-2]["content"] == f"Question {turn}: what does cruft mean?"
        shown = [{"role": "system", "content": "Be brief."}, *session.messages[:-1]]
        assert len(chat.encode(tokenizer, shown, True)[0]) <= session.budget()  # it fitted the context
    assert session.dropped > 0  # eight turns of ~25 tokens cannot fit 96 − 12
    before = list(session.messages)
    with pytest.raises(ValueError, match="shorten"):
        list(session.reply("cruft " * 200))  # cannot fit even alone
    assert session.messages == before  # the conversation is as it was
    session.reset()
    assert session.messages == [] and session.system == "Be brief."

    seen: list[GenerationConfig] = []
    stream = generator.stream
    generator.stream = lambda ids, config: seen.append(config) or stream(ids, config)  # type: ignore[method-assign]
    list(session.reply("Hello"))
    # The turn ends at <|eos|>; the reply can neither open another turn nor restart the conversation.
    assert seen[0].eos_id == special["eos"]
    assert {special["bos"], *(special[role] for role in chat.ROLES)} <= set(seen[0].banned_ids)


def test_cli_chat_answers_resets_and_quits(tmp_path: Path, chat_tokenizer) -> None:
    write_tiny_base(tmp_path, chat_tokenizer[0])
    llmpipe = str(Path(sys.executable).parent / "llmpipe")
    run = subprocess.run(
        [llmpipe, "chat", "--system", "Be brief.", "--max-new-tokens", "6", "--seed", "1"],
        input="What does cruft mean?\n/reset\nHello\n/quit\nnever read\n",
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("model>") == 2 and "(conversation cleared)" in run.stdout

"""model/chat.py: chat templates (rendered as transformers renders them, llmpipe's and a ChatML one),
the loss mask, history truncation to the context window, a streaming chat session, and `llmpipe chat`."""

from __future__ import annotations

import json
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
from model.tokens import ROLES

transformers = pytest.importorskip("transformers")


def test_the_chat_template_matches_transformers(chat_tokenizer) -> None:
    directory, tokenizer = chat_tokenizer
    template = chat.ChatTemplate.load(directory)
    assert template == chat.LLMPIPE_TEMPLATE  # what the tokenizer stage writes
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    for messages, prompt in ((CHAT_MESSAGES, False), (CHAT_MESSAGES[:2], True)):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text == template.render(messages, add_generation_prompt=prompt)
    ids, mask = template.encode(tokenizer, CHAT_MESSAGES)
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=False) == template.render(CHAT_MESSAGES)
    assert ids.tolist().count(tokenizer.token_to_id("<|assistant|>")) == 1  # the user's spelling is text
    learned = tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
    assert learned == "Excess junk.<|eos|>"  # the assistant's words and the end of its turn, nothing else
    assert template.end_of_turn(tokenizer) == tokenizer.token_to_id("<|eos|>")


CHATML = (  # SmolLM2's template (ChatML, with a default system prompt)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_base_models_own_template_masks_and_stops_at_its_end_of_turn(tmp_path: Path) -> None:
    """A pretrained base brings its template and special tokens (ChatML here): rendering matches
    transformers, the mask covers the answer and <|im_end|>, typed special tokens stay text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from model.tokens import for_ordinary_text, special_tokens

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))} | {"\n": 95, "Ċ": 96}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML,
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
    }  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = for_ordinary_text(tokenizer)
    template = chat.ChatTemplate.load(tmp_path)
    assert template is not None
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "hi <|im_start|>"}, {"role": "assistant", "content": "yo"}]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert rendered == template.render(messages)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>")
    ids, mask = template.encode(tokenizer, messages)
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=False) == rendered
    start = tokenizer.token_to_id("<|im_start|>")
    assert ids.tolist().count(start) == 3  # system, user, assistant: the user's spelling is text
    assert tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False) == "yo<|im_end|>"
    end = tokenizer.token_to_id("<|im_end|>")
    assert template.end_of_turn(tokenizer) == end
    special = special_tokens(tmp_path, tokenizer)  # documents end with <|endoftext|>, replies with <|im_end|>
    assert (special.eos, special.document_end) == (end, tokenizer.token_to_id("<|endoftext|>"))


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You explain hacker jargon."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what does cruft mean?"})
        messages.append({"role": "assistant", "content": f"Answer {turn}: excess, superfluous junk."})
    return [*messages, {"role": "user", "content": "And the newest question?"}]


def test_truncation_keeps_the_system_prompt_and_the_newest_turns(chat_tokenizer) -> None:
    _, tokenizer = chat_tokenizer
    messages = conversation(6)
    template = chat.LLMPIPE_TEMPLATE
    full = len(template.encode(tokenizer, messages, add_generation_prompt=True)[0])
    kept, dropped = chat.fit_history(template, tokenizer, messages, full)
    assert kept == messages and dropped == 0  # it fits: nothing changes

    kept, dropped = chat.fit_history(template, tokenizer, messages, full - 1)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1]["role"] == "user"  # a kept history starts with a question, not an orphaned answer
    assert kept[1:] == messages[1 + dropped :]  # the oldest turns went, in order
    assert len(template.encode(tokenizer, kept, add_generation_prompt=True)[0]) <= full - 1

    budget = len(template.encode(tokenizer, [messages[0], messages[-1]], add_generation_prompt=True)[0])
    kept, dropped = chat.fit_history(template, tokenizer, messages, budget)
    assert kept == [messages[0], messages[-1]] and dropped == len(messages) - 2
    with pytest.raises(ValueError, match="system prompt and the last message"):
        chat.fit_history(template, tokenizer, messages, budget - 1)


def test_a_session_streams_replies_and_keeps_within_the_context(chat_tokenizer) -> None:
    directory, tokenizer = chat_tokenizer
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_embd=16, block_size=96)
    generator = Generator.load(GPT(config).eval(), directory)
    template = chat.LLMPIPE_TEMPLATE
    session = chat.ChatSession(generator, GenerationConfig(max_new_tokens=12), system="Be brief.")
    special = {name: tokenizer.token_to_id(f"<|{name}|>") for name in ("bos", "eos", *ROLES)}
    for turn in range(8):
        text = "".join(session.reply(f"Question {turn}: what does cruft mean?"))
        assert session.messages[-1] == {"role": "assistant", "content": text}
        assert session.messages[-2]["content"] == f"Question {turn}: what does cruft mean?"
        shown = [{"role": "system", "content": "Be brief."}, *session.messages[:-1]]
        assert len(template.encode(tokenizer, shown, True)[0]) <= session.budget()  # it fitted the context
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
    assert {special["bos"], *(special[role] for role in ROLES)} <= set(seen[0].banned_ids)


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

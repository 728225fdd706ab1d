"""model/generate.py against transformers: greedy and beam search token for token on llmpipe's own HF
export, the sampling filters on fixed logits, stop strings and streaming."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_base
from test_hf import LAYOUTS, random_model

from model.generate import (
    GenerationConfig,
    generate,
    generate_batch,
    min_p_filter,
    repetition_penalty,
    stream,
    top_k_filter,
    top_p_filter,
)
from model.gpt import GPT
from model.hf import save_hf

transformers = pytest.importorskip("transformers")
EOS = 7
PROMPTS = ([5, 17, 42, 3], [88, 1, 60, 60, 23, 9, 14])


def peaked_model(layout: str) -> GPT:
    """A random model whose next-token distributions are far from uniform, so that the argmax and the
    beam ranking are decided by margins much larger than float rounding."""
    model = random_model(LAYOUTS[layout])
    with torch.no_grad():
        model.tok_emb.weight.mul_(40.0)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model = peaked_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    save_hf(model, directory, {"pad_token_id": 0})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    return model, theirs


def hf_generate(theirs, prompt: list[int], **kwargs: object) -> list[int]:
    ids = torch.tensor([prompt])
    out = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("penalty, eos", list(itertools.product([1.0, 1.3], [None, EOS])))
def test_greedy_is_token_identical_to_transformers(pair, penalty: float, eos: int | None) -> None:
    ours, theirs = pair
    for prompt in PROMPTS:
        config = GenerationConfig(max_new_tokens=12, repetition_penalty=penalty, eos_id=eos)
        expected = hf_generate(
            theirs, prompt, max_new_tokens=12, repetition_penalty=penalty, eos_token_id=eos
        )
        assert generate(ours, prompt, config).ids == expected


@pytest.mark.slow  # 48 cases against transformers generate (greedy parity stays in the fast lane)
@pytest.mark.parametrize(
    "length_penalty, penalty, eos, early",
    list(itertools.product([0.0, 1.0, 2.0], [1.0, 1.3], [None, EOS], [False, True])),
)
def test_beam_search_is_token_identical_to_transformers(
    pair, length_penalty: float, penalty: float, eos: int | None, early: bool
) -> None:
    ours, theirs = pair
    for prompt in PROMPTS:
        config = GenerationConfig(
            max_new_tokens=10, strategy="beam", num_beams=3, length_penalty=length_penalty,
            repetition_penalty=penalty, eos_id=eos, early_stopping=early,
        )  # fmt: skip
        expected = hf_generate(
            theirs, prompt, max_new_tokens=10, num_beams=3, length_penalty=length_penalty,
            repetition_penalty=penalty, eos_token_id=eos, early_stopping=early,
        )  # fmt: skip
        assert generate(ours, prompt, config).ids == expected


BATCH = [[5, 17, 42, 3], [88, 1, 60, 60, 23, 9, 14], [31], [2, 2, 2, 2, 2, 2, 2]]


@pytest.mark.parametrize("eos", [None, EOS])
def test_left_padded_batch_is_token_identical_to_transformers(pair, eos: int | None) -> None:
    ours, theirs = pair
    width = max(len(p) for p in BATCH)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in BATCH])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in BATCH])
    out = theirs.generate(
        ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=10, eos_token_id=eos
    )
    results = generate_batch(ours, BATCH, GenerationConfig(max_new_tokens=10, eos_id=eos))
    for row, result in enumerate(results):
        expected = out[row, width:].tolist()
        if eos in expected:  # transformers pads a finished row; ours stops
            expected = expected[: expected.index(eos) + 1]
        assert result.ids == expected


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_each_row_of_a_batch_gets_what_it_gets_alone(pair, strategy: str) -> None:
    ours, _ = pair
    config = GenerationConfig(
        max_new_tokens=9,
        strategy=strategy,
        repetition_penalty=1.3,
        eos_id=EOS,
        seed=5,  # type: ignore[arg-type]
    )
    for together, prompt in zip(generate_batch(ours, BATCH, config), BATCH, strict=True):
        alone = generate(ours, prompt, config)
        assert together.ids == alone.ids and together.finish_reason == alone.finish_reason
        assert [s.logprob for s in together.steps] == pytest.approx(
            [s.logprob for s in alone.steps], abs=1e-4
        )


def test_a_short_prompt_in_a_batch_keeps_its_own_room(pair) -> None:
    """Padding takes no position: each row may fill the context, however long the other prompts are."""
    ours, _ = pair
    block = ours.config.block_size
    prompts = [[5] * (block - 3), [9, 4]]
    results = generate_batch(ours, prompts, GenerationConfig(max_new_tokens=block))
    assert [len(result.ids) for result in results] == [3, block - 2]
    assert results[1].ids == generate(ours, prompts[1], GenerationConfig(max_new_tokens=block)).ids


def test_filters_match_transformers_on_fixed_logits() -> None:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    scores = torch.randn(4, 50) * 3
    scores[0, :5] = 2.0  # ties at the cut
    seen = torch.randint(0, 50, (4, 9))
    for k in (1, 5, 50):
        assert torch.equal(top_k_filter(scores, k), TopKLogitsWarper(k)(seen, scores.clone()))
    for p in (0.1, 0.5, 0.95, 1.0):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(seen, scores.clone()))
    for p in (0.01, 0.2, 0.9):
        assert torch.equal(min_p_filter(scores, p), MinPLogitsWarper(p)(seen, scores.clone()))
    for penalty in (0.8, 1.2, 2.0):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(seen, scores.clone())
        assert torch.equal(repetition_penalty(scores, seen, penalty), expected)


def test_sampling_is_seeded_and_reports_probabilities(pair) -> None:
    model, _ = pair
    config = GenerationConfig(max_new_tokens=8, strategy="sample", temperature=0.7, top_p=0.9, seed=3)
    first, again = generate(model, PROMPTS[0], config), generate(model, PROMPTS[0], config)
    assert first.ids == again.ids and len(first.steps) == 8
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + first.ids[:1]]))[0][0]
    expected = logits[len(PROMPTS[0]) - 1].log_softmax(-1)[first.ids[0]].item()
    assert first.steps[0].logprob == pytest.approx(expected, abs=1e-5)
    assert all(0 < step.prob <= 1 for step in first.steps)


LETTERS = "abcdefghijklmnopqrstuvwxyz .,!?"


def decode(ids: list[int]) -> str:
    return "".join(LETTERS[i % len(LETTERS)] for i in ids)


def test_stop_strings_end_generation_and_streaming_yields_the_same_text(pair) -> None:
    model, _ = pair
    sampled = GenerationConfig(max_new_tokens=20, strategy="sample", temperature=2.0, seed=5)
    free = generate(model, PROMPTS[1], sampled, decode)
    assert free.finish_reason == "length" and len(free.text) == 20
    stop = free.text[8:10]  # a string that appears after a few tokens (the same seed draws the same tokens)
    config = dataclasses.replace(sampled, stop=(stop, "never there"))
    stopped = generate(model, PROMPTS[1], config, decode)
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)] and stop not in stopped.text
    assert decode(stopped.ids) == stopped.text  # the stop string's tokens are dropped too
    assert "".join(step.text for step in stream(model, PROMPTS[1], config, decode)) == stopped.text
    assert "".join(step.text for step in stream(model, PROMPTS[1], sampled, decode)) == free.text


def test_eos_ends_generation_and_bad_settings_are_refused(pair) -> None:
    model, _ = pair
    free = generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=10))
    eos = free.ids[3]
    ended = generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=10, eos_id=eos))
    assert ended.ids == free.ids[: free.ids.index(eos) + 1] and ended.finish_reason == "eos"
    banned = generate(model, PROMPTS[0], GenerationConfig(max_new_tokens=10, banned_ids=(eos,)))
    assert eos not in banned.ids
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS[0], GenerationConfig(strategy="sample", temperature=0.0))
    with pytest.raises(ValueError, match="context"):
        generate(model, list(range(1, 40)), GenerationConfig())


@pytest.mark.slow  # a subprocess CLI run
def test_cli_streams_text_and_prints_the_token_table(tmp_path: Path, chat_tokenizer) -> None:
    """`llmpipe generate` on a models/base directory (a random model + a real tokenizer)."""
    write_tiny_base(tmp_path, chat_tokenizer[0])
    llmpipe = str(Path(sys.executable).parent / "llmpipe")
    run = subprocess.run(
        [llmpipe, "generate", "--prompt", "The movie", "--max-new-tokens", "5", "--show-probs"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("The movie") and "generated tokens" in run.stdout
    assert run.stdout.count("│") >= 5 * 6  # a row per token
    beam = subprocess.run(
        [llmpipe, "generate", "--prompt", "The", "--strategy", "beam", "--num-beams", "2"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert beam.returncode == 0, beam.stderr
    bad = subprocess.run(
        [llmpipe, "generate", "--prompt", "x", "--strategy", "nucleus"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "greedy, sample or beam" in bad.stderr

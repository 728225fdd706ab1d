"""Text generation with the KV cache: greedy, sampling (temperature, top-k, top-p, min-p) and beam search,
with the semantics of transformers' `generate` so results can be compared token for token.

    config = GenerationConfig(max_new_tokens=40, strategy="sample", temperature=0.7, top_p=0.95, seed=1)
    result = generate(model, prompt_ids, config, decode=tokenizer.decode)   # ids, text, p per token
    for step in stream(model, prompt_ids, config, decode=tokenizer.decode): print(step.text, end="")

- The prompt runs once (prefill) and each new token costs one position (decode), through `KVCache`.
- Logits processing follows transformers, in its order: repetition penalty (each token already in the
  prompt or output, once: a positive logit is divided by the penalty, a negative one multiplied), banned
  ids (−inf), then for sampling temperature → top-k → top-p → min-p. Greedy takes the argmax.
- Beam search is transformers' (≥ 4.50) algorithm: per step the 2·num_beams best continuations by summed
  log-probability (processors applied to the log-softmax), the best num_beams that did not end continue;
  one that ended (EOS, or the length limit) among the top num_beams is a hypothesis scored
  sum log p / generated_length^length_penalty (EOS counted); `early_stopping` True / False / "never".
- Stop strings end generation at their first occurrence; the stop text is not returned, and streaming
  holds back any text that might be the start of a stop string, so streamed and returned text agree.
- Each chosen token's probability is the model's own (softmax of the raw logits), before processors;
  beam search scores its final hypothesis in one forward pass to report the same.
- Several prompts decode as one batch (`generate_batch`): left-padded, with an attention mask and
  per-row positions, so each row gets what it would alone. Beam search takes one prompt at a time (its
  beams are the batch). No orchestration imports here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from model.gpt import GPT, KVCache

Decode = Callable[[list[int]], str]


Strategy = Literal["greedy", "sample", "beam"]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    strategy: Strategy = "greedy"
    temperature: float = 1.0  # sample: logits / temperature
    top_k: int | None = None  # sample: keep the k most likely tokens
    top_p: float | None = None  # sample: keep the smallest set whose probability reaches p
    min_p: float | None = None  # sample: drop tokens less likely than min_p × the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    banned_ids: tuple[int, ...] = ()  # never generated
    eos_id: int | tuple[int, ...] | None = (
        None  # generation ends after this token (or any of these; in `ids`)
    )
    stop: tuple[str, ...] = ()  # generation ends at the first of these strings (not returned)
    num_beams: int = 4  # beam
    length_penalty: float = 1.0  # beam: hypothesis score = sum log p / length ** length_penalty
    early_stopping: bool | Literal["never"] = False  # beam: as transformers
    seed: int | None = None  # sample: a seeded generator (None: torch's global RNG)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The tokens that end generation (transformers' eos_token_id takes an int or a list too)."""
        return () if self.eos_id is None else (self.eos_id,) if isinstance(self.eos_id, int) else self.eos_id

    def validate(self) -> None:
        if self.strategy not in get_args(Strategy):
            *others, last = get_args(Strategy)
            raise ValueError(f"strategy must be {', '.join(others)} or {last}, not {self.strategy!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.strategy == "sample" and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 for sampling (greedy is strategy='greedy'), got {self.temperature}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be ≥ 1 or None, got {self.top_k}")
        for name in ("top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1] or None, got {value}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.strategy == "beam" and self.num_beams < 1:
            raise ValueError(f"num_beams must be ≥ 1, got {self.num_beams}")


@dataclass
class Step:
    """One generated token: its id, the model's probability of it, and the text it adds (streaming)."""

    id: int
    prob: float
    logprob: float
    text: str = ""


@dataclass
class Generation:
    ids: list[int]  # new tokens (EOS included when it ended the text; only those wholly before a stop string)
    text: str | None  # decoded new text, the stop string and what follows removed (None without `decode`)
    steps: list[Step] = field(default_factory=list)  # per token: id, p, log p
    finish_reason: Literal["eos", "stop", "length"] = "length"
    score: float | None = None  # beam: the hypothesis score


# --------------------------------------------------------------------------------------------------
# Logits processing (each function: (vocab,) or (beams, vocab) scores in, the same shape out)
# --------------------------------------------------------------------------------------------------


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: each seen token once, ÷ if positive, × if negative."""
    if penalty == 1.0:
        return scores
    picked = torch.gather(scores, -1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(-1, seen, picked)


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Everything below the k-th highest score becomes −inf (ties with it are kept)."""
    k = min(k, scores.shape[-1])
    cutoff = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < cutoff, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens whose probabilities sum to at least p (at least one)."""
    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p × the top token's probability (keep at least one)."""
    probs = scores.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    order = torch.argsort(scores, dim=-1, descending=True)
    sorted_remove = torch.gather(remove, -1, order)
    sorted_remove[..., :1] = False
    return scores.masked_fill(sorted_remove.scatter(-1, order, sorted_remove), float("-inf"))


def process(scores: torch.Tensor, seen: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Repetition penalty and banned ids (greedy, sample and beam); then the sampling warpers."""
    scores = repetition_penalty(scores, seen, config.repetition_penalty)
    if config.banned_ids:
        scores = scores.index_fill(-1, torch.tensor(config.banned_ids, device=scores.device), float("-inf"))
    if config.strategy != "sample":
        return scores
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k is not None:
        scores = top_k_filter(scores, config.top_k)
    if config.top_p is not None and config.top_p < 1.0:
        scores = top_p_filter(scores, config.top_p)
    if config.min_p is not None:
        scores = min_p_filter(scores, config.min_p)
    return scores


# --------------------------------------------------------------------------------------------------
# Greedy and sampling
# --------------------------------------------------------------------------------------------------


def _room(model: GPT, prompt: Sequence[int], config: GenerationConfig) -> int:
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (e.g. <|bos|>)")
    room = model.config.block_size - len(prompt)
    if room < 1:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens; the model's context is {model.config.block_size}"
        )
    return min(config.max_new_tokens, room)


class _StopText:
    """Decodes the new tokens and finds stop strings; `release` is the text safe to stream so far."""

    def __init__(self, decode: Decode | None, stop: Sequence[str]) -> None:
        self.decode, self.stop, self.sent = decode, [s for s in stop if s], 0

    def text(self, ids: list[int]) -> tuple[str, bool]:
        """(the text up to the first stop string, whether one occurred)."""
        text = self.decode(ids) if self.decode else ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def release(self, text: str, final: bool) -> str:
        """New text to stream, holding back a tail that could still grow into a stop string."""
        hold = 0
        if not final:
            hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                hold = max(hold, 1)
        ready = text[self.sent : len(text) - hold]
        self.sent += len(ready)
        return ready


def stream(
    model: GPT, prompt: Sequence[int], config: GenerationConfig, decode: Decode | None = None
) -> Iterator[Step]:
    """Greedy or sampled tokens one at a time; `Step.text` is the new text to print (with `decode`)."""
    for steps in _decode_loop(model, [prompt], config, decode, results=None):
        yield steps[0]  # type: ignore[misc]  # never None: the loop ends when its only row finishes


def left_pad(
    prompts: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, attention_mask): prompts right-aligned in one (B, longest) tensor, padding 0 and masked; the
    mask is None when every prompt has the same length (no padding, the fast causal path)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), device=device)
        mask[row, width - len(prompt) :] = 1
    return ids, None if bool(mask.all()) else mask


@torch.no_grad()
def _decode_loop(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    decode: Decode | None,
    results: list[Generation] | None,
) -> Iterator[list[Step | None]]:
    """Greedy or sampled decoding of a batch of prompts; yields each step's Step per row (None for rows
    that have finished) and fills `results`."""
    config.validate()
    if config.strategy == "beam":
        raise ValueError("beam search does not stream: call generate()")
    if not prompts:
        return
    budgets = [_room(model, prompt, config) for prompt in prompts]  # a shorter prompt has more room
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # One seeded generator per row, so a row samples the same tokens in any batch as alone.
    generators = None
    if config.seed is not None:
        generators = [torch.Generator(device=device).manual_seed(config.seed) for _ in prompts]
    ids, mask = left_pad(prompts, device)
    # Repetition penalty looks at each row's own tokens: padding stands in as the row's last prompt token.
    seen = ids if mask is None else torch.where(mask.bool(), ids, ids[:, -1:])
    cache = KVCache()
    logits = model(ids, cache=cache, attention_mask=mask, last_only=True)[0][:, -1].float()
    stoppers = [_StopText(decode, config.stop) for _ in prompts]
    new_ids: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    try:
        for step_number in range(1, max(budgets) + 1):
            scores = process(logits, seen, config)
            if config.strategy == "greedy":
                tokens = scores.argmax(-1)
            elif generators is None:
                tokens = torch.multinomial(scores.softmax(-1), 1)[:, 0]
            else:
                rows = zip(scores.softmax(-1), generators, strict=True)
                tokens = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in rows])
            logprobs = logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0].tolist()
            steps: list[Step | None] = []
            for row, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs, strict=True)):
                if reasons[row] is not None:
                    steps.append(None)
                    continue
                new_ids[row].append(token)
                text, stopped = stoppers[row].text(new_ids[row])
                if stopped or token in config.eos_ids or step_number == budgets[row]:
                    reasons[row] = "stop" if stopped else "eos" if token in config.eos_ids else "length"
                step = Step(
                    token, math.exp(logprob), logprob, stoppers[row].release(text, reasons[row] is not None)
                )
                steps.append(step)
                if results is not None:
                    results[row].ids, results[row].text = list(new_ids[row]), text if decode else None
                    results[row].steps.append(step)
            yield steps
            if all(reason is not None for reason in reasons):
                break
            seen = torch.cat([seen, tokens[:, None]], dim=1)
            if mask is not None:  # a finished row's filler token is padding: it takes no position
                active = torch.tensor([reason is None for reason in reasons], device=device)
                mask = torch.cat([mask, active[:, None].to(mask.dtype)], dim=1)
            logits = model(tokens[:, None], cache=cache, attention_mask=mask, last_only=True)[0][
                :, -1
            ].float()
    finally:
        model.train(was_training)
    for row, result in enumerate(results or []):
        result.finish_reason = reasons[row] or "length"  # type: ignore[assignment]
        if result.finish_reason == "stop":  # the stop string's tokens are not part of the answer
            result.ids, result.steps = _trim_to_text(new_ids[row], result.steps, stoppers[row])


def _trim_to_text(ids: list[int], steps: list[Step], stopper: _StopText) -> tuple[list[int], list[Step]]:
    """The tokens wholly before the stop string (their text is a prefix of the returned text)."""
    text, _ = stopper.text(ids)
    keep = len(ids)
    while keep > 0 and stopper.decode is not None and not text.startswith(stopper.decode(ids[:keep])):
        keep -= 1
    return ids[:keep], steps[:keep]


# --------------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def beam_search(
    model: GPT, prompt: Sequence[int], config: GenerationConfig, decode: Decode | None = None
) -> Generation:
    """transformers' beam search for one prompt; returns the best hypothesis."""
    config.validate()
    budget = _room(model, prompt, config)
    beams, length_penalty = config.num_beams, config.length_penalty
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_len = len(prompt)
    max_length = prompt_len + budget
    keep = max(2, 1 + len(config.eos_ids)) * beams  # candidates examined per step
    top_beams = torch.arange(keep, device=device) < beams

    running = torch.tensor(list(prompt), device=device).repeat(beams, 1)  # (beams, cur_len)
    running_scores = torch.full((beams,), -1e9, device=device)
    running_scores[0] = 0.0  # all beams start identical: only the first may expand at step 1
    finished = torch.zeros((beams, max_length), dtype=torch.long, device=device)
    finished_len = torch.zeros(beams, dtype=torch.long, device=device)
    finished_scores = torch.full((beams,), -1e9, device=device)
    is_finished = torch.zeros(beams, dtype=torch.bool, device=device)
    improvable = True
    cache = KVCache()
    logits = model(running, cache=cache, last_only=True)[0][:, -1].float()
    try:
        while True:
            cur_len = running.shape[1]
            log_probs = process(logits.log_softmax(-1), running, config)
            vocab = log_probs.shape[-1]
            totals = (log_probs + running_scores[:, None]).reshape(-1)
            top_scores, top_index = torch.topk(totals, keep)
            source, tokens = top_index // vocab, top_index % vocab
            candidates = torch.cat([running[source], tokens[:, None]], dim=1)
            ended = torch.full_like(tokens, cur_len + 1 >= max_length, dtype=torch.bool)
            if config.eos_ids:
                ended |= torch.isin(tokens, torch.tensor(config.eos_ids, device=device))

            # The best num_beams candidates that did not end keep running.
            still_running = top_scores + ended.float() * -1.0e9
            order = torch.topk(still_running, beams).indices
            running, running_scores, reorder = candidates[order], still_running[order], source[order]

            # Candidates among the top num_beams that ended become hypotheses if they beat the worst kept
            # (transformers' arithmetic, float32 included: rejected ones sink by 1e9 per reason).
            accepted = ended & top_beams
            normalised = top_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
            normalised = (
                normalised + float(bool(is_finished.all()) and config.early_stopping is True) * -1.0e9
            )
            normalised = normalised + float(not improvable) * -1.0e9
            normalised = normalised + (~accepted).float() * -1.0e9
            merged_scores = torch.cat([finished_scores, normalised])
            padded = torch.zeros((keep, max_length), dtype=torch.long, device=device)
            padded[:, : cur_len + 1] = candidates
            merged = torch.cat([finished, padded])
            merged_len = torch.cat(
                [finished_len, torch.full((keep,), cur_len + 1 - prompt_len, device=device)]
            )
            merged_flags = torch.cat([is_finished, accepted])
            best = torch.topk(merged_scores, beams).indices
            finished, finished_len = merged[best], merged_len[best]
            finished_scores, is_finished = merged_scores[best], merged_flags[best]

            cur_len += 1
            horizon = (
                max_length if config.early_stopping == "never" and length_penalty > 0 else cur_len
            ) - prompt_len
            worst = finished_scores.min() if bool(is_finished.all()) else torch.tensor(-1e9, device=device)
            improvable = improvable and bool(running_scores[0] / horizon**length_penalty > worst)
            done_early = bool(is_finished.all()) and config.early_stopping is True
            if not improvable or done_early or bool(ended.all()):
                break
            cache.reorder(reorder)
            logits = model(running[:, -1:], cache=cache, last_only=True)[0][:, -1].float()
        length = int(finished_len[0])
        ids = finished[0, prompt_len : prompt_len + length].tolist()
        steps = _scored_steps(model, prompt, ids)
    finally:
        model.train(was_training)
    reason = "eos" if ids and ids[-1] in config.eos_ids else "length"
    text = None
    if decode is not None:
        stopper = _StopText(decode, config.stop)
        text, stopped = stopper.text(ids)
        if stopped:
            reason = "stop"
            ids, steps = _trim_to_text(ids, steps, stopper)
    return Generation(ids, text, steps, reason, float(finished_scores[0]))  # type: ignore[arg-type]


def _scored_steps(model: GPT, prompt: Sequence[int], ids: list[int]) -> list[Step]:
    """p and log p of each of `ids` after `prompt` under the model (one forward pass)."""
    if not ids:
        return []
    device = next(model.parameters()).device
    sequence = torch.tensor([[*prompt, *ids]], device=device)
    log_probs = model(sequence)[0][0, len(prompt) - 1 : -1].float().log_softmax(-1)
    chosen = log_probs.gather(-1, torch.tensor(ids, device=device)[:, None])[:, 0].tolist()
    return [Step(token, math.exp(value), value) for token, value in zip(ids, chosen, strict=True)]


def generate(
    model: GPT, prompt: Sequence[int], config: GenerationConfig, decode: Decode | None = None
) -> Generation:
    """Generate from `prompt` (token ids) with `config`'s strategy; see the module docstring."""
    return generate_batch(model, [prompt], config, decode)[0]


def generate_batch(
    model: GPT, prompts: Sequence[Sequence[int]], config: GenerationConfig, decode: Decode | None = None
) -> list[Generation]:
    """Generate from several prompts at once (left-padded, one forward pass per step for all rows); each
    row gets what it would get alone. Beam search runs one prompt at a time, its beams as the batch."""
    if config.strategy == "beam":
        return [beam_search(model, prompt, config, decode) for prompt in prompts]
    results = [Generation([], "" if decode else None) for _ in prompts]
    for _ in _decode_loop(model, prompts, config, decode, results):
        pass
    return results


def sample(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    eos_id: int | tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """What the trainer shows as progress: sampled ids (prompt and EOS excluded), the prompt cut to fit."""
    prompt = prompt[-(model.config.block_size - 1) :]
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
    config = GenerationConfig(max_new_tokens, "sample", temperature, top_k, eos_id=eos_id, seed=seed)
    ids = generate(model, prompt, config).ids
    return ids[:-1] if ids and ids[-1] in config.eos_ids else ids

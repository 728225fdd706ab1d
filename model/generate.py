"""Text generation with the KV cache: the prompt is run once (prefill), then one token per step (decode).

`sample` is what the trainer uses to show progress: temperature and top-k sampling with a seeded
generator, stopping at `eos_id`. Greedy is `temperature=0`.
"""

from __future__ import annotations

import torch

from model.gpt import GPT, KVCache


@torch.no_grad()
def sample(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The generated token ids (prompt excluded), at most `max_new_tokens`, up to and without `eos_id`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    room = model.config.block_size - len(prompt)
    if room < 1:
        prompt, room = prompt[-(model.config.block_size - 1) :], 1
    cache = KVCache()
    logits = model(torch.tensor([prompt], device=device), cache=cache)[0][0, -1]
    out: list[int] = []
    for _ in range(min(max_new_tokens, room)):
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits.float() / temperature
            if top_k is not None and top_k < logits.numel():
                cutoff = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            token = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
        if token == eos_id:
            break
        out.append(token)
        if len(out) == min(max_new_tokens, room):
            break
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0][0, -1]
    model.train(was_training)
    return out

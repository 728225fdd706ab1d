"""model/compress.py: xz given the training text, the compressor reference of `evaluate`."""

from __future__ import annotations

import random

from model.compress import conditional_xz_bits, xz_size


def test_text_seen_in_the_context_costs_almost_nothing() -> None:
    rng = random.Random(0)
    words = ["the", "king", "speaks", "and", "queen", "answers", "thee", "thou"]
    train = " ".join(rng.choice(words) for _ in range(20_000)).encode()
    chunks = [train[i : i + 4096] for i in range(0, len(train), 4096)]
    seen = train[5000:9000]  # a passage of the training text
    unseen = bytes(rng.randrange(256) for _ in range(4000))  # incompressible
    seen_bits = conditional_xz_bits(lambda: iter(chunks), seen)
    unseen_bits = conditional_xz_bits(lambda: iter(chunks), unseen)
    assert seen_bits / len(seen) < 0.2  # a long match into the dictionary
    assert unseen_bits / len(unseen) > 7.5  # random bytes stay ~8 bits each
    alone = 8 * xz_size([seen])
    assert seen_bits < alone  # the context helps

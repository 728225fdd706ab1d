"""The finetune stage's data: the domain corpus, or prompt/response pairs with bad rows quarantined.

- `domain_data`: data/domain/'s token shards (the `domain` stage); each batch row is drawn from the
  general corpus instead with probability `general_fraction` (replay, against forgetting).
- `sft_data`: JSONL pairs rendered with the base's chat template (model/chat.py), the loss on the
  response tokens (and the token closing its turn) only; held out by a seeded hash of the prompt. A row that cannot be
  used (not JSON, a field missing, a prompt longer than the context) is kept with the reason instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.chat import ChatTemplate
from model.data import ExampleBatches, MixedBatches, TokenShards
from tasks.core.io import file_md5, hash_fraction
from tasks.core.layout import DOMAIN_DIR, TOKENS_DIR

if TYPE_CHECKING:
    from model.train import Batches


@dataclass
class TaskData:
    train: Batches
    val: Batches
    info: dict[str, int | float]  # what was read (counts for the metrics)
    md5: str  # of the data files: part of the checkpoint fingerprint
    quarantine: list[dict[str, Any]] = field(default_factory=list)  # rows that could not be used, why


def domain_data(root: Path, tokenizer_md5: str, context: int, general_fraction: float) -> TaskData:
    """data/domain/'s splits, checked against the base model's context and tokenizer."""
    tokens = root / DOMAIN_DIR / TOKENS_DIR
    train_split, val_split = TokenShards(tokens, "train"), TokenShards(tokens, "val")
    for split in (train_split, val_split):
        if len(split) <= context:
            raise ValueError(
                f"{tokens}: the domain {split.split} split has {len(split)} tokens, fewer than the model's "
                f"context + 1 ({context + 1}): add domain text or raise domain.val_fraction"
            )
    if train_split.meta["tokenizer_md5"] != tokenizer_md5:
        raise ValueError(
            f"{tokens} was encoded with another tokenizer than models/base/: rerun the `domain` stage"
        )
    source: Batches = train_split
    if general_fraction > 0:
        source = MixedBatches(train_split, TokenShards(root / TOKENS_DIR, "train"), general_fraction)
    info: dict[str, int | float] = {"train_tokens": len(train_split), "val_tokens": len(val_split)}
    return TaskData(source, val_split, info, file_md5(tokens / "meta.json"))


def sft_data(
    path: Path,
    tokenizer: Any,
    template: ChatTemplate,
    pad_id: int,
    context: int,
    *,
    prompt_field: str,
    response_field: str,
    system_prompt: str | None,
    val_fraction: float,
    seed: int,
) -> TaskData:
    """Encode the pairs with the chat template (batches padded with `pad_id`: no loss falls on it);
    quarantine rows that cannot be used, with the reason."""
    splits: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "val": []}
    quarantine: list[dict[str, Any]] = []
    truncated = 0
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            reason, pair = _parse_pair(raw, prompt_field, response_field)
            if pair is not None:
                messages = [
                    *system,
                    {"role": "user", "content": pair[0]},
                    {"role": "assistant", "content": pair[1]},
                ]
                ids, mask = template.encode(tokenizer, messages)
                if int(np.argmax(mask)) >= context:  # the first learned token lies beyond the context
                    reason = f"the prompt alone exceeds the context ({context} tokens)"
            if reason:
                quarantine.append(
                    {"line": number, "reason": reason, "raw": raw[:1000].decode("utf-8", "replace")}
                )
                continue
            if pair is None:
                continue  # a blank line
            truncated += len(ids) > context + 1
            split = "val" if hash_fraction(seed, pair[0]) < val_fraction else "train"
            splits[split].append((ids, mask))
    if not splits["train"] or not splits["val"]:
        examples = "; ".join(f"line {row['line']}: {row['reason']}" for row in quarantine[:3])
        raise ValueError(
            f"{path}: {len(splits['train'])} training and {len(splits['val'])} validation pairs after "
            f"skipping {len(quarantine)} unusable rows{' (' + examples + ')' if examples else ''}; need both"
        )
    info: dict[str, int | float] = {
        "train_pairs": len(splits["train"]),
        "val_pairs": len(splits["val"]),
        "quarantined_pairs": len(quarantine),
        "truncated_pairs": truncated,
    }
    train_batches, val_batches = ExampleBatches(splits["train"], pad_id), ExampleBatches(splits["val"], pad_id)
    return TaskData(train_batches, val_batches, info, file_md5(path), quarantine)


def _parse_pair(raw: bytes, prompt_field: str, response_field: str) -> tuple[str, tuple[str, str] | None]:
    """(reason, None) for a bad row, ("", (prompt, response)) for a good one, ("", None) for a blank line."""
    if not raw.strip():
        return "", None
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"not UTF-8: {err.reason} at byte {err.start}", None
    except json.JSONDecodeError as err:
        return f"malformed JSON: {err.msg} (column {err.colno})", None
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}", None
    values = []
    for key in (prompt_field, response_field):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"field {key!r} is missing, empty or not a string", None
        values.append(value)
    return "", (values[0], values[1])

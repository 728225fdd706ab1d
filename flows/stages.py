"""What DVC knows about the stages: which exist, which are stale and why, and slicing the pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tasks.core.io import read_json
from tasks.core.layout import METRICS_DIR
from tasks.core.stages import STAGES


def declared_stages(root: Path) -> list[str]:
    """Stages dvc.yaml declares, in pipeline order."""
    with open(root / "dvc.yaml", encoding="utf-8") as handle:
        declared = set(yaml.safe_load(handle)["stages"])
    return [stage for stage in STAGES if stage in declared]


def select_stages(
    available: list[str], only: list[str] | None = None, start: str | None = None, end: str | None = None
) -> list[str]:
    """`--only a,b` picks stages; `--from X` / `--to Y` cut the ordered list (both inclusive)."""
    for name in [*(only or []), start, end]:
        if name is not None and name not in available:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(available)}")
    if only and (start or end):
        raise ValueError("--only cannot be combined with --from/--to")
    if only:
        return [stage for stage in available if stage in only]
    first = available.index(start) if start else 0
    last = available.index(end) if end else len(available) - 1
    if first > last:
        raise ValueError(f"--from {start} comes after --to {end}")
    return available[first : last + 1]


def stale_stages(root: Path, stages: list[str] | None = None) -> dict[str, list[str]]:
    """{stage: reasons} for every stale stage among `stages` (all when None); up-to-date ones are absent."""
    from dvc.repo import Repo  # imported here: DVC costs ~0.3 s and only some commands need it

    # DVC resolves a stage's paths against the working directory, not the repo root: work from the root.
    previous = os.getcwd()
    os.chdir(root)
    try:
        with Repo(str(root)) as repo:
            status = repo.status(targets=stages)
    finally:
        os.chdir(previous)
    stale: dict[str, list[str]] = {}
    for name, changes in status.items():
        reasons = stale.setdefault(name.rsplit(":", 1)[-1], [])
        for change in changes:
            if isinstance(change, dict):
                for kind, detail in change.items():
                    shown = (
                        ", ".join(f"{k} {v}" for k, v in detail.items())
                        if isinstance(detail, dict)
                        else detail
                    )
                    reasons.append(f"{kind}: {shown}")
            else:
                reasons.append(str(change))
    return stale


#: Shown first in summaries: the counts a user checks after every run.
HEADLINE_METRICS = (
    "docs_in",
    "docs_out",
    "quarantined",
    "dropped",
    "exact_duplicates",
    "near_duplicates",
    "vocab_size",
    "train_tokens",
    "val_tokens",
    "params",
    "n_layer",
    "n_embd",
    "steps",
    "val_loss",
    "general_val_loss",
    "base_val_loss",
    "trainable_params",
    "unigram_val_loss",
    "mfu",
    "seconds",
)


def metrics_summary(root: Path, stage: str, limit: int = 6) -> str:
    """The first `limit` headline metrics of a stage's last run (per-reason counters left out)."""
    path = root / METRICS_DIR / f"{stage}.json"
    if not path.exists():
        return ""
    metrics = read_json(path)
    headline = [key for key in HEADLINE_METRICS if key in metrics]
    others = [
        key for key in metrics if key not in headline and not key.startswith(("dropped_", "quarantined_"))
    ]
    shown = [
        f"{key}={metrics[key]:.4g}" if isinstance(metrics[key], float) else f"{key}={metrics[key]}"
        for key in headline + others
        if isinstance(metrics[key], (int, float))
    ]
    return ", ".join(shown[:limit])

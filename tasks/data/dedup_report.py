"""The `dedup` stage's explanations of what it removed: the removed-documents schema, a human-sized CSV
of examples, the verified/rejected Jaccard histogram and the LSH S-curve (CSVs for `dvc plots`, a PNG
for MLflow).

Kept apart from the stage (tasks/dedup.py) so the stage reads as its passes; these only report, from
what the stage hands over (paths, similarities, and its params as `LshSettings`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.io import atomic_file
from tasks.data import minhash

JACCARD_BINS = np.round(np.linspace(0.0, 1.0, 21), 2)

#: One row per removed document: what it duplicates, how closely, and its text (nothing is lost).
REMOVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),  # "exact" or "near"
        ("survivor_id", pa.string()),
        ("survivor_source", pa.string()),
        ("jaccard", pa.float64()),
        ("text", pa.large_string()),
    ]
)


class LshSettings(Protocol):
    """The settings the plots read (the dedup stage's params)."""

    threshold: float
    bands: int
    rows: int


def write_plots(
    report_dir: Path, jaccard_csv: Path, scurve_csv: Path, similarity: np.ndarray, settings: LshSettings
) -> None:
    """Verified-Jaccard histogram and the LSH S-curve: CSVs for `dvc plots`, PNGs for MLflow."""
    from matplotlib.figure import Figure

    threshold, bands, rows = settings.threshold, settings.bands, settings.rows

    verified, _ = np.histogram(similarity[similarity >= threshold], bins=JACCARD_BINS)
    rejected, _ = np.histogram(similarity[similarity < threshold], bins=JACCARD_BINS)
    with atomic_file(jaccard_csv) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["jaccard", "verified", "rejected"])
        writer.writerows(zip(JACCARD_BINS[:-1].tolist(), verified.tolist(), rejected.tolist(), strict=True))
    grid = np.round(np.linspace(0.0, 1.0, 101), 2)
    curve = np.asarray(minhash.candidate_probability(grid, bands, rows))
    with atomic_file(scurve_csv) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["jaccard", "p_candidate"])
        writer.writerows((j, f"{p:.6f}") for j, p in zip(grid.tolist(), curve.tolist(), strict=True))

    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    width = JACCARD_BINS[1] - JACCARD_BINS[0]
    left.bar(
        JACCARD_BINS[:-1], rejected, width=width, align="edge", label="rejected (< threshold)", color="#bbb"
    )
    left.bar(
        JACCARD_BINS[:-1], verified, width=width, align="edge", bottom=rejected, label="verified duplicate"
    )
    left.axvline(threshold, color="k", linestyle="--", linewidth=1)
    left.set(title="candidate pairs by Jaccard", xlabel="Jaccard of shingle sets", ylabel="pairs")
    left.legend()
    right.plot(grid, curve)
    right.axvline(threshold, color="k", linestyle="--", linewidth=1)
    right.set(
        title=f"LSH S-curve, {bands} bands × {rows} rows",
        xlabel="Jaccard",
        ylabel="P(candidate)",
        ylim=(0, 1.02),
    )
    figure.tight_layout()
    report_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(report_dir / "jaccard_and_scurve.png", mode="wb") as handle:
        figure.savefig(handle, format="png", dpi=100)


def write_examples(report_dir: Path, limit: int = 200) -> None:
    """A human-sized CSV of removed documents (the full list is reports/dedup/removed/)."""
    table = pq.read_table(report_dir / "removed", columns=REMOVED_SCHEMA.names[:-1])
    with atomic_file(report_dir / "removed_examples.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=table.column_names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table.slice(0, limit).to_pylist())

"""Throughput of the ingest and normalize stages on the bundled corpus (or any corpus directory).

    python benchmarks/ingest_normalize.py [--corpus corpus/en corpus/ja] [--repeat 2] [--workers 1 2]

Runs each stage function directly (no DVC/MLflow overhead) in a scratch project and prints one row per
configuration: wall seconds (best of --repeat), input MB/s, documents/s and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks import ingest, normalize  # noqa: E402
from tasks.core.layout import PARAMS_FILE  # noqa: E402
from tasks.core.params import load_section  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_of(repeat: int, call) -> tuple[float, dict]:
    best, metrics = float("inf"), {}
    for _ in range(repeat):
        started = time.perf_counter()
        metrics = call()
        best = min(best, time.perf_counter() - started)
    return best, metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", nargs="+", default=["corpus/en", "corpus/ja"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="llmpipe-bench-"))
    try:
        for path in args.corpus:
            shutil.copytree(REPO / path, scratch / path)
        ingest_params = dataclasses.replace(
            load_section(ingest.IngestParams, "ingest", REPO / PARAMS_FILE), paths=args.corpus
        )
        normalize_params = load_section(normalize.NormalizeParams, "normalize", REPO / PARAMS_FILE)

        table = Table(title=f"ingest + normalize on {', '.join(args.corpus)} (best of {args.repeat})")
        for column in ("stage", "workers", "docs in", "MB in", "seconds", "MB/s", "docs/s", "peak RSS MB"):
            table.add_column(column, justify="left" if column == "stage" else "right")

        seconds, metrics = best_of(args.repeat, lambda: ingest.run(ingest_params, scratch))
        megabytes = metrics["bytes_out"] / 1e6
        table.add_row(
            "ingest",
            "1",
            f"{metrics['docs_in']:,}",
            f"{megabytes:.1f}",
            f"{seconds:.2f}",
            f"{megabytes / seconds:.1f}",
            f"{metrics['docs_in'] / seconds:,.0f}",
            f"{peak_rss_mb():.0f}",
        )
        for workers in args.workers:
            params = dataclasses.replace(normalize_params, workers=workers)
            seconds, metrics = best_of(args.repeat, lambda params=params: normalize.run(params, scratch))
            megabytes = metrics["chars_in"] / 1e6
            table.add_row(
                "normalize",
                str(workers),
                f"{metrics['docs_in']:,}",
                f"{megabytes:.1f}",
                f"{seconds:.2f}",
                f"{megabytes / seconds:.2f}",
                f"{metrics['docs_in'] / seconds:,.0f}",
                f"{peak_rss_mb():.0f}",
            )
        Console().print(table)
        print("normalize MB counts characters in (≈ bytes for English); peak RSS is this process only.")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

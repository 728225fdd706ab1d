"""Where things live on disk, relative to the project root.

dvc.yaml names the same paths (a test keeps the two in step); every stage resolves them against
`project_root()` so the code works from any working directory inside the project.
"""

from __future__ import annotations

import os
from pathlib import Path

RAW_DIR = Path("data/raw")
NORMALIZED_DIR = Path("data/normalized")
DEDUP_DIR = Path("data/dedup")
TOKENS_DIR = Path("data/tokens")
TOKENIZER_DIR = Path("models/tokenizer")
PLAN_FILE = Path("models/plan.json")
INIT_DIR = Path("models/init")  # the pretrained base pretraining starts from (empty of weights: scratch)
INIT_SOURCE = INIT_DIR / "source.json"  # what `pretrain.init` named and what was imported
BASE_DIR = Path("models/base")
GRU_DIR = Path("models/gru")  # the recurrent baseline (stage `gru`)
DOMAIN_DIR = Path("data/domain")  # the fine-tuning corpus, a sub-project with this same layout
LORA_DIR = Path("models/lora")
QUARANTINE_DIR = Path("data/quarantine")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")
PARAMS_FILE = Path("params.yaml")

#: Everything the tools would otherwise write to $HOME (Prefect db, MLflow store, DVC site cache).
STATE_DIR = Path(".llmpipe")
CPU_RATE_FILE = "cpu-peak-flops.json"  # in STATE_DIR: this machine's measured FLOP/s (plan, pretrain MFU)


def project_root(start: Path | None = None) -> Path:
    """The directory holding params.yaml and dvc.yaml: $LLMPIPE_ROOT, else the nearest ancestor of cwd."""
    if env := os.environ.get("LLMPIPE_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() and (candidate / PARAMS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no llmpipe project (dvc.yaml + params.yaml) in {here} or any parent directory")


def state_dir(root: Path) -> Path:
    return root / STATE_DIR

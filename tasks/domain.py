"""Stage `domain`: the fine-tuning corpus, prepared exactly like the pretraining corpus.

The same stage functions (ingest → normalize → dedup → tokenize) run on `domain.paths` with the settings
of the general sections (`ingest`, `normalize`, `dedup`, `tokenize`), so domain text is cleaned and
deduplicated like the pretraining text, and encoded with the base tokenizer (models/tokenizer/). They
run in a sub-project that is built in a temporary directory and renamed to data/domain/ when complete:

    data/domain/data/raw, data/quarantine, data/normalized, data/dedup, data/tokens   (same layout)
    data/domain/reports/{ingest,normalize,dedup}, data/domain/plots                 (their reports)
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.tokens import TOKENIZER_FILE, TOKENIZER_FILES
from tasks import dedup, ingest, normalize, tokenize
from tasks.core.io import atomic_dir
from tasks.core.layout import DOMAIN_DIR, PARAMS_FILE, TOKENIZER_DIR
from tasks.core.params import ParamsError, StageParams, load_section

TOKENIZER_JSON = TOKENIZER_DIR / TOKENIZER_FILE  # the general tokenizer, copied into the sub-project


@dataclass
class DomainParams(StageParams):
    paths: list[str] = field(default_factory=lambda: ["corpus/domain"])  # like ingest.paths
    text_field: str | None = None  # null: ingest.text_field
    val_fraction: float = 0.1  # share of domain documents held out (tokenize.val_fraction for this corpus)

    def validate(self) -> None:
        if not self.paths:
            raise ParamsError("params.yaml: domain.paths is empty: list the fine-tuning corpus files")
        if not 0 < self.val_fraction < 1:
            raise ParamsError(f"params.yaml: domain.val_fraction must be in (0, 1), got {self.val_fraction}")


def run(params: DomainParams, root: Path) -> dict[str, Any]:
    """Read `domain.paths` + models/tokenizer/, write data/domain/; metrics per step plus a summary."""
    root = Path(root)
    if not (root / TOKENIZER_JSON).is_file():
        raise FileNotFoundError(f"{root / TOKENIZER_JSON}: no tokenizer (run the `tokenizer` stage first)")
    settings = root / PARAMS_FILE
    ingest_params = dataclasses.replace(
        load_section(ingest.IngestParams, "ingest", settings),
        paths=[str((root / path).absolute()) for path in params.paths],  # the sub-project is elsewhere
    )
    if params.text_field is not None:
        ingest_params.text_field = params.text_field
    tokenize_params = dataclasses.replace(
        load_section(tokenize.TokenizeParams, "tokenize", settings), val_fraction=params.val_fraction
    )
    steps: dict[str, Any] = {}
    with atomic_dir(root / DOMAIN_DIR) as sub:
        (sub / TOKENIZER_DIR).mkdir(parents=True)
        for name in TOKENIZER_FILES:  # tokenizer.json and the config naming its special tokens
            if (root / TOKENIZER_DIR / name).is_file():
                shutil.copy2(root / TOKENIZER_DIR / name, sub / TOKENIZER_DIR / name)
        steps["ingest"] = ingest.run(ingest_params, sub)
        steps["normalize"] = normalize.run(
            load_section(normalize.NormalizeParams, "normalize", settings), sub
        )
        steps["dedup"] = dedup.run(load_section(dedup.DedupParams, "dedup", settings), sub)
        steps["tokenize"] = tokenize.run(tokenize_params, sub)
    return {
        "docs": steps["dedup"].get("docs_out", 0),
        "train_tokens": steps["tokenize"]["train_tokens"],
        "val_tokens": steps["tokenize"]["val_tokens"],
        **steps,
    }

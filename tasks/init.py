"""Stage `init`: the weights pretraining starts from, as set by `pretrain.init`.

- `scratch`: nothing to import; models/init/ holds only source.json, and pretraining starts from random
  weights in the shape the plan chooses.
- a pretrained base (`smollm2`, a `.gguf` file, a Hugging Face directory; tasks/core/bases.py): its
  weights become llmpipe's GPT (model/gguf.py, model/hf.py) and are written as an llmpipe checkpoint —
  config.json + model.safetensors (fp32), the base's tokenizer as transformers files (tokenizer.json,
  tokenizer_config.json with its chat template) — plus source.json: what was imported, its md5 and size.

The later stages read models/init/: the tokenizer stage adopts the base's tokenizer instead of training
one, plan sizes continued pretraining for the base, pretrain starts from its weights. DVC tracks the
setting (`pretrain.init`) and models/init/'s content, so the base's md5 is part of every downstream
stage's lineage; the md5 is also an MLflow tag (`llmpipe.base_md5`). A file outside the project that is
replaced in place is not seen by DVC: rerun with `llmpipe run --force --only init`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.tokens import TOKENIZER_FILE, TOKENIZER_FILES
from tasks.core import tracking
from tasks.core.bases import InitSetting, Source, resolve, source_md5
from tasks.core.io import atomic_dir, write_json
from tasks.core.layout import INIT_DIR, INIT_SOURCE
from tasks.core.params import StageParams

BASE_MD5_TAG = "llmpipe.base_md5"


@dataclass(kw_only=True)
class InitParams(StageParams, InitSetting):
    """params.yaml `pretrain.init` (the one key of the pretrain section this stage reads)."""


def _import_hf(source: Source, out: Path) -> Any:
    """An HF directory → GPT weights and config.json + its tokenizer files (tokenizer.json made by
    transformers when the directory only has the slow files, e.g. GPT-2's vocab.json + merges.txt)."""
    from safetensors.torch import save_model

    from model.hf import load_hf

    assert source.path is not None
    model = load_hf(source.path)
    save_model(model, str(out / "model.safetensors"))
    write_json(out / "config.json", model.config.to_dict())
    if (source.path / TOKENIZER_FILE).is_file():
        for name in TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, out / name)
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(source.path)).save_pretrained(str(out))
        if not (out / TOKENIZER_FILE).is_file():
            raise ValueError(
                f"{source.path}: its tokenizer cannot be saved as tokenizer.json (not a fast one)"
            )
    return model.config


def run(params: InitParams, root: Path) -> dict[str, Any]:
    """Resolve `pretrain.init`, import the base into models/init/, return what was imported."""
    root = Path(root)
    source = resolve(params.init, root)
    started = time.perf_counter()
    with atomic_dir(root / INIT_DIR) as out:
        record: dict[str, Any] = {"init": params.init, "kind": source.kind}
        if source.kind != "scratch":
            assert source.path is not None
            if source.kind == "gguf":
                from model.gguf import import_gguf

                checkpoint = import_gguf(source.path, out)
                metadata = {key: value for key, value in checkpoint.metadata.items() if key != "file"}
                config, record["gguf"] = checkpoint.config, metadata
            else:
                config = _import_hf(source, out)
            from model.flops import count_params

            record |= {
                # no absolute path: models/init/ is the same on every machine for the same base
                "name": source.name or source.path.name,
                "file": source.path.name,
                "md5": source_md5(source),
                "bytes": sum(p.stat().st_size for p in [source.path, *source.path.rglob("*")] if p.is_file()),
                "params": count_params(config).total,
                "config": config.to_dict(),
            }
        write_json(out / INIT_SOURCE.name, record)
    seconds = time.perf_counter() - started
    if source.kind == "scratch":
        print("init: pretrain.init is scratch: pretraining starts from random weights")
        return {"kind": source.kind, "params": 0}
    tracking.set_tags({BASE_MD5_TAG: record["md5"], "llmpipe.base": params.init})
    print(f"init: imported {record['name']} ({record['params']:,} parameters) in {seconds:.1f} s")
    return {
        "kind": source.kind,
        "params": record["params"],
        "vocab_size": record["config"]["vocab_size"],
        "n_layer": record["config"]["n_layer"],
        "n_embd": record["config"]["n_embd"],
        "context": record["config"]["block_size"],
        "source_mb": round(record["bytes"] / 1e6, 1),
        "import_seconds": round(seconds, 2),
    }

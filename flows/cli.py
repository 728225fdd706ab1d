"""`llmpipe` command line: run the pipeline, run one stage, see what is stale, use the model.

llmpipe run [--only dedup] [--from X] [--to Y] [--force] [-S section.key=value ...]
llmpipe stage NAME          # what dvc.yaml's `cmd` calls
llmpipe server              # a Prefect server on 127.0.0.1 (its database in .llmpipe/prefect)
llmpipe serve --cron "0 3 * * *" [--only X] [--force] [--sync]   # the pipeline as a scheduled deployment
llmpipe status              # which stages are stale (from DVC), when they last ran, their last metrics
llmpipe compare [RUN_ID ...] [--last N] [--metric val_bpb] [--promote]   # models across runs
llmpipe plan [--flops 1e18 | --gpu h100 --gpus 8 --hours 24 --mfu 0.4] [--price 2.5] [--json]
llmpipe deps [--write]       # dvc.yaml code deps vs the import graph
llmpipe export-hf CHECKPOINT OUT_DIR   # a transformers directory (GPT-2 or Llama layout)
llmpipe pull smollm2         # fetch a pretrained base into the local cache once (then pretrain.init: smollm2)
llmpipe generate --prompt "The movie was full of" [--strategy greedy|beam|sample] [--show-probs] ...
llmpipe chat [--system "You are terse."] [--adapter models/lora]   # /reset, /quit
"""

from __future__ import annotations

import importlib
import sys

from flows.cli_app import app, errors

#: The modules whose commands register on `app` when imported, in the order `llmpipe --help` lists them.
COMMAND_MODULES = ("flows.cli_pipeline", "flows.cli_inspect", "flows.cli_model")
for module in COMMAND_MODULES:
    importlib.import_module(module)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
